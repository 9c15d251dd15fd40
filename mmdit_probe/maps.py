"""Quadrant names and the selection of full attention maps (with their byte estimate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .selection import as_indices

STREAMS = ("image", "text")
#: The four quadrants, always named query→key.
QUADRANTS = ("image->image", "image->text", "text->image", "text->text")


def parse_quadrant(quadrant: str | Sequence[str]) -> tuple[str, str]:
    """``"image->text"`` (also ``"image→text"``, ``"image_to_text"``, ``("image", "text")``) → ``("image", "text")``."""
    if isinstance(quadrant, (tuple, list)) and len(quadrant) == 2:
        parts = tuple(quadrant)
    elif isinstance(quadrant, str):
        q = quadrant.strip().lower().replace("→", "->").replace("_to_", "->").replace(" ", "")
        parts = tuple(q.split("->")) if "->" in q else ()
    else:
        parts = ()
    if len(parts) != 2 or any(p not in STREAMS for p in parts):
        raise ValueError(
            f"unknown quadrant {quadrant!r}; use one of {', '.join(QUADRANTS)} (query->key: 'image->text' means "
            f"image queries attending to text keys)"
        )
    return parts[0], parts[1]


def quadrant_name(query: str, key: str) -> str:
    return f"{query}->{key}"


@dataclass(frozen=True)
class MapSelection:
    """Which exact softmax maps to keep: one quadrant for chosen steps, layers, heads, batch rows.

    ``None`` means all; ``batch`` names result rows (``uncond 0, cond 0, …`` in order of appearance).
    ``MapSelection("image->text", layers=[2], steps=[0, 1])``. Negative or fractional indices are refused.
    """

    quadrant: str
    steps: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    batch: tuple[int, ...] | None = None
    attention: str = "attn"

    def __post_init__(self):
        object.__setattr__(self, "quadrant", quadrant_name(*parse_quadrant(self.quadrant)))
        for name in ("steps", "layers", "heads", "batch"):
            object.__setattr__(self, name, as_indices(getattr(self, name), name, owner="MapSelection"))
        if self.attention not in ("attn", "attn2"):
            raise ValueError(f"attention must be 'attn' or 'attn2', got {self.attention!r}")
        if self.attention == "attn2" and self.quadrant != "image->image":
            raise ValueError("attn2 is image-only self-attention: only the 'image->image' quadrant exists there")

    @property
    def streams(self) -> tuple[str, str]:
        return parse_quadrant(self.quadrant)

    def matches(self, step: int, layer: int, attention: str) -> bool:
        return (
            attention == self.attention
            and (self.steps is None or step in self.steps)
            and (self.layers is None or layer in self.layers)
        )

    def bytes_per_call(self, n_image: int, n_text: int, batch: int, heads: int) -> int:
        """fp32 bytes one matching attention call adds."""
        sizes = {"image": n_image, "text": n_text}
        q, k = self.streams
        b = len(self.batch) if self.batch is not None else batch
        h = len(self.heads) if self.heads is not None else heads
        return 4 * b * h * sizes[q] * sizes[k]

    def estimate_bytes(self, n_steps: int, layers_with_site: Sequence[int], n_image: int, n_text: int,
                       batch: int, heads: int) -> int:
        """Total bytes for a run of ``n_steps`` over the given layers."""
        steps = n_steps if self.steps is None else len([s for s in self.steps if s < n_steps])
        layers = [l for l in layers_with_site if self.layers is None or l in self.layers]
        return steps * len(layers) * self.bytes_per_call(n_image, n_text, batch, heads)


class MapBudgetError(MemoryError):
    """The requested full maps would exceed the recorder's byte budget."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
