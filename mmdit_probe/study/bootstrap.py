"""Percentile bootstrap over prompts: :func:`bootstrap_mean`.

The resampling unit is the prompt. Input is one value per prompt and cell (the prompt's mean over its
seeds, and over heads etc. averaged away; NaN where the prompt has no value). Each of ``n_boot``
replicates draws ``P`` prompts with replacement (a multinomial count per prompt, from
``numpy.random.default_rng(seed)``, the same draws for every cell so joint statements stay coherent)
and takes the mean over the drawn prompts that have a value. The interval is the ``(1 − level)/2`` and
``(1 + level)/2`` percentiles of the replicates (``numpy.nanquantile``, linear interpolation). Cells
with fewer than 2 prompts get NaN bounds. Percentile intervals under-cover a little for few prompts
(about 93–94 % for a nominal 95 % with 30–50 prompts from a normal population).
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["bootstrap_mean", "resample_counts"]

#: Replicate × cell block size (float64 elements) kept in memory at once.
BLOCK_ELEMENTS = 1 << 22


def resample_counts(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_prompts]`` float64: how often each prompt is drawn in each replicate (rows sum to ``n_prompts``)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_boot).astype(np.float64)


def bootstrap_mean(values: np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, ci_low, ci_high, n)`` per column of ``values`` ``[prompts, cells]`` (NaN = missing).

    ``mean`` is the mean over the prompts that have a value, ``n`` their number.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    n_p, n_c = v.shape
    have = ~np.isnan(v)
    n = have.sum(axis=0)
    filled = np.where(have, v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / n
    low, high = np.full(n_c, np.nan), np.full(n_c, np.nan)
    if n_p == 0 or n_c == 0:
        return mean, low, high, n
    counts = resample_counts(n_p, n_boot, seed)
    q = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    block = max(1, BLOCK_ELEMENTS // n_boot)
    weights = have.astype(np.float64)
    for start in range(0, n_c, block):
        sl = slice(start, start + block)
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = (counts @ filled[:, sl]) / (counts @ weights[:, sl])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicates of sparse cells
            lo_hi = np.nanquantile(reps, q, axis=0)
        low[sl], high[sl] = lo_hi[0], lo_hi[1]
    few = n < 2
    low[few], high[few] = np.nan, np.nan
    return mean, low, high, n
