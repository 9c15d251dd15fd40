"""An analytic detector for the shapes world: colour masks, shape by bounding-box fill, relations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import COLOURS, parse_caption

__all__ = ["DetectorConfig", "ObjectDetection", "PromptCheck", "colour_masks", "detect_object", "check_prompt",
           "classify_fill", "largest_component"]

_PALETTE = np.array([(0.0, 0.0, 0.0), *COLOURS.values()], np.float32)  # index 0 = black background
_NAMES = ("background", *COLOURS)


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds: max RGB distance to a pure colour, min pixels for presence, fill-ratio cut points."""

    max_distance: float = 0.5
    min_pixels: int = 60
    triangle_below: float = 0.7  # triangle fills 0.5 of its box, circle 0.785, square 1.0
    circle_below: float = 0.9
    trim: float = 0.01  # quantile trimmed from each side of the bounding box (stray pixels)


@dataclass(frozen=True)
class ObjectDetection:
    colour: str
    present: bool
    pixels: int
    fill: float
    shape: str | None
    cx: float
    cy: float


@dataclass(frozen=True)
class PromptCheck:
    """Whether an image matches its caption (per criterion) and the detections behind it."""

    colour: bool
    shape: bool
    relation: bool
    all: bool
    objects: tuple[ObjectDetection, ...]


def colour_masks(image: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> dict[str, np.ndarray]:
    """Boolean ``[H, W]`` mask per palette colour: pixels nearest to it and within ``max_distance``
    (all such pixels; :func:`detect_object` then keeps the largest connected blob)."""
    img = np.clip(np.asarray(image, np.float32), 0, 1)
    d = np.linalg.norm(img[..., None, :] - _PALETTE, axis=-1)  # [H, W, 5]
    nearest = d.argmin(-1)
    close = d.min(-1) <= cfg.max_distance
    return {name: (nearest == i) & close for i, name in enumerate(_NAMES) if i > 0}


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (min-label propagation, vectorised)."""
    if not mask.any():
        return mask.copy()
    big = mask.size + 1
    lab = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, lab):
            break
        lab = nb
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab == ids[counts.argmax()]


def classify_fill(fill: float, cfg: DetectorConfig = DetectorConfig()) -> str:
    """Shape from the bounding-box fill ratio."""
    if fill < cfg.triangle_below:
        return "triangle"
    return "circle" if fill < cfg.circle_below else "square"


def detect_object(mask: np.ndarray, colour: str, cfg: DetectorConfig = DetectorConfig()) -> ObjectDetection:
    """Presence, fill ratio, shape and centroid of the largest connected blob of ``mask``."""
    mask = largest_component(mask)
    ys, xs = np.nonzero(mask)
    n = len(xs)
    if n < cfg.min_pixels:
        return ObjectDetection(colour, False, n, 0.0, None, float("nan"), float("nan"))
    x0, x1 = np.quantile(xs, [cfg.trim, 1 - cfg.trim])
    y0, y1 = np.quantile(ys, [cfg.trim, 1 - cfg.trim])
    x0, x1, y0, y1 = int(round(x0)), int(round(x1)), int(round(y0)), int(round(y1))
    inside = mask[y0:y1 + 1, x0:x1 + 1].sum()
    fill = float(inside) / max((x1 - x0 + 1) * (y1 - y0 + 1), 1)
    return ObjectDetection(colour, True, n, fill, classify_fill(fill, cfg), float(xs.mean()), float(ys.mean()))


def _relation_holds(rel: str, a: ObjectDetection, b: ObjectDetection) -> bool:
    if not (a.present and b.present):
        return False
    if rel == "left of":
        return a.cx < b.cx
    if rel == "right of":
        return a.cx > b.cx
    if rel == "above":
        return a.cy < b.cy
    if rel == "below":
        return a.cy > b.cy
    raise ValueError(f"unknown relation {rel!r}")


def check_prompt(image: np.ndarray, caption: str, cfg: DetectorConfig = DetectorConfig()) -> PromptCheck:
    """Check ``image`` (``[H, W, 3]`` in 0…1) against ``caption``."""
    objs, rel = parse_caption(caption)
    masks = colour_masks(image, cfg)
    dets = tuple(detect_object(masks[c], c, cfg) for c, _ in objs)
    colour = all(d.present for d in dets)
    shape = all(d.shape == s for d, (_, s) in zip(dets, objs))
    relation = True if rel is None else _relation_holds(rel, dets[0], dets[1])
    return PromptCheck(colour, shape, relation, colour and shape and relation, dets)
