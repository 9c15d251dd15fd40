"""What a recorder accumulates during a run, and its assembly into an :class:`AttentionResult`.

Rows of the result are *row slots*: one per distinct ``(branch, index within branch)`` seen in any
call (``uncond 0, cond 0, slg 0, …``); steps are *step slots*: one per distinct ``(run, step)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import warnings

import torch

from .context import CallContext
from .hooks import Site
from .layout import TokenLayout
from .named import Stat
from .result import AttentionResult

LEAD_DIMS = ("step", "layer", "attention", "batch")


class Recording:
    """Per-call records of one recorder: ``(step slot, site, row slots, values)`` plus full maps."""

    def __init__(self, statistics: Sequence[Any], controller: Any):
        self.statistics = tuple(statistics)
        self.controller = controller
        self.context: CallContext | None = None
        self.step_keys: dict[tuple[int, int], int] = {}
        self.timesteps: list[float | torch.Tensor] = []
        self.runs: list[int] = []
        self.row_keys: dict[tuple[str, int], int] = {}
        self.row_branch: list[str] = []
        self.row_prompt: list[int] = []
        self.row_layout: list[TokenLayout | None] = []
        self.row_slots: tuple[int, ...] = ()
        self.step_slot = -1
        self.records: dict[str, list[tuple[int, Site, tuple[int, ...], torch.Tensor, torch.Tensor]]] = {}
        self.maps: dict[tuple[int, int, str, str], torch.Tensor] = {}
        self.map_meta: dict[tuple[int, int, str, str], dict] = {}
        self._bytes: dict[str, int] = {}
        self.grid: tuple[int, int] | None = None
        self.n_text: int | None = None

    def start_call(self, ctx: CallContext) -> None:
        self.context = ctx
        key = (ctx.run, ctx.step)
        if key not in self.step_keys:
            self.step_keys[key] = len(self.step_keys)
            self.timesteps.append(ctx.timestep)
            self.runs.append(ctx.run)
        self.step_slot = self.step_keys[key]
        slots = []
        for row, rk in enumerate(ctx.row_keys()):
            if rk not in self.row_keys:
                self.row_keys[rk] = len(self.row_keys)
                self.row_branch.append(rk[0])
                self.row_prompt.append(-1 if ctx.prompts[row] is None else int(ctx.prompts[row]))
                self.row_layout.append(ctx.layouts[row])
            slot = self.row_keys[rk]
            if self.row_layout[slot] is None:
                self.row_layout[slot] = ctx.layouts[row]
            slots.append(slot)
        self.row_slots = tuple(slots)
        if self.grid is None:
            self.grid, self.n_text = ctx.latent_hw, ctx.n_text

    def add(self, site: Site, name: str, value: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """``value [rows, ...]`` of one attention call; ``nonfinite [rows]``: the model's attention was non-finite there."""
        self.records.setdefault(name, []).append((self.step_slot, site, self.row_slots, value, nonfinite))
        self._bytes[name] = self._bytes.get(name, 0) + value.numel() * value.element_size()

    def add_map(self, where: tuple[int, str, str], p: torch.Tensor, rows: list[int], heads: list[int]) -> None:
        key = (self.step_slot, *where)
        if key in self.maps:  # a second call at this step (SLG): its rows join the same map
            self.maps[key] = torch.cat([self.maps[key], p], 0)
            self.map_meta[key]["batch"] = self.map_meta[key]["batch"] + rows
        else:
            self.maps[key] = p
            self.map_meta[key] = {"batch": rows, "heads": heads}
        self._bytes["maps"] = self._bytes.get("maps", 0) + p.numel() * p.element_size()

    def held_bytes(self, names: Sequence[str] | None = None) -> int:
        """Bytes of recorded values (of ``names``; all by default)."""
        return sum(b for n, b in self._bytes.items() if names is None or n in names)


