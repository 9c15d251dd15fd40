"""``Statistic``: the protocol every recorded statistic follows, built-ins included.

A statistic turns one attention call into a tensor ``[batch, *dims]``; the recorder stacks these
over ``(step, layer, attention, batch)`` and the result, ``to_dataframe()``, ``save``/``load`` treat
a user's statistic exactly like the built-ins.

>>> class QueryNorm(mp.Statistic):
...     name, dims = "query_norm", ("head",)
...     def compute(self, call, q, k, v, lse):
...         return q[:, :, call.image_slice].float().norm(dim=-1).mean(-1)   # [B, H]
>>> with mp.AttentionRecorder(pipe, statistics=[QueryNorm()]) as rec: ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..context import CallContext
    from ..hooks import AttentionCall


class Statistic:
    """Base class: set ``name`` and ``dims``, implement :meth:`compute`.

    ``attentions``: the attention kinds it applies to (``"attn"`` joint, ``"attn2"`` SD3.5's
    image-only). ``to_dataframe()`` names its value column ``value``.
    """

    name: str = ""
    dims: tuple[str, ...] = ()
    attentions: tuple[str, ...] = ("attn", "attn2")

    def coords(self) -> dict[str, tuple]:
        """Labels of (some of) ``dims``, known once recording started (default: integer positions)."""
        return {}

    def begin(self, context: "CallContext") -> None:
        """Called at the start of every transformer call, before any block runs (may raise to refuse it)."""

    def bytes_per_call(self, context: "CallContext", heads: int) -> int:
        """fp32 bytes one attention call adds (for the recorder's budget); 0 = negligible."""
        return 0

    def compute(self, call: "AttentionCall", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                lse: torch.Tensor) -> torch.Tensor | None:
        """``[batch, *dims]`` for this attention call (None: nothing at this call)."""
        raise NotImplementedError(f"{type(self).__name__}.compute")
