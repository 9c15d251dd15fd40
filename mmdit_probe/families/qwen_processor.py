"""``QwenProbeProcessor``: what diffusers' ``QwenDoubleStreamAttnProcessor2_0`` computes, with observer and edit points.

Projections, qk RMS-norms, Qwen's complex RoPE and the ``[text, image]`` join are diffusers' own, in the
processor's order; the kernel is ``dispatch_attention_fn`` (exactly as diffusers calls it) when nothing
observes or edits, and the fused LSE kernel on the same ``[B, H, S, D]`` view otherwise.

Padding mask: with ``encoder_hidden_states_mask`` (a batch of prompts of different token lengths)
diffusers passes the boolean key mask ``[B, 1, 1, S]`` (text padding False) to the kernel; it goes to
:meth:`HookedProcessor.attention` as is, so the kernel runs with it (bitwise the unhooked output on CPU)
and every statistic and LSE-reading edit is over the unmasked keys only.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from .base import Site
from .hooked import HookedProcessor


class QwenProbeProcessor(HookedProcessor):
    """Drop-in for ``QwenDoubleStreamAttnProcessor2_0`` (every Qwen-Image block is double-stream)."""

    def __init__(self, site: Site, controller: Any, original: Any):
        super().__init__(site, controller)
        self._attention_backend = original._attention_backend
        self._parallel_config = original._parallel_config

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                             "Pass encoder_hidden_states_mask to let the processor build the joint mask.")
        mask = None
        if encoder_hidden_states_mask is not None:  # [B, 1, 1, S]: text mask, then every image token
            image_mask = torch.ones((hidden_states.shape[0], hidden_states.shape[1]), dtype=torch.bool,
                                    device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = (p(hidden_states).unflatten(-1, (-1, head_dim))
                                         for p in (attn.to_q, attn.to_k, attn.to_v))
        txt_query, txt_key, txt_value = (p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                                         for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        joint_query = torch.cat([txt_query, img_query], dim=1)  # [B, S, H, D], text first
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        if self.edits or self.needs_lse:
            n_image = joint_query.shape[1] - seq_txt
            q, k, v = (t.transpose(1, 2) for t in (joint_query, joint_key, joint_value))  # the view SDPA receives
            joint_hidden_states = self.attention(n_image, seq_txt, q, k, v, attn_mask=mask).transpose(1, 2)
        else:
            joint_hidden_states = dispatch_attention_fn(
                joint_query, joint_key, joint_value, attn_mask=mask,
                dropout_p=0.0, is_causal=False, backend=self._attention_backend, parallel_config=self._parallel_config)
        joint_hidden_states = joint_hidden_states.flatten(2, 3).to(joint_query.dtype)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        if self.edits:
            img_attn_output, txt_attn_output = self._edit_streams(
                img_attn_output.shape[1], seq_txt, img_attn_output, txt_attn_output)
        return img_attn_output, txt_attn_output
