"""One run → the values a study aggregates: :func:`run_unit` records a run, :func:`extract` reads its
:class:`~mmdit_probe.AttentionResult` into ``(statistic, word, keys, values)`` pieces.

* ``mass`` / ``group_mass`` / ``entropy``: ``result.to_dataframe(stat)``; cells are the statistic's dims
  without ``batch``, plus ``branch`` (``group_mass``'s ``key_group`` is named ``key``). Batch rows of
  one branch (several images per prompt) are averaged.
* ``word_map``: ``result.word_map(word, ...)`` (head mean, over the chosen steps and layers) for every
  word the prompt has, averaged over the batch rows of each branch; cells ``branch, y, x``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["STATISTICS", "DEFAULT_STATISTICS", "extract", "run_unit", "check_statistics"]

STATISTICS = ("mass", "group_mass", "entropy", "word_map")
DEFAULT_STATISTICS = ("mass", "group_mass", "word_map")
RENAME = {"key_group": "key"}


def check_statistics(statistics: Sequence[str] | str) -> tuple[str, ...]:
    stats = (statistics,) if isinstance(statistics, str) else tuple(statistics)
    bad = [s for s in stats if s not in STATISTICS]
    if bad or not stats:
        raise ValueError(f"unknown statistic(s) {bad}; a study aggregates {', '.join(STATISTICS)}")
    return tuple(dict.fromkeys(stats))


def cell_columns(result: Any, stat: str) -> list[str]:
    """Key columns of ``stat``'s cells: its dims without ``batch``, ``branch`` after ``attention``."""
    dims = [d for d in result.stat(stat).dims if d != "batch"]
    at = dims.index("attention") + 1 if "attention" in dims else 0
    dims.insert(at, "branch")
    return [RENAME.get(d, d) for d in dims]


def extract(result: Any, statistics: Sequence[str], word_steps=None, word_layers=None) -> list[tuple]:
    """``[(statistic, word, keys DataFrame, float64 values), ...]`` of one run (``word`` is ``""`` but for word maps)."""
    import pandas as pd

    out = []
    for stat in statistics:
        if stat == "word_map":
            continue
        df = result.to_dataframe(stat).rename(columns=RENAME)
        value = df.columns[-1]
        cols = cell_columns(result, stat)
        if df.groupby("branch")["batch"].nunique().max() > 1:  # several rows of one branch: their mean
            df = df.groupby(cols, sort=False, as_index=False)[value].mean()
        out.append((stat, "", df[cols].reset_index(drop=True), df[value].to_numpy(dtype=np.float64)))
    if "word_map" in statistics and result.words:
        branches = list(result.branches)
        h, w = result.image_grid
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        names = list(dict.fromkeys(branches))
        for word in result.words:
            maps = result.word_map(word, step=word_steps, layer=word_layers).double().cpu().numpy()  # [batch, h, w]
            kept, rows = [], []
            for name in names:  # branches without the word (CFG's uncond: empty prompt) are all NaN: left out
                m = maps[[i for i, b in enumerate(branches) if b == name]]
                if np.isfinite(m).any():
                    with np.errstate(invalid="ignore"):
                        kept.append(name)
                        rows.append(np.nanmean(m, axis=0) if len(m) > 1 else m[0])
            if not kept:
                continue
            keys = pd.DataFrame({"branch": np.repeat(np.array(kept, dtype=object), h * w),
                                 "y": np.tile(yy.ravel(), len(kept)), "x": np.tile(xx.ravel(), len(kept))})
            out.append(("word_map", word, keys, np.concatenate([r.ravel() for r in rows])))
    return out


def facts(result: Any) -> dict:
    """Per-setting facts shared by every run: timesteps by step, image grid, block kinds by layer."""
    st = result.stat("mass")
    kinds = st.aux.get("block_kind", ("layer", ()))[1]
    return {"timesteps": [float(t) for t in result.timesteps], "image_grid": list(result.image_grid or ()),
            "layers": [int(v) for v in st.labels("layer")], "block_kinds": [str(k) for k in kinds]}


def run_unit(pipe: Any, setting: Any, prompt: str, seed: int, call_kwargs: dict, statistics: Sequence[str],
             word_steps=None, word_layers=None) -> tuple[list[tuple], dict]:
    """Record one run of ``prompt`` with ``seed`` under ``setting``; return :func:`extract`'s pieces and :func:`facts`."""
    import torch

    from ..ablate import intervene
    from ..record import AttentionRecorder

    p = setting.pipe if setting.pipe is not None else pipe
    kwargs = {**call_kwargs, **dict(setting.call_kwargs)}
    rec = AttentionRecorder(p, groups="group_mass" in statistics, words="word_map" in statistics,
                            entropy="entropy" in statistics)
    with rec, intervene(p, *setting.specs):
        p(prompt, generator=torch.Generator().manual_seed(int(seed)), output_type="latent", **kwargs)
    res = rec.result
    return extract(res, statistics, word_steps, word_layers), facts(res)
