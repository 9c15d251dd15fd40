"""Observe the attention of layers where PAG swapped in its own processor during the pipeline call.

``StableDiffusion3PAGPipeline`` installs ``PAGCFGJointAttnProcessor2_0`` / ``PAGJointAttnProcessor2_0``
on its PAG layers at the start of ``__call__`` and restores the previous processors at the end.
:class:`PagObserver` wraps PAG's processor: the output is PAG's own (bitwise), and observers see
the ``q, k`` PAG computes (projections, no qk-norm, ``[image, text]``), with the perturbed rows'
image queries restricted to their own key plus the text keys, as PAG computes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0

from ..kernels import attention_with_lse, default_scale, lse_over_keys
from .sites import AttentionCall, Site

if TYPE_CHECKING:  # pragma: no cover
    from .controller import ProbeController

PAG_PROCESSORS = (PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0)
_ORDER = ("image", "text")  # PAG's processors concatenate [image, text] themselves


class PagObserver:
    """PAG's processor for the output; exact statistics of what it computes for the observers."""

    def __init__(self, site: Site, controller: "ProbeController", inner: Any, observers: tuple[Any, ...]):
        self.site, self.controller, self.inner, self.observers = site, controller, inner, observers

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.observers:
            self._observe(attn, hidden_states, encoder_hidden_states)
        return out

    @torch.compiler.disable
    @torch.no_grad()
    def _observe(self, attn, hs, ehs) -> None:
        ctx = self.controller.current_context()
        b, n_image = hs.shape[:2]
        head_dim = attn.to_k.out_features // attn.heads
        split = lambda t: t.view(b, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
        q = split(torch.cat([attn.to_q(hs), attn.add_q_proj(ehs)], dim=1))
        k = split(torch.cat([attn.to_k(hs), attn.add_k_proj(ehs)], dim=1))
        v = split(torch.cat([attn.to_v(hs), attn.add_v_proj(ehs)], dim=1))
        out, lse = attention_with_lse(q, k, v)
        rows = ctx.rows("perturbed")
        s = default_scale(q)
        if rows:
            r = torch.tensor(rows, dtype=torch.long, device=q.device)
            qi, ki, kt = q[r][:, :, :n_image].float(), k[r][:, :, :n_image].float(), k[r][:, :, n_image:]
            own = s * (qi * ki).sum(-1)
            restricted = torch.logaddexp(own, lse_over_keys(q[r][:, :, :n_image], kt, s).float())
            lse = lse.clone()
            lse_r = lse[r]
            lse_r[:, :, :n_image] = restricted.to(lse.dtype)
            lse[r] = lse_r
        call = AttentionCall(self.site, ctx, n_image, ehs.shape[1], _ORDER, s, attn.heads, tuple(rows))
        for o in self.observers:
            o.observe(call, q, k, v, out, lse)
