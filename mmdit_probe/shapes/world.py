"""A deterministic world of captioned flat-shape scenes with ground-truth masks.

Scenes are ``size``×``size`` RGB images (floats in 0…1) on a black background with one or two
flat shapes in distinct pure colours. Captions follow a tiny grammar::

    a <colour> <shape>
    a <colour> <shape> (left of | right of | above | below) a <colour> <shape>

The relation always holds between the two objects' centres with a clear margin. Some
colour–shape pairs (``WorldConfig.heldout_pairs``) never appear in training scenes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COLOURS", "SHAPES", "RELATIONS", "WorldConfig", "SceneObject", "Scene", "Batch",
    "world_vocab", "render_shape", "sample_scene", "make_batch", "caption_of", "all_captions",
    "is_heldout_caption", "parse_caption",
]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the world (sizes in pixels)."""

    size: int = 64
    one_object_prob: float = 0.35
    single_size: tuple[int, int] = (26, 38)
    pair_size: tuple[int, int] = (22, 28)
    min_gap: int = 4  # pixels between the two objects along the relation axis
    grid: int = 1  # > 1: sizes and bounding boxes snap to this many pixels (4 = the VAE's latent cell)
    heldout_pairs: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"))
    heldout_fraction: float = 0.15  # of the remaining two-object captions, by a fixed hash


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cx: float
    cy: float
    size: int


@dataclass(frozen=True)
class Scene:
    """One scene: objects, caption, image ``[H, W, 3]`` in 0…1 and boolean masks ``[n, H, W]``."""

    objects: tuple[SceneObject, ...]
    relation: str | None
    caption: str
    image: np.ndarray = field(repr=False)
    masks: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Batch:
    """Many scenes stacked: images ``[N, H, W, 3]`` float32, captions, per-scene objects/masks."""

    images: np.ndarray
    captions: list[str]
    scenes: list[Scene]


def world_vocab() -> tuple[str, ...]:
    """Every word the captions can use (the tokenizers' vocabulary)."""
    words = ["a", *COLOURS, *SHAPES]
    for r in RELATIONS:
        words += [w for w in r.split() if w not in words]
    return tuple(words)


def render_shape(shape: str, cx: float, cy: float, size: int, res: int) -> np.ndarray:
    """Boolean mask ``[res, res]`` of a shape of bounding-box side ``size`` centred at ``(cx, cy)``."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    h = size / 2.0
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    if shape == "triangle":  # apex up, base at the bottom: fills half its bounding box
        top, t = cy - h, (yy - (cy - h)) / size
        return (yy >= top) & (yy <= cy + h) & (np.abs(xx - cx) <= t * h)
    raise ValueError(f"unknown shape {shape!r}")


def caption_of(objects: tuple[SceneObject, ...], relation: str | None) -> str:
    """The caption of a scene (first object is the subject of the relation)."""
    first = f"a {objects[0].colour} {objects[0].shape}"
    if relation is None:
        return first
    return f"{first} {relation} a {objects[1].colour} {objects[1].shape}"


def parse_caption(caption: str) -> tuple[list[tuple[str, str]], str | None]:
    """Inverse of :func:`caption_of`: ``([(colour, shape), ...], relation)``."""
    w = caption.split()
    objs = [(w[1], w[2])]
    if len(w) == 3:
        return objs, None
    rel = " ".join(w[3:-3])
    objs.append((w[-2], w[-1]))
    return objs, rel


def all_captions() -> list[str]:
    """Every caption of the grammar (distinct colours within a caption), in a fixed order."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    caps = [f"a {c} {s}" for c, s in pairs]
    for c1, s1 in pairs:
        for r in RELATIONS:
            for c2, s2 in pairs:
                if c2 != c1:
                    caps.append(f"a {c1} {s1} {r} a {c2} {s2}")
    return caps


def is_heldout_caption(caption: str, config: WorldConfig = WorldConfig()) -> bool:
    """Held-out prompts: any held-out colour–shape pair, or a fixed hash-chosen share of the rest."""
    objs, rel = parse_caption(caption)
    if any(o in config.heldout_pairs for o in objs):
        return True
    if rel is None:
        return False
    return (zlib.crc32(caption.encode()) % 1000) < config.heldout_fraction * 1000


