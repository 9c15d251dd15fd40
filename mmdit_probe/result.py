"""``AttentionResult``: recorded statistics with named dims, detached from the model.

Statistics (each a :class:`~mmdit_probe.named.Stat`), dims in order:

=============  ===========================================================================
``mass``        step, layer, attention, batch, head, query, key        (quadrant masses)
``group_mass``  step, layer, attention, batch, head, query, key_group  (``KEY_GROUPS``)
``entropy``     step, layer, attention, batch, head, query             (nats, mean over queries)
``key_mass``    step, layer, attention, batch, head, query, key_token  (Σ over queries of P[:, j])
``word_map``    step, layer, attention, batch, [head,] word, image_token (image→word mass; head
                only with ``word_heads="all"``; attention is ``attn`` only)
=============  ===========================================================================

``mass`` is, per query group, the mean over its query tokens of the probability summed over the
key group; for each query group the two key groups sum to 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .io import read_result, save_result
from .layout import TokenLayout, normalise_word
from .maps import parse_quadrant, quadrant_name
from .named import Stat

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
        """Select by label in every statistic, the row layouts and the full maps alike.

        ``res.sel(layer=[0, 1], batch=[1])``; ``branch="cond"`` (or a list of branch names) selects the
        batch rows of those branches. A scalar drops the dim, a list keeps it.
        """
        selection = dict(selection)
        if "branch" in selection:
            names = selection.pop("branch")
            names = (names,) if isinstance(names, str) else tuple(names)
            rows = [self.batch_labels[i] for i, b in enumerate(self.branches) if b in names]
            if not rows:
                raise KeyError(f"branch {names} not in this result; branches: {sorted(set(self.branches))}")
            if "batch" in selection:
                wanted = selection["batch"] if isinstance(selection["batch"], (list, tuple, range)) else [selection["batch"]]
                rows = [r for r in rows if r in wanted]
            selection["batch"] = rows
        known = {d for s in self.stats.values() for d in s.dims}
        unknown = [d for d in selection if d not in known]
        if unknown:
            raise KeyError(f"unknown dim(s) {unknown}; dims are {sorted(known)} (or branch=...)")
        stats = {n: s.sel(**{d: v for d, v in selection.items() if d in s.dims}) for n, s in self.stats.items()}
        layouts = self.layouts
        if "batch" in selection and self.layouts:
            wanted = selection["batch"]
            labels = self.batch_labels
            picks = wanted if isinstance(wanted, (list, tuple, range)) else [wanted]
            layouts = tuple(self.layouts[labels.index(b)] for b in picks)
        maps, map_meta = _select_maps(self.maps, self.map_meta, selection)
        return AttentionResult(stats, maps, map_meta, layouts, self.meta)

    @property
    def batch_labels(self) -> list:
        """The batch coordinate (row labels) of this result."""
        return list(self.mass.labels("batch")) if "batch" in self.mass.dims else []

    def renumbered(self) -> "AttentionResult":
        """The same result with batch rows labelled ``0 … n−1`` (maps' row labels follow)."""
        old = self.batch_labels
        new = {b: i for i, b in enumerate(old)}
        stats = {}
        for n, st in self.stats.items():
            coords = dict(st.coords)
            if "batch" in st.dims:
                coords["batch"] = tuple(range(len(old)))
            stats[n] = Stat(st.values, st.dims, coords, st.aux)
        meta = {k: {**m, "batch": [new[b] for b in m.get("batch", []) if b in new]} for k, m in self.map_meta.items()}
        return AttentionResult(stats, self.maps, meta, self.layouts, self.meta)

    def explore(self, *args: Any, **kwargs: Any):
        """An interactive HTML page of this result (inline in Jupyter; ``path=`` writes it): see :func:`mmdit_probe.explorer`."""
        from .explorer import explore  # the explorer builds on results; results do not need it to load

        return explore(self, *args, **kwargs)

    def to_xarray(self, stat: str = "mass"):
        """One statistic as an ``xarray.DataArray`` (dims, label coordinates, aux coordinates such as branch)."""
        import xarray as xr

        st = self.stat(stat)
        coords: dict[str, Any] = {d: list(st.labels(d)) for d in st.dims}
        for name, (dim, vals) in st.aux.items():
            coords[name] = (dim, list(vals))
        return xr.DataArray(st.values.numpy(), dims=st.dims, coords=coords, name=stat, attrs={"model": self.meta.get("model", "")})

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
        return df.pivot_table(index=list(by), columns="quadrant", values="mass", aggfunc="mean", dropna=False)

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
        vals = word_values(self.stat("word_map"), word, step=step, layer=layer, attention=attention, head=head,
                           batch=batch)
        if self.image_grid is None:
            raise ValueError("this result has no image grid in its metadata (meta['image_grid']), so word maps cannot be "
                             "laid out as images; use res.stat('word_map') for the flat [..., image_token] values")
        h, wd = self.image_grid
        return vals.reshape(*vals.shape[:-1], h, wd)

    # ---- persistence ------------------------------------------------------------------
    def save(self, path) -> str:
        """Write atomically to one ``.safetensors`` file (tensors) with a JSON header (coords, layouts)."""
        return save_result(self, path)

    @classmethod
    def load(cls, path) -> "AttentionResult":
        return cls(*read_result(path))

    def __repr__(self) -> str:
        parts = [f"{n}{tuple(s.values.shape)}" for n, s in self.stats.items()]
        return f"AttentionResult({', '.join(parts)}; {len(self.maps)} maps; dims {LEAD_DIMS})"


def _select_maps(maps: dict, meta: dict, selection: dict) -> tuple[dict, dict]:
    """Full maps ``(step, layer, attention, quadrant) → [rows, heads, nq, nk]`` restricted to ``selection``."""
    def allowed(dim: str, value: Any) -> bool:
        if dim not in selection:
            return True
        v = selection[dim]
        return value in v if isinstance(v, (list, tuple, range)) else value == v

    out, out_meta = {}, {}
    for key, t in maps.items():
        step, layer, attention, _ = key
        if not (allowed("step", step) and allowed("layer", layer) and allowed("attention", attention)):
            continue
        m = dict(meta.get(key, {}))
        for dim, axis in (("batch", 0), ("head", 1)):
            labels = m.get("batch" if dim == "batch" else "heads")
            if dim in selection and labels is not None:
                keep = [i for i, lab in enumerate(labels) if allowed(dim, lab)]
                t = t[keep] if axis == 0 else t[:, keep]
                m["batch" if dim == "batch" else "heads"] = [labels[i] for i in keep]
        if t.shape[0] and t.shape[1]:
            out[key], out_meta[key] = t, m
    return out, out_meta


def word_values(st: Stat, word: str, *, step: int | Sequence[int] | None = None,
                layer: int | Sequence[int] | None = None, attention: str = "attn", head: int | str = "mean",
                batch: int | Sequence[int] | None = None) -> torch.Tensor:
    """One word's values of a word-map statistic (``word_map``, ``context_word_map``): ``[batch, token]``
    (``[batch, head, token]`` with ``head="all"``; an int picks one head). Steps/layers given as a list or None
    (all) are averaged."""
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
    return vals