def _warn_non_finite(mass: Stat | None) -> None:
    """Warn, naming steps and layers, where the model itself produced non-finite attention."""
    if mass is None or mass.recorded is None:
        return
    bad = mass.recorded & ~torch.isfinite(mass.values)
    if not bad.any():
        return
    steps = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})
    layers = sorted({int(i) for i in bad.nonzero()[:, 1].tolist()})
    warnings.warn(
        f"the model produced non-finite attention (NaN/inf) at steps {steps}, layers {layers}: these entries are "
        f"recorded as NaN (to_dataframe keeps them; entries never recorded are dropped). Check the inputs/latents "
        f"(a diverged run), the dtype, or the weights.", RuntimeWarning, stacklevel=4)


def assemble(rec: Recording | None, layers: Sequence[int]) -> AttentionResult:
    """Stack the per-call records into dense NaN-filled tensors (one transfer to CPU per statistic)."""
    if rec is None:
        raise RuntimeError("nothing recorded yet")
    ctl = rec.controller
    n_steps, n_rows, n_layers = len(rec.step_keys), len(rec.row_keys), ctl.num_layers
    heads = ctl.transformer.config.num_attention_heads
    model_attn = ("attn", "attn2") if any(s.attention == "attn2" for s in ctl.sites) else ("attn",)
    timesteps = tuple(float(t) for t in rec.timesteps)
    aux: dict[str, tuple[str, tuple]] = {"timestep": ("step", timesteps), "branch": ("batch", tuple(rec.row_branch)),
                                         "prompt": ("batch", tuple(rec.row_prompt))}
    aux["block_kind"] = ("layer", tuple(ctl.family.block_kinds(ctl.transformer)))
    if len(set(rec.runs)) > 1:
        aux["run"] = ("step", tuple(rec.runs))
    base = {"step": tuple(range(n_steps)), "layer": tuple(range(n_layers)), "batch": tuple(range(n_rows)),
            "head": tuple(range(heads))}
    stats: dict[str, Stat] = {}
    for s in rec.statistics:
        entries = rec.records.get(s.name)
        attentions = tuple(a for a in model_attn if a in s.attentions)
        if not entries:
            if s.name != "mass":
                continue
            shape, device = (heads, 2, 2), "cpu"
        else:
            shape, device = tuple(entries[0][3].shape[1:]), entries[0][3].device
        t = torch.full((n_steps, n_layers, len(attentions), n_rows) + shape, float("nan"), device=device)
        broken = torch.zeros((n_steps, n_layers, len(attentions), n_rows), dtype=torch.bool, device=device)
        for step, site, rows, value, nonfinite in entries or ():
            idx = torch.tensor(rows, dtype=torch.long, device=device)
            a = attentions.index(site.attention)
            t[step, site.layer, a].index_copy_(0, idx, value.to(t.dtype))
            broken[step, site.layer, a].index_copy_(0, idx, nonfinite.to(device))
        # recorded = a value, or NaN in a row whose attention the model itself made non-finite; NaN elsewhere is
        # "not recorded" (a layer not selected, attn2's text rows, a word absent from a row's prompt)
        recorded = ~torch.isnan(t) | broken.reshape(broken.shape + (1,) * len(shape)).expand(t.shape)
        coords = {**base, "attention": attentions, **s.coords()}
        dims = LEAD_DIMS + tuple(s.dims)
        stats[s.name] = Stat(t.cpu(), dims, {d: tuple(c) for d, c in coords.items() if d in dims}, aux, recorded.cpu())
    _warn_non_finite(stats.get("mass"))
    cfg = ctl.transformer.config
    meta = {
        "model": type(ctl.transformer).__name__, "family": ctl.family.name,
        "num_layers": n_layers, "heads": heads, "head_dim": cfg.attention_head_dim,
        "qk_norm": cfg.get("qk_norm") if hasattr(cfg, "get") else getattr(cfg, "qk_norm", None),
        "dual_attention_layers": [s.layer for s in ctl.sites if s.attention == "attn2"],
        "order": list(ctl.order), "recorded_layers": list(layers),
        "image_grid": list(rec.grid) if rec.grid else None, "n_text": rec.n_text,
        "dtype": str(next(ctl.transformer.parameters()).dtype),
    }
    maps = {k: v.cpu() for k, v in rec.maps.items()}
    return AttentionResult(stats, maps, {k: dict(v) for k, v in rec.map_meta.items()}, tuple(rec.row_layout), meta)
