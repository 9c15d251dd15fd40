"""``ConceptMaps``: the concept maps of one probe, detached from the model (CPU, float32, NaN = not recorded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .tokens import ConceptError

_LEAD = ("step", "layer", "row", "concept")


@dataclass(frozen=True)
class ConceptMaps:
    """Concept maps per step slot, recorded layer, batch row and concept.

    ``raw [step, layer, row, concept, (head,) y, x]``: concept→image attention, softmax over the image keys
    (the concept queries' full softmax over ``[image, concept]`` keys restricted to the image and
    renormalised; sums to 1 over ``y, x``), mean over the concept's tokens; head mean unless ``heads``.
    ``image_mass [step, layer, row, concept, (head)]``: that full softmax's mass on the image keys.
    ``scores [step, layer, row, concept, y, x]``: output-space dot products of the image tokens' attention
    outputs with the concept's attention output (all heads' channels); :attr:`output_space` is their softmax
    over concepts. Coordinates: ``steps``/``timesteps``/``runs`` per step slot, ``layers`` (block index) and
    ``block_kinds`` per layer, ``branches`` per row, ``heads`` (None: head mean), ``tokens`` per concept.
    """

    concepts: tuple[str, ...]
    raw: torch.Tensor
    image_mass: torch.Tensor
    scores: torch.Tensor
    steps: tuple[int, ...]
    timesteps: tuple[float, ...]
    runs: tuple[int, ...]
    layers: tuple[int, ...]
    block_kinds: tuple[str, ...]
    branches: tuple[str, ...]
    heads: tuple[int, ...] | None
    tokens: tuple[tuple[str, ...], ...]
    call_output: Any = None

    @property
    def images(self) -> Any:
        """The pipeline's images (``call_output.images``), when the probe ran a pipeline call."""
        return getattr(self.call_output, "images", None)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.scores.shape[-2:])

    @property
    def output_space(self) -> torch.Tensor:
        """``[step, layer, row, concept, y, x]``: softmax over concepts of :attr:`scores` (ConceptAttention's map)."""
        return torch.softmax(self.scores, dim=3)

    def dims(self, name: str) -> tuple[str, ...]:
        """Dimension names of ``raw``, ``image_mass``, ``scores`` or ``output_space``."""
        head = ("head",) if self.heads is not None else ()
        table = {"raw": _LEAD + head + ("y", "x"), "image_mass": _LEAD + head,
                 "scores": _LEAD + ("y", "x"), "output_space": _LEAD + ("y", "x")}
        if name not in table:
            raise KeyError(f"no field {name!r}; fields with dims: {', '.join(table)}")
        return table[name]

    # ---- selections --------------------------------------------------------------------
    def concept_index(self, concept: str | int) -> int:
        if isinstance(concept, int) and 0 <= concept < len(self.concepts):
            return concept
        if concept in self.concepts:
            return self.concepts.index(concept)
        raise KeyError(f"concept {concept!r} was not probed; concepts: {', '.join(self.concepts)}")

    def row(self, branch: str = "cond", index: int = 0) -> int:
        """The row of the ``index``-th row of ``branch``."""
        rows = [i for i, b in enumerate(self.branches) if b == branch]
        if index >= len(rows):
            raise KeyError(f"no row {index} of branch {branch!r}; rows: {', '.join(self.branches) or '(none)'}")
        return rows[index]

    def _slots(self, values: int | Sequence[int] | None, coords: tuple[int, ...], what: str) -> list[int]:
        if values is None:
            return list(range(len(coords)))
        wanted = [values] if isinstance(values, int) else list(values)
        out = [i for i, c in enumerate(coords) if c in wanted]
        missing = [v for v in wanted if v not in coords]
        if missing or not out:
            raise KeyError(f"{what} {missing or wanted} not recorded; recorded {what}: {sorted(set(coords))}")
        return out

    def _pick(self, values: torch.Tensor, concept, step, layer, branch, index) -> torch.Tensor:
        s = self._slots(step, self.steps, "steps")
        ls = self._slots(layer, self.layers, "layers")
        return values[s][:, ls][:, :, self.row(branch, index), self.concept_index(concept)]

    def raw_map(self, concept: str | int, *, step: int | Sequence[int] | None = None,
                layer: int | Sequence[int] | None = None, branch: str = "cond", index: int = 0,
                head: int | None = None) -> torch.Tensor:
        """``[y, x]``: mean of :attr:`raw` over the chosen steps and layers (default all) and heads (or one head)."""
        v = self._pick(self.raw, concept, step, layer, branch, index)  # [s, l, (H,) y, x]
        if self.heads is not None:
            v = v.mean(2) if head is None else v[:, :, self.heads.index(head)]
        elif head is not None:
            raise ConceptError("these maps keep the head mean only; record with heads='all' for per-head maps")
        return v.nanmean((0, 1))

    def output_map(self, concept: str | int, *, step: int | Sequence[int] | None = None,
                   layer: int | Sequence[int] | None = None, branch: str = "cond", index: int = 0) -> torch.Tensor:
        """``[y, x]``: mean of :attr:`output_space` over the chosen steps and layers (ConceptAttention's aggregation)."""
        return self._pick(self.output_space, concept, step, layer, branch, index).nanmean((0, 1))

    def to_xarray(self):
        """An ``xarray.Dataset`` of ``raw``, ``image_mass``, ``scores``, ``output_space`` with named dims and coordinates."""
        import xarray as xr

        coords: dict[str, Any] = {
            "step": list(range(len(self.steps))), "layer": list(self.layers), "row": list(range(len(self.branches))),
            "concept": list(self.concepts), "y": list(range(self.grid[0])), "x": list(range(self.grid[1])),
            "denoising_step": ("step", list(self.steps)), "timestep": ("step", list(self.timesteps)),
            "run": ("step", list(self.runs)), "block_kind": ("layer", list(self.block_kinds)),
            "branch": ("row", list(self.branches)),
        }
        if self.heads is not None:
            coords["head"] = list(self.heads)
        data = {n: (self.dims(n), getattr(self, n).numpy()) for n in ("raw", "image_mass", "scores", "output_space")}
        return xr.Dataset(data, coords=coords)