def _sizes(rng: np.random.Generator, cfg: WorldConfig, lo: int, hi: int, n: int) -> list[int]:
    """``n`` side lengths in ``lo…hi`` (multiples of ``cfg.grid`` when it is > 1)."""
    if cfg.grid <= 1:
        return [int(v) for v in rng.integers(lo, hi + 1, size=n)]
    g = cfg.grid
    return [int(v) * g for v in rng.integers(-(-lo // g), hi // g + 1, size=n)]


def _centre(rng: np.random.Generator, cfg: WorldConfig, s: int) -> float:
    """A random centre coordinate of an object of side ``s`` inside the image (box on the grid)."""
    res = cfg.size
    if cfg.grid <= 1:
        return float(rng.uniform(s / 2, res - s / 2))
    return float(rng.integers(0, (res - s) // cfg.grid + 1) * cfg.grid + s / 2)


def _place_pair(rng: np.random.Generator, cfg: WorldConfig, relation: str) -> tuple[float, ...]:
    """Centres and sizes ``(x1, y1, s1, x2, y2, s2)`` satisfying ``relation`` with a clear gap."""
    lo, hi = cfg.pair_size
    first = relation in ("left of", "above")  # object 1 has the smaller coordinate along the relation axis
    while True:
        s1, s2 = _sizes(rng, cfg, lo, hi, 2)
        a1, a2 = _centre(rng, cfg, s1), _centre(rng, cfg, s2)
        if cfg.grid <= 1:  # the shipped model's world: swap the coordinates (a box may poke out by <= 3 px)
            a1, a2 = (min(a1, a2), max(a1, a2)) if first else (max(a1, a2), min(a1, a2))
        elif (a1 < a2) != first:  # on the grid: reject, so that each box keeps its own grid offset
            continue
        if abs(a2 - a1) < (s1 + s2) / 2 + cfg.min_gap:
            continue
        b1, b2 = _centre(rng, cfg, s1), _centre(rng, cfg, s2)
        if relation in ("left of", "right of"):
            return a1, b1, s1, a2, b2, s2
        return b1, a1, s1, b2, a2, s2


def sample_scene(rng: np.random.Generator, config: WorldConfig = WorldConfig(), *, split: str = "train",
                 caption: str | None = None) -> Scene:
    """Sample one scene. ``split="train"`` avoids held-out captions, ``"heldout"`` draws only them,
    ``"any"`` draws from everything; ``caption`` forces the caption (positions/sizes still random)."""
    cfg = config
    if caption is None:
        while True:
            n = 1 if rng.random() < cfg.one_object_prob else 2
            cols = rng.choice(list(COLOURS), size=n, replace=False)
            shp = rng.choice(SHAPES, size=n)
            rel = str(rng.choice(RELATIONS)) if n == 2 else None
            objs = [(str(c), str(s)) for c, s in zip(cols, shp)]
            cap = caption_of(tuple(SceneObject(c, s, 0, 0, 0) for c, s in objs), rel)
            held = is_heldout_caption(cap, cfg)
            if split == "any" or (split == "heldout") == held:
                break
    else:
        objs, rel = parse_caption(caption)
        cap = caption
    res = cfg.size
    if len(objs) == 1:
        (s,) = _sizes(rng, cfg, *cfg.single_size, 1)
        geo = [(_centre(rng, cfg, s), _centre(rng, cfg, s), s)]
    else:
        x1, y1, s1, x2, y2, s2 = _place_pair(rng, cfg, rel)
        geo = [(x1, y1, int(s1)), (x2, y2, int(s2))]
    objects = tuple(SceneObject(c, s, float(x), float(y), int(z)) for (c, s), (x, y, z) in zip(objs, geo))
    image = np.zeros((res, res, 3), np.float32)
    masks = np.stack([render_shape(o.shape, o.cx, o.cy, o.size, res) for o in objects])
    for o, m in zip(objects, masks):
        image[m] = COLOURS[o.colour]
    return Scene(objects, rel, cap, image, masks)


def make_batch(n: int, seed: int, config: WorldConfig = WorldConfig(), *, split: str = "train") -> Batch:
    """``n`` scenes, deterministic from ``seed`` (and ``split``)."""
    rng = np.random.default_rng([seed, {"train": 0, "heldout": 1, "any": 2}[split]])
    scenes = [sample_scene(rng, config, split=split) for _ in range(n)]
    images = np.stack([s.image for s in scenes]) if scenes else np.zeros((0, config.size, config.size, 3), np.float32)
    return Batch(images, [s.caption for s in scenes], scenes)
