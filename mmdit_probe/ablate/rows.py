"""``put_rows`` (the row-selective write the ablation hooks share) and ``AblationError``."""

from __future__ import annotations

from typing import Sequence

import torch


class AblationError(ValueError):
    """An ablation spec that does not fit the model, the run or the other specs (raised before compute)."""


def put_rows(t: torch.Tensor, rows: Sequence[int], value: torch.Tensor | float) -> torch.Tensor:
    """``t`` with ``t[rows]`` taken from ``value`` (a tensor shaped like ``t``, or a number).

    Returns a copy; when every row is replaced, ``value`` itself (or a filled tensor).
    """
    rows = list(rows)
    if rows == list(range(t.shape[0])):
        return value if isinstance(value, torch.Tensor) else torch.full_like(t, value)
    out = t.clone()
    idx = torch.as_tensor(rows, dtype=torch.long, device=t.device)
    out[idx] = value[idx].to(t.dtype) if isinstance(value, torch.Tensor) else value
    return out
