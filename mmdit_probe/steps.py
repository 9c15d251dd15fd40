"""Step-count study: record runs at several ``num_inference_steps`` and align them by noise level.

Step index ``i`` of a 4-step run and of a 16-step run are different noise levels; what is
comparable is the sigma (flow matching: ``x_t = (1 - σ)·x_0 + σ·noise``, ``timestep = σ ×
num_train_timesteps``). Sigmas are taken from the scheduler, never from the step index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .families import model_blocks, resolve_family
from .record import AttentionRecorder

__all__ = [
    "Schedule", "StepStudy", "schedule", "layer_groups", "step_count_study", "interpolate_at_sigmas",
    "image_convergence", "plot_mass_vs_sigma",
]

GROUP_NAMES = ("early", "middle", "late")


@dataclass(frozen=True)
class Schedule:
    """Timesteps (one per step) and sigmas (one per step plus the final one) of a scheduler."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    mu: float | None = None

    def sigma_of(self, timestep: float) -> float:
        """Sigma of the step whose timestep is nearest to ``timestep``."""
        i = int(np.argmin(np.abs(np.asarray(self.timesteps) - float(timestep))))
        return self.sigmas[i]


@dataclass(frozen=True)
class StepStudy:
    """What :func:`step_count_study` measured: the table, and per step count the result and image."""

    table: Any
    results: Mapping[int, Any] = field(default_factory=dict)
    images: Mapping[int, torch.Tensor] = field(default_factory=dict)
    schedules: Mapping[int, Schedule] = field(default_factory=dict)


def _latent_hw(pipe: Any, height: int | None, width: int | None) -> tuple[int, int]:
    f = pipe.vae_scale_factor
    default = pipe.default_sample_size * f
    return int(height or default) // f, int(width or default) // f


def schedule(pipe: Any, num_inference_steps: int, *, height: int | None = None, width: int | None = None) -> Schedule:
    """The timesteps / sigmas ``pipe`` will use for ``num_inference_steps`` (and this image size).

    Reproduces the pipeline's own ``set_timesteps`` call (its family adapter's ``schedule``) on a deep copy of
    ``pipe.scheduler`` (the pipeline is not touched), with the resolution-dependent ``mu`` where the pipeline uses one.
    """
    timesteps, sigmas, mu = resolve_family(pipe).schedule(pipe, int(num_inference_steps), height, width)
    return Schedule(tuple(timesteps), tuple(sigmas), mu)


def layer_groups(n_layers: int, names: Sequence[str] = GROUP_NAMES) -> dict[int, str]:
    """Split layers ``0..n_layers-1`` into consecutive, near-equal groups (``early``/``middle``/``late``)."""
    parts = np.array_split(np.arange(n_layers), min(len(names), n_layers))
    return {int(l): names[g] for g, part in enumerate(parts) for l in part}


def step_count_study(
    pipe: Any,
    prompt: str,
    step_counts: Sequence[int] = (4, 8, 16),
    seed: int = 0,
    *,
    groups: Sequence[str] = GROUP_NAMES,
    per_head: bool = False,
    return_runs: bool = False,
    **call_kwargs: Any,
):
    """Record ``pipe(prompt, num_inference_steps=n, generator=manual_seed(seed), **call_kwargs)`` per ``n``.

    Returns a tidy DataFrame (``return_runs=True``: a :class:`StepStudy` with it, the results,
    the images and the schedules) with columns ``steps, step, timestep, sigma, layer, layer_group,
    attention, branch, query, key, quadrant, mass`` (mass averaged over heads unless ``per_head``,
    and over the batch rows of a branch). ``sigma`` comes from the scheduler for that step count.
    """
    import pandas as pd


    n_layers = len(model_blocks(pipe))
    gmap = layer_groups(n_layers, groups)
    call_kwargs.setdefault("output_type", "pt")
    frames, results, images, schedules = [], {}, {}, {}
    for n in step_counts:
        n = int(n)
        sched = schedule(pipe, n, height=call_kwargs.get("height"), width=call_kwargs.get("width"))
        with AttentionRecorder(pipe) as rec:
            out = pipe(prompt, num_inference_steps=n, generator=torch.manual_seed(seed), **call_kwargs)
        res = rec.result
        df = res.to_dataframe("mass")
        keys = ["step", "timestep", "layer", "attention", "branch", "query", "key"] + (["head"] if per_head else [])
        df = df.groupby(keys, as_index=False, sort=True)["mass"].mean()
        df.insert(0, "steps", n)
        df.insert(3, "sigma", df["timestep"].map(sched.sigma_of))
        df.insert(5, "layer_group", df["layer"].map(gmap))
        df["quadrant"] = df["query"] + "->" + df["key"]
        frames.append(df)
        results[n], schedules[n] = res, sched
        images[n] = out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(np.asarray(out.images))
    cols = ["steps", "step", "timestep", "sigma", "layer", "layer_group", "attention", "branch", "query", "key",
            "quadrant"] + (["head"] if per_head else []) + ["mass"]
    table = pd.concat(frames, ignore_index=True)[cols]
    if return_runs:
        return StepStudy(table, results, images, schedules)
    return table


