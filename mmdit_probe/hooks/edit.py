"""``Edit``: the public base class of every attention-level change, and ``Observer``.

Subclass :class:`Edit` and override any hook; the defaults change nothing. Pass instances to
:func:`mmdit_probe.intervene` beside the built-in specs (which are implemented as Edits too).

>>> class SelfAndText(mp.Edit):          # PAG's perturbation, written by hand
...     def edit_attention(self, call, q, k, v, out, lse): ...
>>> with mp.intervene(pipe, SelfAndText(layers=[2])):
...     pipe(prompt)

Tensors are per head: ``q, k, v [B, H, N, D]`` over the joint sequence in the model's order,
``out [B, H, N, D]``, ``lse [B, H, N]`` (fp32, natural log); ``call`` is the
:class:`~mmdit_probe.hooks.AttentionCall` (site, :class:`~mmdit_probe.context.CallContext`, slices).
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from ..selection import as_indices
from .sites import AttentionCall, Site

_HOOKS = ("edit_qkv", "edit_attention", "edit_heads", "edit_streams", "observed_qk")


class Edit:
    """Base class for attention edits (all hooks no-ops).

    Args:
        layers: blocks to apply to (None = all).
        attentions: ``"attn"`` (joint attention) and/or ``"attn2"`` (SD3.5's image-only attention).
    """

    overrides: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.overrides = frozenset(h for h in _HOOKS if getattr(cls, h) is not getattr(Edit, h))

    def __init__(self, layers: int | Iterable[int] | None = None, attentions: str | Iterable[str] = ("attn",)):
        self.layers = as_indices(layers, "layers", owner=type(self).__name__)
        self.attentions = (attentions,) if isinstance(attentions, str) else tuple(attentions)

    def applies_to(self, site: Site) -> bool:
        """Whether this edit runs at ``site``."""
        return site.attention in self.attentions and (self.layers is None or site.layer in self.layers)

    @property
    def needs_lse(self) -> bool:
        """True when :meth:`edit_attention` is overridden (the processor then runs the LSE kernel)."""
        return "edit_attention" in self.overrides

    def edit_qkv(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Change ``q, k, v`` before the kernel; returns ``(q, k, v)``."""
        return q, k, v

    def edit_attention(self, call: AttentionCall, q, k, v, out: torch.Tensor, lse: torch.Tensor):
        """Change the attention output and its LSE; returns ``(out, lse)``."""
        return out, lse

    def edit_heads(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Change per-head outputs ``out [B, H, N, D]`` before the heads are merged."""
        return out

    def edit_streams(self, call: AttentionCall, image: torch.Tensor, text: torch.Tensor | None):
        """Change the projected stream outputs ``image [B, N_img, C]``, ``text [B, N_txt, C]`` (None on attn2)."""
        return image, text

    def observed_qk(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor):
        """The ``q, k`` observers see (an edit that forbids query/key pairs encodes that here)."""
        return q, k


class Observer(Protocol):
    """Sees every attention call of the sites it is attached to (the recorder is one)."""

    def observe(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor, lse: torch.Tensor) -> None: ...
