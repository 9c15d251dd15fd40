"""``HookedProcessor``: the edit and observer points every family's probe processor shares.

Everything that reads per-call Python state (the call context, edits, observers) runs in
``torch.compiler.disable`` d methods, so ``torch.compile(pipe.transformer)`` compiles once per
input shape: the traced part of a processor sees only tensors and attributes that change when
users attach (``observers``, ``edits``, ``needs_lse``, kept in step by the controller).

Attention masks (Chroma): :meth:`HookedProcessor.attention` takes the mask the model gives the kernel
and runs the kernel with it (bitwise the unhooked output on CPU). Edits that read the LSE
(``edit_attention``) and observers then see ``q, k`` with the mask folded in as 8 trailing
coordinates (:func:`~mmdit_probe.kernels.fold_mask`; ``v`` and ``out`` zero-padded to match for
``edit_attention``), so attention they recompute and statistics they compute are the masked ones;
rows that attend nowhere keep the kernel's output and ``lse = −inf``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import MaskFold, attention_with_lse, default_scale, fold_mask
from .base import AttentionCall, Site


class HookedProcessor:
    """Base of the probe processors: holds the site, the controller, observers and edits."""

    def __init__(self, site: Site, controller: Any):
        self.site = site
        self.controller = controller
        self.observers: tuple[Any, ...] = ()
        self.edits: tuple[Any, ...] = ()
        self.needs_lse = False

    def attention(self, n_image: int, n_text: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Kernel, edits and observers on ``q, k, v [B, H, S, D]``; returns ``out [B, H, S, D]``.

        ``attn_mask``: what the model passes to SDPA (boolean or additive, 4-D). Without observers or
        LSE-reading edits this is SDPA itself; otherwise the fused kernel that SDPA runs, asked for its
        log-sum-exp (bitwise the same output on CPU).
        """
        if self.edits:
            q, k, v = self._edit_qkv(n_image, n_text, q, k, v)
        if self.needs_lse:
            fold = None if attn_mask is None else self._fold(attn_mask, q)  # refuses a non-padding mask first
            out, lse = attention_with_lse(q, k, v, attn_mask=attn_mask)
            if self.edits:
                out, lse = self._edit_attention(n_image, n_text, q, k, v, out, lse, fold)
            if self.observers:
                self._observe(n_image, n_text, q, k, v, out, lse, fold)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        if self.edits:
            out = self._edit_heads(n_image, n_text, out)
        return out

    # ---- per-call Python state: outside traced code -------------------------------------
    def _call(self, n_image: int, n_text: int, q: torch.Tensor, self_only: tuple[int, ...] = ()) -> AttentionCall:
        return AttentionCall(self.site, self.controller.current_context(), n_image, n_text, self.controller.order,
                             default_scale(q), q.shape[1], self_only)

    @torch.compiler.disable
    def _edit_qkv(self, n_image, n_text, q, k, v):
        call = self._call(n_image, n_text, q)
        for e in self.edits:
            q, k, v = e.edit_qkv(call, q, k, v)
        return q, k, v

    @torch.compiler.disable
    def _fold(self, attn_mask: torch.Tensor, q: torch.Tensor) -> MaskFold:
        return fold_mask(attn_mask, default_scale(q), q.shape[-2])

    @torch.compiler.disable
    def _edit_attention(self, n_image, n_text, q, k, v, out, lse, fold: MaskFold | None = None):
        call = self._call(n_image, n_text, q)
        if fold is None:
            for e in self.edits:
                out, lse = e.edit_attention(call, q, k, v, out, lse)
            return out, lse
        editing = [e for e in self.edits if e.needs_lse]  # the others' edit_attention changes nothing
        if not editing:
            return out, lse
        kernel_out, width = out, fold.q_extra.shape[-1]
        q, k = fold.apply(q, k)
        v, out = F.pad(v.float(), (0, width)), F.pad(out, (0, width))
        for e in editing:
            out, lse = e.edit_attention(call, q, k, v, out, lse)
        attends = fold.attends.expand_as(lse)
        out = torch.where(attends.unsqueeze(-1), out[..., : kernel_out.shape[-1]], kernel_out)
        return out, lse.masked_fill(~attends, float("-inf"))

    @torch.compiler.disable
    @torch.no_grad()
    def _observe(self, n_image, n_text, q, k, v, out, lse, fold: MaskFold | None = None):
        """Observers see detached values (statistics never join the autograd graph)."""
        if self.controller.context is None:  # a gradient-checkpointing recomputation: recorded once, in forward
            return
        call = self._call(n_image, n_text, q)
        obs_q, obs_k = (q, k) if fold is None else fold.apply(q, k)
        for e in self.edits:
            obs_q, obs_k = e.observed_qk(call, obs_q, obs_k)
        for o in self.observers:
            o.observe(call, obs_q, obs_k, v, out, lse)

    @torch.compiler.disable
    def _edit_heads(self, n_image, n_text, out):
        call = self._call(n_image, n_text, out)
        for e in self.edits:
            out = e.edit_heads(call, out)
        return out

    @torch.compiler.disable
    def _edit_streams(self, n_image, n_text, image, text):
        call = AttentionCall(self.site, self.controller.current_context(), n_image, n_text, self.controller.order,
                             float("nan"), 0)
        for e in self.edits:
            image, text = e.edit_streams(call, image, text)
        return image, text
