"""``ProbeProcessor``: computes exactly what diffusers' ``JointAttnProcessor2_0`` (or, after
``fuse_qkv_projections()``, ``FusedJointAttnProcessor2_0``) computes — same ops, same order, same
kernel — and shows per-head ``q, k, v``, output and log-sum-exp to observers and lets
:class:`~mmdit_probe.Edit` s change them (the machinery is :class:`~.hooked.HookedProcessor`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..layout import stream_slices
from .base import Site
from .hooked import HookedProcessor


def _heads(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


class ProbeProcessor(HookedProcessor):
    """Drop-in for ``JointAttnProcessor2_0`` with observer and edit points (see :class:`~mmdit_probe.Edit`)."""

    def __init__(self, site: Site, controller: Any, fused: bool = False):
        super().__init__(site, controller)
        self.fused = fused  # replaces FusedJointAttnProcessor2_0 (after fuse_qkv_projections): its ops, its order

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        if self.fused:
            return self._fused(attn, hidden_states, encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query, key, value = (_heads(t, batch_size, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n_text = 0
        order = self.controller.order
        if encoder_hidden_states is not None:
            eq = _heads(attn.add_q_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            ek = _heads(attn.add_k_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            ev = _heads(attn.add_v_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            n_text = eq.shape[2]
            streams = {"image": (query, key, value), "text": (eq, ek, ev)}
            query, key, value = (torch.cat([streams[s][i] for s in order], dim=2) for i in range(3))

        return self._attend(attn, batch_size, head_dim, residual.shape[1], n_text, query, key, value, encoder_hidden_states)

    def _fused(self, attn, hidden_states, encoder_hidden_states):
        """``FusedJointAttnProcessor2_0``'s projections: one ``to_qkv`` / ``to_added_qkv`` matmul, no qk-norm."""
        batch_size, n_image = hidden_states.shape[:2]
        parts = [torch.split(attn.to_qkv(hidden_states), attn.to_qkv.out_features // 3, dim=-1)]
        if encoder_hidden_states is not None:
            parts.append(torch.split(attn.to_added_qkv(encoder_hidden_states), attn.to_added_qkv.out_features // 3, dim=-1))
        streams = dict(zip(("image", "text"), parts))
        order = [s for s in self.controller.order if s in streams]
        joined = [torch.cat([streams[s][i] for s in order], dim=1) for i in range(3)]
        head_dim = joined[1].shape[-1] // attn.heads
        query, key, value = (_heads(t, batch_size, attn.heads, head_dim) for t in joined)
        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        return self._attend(attn, batch_size, head_dim, n_image, n_text, query, key, value, encoder_hidden_states)

    def _attend(self, attn, batch_size, head_dim, n_image, n_text, query, key, value, encoder_hidden_states):
        """Kernel, edits, observers, head merge and output projections (shared by both projection paths)."""
        order = self.controller.order
        out = self.attention(n_image, n_text, query, key, value)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            parts = stream_slices(order, n_image, n_text)
            hidden_states, encoder_hidden_states = hidden_states[:, parts["image"]], hidden_states[:, parts["text"]]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if self.edits:
            hidden_states, encoder_hidden_states = self._edit_streams(n_image, n_text, hidden_states, encoder_hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