def interpolate_at_sigmas(
    df,
    sigmas: Sequence[float] | None = None,
    by: Sequence[str] = ("attention", "branch", "layer_group", "quadrant"),
):
    """Mass of every step count at common sigmas (linear interpolation in sigma).

    Masses are first averaged over the layers (and heads) inside each ``by`` group per recorded
    sigma. ``sigmas=None`` uses the sigmas of the smallest step count that lie inside every run's
    recorded range, so nothing is extrapolated; values outside a run's range are NaN.
    Returns ``by…, sigma, steps, mass``.
    """
    import pandas as pd

    by = [b for b in by if b in df.columns]
    curves = df.groupby(["steps", *by, "sigma"], as_index=False)["mass"].mean()
    if sigmas is None:
        lo = curves.groupby("steps")["sigma"].min().max()
        hi = curves.groupby("steps")["sigma"].max().min()
        fewest = curves[curves["steps"] == curves["steps"].min()]["sigma"].unique()
        sigmas = sorted((s for s in fewest if lo - 1e-9 <= s <= hi + 1e-9), reverse=True)
    grid = np.asarray(sorted(sigmas, reverse=True), dtype=float)
    rows = []
    for key, g in curves.groupby(["steps", *by], sort=True):
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values("sigma")
        x, y = g["sigma"].to_numpy(float), g["mass"].to_numpy(float)
        vals = np.interp(grid, x, y, left=np.nan, right=np.nan)
        for s, v in zip(grid, vals):
            rows.append((*key[1:], float(s), key[0], float(v)))
    return pd.DataFrame(rows, columns=[*by, "sigma", "steps", "mass"])


def image_convergence(images: Mapping[int, torch.Tensor], reference: int | None = None):
    """Distance of each step count's image to the ``reference`` one (default: the most steps).

    ``images`` maps step count to an image tensor in [0, 1] (``output_type="pt"``). Columns:
    ``steps, mse, psnr_db`` (PSNR for a peak of 1; ``inf`` for the reference itself).
    """
    import pandas as pd

    ref_n = max(images) if reference is None else reference
    ref = images[ref_n].double()
    rows = []
    for n in sorted(images):
        mse = float(((images[n].double() - ref) ** 2).mean())
        rows.append((n, mse, float("inf") if mse == 0 else -10.0 * np.log10(mse)))
    return pd.DataFrame(rows, columns=["steps", "mse", "psnr_db"]).assign(reference_steps=ref_n)


def _group_label(df, group: str) -> str:
    layers = sorted(df.loc[df["layer_group"] == group, "layer"].unique())
    if not layers:
        return group
    span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"
    return f"{group} ({span})"


def plot_mass_vs_sigma(
    df,
    *,
    branch: str | None = "cond",
    attention: str = "attn",
    quadrants: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
):
    """Quadrant mass vs sigma, one line per step count; rows = quadrants, columns = layer groups.

    ``df`` is the table of :func:`step_count_study`. The sigma axis runs from 1 (pure noise) on
    the left to 0 (clean) on the right, the direction of sampling.
    """
    import matplotlib.pyplot as plt

    d = df[df["attention"] == attention]
    if branch is not None and "branch" in d:
        if branch not in set(d["branch"]):
            raise KeyError(f"branch {branch!r} not in the table; branches: {sorted(set(d['branch']))}")
        d = d[d["branch"] == branch]
    quadrants = list(quadrants or dict.fromkeys(d["quadrant"]))
    groups = list(groups or [g for g in GROUP_NAMES if g in set(d["layer_group"])] or dict.fromkeys(d["layer_group"]))
    curves = d.groupby(["steps", "layer_group", "quadrant", "sigma"], as_index=False)["mass"].mean()
    step_counts = sorted(curves["steps"].unique())
    fig, axes = plt.subplots(len(quadrants), len(groups), squeeze=False, sharex=True, sharey="row",
                             figsize=figsize or (3.2 * len(groups), 2.3 * len(quadrants)), constrained_layout=True)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(step_counts), 1)))
    for r, quad in enumerate(quadrants):
        for c, group in enumerate(groups):
            ax = axes[r, c]
            for color, n in zip(colors, step_counts):
                g = curves[(curves["steps"] == n) & (curves["layer_group"] == group) & (curves["quadrant"] == quad)]
                ax.plot(g["sigma"], g["mass"], marker="o", ms=3, color=color, label=f"{n} steps")
            ax.set_xlim(1.02, -0.02)
            if r == 0:
                ax.set_title(_group_label(d, group), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{quad}\nmass", fontsize=9)
            if r == len(quadrants) - 1:
                ax.set_xlabel("sigma (noise level)")
    axes[0, -1].legend(fontsize=7, title="num_inference_steps", title_fontsize=7)
    what = f"{branch} branch, " if branch else ""
    fig.suptitle(f"Quadrant mass vs noise level ({what}{attention}, mean over heads and layers in a group)", fontsize=10)
    return fig
