"""The explorer page's data from an ablation sweep table (:func:`mmdit_probe.sweep`: columns prompt, seed,
spec, spec_index, metric, step, value; ``layer`` / ``quadrant`` / ``head`` are read from the spec names
when the table lacks them). Spreads are mean ± s.d. over seeds and prompts, clipped to the metric's range,
as in :func:`mmdit_probe.plot.effect_by_layer`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


REQUIRED = ("spec", "metric", "value")
SPEC_COLUMNS = {"layer": r"\bblocks? (\d+)\b", "quadrant": r"knock out (\S+->\S+)", "head": r"\bheads? (\d+)\b"}


def read_sweep(path: str | Path) -> Any:
    """A sweep table from CSV (as :func:`mmdit_probe.sweep` writes it) or parquet."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep table at {path}")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, na_values={"step": [""], "value": ["", "nan", "NaN"]})


def with_spec_columns(df: Any) -> Any:
    """Add ``layer`` / ``quadrant`` / ``head`` read from the spec names, where every spec names one."""
    specs = df["spec"].astype(str)
    for col, pattern in SPEC_COLUMNS.items():
        if col in df.columns:
            continue
        found = specs.str.findall(pattern)
        if len(found) and found.map(len).eq(1).all():
            vals = found.str[0]
            df = df.assign(**{col: vals.astype(int) if col != "quadrant" else vals})
    return df


def _levels(df: Any, col: str) -> list:
    if col == "spec":
        return list(df.sort_values("spec_index", kind="stable")["spec"].drop_duplicates()) if "spec_index" in df else \
            list(dict.fromkeys(df["spec"]))
    vals = df[col].dropna()
    return sorted(vals.unique().tolist()) if vals.dtype.kind in "iuf" else list(dict.fromkeys(vals))


def _final(d: Any) -> Any:
    """One value per run: rows without a step, else the last step."""
    if "step" not in d.columns:
        return d
    no_step = d[d["step"].isna()]
    return no_step if len(no_step) else d[d["step"] == d["step"].max()]


def sweep_data(df: Any, title: str | None = None) -> dict:
    """Everything the sweep page shows, JSON-able: per final metric the effect by layer (or by spec),
    split by quadrant/head when present, with seed points; per step metric one curve per ablation."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"not a sweep table: missing column(s) {missing}; expected prompt, seed, spec, spec_index, "
                         "metric, step, value (from mmdit_probe.sweep)")
    df = with_spec_columns(df)
    x = "layer" if "layer" in df.columns else "spec"
    hue = next((c for c in ("quadrant", "head") if c in df.columns), None)
    final: dict[str, Any] = {}
    per_step: dict[str, Any] = {}
    for metric in dict.fromkeys(df["metric"]):
        d = df[df["metric"] == metric]
        has_steps = "step" in d.columns and d["step"].notna().any()
        if has_steps:
            per_step[metric] = _step_series(d[d["step"].notna()], metric, x, hue)
        if not has_steps or d["step"].isna().any():
            final[metric] = _final_series(_final(d), metric, x, hue)
    prompts = list(dict.fromkeys(df["prompt"].astype(str))) if "prompt" in df else []
    seeds = sorted(df["seed"].unique().tolist()) if "seed" in df else []
    return {"kind": "sweep", "title": title,
            "info": {"prompts": " | ".join(prompts), "seeds": ", ".join(map(str, seeds)),
                     "ablations": int(df["spec"].nunique()), "rows": int(len(df))},
            "x": x, "hue": hue, "x_levels": [str(v) for v in _levels(df, x)], "final": final, "per_step": per_step,
            "notes": [] if final else ["No final-output metrics in this table."]}


def _final_series(d: Any, metric: str, x: str, hue: str | None) -> dict:
    from ..plot.ablation import metric_range, spread  # the figures' own: page and PNG agree (loads matplotlib)

    xs = _levels(d, x)
    series = []
    for level in (_levels(d, hue) if hue else [None]):
        sub = d if level is None else d[d[hue] == level]
        stats = [spread(sub.loc[sub[x] == v, "value"], metric) for v in xs]
        mean, lo, hi = (np.array(a, dtype=float) for a in zip(*stats))
        pts = sub[sub[x].isin(xs)]
        series.append({"name": None if level is None else str(level), "x": [str(v) for v in xs], "mean": _sig(mean),
                       "lo": _sig(lo), "hi": _sig(hi), "specs": [_spec_of(sub, x, v) for v in xs],
                       "points": {"x": [str(v) for v in pts[x]], "y": _sig(pts["value"].to_numpy(float)),
                                  "text": [_point_label(r) for r in pts.to_dict("records")]}})
    n_runs = d.groupby([x] + ([hue] if hue else [])).size().max() if len(d) else 0
    return {"series": series, "range": [_finite(v) for v in metric_range(metric)], "runs_per_x": int(n_runs)}


def _step_series(d: Any, metric: str, x: str, hue: str | None) -> dict:
    from ..plot.ablation import spread

    series = []
    for spec in _levels(d, "spec"):
        sub = d[d["spec"] == spec]
        steps = sorted(sub["step"].dropna().unique().tolist())
        stats = [spread(sub.loc[sub["step"] == s, "value"], metric) for s in steps]
        mean, lo, hi = (np.array(a, dtype=float) for a in zip(*stats))
        first = sub.iloc[0]
        series.append({"spec": str(spec), "x": str(first[x]), "hue": None if hue is None else str(first[hue]),
                       "steps": [int(s) for s in steps], "mean": _sig(mean), "lo": _sig(lo),
                       "hi": _sig(hi)})
    return {"series": series}


def _spec_of(d: Any, x: str, v: Any) -> str:
    specs = list(dict.fromkeys(d.loc[d[x] == v, "spec"].astype(str)))
    return " / ".join(specs[:3]) + (" …" if len(specs) > 3 else "")


def _point_label(row: dict) -> str:
    return f"seed {row.get('seed', '?')}, {row.get('prompt', '')!s}"[:80]


def _sig(a: Any) -> list:
    """Numbers to 6 significant digits (metrics span 1e-6 … 1e2), NaN as None."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None for v in np.asarray(a, dtype=float).ravel()]


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None
