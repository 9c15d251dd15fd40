"""Streaming mean / variance per cell that merges *exactly*: :class:`RunningMoments` and :class:`KeyIndex`.

Welford's update and Chan et al.'s pairwise merge give the mean and variance of a stream in one pass,
but in floating point ``merge(merge(a, b), c)`` and ``merge(a, merge(b, c))`` differ in the last bits,
so a study split over ranks would not give the numbers of a single-process run. Here every value is
instead added *exactly*: ``x`` and ``x²`` (``x²`` as the exact pair ``hi + lo`` of Dekker's product) are
cut into 32-bit integer limbs on the grid ``2**-GRID_BITS`` (``GRID_BITS = 160``: nothing a float32
statistic can hold above ``2**-112`` is lost) and summed as int64. Integer sums do not depend on order,
so any split of the runs, merged in any order, gives bitwise the same sums ``n, Σx, Σx²`` and thus the
same mean and variance; these are then computed once from the exact integers (Python ints, correctly
rounded), the sample variance as ``(n·Σx² − (Σx)²) / (n·(n−1))`` with no cancellation. Memory per cell:
``8 · (1 + 2 · LIMBS)`` bytes. Values must be finite with ``|x| < 2**32``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["RunningMoments", "KeyIndex", "GRID_BITS", "LIMBS", "exact_sums", "limbs"]

GRID_BITS = 160
LIMB_BITS = 32
LIMBS = 7  # 7 x 32 bits = 224 bits: |x| (and x²) < 2**(224 - 160) = 2**64
MAX_ABS = 2.0 ** 32
_SPLIT = 134217729.0  # 2**27 + 1 (Veltkamp)


def limbs(x: np.ndarray) -> np.ndarray:
    """``[LIMBS, n]`` int64 with ``Σ_k limb_k · 2**(32k) == trunc(x · 2**GRID_BITS)`` (sign on every limb)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x) * (2.0 ** GRID_BITS)  # exact: a power-of-two scale
    sign = np.where(x < 0, -1, 1).astype(np.int64)
    out = np.zeros((LIMBS,) + x.shape, dtype=np.int64)
    top = float(a.max()) if a.size else 0.0
    kmax = min(LIMBS - 1, int(np.frexp(top)[1] - 1) // LIMB_BITS) if top >= 1.0 else 0  # higher limbs are 0
    for k in range(kmax, -1, -1):
        scale = 2.0 ** (LIMB_BITS * k)
        q = np.floor(a / scale)  # exact: < 2**32 integers
        a = a - q * scale  # exact: the bits of a below 2**(32k)
        out[k] = q.astype(np.int64) * sign
    return out


def _two_square(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x² == hi + lo`` exactly (Dekker), for finite ``|x| < 2**32``."""
    hi = x * x
    c = _SPLIT * x
    xh = c - (c - x)
    xl = x - xh
    lo = ((xh * xh - hi) + 2.0 * xh * xl) + xl * xl
    return hi, lo


def exact_sums(limb_sums: np.ndarray) -> np.ndarray:
    """Object array of Python ints ``Σ_k limb_k · 2**(32k)`` (the exact sum on the ``2**-GRID_BITS`` grid)."""
    total = np.zeros(limb_sums.shape[1:], dtype=object)
    for k in range(limb_sums.shape[0]):
        total = total + limb_sums[k].astype(object) * (1 << (LIMB_BITS * k))
    return total


class RunningMoments:
    """Count, exact sum and exact sum of squares of a stream of value vectors (one slot per cell).

    ``add(idx, values)`` adds one observation to each cell ``idx[i]`` (distinct indices; NaN values are
    skipped); ``merge(other)`` adds another accumulator (any order, bitwise the same result);
    ``mean`` / ``var`` (sample, ``ddof=1``) / ``std`` read them (NaN where ``n`` is too small).
    """

    def __init__(self, size: int = 0):
        self.n = np.zeros(size, dtype=np.int64)
        self.s1 = np.zeros((LIMBS, size), dtype=np.int64)
        self.s2 = np.zeros((LIMBS, size), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.n)

    def grow(self, size: int) -> None:
        """Make room for ``size`` cells (new cells are empty)."""
        extra = size - len(self.n)
        if extra > 0:
            self.n = np.concatenate([self.n, np.zeros(extra, np.int64)])
            self.s1 = np.concatenate([self.s1, np.zeros((LIMBS, extra), np.int64)], axis=1)
            self.s2 = np.concatenate([self.s2, np.zeros((LIMBS, extra), np.int64)], axis=1)

    def add(self, idx: np.ndarray | None, values: np.ndarray) -> None:
        """One observation per cell ``idx`` (default: cells ``0 … len(values)−1``); NaN = no observation."""
        values = np.asarray(values, dtype=np.float64).ravel()
        idx = np.arange(len(values)) if idx is None else np.asarray(idx, dtype=np.int64).ravel()
        if len(idx) != len(values):
            raise ValueError(f"{len(idx)} cell indices for {len(values)} values")
        keep = ~np.isnan(values)
        idx, values = idx[keep], values[keep]
        if not np.all(np.isfinite(values)) or (len(values) and np.abs(values).max() >= MAX_ABS):
            raise ValueError(f"RunningMoments takes finite values with |x| < 2**32; got {values[~(np.abs(values) < MAX_ABS)][:3]}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("one observation per cell per add(): the cell indices repeat")
        if len(idx) and idx.max() >= len(self.n):
            self.grow(int(idx.max()) + 1)
        hi, lo = _two_square(values)
        self.n[idx] += 1
        self.s1[:, idx] += limbs(values)
        self.s2[:, idx] += limbs(hi) + limbs(lo)

    def merge(self, other: "RunningMoments", index: np.ndarray | None = None) -> "RunningMoments":
        """Add ``other`` in place; its cell ``j`` goes to cell ``index[j]`` (default ``j``)."""
        index = np.arange(len(other)) if index is None else np.asarray(index, dtype=np.int64)
        if len(index) and index.max() >= len(self.n):
            self.grow(int(index.max()) + 1)
        self.n[index] += other.n
        self.s1[:, index] += other.s1
        self.s2[:, index] += other.s2
        return self

    def take(self, order: np.ndarray) -> "RunningMoments":
        """A copy with cells reordered (``order[i]`` = old cell of new cell ``i``)."""
        out = RunningMoments(0)
        out.n, out.s1, out.s2 = self.n[order].copy(), self.s1[:, order].copy(), self.s2[:, order].copy()
        return out

    @property
    def mean(self) -> np.ndarray:
        s1 = exact_sums(self.s1)
        return np.array([float(s / (int(n) << GRID_BITS)) if n else np.nan for s, n in zip(s1, self.n)], dtype=np.float64)

    @property
    def var(self) -> np.ndarray:
        """Sample variance (``ddof=1``), exact up to the final rounding; NaN where ``n < 2``."""
        s1, s2 = exact_sums(self.s1), exact_sums(self.s2)
        out = np.full(len(self.n), np.nan)
        for i, (a, b, n) in enumerate(zip(s1, s2, self.n)):
            n = int(n)
            if n >= 2:
                num = n * b * (1 << GRID_BITS) - a * a  # both on the 2**-(2·GRID_BITS) grid
                out[i] = max(num, 0) / (n * (n - 1) << (2 * GRID_BITS))
        return out

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    # ---- persistence (plain int64 arrays) -------------------------------------------------------
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}n": self.n, f"{prefix}s1": self.s1, f"{prefix}s2": self.s2}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "RunningMoments":
        out = cls(0)
        out.n = np.asarray(arrays[f"{prefix}n"], dtype=np.int64).copy()
        out.s1 = np.asarray(arrays[f"{prefix}s1"], dtype=np.int64).reshape(LIMBS, -1).copy()
        out.s2 = np.asarray(arrays[f"{prefix}s2"], dtype=np.int64).reshape(LIMBS, -1).copy()
        if out.s1.shape[1] != len(out.n) or out.s2.shape[1] != len(out.n):
            raise ValueError("moment arrays of different lengths")
        return out


class KeyIndex:
    """Cells named by key columns (``step, layer, …``), numbered in order of first appearance.

    ``lookup(frame)`` returns the cell number of every row of ``frame`` (its key columns), adding the
    keys not seen before at the end, so numbers never change while a study streams.
    """

    def __init__(self, columns: Sequence[str], frame: Any = None):
        import pandas as pd

        self.columns = tuple(columns)
        empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in self.columns})
        self._frame = empty if frame is None else frame[list(self.columns)].reset_index(drop=True)
        self._index = pd.MultiIndex.from_frame(self._frame) if len(self._frame) else None
        self._last: tuple | None = None  # (key arrays, result) of the last lookup: runs repeat their keys

    def __len__(self) -> int:
        return len(self._frame)

    @property
    def frame(self):
        """The key columns, one row per cell, in cell order."""
        return self._frame

    def lookup(self, frame) -> np.ndarray:
        import pandas as pd

        keys = [frame[c].to_numpy() for c in self.columns]
        if self._last is not None and len(keys[0]) == len(self._last[0][0]) and all(
                np.array_equal(a, b) for a, b in zip(keys, self._last[0])):
            return self._last[1]
        sub = frame[list(self.columns)].reset_index(drop=True)
        mi = pd.MultiIndex.from_frame(sub)
        if self._index is None:
            idx = np.full(len(sub), -1, dtype=np.int64)
        else:
            idx = np.asarray(self._index.get_indexer(mi), dtype=np.int64)
        new = idx < 0
        if new.any():
            fresh = sub[new].drop_duplicates()
            self._frame = pd.concat([self._frame, fresh], ignore_index=True) if len(self._frame) else fresh.reset_index(drop=True)
            self._index = pd.MultiIndex.from_frame(self._frame)
            idx = np.asarray(self._index.get_indexer(mi), dtype=np.int64)
        self._last = (keys, idx)
        return idx

    def sorted_order(self) -> np.ndarray:
        """Cell numbers in canonical (sorted by key columns) order."""
        if not len(self._frame):
            return np.zeros(0, dtype=np.int64)
        return self._frame.sort_values(list(self.columns), kind="mergesort").index.to_numpy()
