"""``FluxProbeProcessor``: what diffusers' ``FluxAttnProcessor`` computes, with observer and edit points.

Projections, qk-norm, the ``[text, image]`` join and RoPE are diffusers' own functions, in the
processor's order; the kernel is ``dispatch_attention_fn`` (exactly as diffusers calls it) when
nothing observes or edits, and the fused LSE kernel on the same ``[B, H, S, D]`` view otherwise
(the kernel the native backend's SDPA runs), with the attention mask the native backend would hand
SDPA (Chroma passes one: its T5 padding mask, ``[B, 1, S, S]``). Single-stream blocks receive the
already-joined sequence; its text length comes from the call context.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from .base import Site
from .hooked import HookedProcessor


class FluxProbeProcessor(HookedProcessor):
    """Drop-in for ``FluxAttnProcessor`` (double- and single-stream blocks)."""

    def __init__(self, site: Site, controller: Any, original: Any):
        super().__init__(site, controller)
        self._attention_backend = original._attention_backend
        self._parallel_config = original._parallel_config

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        joint = attn.added_kv_proj_dim is not None
        if joint:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self.edits or self.needs_lse:
            n_text = encoder_query.shape[1] if joint else self._context_text()
            n_image = query.shape[1] - n_text
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D], the view SDPA receives
            mask = sdpa_mask(attention_mask, q, k)
            hidden_states = self.attention(n_image, n_text, q, k, v, mask).transpose(1, 2)
        else:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                  backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            if self.edits:
                hidden_states, encoder_hidden_states = self._edit_streams(
                    hidden_states.shape[1], encoder_hidden_states.shape[1], hidden_states, encoder_hidden_states)
            return hidden_states, encoder_hidden_states
        if self.edits:  # single-stream: the joined attention output, before the block's projection
            hidden_states, _ = self._edit_streams(hidden_states.shape[1], 0, hidden_states, None)
        return hidden_states

    @torch.compiler.disable
    def _context_text(self) -> int:
        return self.controller.current_context().n_text


def sdpa_mask(attention_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The mask diffusers' native backend hands SDPA for ``q, k [B, H, S, D]``: a 2-D ``[B, S_k]`` key mask
    becomes ``[B, 1, 1, S_k]``; any other mask (Chroma's ``[B, 1, S, S]``) goes as it is."""
    if (attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == q.shape[0]
            and attention_mask.shape[1] == k.shape[2]):
        return attention_mask[:, None, None, :]
    return attention_mask
