"""Flux.2 probe processors: what diffusers' ``Flux2AttnProcessor`` (double-stream blocks) and
``Flux2ParallelSelfAttnProcessor`` (single-stream blocks) compute, with observer and edit points.

Projections, qk-norm, the ``[text, image]`` join and RoPE are diffusers' own functions in the
processors' order; the kernel is ``dispatch_attention_fn`` (called exactly as diffusers calls it)
when nothing observes or edits, and the fused LSE kernel on the same ``[B, H, S, D]`` view otherwise
(the kernel the native backend's SDPA runs). Single-stream blocks receive the already-joined
sequence; its text length comes from the call context.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

from .base import Site
from .hooked import HookedProcessor


class _Flux2Probe(HookedProcessor):
    """Shared kernel step of the two Flux.2 probe processors."""

    def __init__(self, site: Site, controller: Any, original: Any):
        super().__init__(site, controller)
        self._attention_backend = original._attention_backend
        self._parallel_config = original._parallel_config

    def _kernel(self, query, key, value, attention_mask, n_text: int | None) -> torch.Tensor:
        """``query, key, value [B, S, H, D]`` (normed, rotated, joined) → ``[B, S, H·D]`` in ``query``'s dtype.

        ``n_text``: the text length of the joined sequence (None: read it from the call context).
        """
        if self.edits or self.needs_lse:
            if attention_mask is not None:
                _refuse_mask()
            n_text = self._context_text() if n_text is None else n_text
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D], the view SDPA receives
            out = self.attention(query.shape[1] - n_text, n_text, q, k, v).transpose(1, 2)
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        return out.flatten(2, 3).to(query.dtype)

    @torch.compiler.disable
    def _context_text(self) -> int:
        return self.controller.current_context().n_text


class Flux2ProbeProcessor(_Flux2Probe):
    """Drop-in for ``Flux2AttnProcessor`` (double-stream blocks: ``[text, image]`` joined in the kernel)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        n_text = 0
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            n_text = encoder_query.shape[1]
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._kernel(query, key, value, attention_mask, n_text)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            if self.edits:
                hidden_states, encoder_hidden_states = self._edit_streams(
                    hidden_states.shape[1], encoder_hidden_states.shape[1], hidden_states, encoder_hidden_states)
            return hidden_states, encoder_hidden_states
        if self.edits:
            hidden_states, _ = self._edit_streams(hidden_states.shape[1], 0, hidden_states, None)
        return hidden_states


class Flux2ParallelProbeProcessor(_Flux2Probe):
    """Drop-in for ``Flux2ParallelSelfAttnProcessor`` (single-stream blocks: attention and MLP in parallel).

    Stream edits see the joined attention output ``[B, S, H·D]`` before the fused output projection
    (the MLP half still runs).
    """

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._kernel(query, key, value, attention_mask, None)
        if self.edits:
            hidden_states, _ = self._edit_streams(hidden_states.shape[1], 0, hidden_states, None)

        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        return attn.to_out(hidden_states)


def _refuse_mask() -> None:
    raise NotImplementedError("mmdit_probe records Flux.2 attention without an attention mask (as Flux2Pipeline runs "
                              "it); this call passed attention_mask")
