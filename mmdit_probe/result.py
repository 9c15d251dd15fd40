"""``AttentionResult``: recorded statistics with named dims, detached from the model.

Statistics (each a :class:`~mmdit_probe.named.Stat`), dims in order:

=============  ===========================================================================
``mass``        step, layer, attention, batch, head, query, key        (quadrant masses)
``group_mass``  step, layer, attention, batch, head, query, key_group  (``KEY_GROUPS``)
``entropy``     step, layer, attention, batch, head, query             (nats, mean over queries)
``key_mass``    step, layer, attention, batch, head, query, key_token  (Σ over queries of P[:, j])
``word_map``    step, layer, attention, batch, head, word, image_token (image→word mass)
=============  ===========================================================================

``mass`` is, per query group, the mean over its query tokens of the probability summed over the
key group; for each query group the two key groups sum to 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .layout import KEY_GROUPS, QUERY_GROUPS, TokenLayout, normalise_word
from .maps import parse_quadrant, quadrant_name
from .named import Stat

STAT_DIMS: dict[str, tuple[str, ...]] = {
    "mass": ("query", "key"),
    "group_mass": ("query", "key_group"),
    "entropy": ("query",),
    "key_mass": ("query", "key_token"),
    "word_map": ("word", "image_token"),  # after an optional head dim (word_heads="all")
}
LEAD_DIMS = ("step", "layer", "attention", "batch", "head")
VALUE_NAMES = {"mass": "mass", "group_mass": "mass", "entropy": "entropy", "key_mass": "mass", "word_map": "mass"}
HOW_TO_ENABLE = {"group_mass": "groups=True", "entropy": "entropy=True", "key_mass": "key_mass=True", "word_map": "words=True"}


class AttentionResult:
    """Recorded attention statistics of one or more transformer calls.

    ``stats`` maps a statistic name to its :class:`Stat`; ``maps`` maps
    ``(step, layer, attention, quadrant)`` to exact softmax blocks ``[batch, head, n_query, n_key]``
    (with ``map_meta`` naming the batch rows and heads kept); ``layouts`` holds one
    :class:`TokenLayout` per batch row (or None); ``meta`` describes the model and run.
    """

    def __init__(self, stats: dict[str, Stat], maps: dict | None = None, map_meta: dict | None = None,
                 layouts: Sequence[TokenLayout | None] = (), meta: dict | None = None):
        self.stats = dict(stats)
        self.maps = dict(maps or {})
        self.map_meta = dict(map_meta or {})
        self.layouts = tuple(layouts)
        self.meta = dict(meta or {})

    # ---- access -----------------------------------------------------------------------
    def stat(self, name: str) -> Stat:
        if name not in self.stats:
            hint = f" (record it with AttentionRecorder(..., {HOW_TO_ENABLE[name]}))" if name in HOW_TO_ENABLE else ""
            raise KeyError(f"statistic {name!r} was not recorded{hint}; recorded: {sorted(self.stats)}")
        return self.stats[name]

    @property
    def mass(self) -> Stat:
        return self.stat("mass")

    @property
    def timesteps(self) -> tuple[float, ...]:
        return tuple(self.mass.aux.get("timestep", ("step", ()))[1])

    @property
    def branches(self) -> tuple[str, ...]:
        return tuple(self.mass.aux.get("branch", ("batch", ()))[1])

    @property
    def image_grid(self) -> tuple[int, int] | None:
        grid = self.meta.get("image_grid")
        return tuple(grid) if grid else None

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.stats["word_map"].labels("word")) if "word_map" in self.stats else ()

    def sel(self, **selection: Any) -> "AttentionResult":
        """Select by label in every statistic that has the named dims: ``res.sel(layer=[0, 1], branch=...)``."""
        known = {d for s in self.stats.values() for d in s.dims}
        unknown = [d for d in selection if d not in known]
        if unknown:
            raise KeyError(f"unknown dim(s) {unknown}; dims are {sorted(known)}")
        stats = {n: s.sel(**{d: v for d, v in selection.items() if d in s.dims}) for n, s in self.stats.items()}
        return AttentionResult(stats, self.maps, self.map_meta, self.layouts, self.meta)

    def to_dataframe(self, stat: str = "mass", dropna: bool = True):
        """Long-form DataFrame of one statistic (one row per entry, NaN entries dropped)."""
        return self.stat(stat).to_dataframe(VALUE_NAMES.get(stat, "value"), dropna=dropna)

    def quadrant_table(self, by: Sequence[str] = ("layer",), branch: str | None = "cond", attention: str = "attn"):
        """Mean mass per quadrant (columns ``image->image`` …) grouped by ``by`` (rows)."""
        df = self.to_dataframe("mass")
        if branch is not None and "branch" in df:
            df = df[df["branch"] == branch]
        df = df[df["attention"] == attention]
        df = df.assign(quadrant=df["query"] + "->" + df["key"])
        return df.pivot_table(index=list(by), columns="quadrant", values="mass", aggfunc="mean")

    # ---- maps -------------------------------------------------------------------------
    def attention_map(self, step: int, layer: int, query: str, key: str, attention: str = "attn") -> torch.Tensor:
        """Exact softmax block ``[batch, head, n_query, n_key]`` recorded with a ``MapSelection``."""
        quad = quadrant_name(*parse_quadrant((query, key)))
        k = (int(step), int(layer), attention, quad)
        if k not in self.maps:
            have = sorted(self.maps)[:8]
            raise KeyError(
                f"no {quad} map at step {step}, layer {layer}, {attention}; record it with "
                f"AttentionRecorder(..., maps=MapSelection({quad!r}, steps=[{step}], layers=[{layer}])). Recorded: {have}"
            )
        return self.maps[k]

    def word_map(self, word: str, *, step: int | Sequence[int] | None = None, layer: int | Sequence[int] | None = None,
                 attention: str = "attn", head: int | str = "mean", batch: int | Sequence[int] | None = None) -> torch.Tensor:
        """Image→``word`` attention over the image grid: ``[batch, h, w]`` (or ``[batch, head, h, w]``
        with ``head="all"``). Steps/layers given as a list or None (all) are averaged."""
        st = self.stat("word_map")
        w = normalise_word(word)
        if w not in st.labels("word"):
            raise KeyError(f"word {word!r} was not recorded; recorded words: {', '.join(st.labels('word'))}")
        st = st.sel(word=w, attention=attention)
        for dim, val in (("step", step), ("layer", layer), ("batch", batch)):
            if val is not None:
                st = st.sel(**{dim: val})
        st = st.mean(*[d for d in ("step", "layer") if d in st.dims])
        vals = st.values
        if "head" in st.dims:
            head_axis = st.dims.index("head")
            if head == "mean":
                vals = torch.nanmean(vals, dim=head_axis)
            elif head != "all":
                vals = vals.select(head_axis, int(head))
        h, wd = self.image_grid
        return vals.reshape(*vals.shape[:-1], h, wd)

    # ---- persistence ------------------------------------------------------------------
    def save(self, path) -> str:
        """Write atomically to one ``.safetensors`` file (tensors) with a JSON header (coords, layouts)."""
        from .io import save_result

        return save_result(self, path)

    @classmethod
    def load(cls, path) -> "AttentionResult":
        from .io import load_result

        return load_result(path)

    def __repr__(self) -> str:
        parts = [f"{n}{tuple(s.values.shape)}" for n, s in self.stats.items()]
        return f"AttentionResult({', '.join(parts)}; {len(self.maps)} maps; dims {LEAD_DIMS})"


def assemble_result(rec: Any) -> AttentionResult:
    """Stack a recorder's per-call records into dense NaN-filled tensors (one transfer to CPU)."""
    ctl = rec.controller
    steps = sorted(rec._calls)
    n_layers = ctl.num_layers
    attentions = ("attn", "attn2") if any(s.attention == "attn2" for s in ctl.sites) else ("attn",)
    heads = ctl.transformer.config.num_attention_heads
    batch = max((rec._calls[s].batch for s in steps), default=0)
    step_pos = {s: i for i, s in enumerate(steps)}
    tensors: dict[str, torch.Tensor] = {}
    for step, call, values in rec._records:
        for name, v in values.items():
            if name not in tensors:
                shape = (len(steps), n_layers, len(attentions), batch) + tuple(v.shape[1:])
                tensors[name] = torch.full(shape, float("nan"), device=v.device)
            tensors[name][step_pos[step], call.site.layer, attentions.index(call.site.attention), : v.shape[0]] = v
    first = rec._calls[steps[0]] if steps else None
    layouts = rec._layouts.get(steps[0]) if steps else None
    branches = rec._branches.get(steps[0], []) if steps else []
    branches = list(branches) + ["cond"] * (batch - len(branches))
    timesteps = tuple(float(rec._calls[s].timestep) for s in steps)
    coords_base = {"step": tuple(range(len(steps))), "layer": tuple(range(n_layers)), "attention": attentions,
                   "batch": tuple(range(batch))}
    aux = {"timestep": ("step", timesteps), "branch": ("batch", tuple(branches))}
    stats: dict[str, Stat] = {}
    for name, t in tensors.items():
        t = t.cpu()
        coords = dict(coords_base)
        dims = LEAD_DIMS + STAT_DIMS[name]
        if name == "word_map":
            if rec.word_heads != "all":  # recorded as the head mean
                t, dims = t.squeeze(4), LEAD_DIMS[:4] + STAT_DIMS[name]
            coords["word"] = tuple(rec._word_list or ())
        coords.setdefault("head", tuple(range(heads)))
        if "query" in dims:
            coords["query"] = QUERY_GROUPS
        if name == "mass":
            coords["key"] = QUERY_GROUPS
        if name == "group_mass":
            coords["key_group"] = KEY_GROUPS
        stats[name] = Stat(t, dims, {d: c for d, c in coords.items() if d in dims}, aux)
    if not stats:
        empty = torch.empty((len(steps), n_layers, len(attentions), batch, heads, 2, 2))
        stats["mass"] = Stat(empty, LEAD_DIMS + ("query", "key"),
                             {**coords_base, "head": tuple(range(heads)), "query": QUERY_GROUPS, "key": QUERY_GROUPS}, aux)
    maps = {k: v.cpu() for k, v in rec._maps.items()}
    cfg = ctl.transformer.config
    meta = {
        "model": type(ctl.transformer).__name__,
        "num_layers": n_layers, "heads": heads, "head_dim": cfg.attention_head_dim,
        "qk_norm": cfg.get("qk_norm") if hasattr(cfg, "get") else getattr(cfg, "qk_norm", None),
        "dual_attention_layers": [s.layer for s in ctl.sites if s.attention == "attn2"],
        "order": list(ctl.order), "recorded_layers": list(rec.layers),
        "image_grid": list(first.latent_hw) if first else None, "n_text": first.n_text if first else None,
        "dtype": str(next(ctl.transformer.parameters()).dtype),
    }
    return AttentionResult(stats, maps, rec._map_meta, layouts or (), meta)
