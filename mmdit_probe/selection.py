"""One normaliser for index selections (layers, heads, steps, batch rows) used by specs, maps and the recorder.

Accepts ``None`` (all), a Python / numpy / 0-d tensor integer, a ``range`` or any iterable of
those; refuses floats (``1.7``), bools, strings and empty selections with a message that names the
fix. With ``n`` it also checks ``0 <= i < n`` (no negative indices: ``-1`` would silently mean
the last head under one name and another under its label).
"""

from __future__ import annotations

import operator
from typing import Any, Iterable


class SelectionError(ValueError):
    """An index selection that is not a set of non-negative integers in range."""


def _one(x: Any, what: str, owner: str) -> int:
    if isinstance(x, bool) or isinstance(x, str):
        raise SelectionError(f"{owner}: {what} must be integer indices, got {x!r}")
    try:
        return operator.index(x)  # int, numpy int, 0-d integer tensor
    except TypeError:
        raise SelectionError(f"{owner}: {what} must be integer indices, got {x!r} ({type(x).__name__})") from None


def as_indices(x: int | Iterable[int] | None, what: str, *, owner: str = "selection", n: int | None = None,
               allow_none: bool = True) -> tuple[int, ...] | None:
    """``x`` as a tuple of distinct ints in first-seen order (``None`` stays ``None`` = all).

    >>> as_indices(np.int64(2), "layers")
    (2,)
    >>> as_indices(range(3), "steps", n=4)
    (0, 1, 2)
    """
    if x is None:
        if not allow_none:
            raise SelectionError(f"{owner}: {what} must be given")
        return None
    if isinstance(x, (str, bytes)):
        raise SelectionError(f"{owner}: {what} must be integer indices, got {x!r}")
    try:
        vals: tuple = (_one(x, what, owner),)
    except SelectionError:
        if not isinstance(x, Iterable) or getattr(x, "ndim", 1) == 0:
            raise
        vals = tuple(_one(i, what, owner) for i in x)
    out = tuple(dict.fromkeys(vals))
    if not out:
        raise SelectionError(f"{owner}: empty {what} selection; pass None for all {what} or at least one index")
    neg = [i for i in out if i < 0]
    if neg:
        raise SelectionError(f"{owner}: {what} {neg} are negative; indices count from 0")
    if n is not None:
        bad = [i for i in out if i >= n]
        if bad:
            raise SelectionError(f"{owner}: {what} {bad} out of range: this model has {what} 0..{n - 1}")
    return out


def fmt_ints(xs: Iterable[int]) -> str:
    """``(0, 1, 2, 5)`` → ``"0-2,5"``."""
    xs = sorted(set(xs))
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)
