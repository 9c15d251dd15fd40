"""Small tensor helpers shared by the ablation hooks, and ``AblationError``."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class AblationError(ValueError):
    """An ablation spec that does not fit the model, the run or the other specs (raised before compute)."""


def block_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden_states, encoder_hidden_states)`` of a ``JointTransformerBlock`` call."""
    hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    ehs = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (args[1] if len(args) > 1 else None)
    return hs, ehs


def replace_block_input(args: tuple, kwargs: dict, name: str, index: int, value: Any) -> tuple[tuple, dict]:
    """Copies of ``(args, kwargs)`` with input ``name`` (positional ``index``) set to ``value``."""
    kwargs = dict(kwargs)
    if name in kwargs or len(args) <= index:
        kwargs[name] = value
        return args, kwargs
    args = tuple(value if i == index else a for i, a in enumerate(args))
    return args, kwargs


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
