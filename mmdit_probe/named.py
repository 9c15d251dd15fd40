"""``Stat``: a tensor with named dims, coordinates, selection/reduction by name and long-form export."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Stat:
    """A statistic: ``values`` with ``dims`` named, a label list per dim in ``coords``.

    ``aux`` holds extra coordinates attached to one dim (``{"timestep": ("step", [...]),
    "branch": ("batch", [...])}``); they become DataFrame columns. Entries never recorded are NaN
    (a skipped layer, ``attn2`` on a block without it, text rows of ``attn2``); ``recorded`` (bool,
    shaped like ``values``) tells them apart from NaN the model itself produced. Without it (files
    written before it existed) NaN means "not recorded".
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    coords: Mapping[str, tuple] = field(default_factory=dict)
    aux: Mapping[str, tuple[str, tuple]] = field(default_factory=dict)
    recorded: torch.Tensor | None = None

    def __post_init__(self):
        if self.values.dim() != len(self.dims):
            raise ValueError(f"values have {self.values.dim()} dims but names {self.dims}")
        if self.recorded is not None and self.recorded.shape != self.values.shape:
            raise ValueError(f"recorded mask {tuple(self.recorded.shape)} does not match values {tuple(self.values.shape)}")
        for d, n in zip(self.dims, self.values.shape):
            if d in self.coords and len(self.coords[d]) != n:
                raise ValueError(f"dim {d!r} has {n} entries but {len(self.coords[d])} coordinates")

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(self.dims, self.values.shape))

    def labels(self, dim: str) -> tuple:
        self._check_dim(dim)
        return tuple(self.coords.get(dim, range(self.values.shape[self.dims.index(dim)])))

    def _check_dim(self, dim: str) -> None:
        if dim not in self.dims:
            raise KeyError(f"unknown dim {dim!r}; this statistic has dims {self.dims}")

    def _index_of(self, dim: str, label: Any) -> int:
        labels = self.labels(dim)
        for i, lab in enumerate(labels):
            if lab == label:
                return i
        if isinstance(label, (int, np.integer)) and dim not in self.coords and 0 <= label < len(labels):
            return int(label)
        raise KeyError(f"{label!r} is not a {dim!r} of this result; available: {list(labels)}")

    def sel(self, **selection: Any) -> "Stat":
        """Select by label; a scalar drops the dim, a list keeps it. ``sel(layer=3, query="image")``."""
        out = self
        for dim, label in selection.items():
            out._check_dim(dim)
            axis = out.dims.index(dim)
            if isinstance(label, (list, tuple, range)):
                idx = [out._index_of(dim, lab) for lab in label]
                index = torch.tensor(idx, dtype=torch.long)
                vals = out.values.index_select(axis, index)
                mask = None if out.recorded is None else out.recorded.index_select(axis, index)
                coords = dict(out.coords)
                coords[dim] = tuple(out.labels(dim)[i] for i in idx)
                aux = {k: (d, tuple(v[i] for i in idx)) if d == dim else (d, v) for k, (d, v) in out.aux.items()}
                out = Stat(vals, out.dims, coords, aux, mask)
            else:
                i = out._index_of(dim, label)
                vals = out.values.select(axis, i)
                mask = None if out.recorded is None else out.recorded.select(axis, i)
                coords = {k: v for k, v in out.coords.items() if k != dim}
                aux = {k: (d, v) for k, (d, v) in out.aux.items() if d != dim}
                out = Stat(vals, tuple(d for d in out.dims if d != dim), coords, aux, mask)
        return out

    def _reduce(self, fn, dims: Sequence[str]) -> "Stat":
        for d in dims:
            self._check_dim(d)
        axes = [self.dims.index(d) for d in dims]
        vals = fn(self.values, axes) if axes else self.values
        mask = None
        if self.recorded is not None:
            mask = self.recorded
            for a in sorted(axes, reverse=True):
                mask = mask.any(a)
        keep = tuple(d for d in self.dims if d not in dims)
        return Stat(vals, keep, {k: v for k, v in self.coords.items() if k in keep},
                    {k: (d, v) for k, (d, v) in self.aux.items() if d in keep}, mask)

    def mean(self, *dims: str) -> "Stat":
        """Mean over the named dims, ignoring NaN (missing) entries."""
        return self._reduce(lambda v, a: torch.nanmean(v, dim=a), dims)

    def sum(self, *dims: str) -> "Stat":
        """Sum over the named dims, ignoring NaN entries."""
        return self._reduce(lambda v, a: torch.nansum(v, dim=a), dims)

    def to_dataframe(self, name: str = "value", dropna: bool = True):
        """Long form: one row per entry, a column per dim (labels), aux columns, and ``name``."""
        import pandas as pd

        vals = self.values.detach().float().cpu().numpy()
        grids = np.meshgrid(*[np.arange(n) for n in vals.shape], indexing="ij")
        data: dict[str, Any] = {}
        for d, g in zip(self.dims, grids):
            labels = np.asarray(self.labels(d), dtype=object)
            data[d] = labels[g.ravel()]
            for aux_name, (aux_dim, aux_vals) in self.aux.items():
                if aux_dim == d:
                    data[aux_name] = np.asarray(aux_vals, dtype=object)[g.ravel()]
        data[name] = vals.ravel()
        df = pd.DataFrame(data)
        for col in df.columns:
            if col != name:
                if len(df) and df[col].map(_is_number).all():
                    df[col] = pd.to_numeric(df[col])
        if dropna:  # drop what was never recorded; NaN the model produced stays (and the recorder warned)
            keep = (self.recorded.cpu().numpy().ravel() if self.recorded is not None
                    else ~np.isnan(df[name].to_numpy()))
            df = df[keep].reset_index(drop=True)
        return df


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
