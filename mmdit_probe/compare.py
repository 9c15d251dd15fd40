"""Compare two recorded runs (or models): ``compare(a, b)`` → differences ``b − a`` and ratios ``b / a``.

Typical pairs: T5 present vs omitted, the CFG ``uncond`` vs ``cond`` branch (:func:`branch_view`),
a transformer vs the same transformer with a LoRA adapter (:func:`lora_parameter_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .named import Stat
from .result import AttentionResult

__all__ = ["Comparison", "LoraCounts", "compare", "branch_view", "plot_difference", "lora_parameter_counts"]


@dataclass(frozen=True)
class Comparison:
    """Two statistics with identical dims and coords; ``difference = b − a``, ``ratio = b / a``."""

    a: Stat
    b: Stat
    stat: str = "mass"
    labels: tuple[str, str] = ("a", "b")

    @property
    def difference(self) -> Stat:
        return Stat(self.b.values - self.a.values, self.a.dims, dict(self.a.coords), self._shared_aux())

    @property
    def ratio(self) -> Stat:
        return Stat(self.b.values / self.a.values, self.a.dims, dict(self.a.coords), self._shared_aux())

    def _shared_aux(self) -> dict:
        return {k: v for k, v in self.a.aux.items() if self.b.aux.get(k) == v}

    def to_dataframe(self, dropna: bool = True):
        """One row per entry: dims, aux coords (``…_a``/``…_b`` where they differ), ``a, b, difference, ratio``."""
        import numpy as np

        df = Stat(self.a.values, self.a.dims, dict(self.a.coords), self._shared_aux()).to_dataframe("a", dropna=False)
        for name, (dim, vals) in self.a.aux.items():
            if name not in self._shared_aux():
                labels = {lab: i for i, lab in enumerate(self.a.labels(dim))}
                idx = df[dim].map(labels).to_numpy()
                other = self.b.aux.get(name, (dim, (None,) * len(labels)))[1]
                df[f"{name}_{self.labels[0]}"] = np.asarray(vals, dtype=object)[idx]
                df[f"{name}_{self.labels[1]}"] = np.asarray(other, dtype=object)[idx]
        b = self.b.values.detach().double().cpu().numpy().ravel()
        df["b"] = b
        df["difference"] = df["b"] - df["a"]
        with np.errstate(divide="ignore", invalid="ignore"):
            df["ratio"] = df["b"] / df["a"]
        if dropna:
            df = df[~(df["a"].isna() & df["b"].isna())].reset_index(drop=True)
        return df

    def __repr__(self) -> str:
        return f"Comparison({self.stat}: {self.labels[1]} − {self.labels[0]}, dims {self.a.dims}, shape {tuple(self.a.values.shape)})"


@dataclass(frozen=True)
class LoraCounts:
    """Parameter counts of a model with adapters, as LoRA users report them."""

    trainable: int
    total: int
    lora: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {self.trainable_percent:.4f}")


def _as_stat(x: AttentionResult | Stat, stat: str) -> Stat:
    return x if isinstance(x, Stat) else x.stat(stat)


def _check_aligned(a: Stat, b: Stat, ignore_aux: Sequence[str]) -> None:
    if a.dims != b.dims:
        raise ValueError(f"dims differ: a has {a.dims}, b has {b.dims}; select or average dims first "
                         f"(e.g. .sel(attention='attn') or .mean('head')) so both have the same dims")
    for dim in a.dims:
        la, lb = a.labels(dim), b.labels(dim)
        if la != lb:
            common = [x for x in la if x in lb]
            how = (f"select the common entries on both, e.g. .sel({dim}={common!r})" if common else
                   f"the two have no {dim!r} entry in common")
            if dim == "step":
                how += "; runs with different step counts are compared by noise level with mmdit_probe.steps.interpolate_at_sigmas"
            if dim == "batch":
                how += "; to compare CFG branches use branch_view(result, 'uncond') / branch_view(result, 'cond')"
            raise ValueError(f"dim {dim!r} does not match: a has {len(la)} entries {list(la)[:8]}, "
                             f"b has {len(lb)} entries {list(lb)[:8]}; {how}")
    for name in set(a.aux) | set(b.aux):
        if name in ignore_aux:
            continue
        va, vb = a.aux.get(name), b.aux.get(name)
        if va is None or vb is None or va[0] != vb[0] or not _close(va[1], vb[1]):
            raise ValueError(f"coordinate {name!r} does not match: a has {va}, b has {vb}. The runs are not "
                             f"aligned (e.g. a different scheduler or step count); pass ignore_aux=({name!r},) to "
                             f"compare anyway, or align them by sigma (mmdit_probe.steps.interpolate_at_sigmas)")


def _close(x: Sequence, y: Sequence) -> bool:
    if len(x) != len(y):
        return False
    for u, v in zip(x, y):
        if isinstance(u, (int, float)) and isinstance(v, (int, float)):
            if abs(float(u) - float(v)) > 1e-6 * max(1.0, abs(float(u))):
                return False
        elif u != v:
            return False
    return True


def compare(
    result_a: AttentionResult | Stat,
    result_b: AttentionResult | Stat,
    stat: str = "mass",
    *,
    labels: tuple[str, str] = ("a", "b"),
    ignore_aux: Sequence[str] = ("branch",),
) -> Comparison:
    """Compare statistic ``stat`` of two results with identical dims and coordinates.

    Raises ``ValueError`` naming the first dim / coordinate that differs and how to align it.
    Aux coordinates in ``ignore_aux`` (by default the CFG ``branch`` names) may differ.
    """
    a, b = _as_stat(result_a, stat), _as_stat(result_b, stat)
    _check_aligned(a, b, ignore_aux)
    return Comparison(a, b, stat, tuple(labels))


def branch_view(result: AttentionResult, branch: str) -> AttentionResult:
    """The batch rows of one branch (``"uncond"``, ``"cond"``, ``"slg"``, ``"perturbed"``), renumbered ``0…``.

    ``result.sel(branch=branch)`` (statistics, layouts and full maps alike) with rows relabelled, so
    the branches of one run are comparable with :func:`compare`.
    """
    out = result.sel(branch=branch).renumbered()
    return AttentionResult(out.stats, out.maps, out.map_meta, out.layouts, {**result.meta, "branch": branch})


def plot_difference(
    comparison: Comparison,
    *,
    branch: str | None = "cond",
    attention: str = "attn",
    title: str | None = None,
    cmap: str = "RdBu_r",
):
    """Difference quadrant map: one panel per quadrant (query → key), layer × step, mean over heads.

    Diverging colormap centred at 0 with symmetric limits (red: ``b`` attends more).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    d = comparison.difference
    if "attention" in d.dims:
        d = d.sel(attention=attention)
    if branch is not None and "branch" in d.aux:
        dim, names = d.aux["branch"]
        rows = [d.labels(dim)[i] for i, b in enumerate(names) if b == branch]
        if not rows:
            raise KeyError(f"branch {branch!r} not in the comparison; branches: {sorted(set(names))}")
        d = d.sel(**{dim: rows})
    d = d.mean(*[x for x in ("batch", "head") if x in d.dims])
    queries, keys = d.labels("query"), d.labels("key")
    vals = d.values.detach().double().cpu()
    finite = vals[torch.isfinite(vals)]
    lim = float(finite.abs().max()) if finite.numel() else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-(lim or 1e-12), vmax=lim or 1e-12)
    fig, axes = plt.subplots(len(queries), len(keys), squeeze=False, figsize=(3.4 * len(keys), 2.8 * len(queries)),
                             constrained_layout=True)
    im = None
    for r, q in enumerate(queries):
        for c, k in enumerate(keys):
            panel = d.sel(query=q, key=k)
            m = panel.values.detach().double().cpu().numpy()
            if panel.dims.index("layer") > panel.dims.index("step"):
                m = m.T  # rows = layers
            ax = axes[r, c]
            im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, norm=norm, aspect="auto", origin="lower")
            ax.set_title(f"{q} → {k}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("layer")
            steps, layers = panel.labels("step"), panel.labels("layer")
            ax.set_xticks(range(len(steps)))
            ax.set_xticklabels([str(s) for s in steps], fontsize=7)
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels([str(l) for l in layers], fontsize=7)
    la, lb = comparison.labels
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"{comparison.stat}: {lb} − {la}")
    fig.suptitle(title or f"{comparison.stat} difference ({lb} − {la}), {attention}"
                 + (f", {branch} branch" if branch and "branch" in comparison.difference.aux else ""), fontsize=10)
    return fig


def lora_parameter_counts(model: torch.nn.Module) -> LoraCounts:
    """Trainable (``requires_grad``) vs all parameters, and how many belong to LoRA layers.

    ``str()`` gives peft's ``print_trainable_parameters`` line:
    ``trainable params: X || all params: Y || trainable%: Z``.
    """
    trainable = total = lora = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        lora += n if "lora_" in name else 0
    return LoraCounts(trainable, total, lora)
