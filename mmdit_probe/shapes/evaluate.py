"""Measure the shapes model: prompt adherence, grounding of colour/shape words, ablation sanity.

``python -m mmdit_probe.shapes.evaluate [--n N] [--steps S] [--out FILE.json] [--weights DIR] [--split S]
[--arch A] [--device D]``

The same code measures the SD3 and the Flux shapes model: guidance is CFG for SD3 and true CFG against the
empty prompt for Flux (:func:`guidance_kwargs`); layers are the family's blocks in execution order, and
grounding adds a layer-averaged row per block kind (``mean_joint`` / ``mean_single``) where a model has both.

Ablations use the library's interventions (``mmdit_probe.intervene``): ``zero_text`` =
``ZeroText()`` (the text stream entering every block is zeroed), ``zero_text_pooled`` = that plus
``ZeroText(pooled=True)`` (the pooled text vector that modulates every block), ``skip_L`` =
``SkipLayers([L])`` (block ``L`` passes both streams through).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .detect import DetectorConfig, check_prompt, colour_masks, largest_component
from .world import all_captions, is_heldout_caption, make_batch, parse_caption, WorldConfig

__all__ = ["EvalConfig", "sampling_defaults", "guidance_kwargs", "model_blocks", "heldout_prompts",
           "validation_prompts", "generate", "adherence", "grounding",
           "ablation_context", "grounding_by_kind", "evaluate", "evaluate_main", "build_parser", "format_report"]


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings."""

    n: int = 32
    steps: int = 20
    guidance: float | None = None  # None: the model's trained default (``shapes_config.default_guidance``)
    seed: int = 0
    batch: int = 16
    ablations: bool = True
    split: str = "heldout"  # "heldout": never-trained captions; "validation": training-distribution captions


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` held-out captions (never seen in training), deterministic from ``seed``; half of them
    (rounded up) use a colour–shape pair never seen in training, the rest unseen two-object captions."""
    held = [c for c in all_captions() if is_heldout_caption(c)]
    pairs = WorldConfig().heldout_pairs
    unseen_pair = [c for c in held if any(o in pairs for o in parse_caption(c)[0])]
    other = [c for c in held if c not in set(unseen_pair)]
    rng = np.random.default_rng(seed)
    k = (n + 1) // 2
    out = list(rng.choice(unseen_pair, size=k, replace=k > len(unseen_pair)))
    out += list(rng.choice(other, size=n - k, replace=n - k > len(other)))
    return [str(c) for c in out]


def validation_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` captions drawn like training scenes (training captions only), deterministic from ``seed``:
    the model-selection set, kept apart from the held-out evaluation prompts."""
    return make_batch(n, 1_000_000 + seed, split="train").captions


def sampling_defaults(pipe, guidance: float | None = None) -> tuple[float, int]:
    """``(guidance, max_sequence_length)``: ``guidance`` or else the model's trained default, and its T5 length."""
    cfg = getattr(pipe, "shapes_config", None)
    if guidance is None:
        guidance = cfg.default_guidance if cfg is not None else 7.0
    return float(guidance), (cfg.max_sequence_length if cfg is not None else 12)


def guidance_kwargs(pipe, guidance: float, n_prompts: int) -> dict:
    """The ``pipe(...)`` arguments of classifier-free guidance at scale ``guidance`` for ``n_prompts`` prompts:
    ``guidance_scale`` (SD3, and Flux with a guidance embedding), or for a Flux transformer without one (the
    shapes Flux model) ``true_cfg_scale`` with one empty negative prompt per prompt (the unconditional rows,
    as caption dropout trained them)."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    params = inspect.signature(type(pipe).__call__).parameters
    if "true_cfg_scale" in params and config is not None and not config.get("guidance_embeds", True):
        return {"true_cfg_scale": float(guidance), "negative_prompt": [""] * n_prompts}
    return {"guidance_scale": float(guidance)}


def model_blocks(pipe) -> tuple[str, ...]:
    """Block kind of every layer in execution order (``"joint"`` / ``"single"``), from the model family."""
    from ..families import resolve_family

    return tuple(resolve_family(pipe).block_kinds(pipe.transformer))


def generate(pipe, prompts: list[str], cfg: EvalConfig, recorder_factory=None) -> tuple[np.ndarray, list]:
    """Images ``[N, H, W, 3]`` in 0…1 (and one attention result per chunk when ``recorder_factory``)."""
    guidance, max_len = sampling_defaults(pipe, cfg.guidance)
    images, results = [], []
    for i in range(0, len(prompts), cfg.batch):
        chunk = prompts[i:i + cfg.batch]
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + i)
        kwargs = dict(num_inference_steps=cfg.steps, **guidance_kwargs(pipe, guidance, len(chunk)),
                      max_sequence_length=max_len, generator=gen, output_type="np")
        if recorder_factory is None:
            out = pipe(chunk, **kwargs)
        else:
            with recorder_factory(pipe) as rec:
                out = pipe(chunk, **kwargs)
            results.append(rec.result)
        images.append(np.asarray(out.images, np.float32))
    return np.concatenate(images), results


def adherence(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Fractions of images whose prompted colours / shapes / relation / everything are right.

    ``shape`` counts an image only if every prompted object is present in its colour with its shape."""
    checks = [check_prompt(im, p) for im, p in zip(images, prompts)]
    return {k: float(np.mean([getattr(c, k) for c in checks])) for k in ("colour", "shape", "relation", "all")}


def _point_iou(amap: torch.Tensor, mask: np.ndarray) -> tuple[bool, float]:
    """Pointing hit and top-k IoU (k = mask area) of an ``[h, w]`` map against a full-res ``mask``."""
    H, W = mask.shape
    up = F.interpolate(amap[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    flat = up.flatten()
    m = torch.from_numpy(mask).flatten()
    hit = bool(m[int(flat.argmax())])
    k = int(m.sum())
    top = torch.zeros_like(m)
    top[flat.topk(k).indices] = True
    iou = float((top & m).sum()) / float((top | m).sum())
    return hit, iou


def grounding(images: np.ndarray, prompts: list[str], results: list, n_layers: int, batch: int,
              det: DetectorConfig = DetectorConfig(), *, block_kinds: tuple[str, ...] | None = None) -> dict:
    """Per layer (and ``"mean"`` over layers): pointing accuracy and IoU of colour and shape words.

    ``block_kinds`` (one per layer, e.g. Flux's ``joint`` … ``single``): where it names more than one kind,
    a row ``"mean_<kind>"`` per kind scores the map averaged over that kind's layers.

    The object mask is the detector's colour mask (largest blob) of the *generated* image; objects the detector
    does not find are skipped (counted in ``n``). A shape word is scored only if it is unique in its
    prompt. ``chance`` is the mean mask area fraction (pointing accuracy of a random point)."""
    if block_kinds is not None and len(block_kinds) != n_layers:
        raise ValueError(f"block_kinds names {len(block_kinds)} layers but n_layers is {n_layers}")
    kinds = list(dict.fromkeys(block_kinds or ()))
    groups = {f"mean_{k}": [L for L in range(n_layers) if block_kinds[L] == k] for k in kinds} if len(kinds) > 1 else {}
    layers: list[int | str] = list(range(n_layers)) + ["mean"] + list(groups)
    acc = {str(L): {kind: {"hits": [], "ious": []} for kind in ("colour", "shape")} for L in layers}
    areas = []
    for ci, res in enumerate(results):
        cond = [r for r, b in enumerate(res.branches) if b == "cond"]
        cache: dict = {}
        for j, row in enumerate(cond):
            idx = ci * batch + j
            objs, _ = parse_caption(prompts[idx])
            masks = colour_masks(images[idx], det)
            shape_counts = {s: sum(1 for _, t in objs if t == s) for _, s in objs}
            for colour, shape in objs:
                mask = largest_component(masks[colour])
                if mask.sum() < det.min_pixels:
                    continue
                areas.append(mask.mean())
                words = [("colour", colour)] + ([("shape", shape)] if shape_counts[shape] == 1 else [])
                for kind, word in words:
                    for L in layers:
                        key = (word, L)
                        if key not in cache:
                            cache[key] = res.word_map(word, layer=None if L == "mean" else groups.get(L, L))
                        amap = cache[key][row]
                        if torch.isnan(amap).any():
                            continue
                        hit, iou = _point_iou(amap, mask)
                        acc[str(L)][kind]["hits"].append(hit)
                        acc[str(L)][kind]["ious"].append(iou)
    out = {}
    for L, kinds in acc.items():
        out[L] = {kind: {"pointing": float(np.mean(v["hits"])) if v["hits"] else float("nan"),
                         "iou": float(np.mean(v["ious"])) if v["ious"] else float("nan"),
                         "n": len(v["hits"])} for kind, v in kinds.items()}
    out["chance_pointing"] = float(np.mean(areas)) if areas else float("nan")
    return out


def grounding_by_kind(ground: dict, block_kinds: tuple[str, ...] | list[str]) -> dict:
    """Per block kind (``joint`` / ``single``): its layers, the layer with the best colour pointing and its row, and
    the row of the map averaged over the kind's layers (``mean_<kind>``; ``mean`` where there is one kind)."""
    out = {}
    kinds = list(dict.fromkeys(block_kinds))
    for kind in kinds:
        layers = [str(L) for L, k in enumerate(block_kinds) if k == kind]
        scored = [L for L in layers if not np.isnan(ground[L]["colour"]["pointing"])]
        score = lambda L: (ground[L]["colour"]["pointing"], ground[L]["colour"]["iou"])  # noqa: E731
        best = max(scored, key=score) if scored else None
        out[kind] = {"layers": [int(L) for L in layers], "best_layer": None if best is None else int(best),
                     "best": None if best is None else ground[best],
                     "mean": ground[f"mean_{kind}" if len(kinds) > 1 else "mean"]}
    return out


def ablation_context(pipe, name: str):
    """The library intervention for ``"none"``, ``"zero_text"`` (:class:`~mmdit_probe.ZeroText` at every
    block), ``"zero_text_pooled"`` (also ``ZeroText(pooled=True)``) or ``"skip_<L>"``
    (:class:`~mmdit_probe.SkipLayers`); a context manager that restores the pipeline on exit."""
    from ..ablate import intervene
    from ..ablate import SkipLayers, ZeroText

    if name == "none":
        return contextlib.nullcontext()
    if name == "zero_text":
        return intervene(pipe, ZeroText())
    if name == "zero_text_pooled":
        return intervene(pipe, ZeroText(), ZeroText(pooled=True))
    if name.startswith("skip_"):
        return intervene(pipe, SkipLayers([int(name[5:])]))
    raise ValueError(f"unknown ablation {name!r}")


def evaluate(pipe, cfg: EvalConfig = EvalConfig(), *, log=print) -> dict:
    """Run the three measurements on ``cfg.n`` held-out prompts; return a JSON-ready dict."""
    from ..record import AttentionRecorder

    torch.set_num_threads(2)
    sources = {"heldout": heldout_prompts, "validation": validation_prompts}
    if cfg.split not in sources:
        raise ValueError(f"unknown split {cfg.split!r}; use one of {sorted(sources)}")
    prompts = sources[cfg.split](cfg.n, cfg.seed)
    cfg = replace(cfg, guidance=sampling_defaults(pipe, cfg.guidance)[0])  # the report names the scale used
    pairs = WorldConfig().heldout_pairs
    unseen = [any(o in pairs for o in parse_caption(p)[0]) for p in prompts]
    block_kinds = model_blocks(pipe)
    n_layers = len(block_kinds)
    images, results = generate(pipe, prompts, cfg, lambda p: AttentionRecorder(p, words=True, word_heads="mean"))
    adh = adherence(images, prompts)
    sub = {} if cfg.split != "heldout" else {
        "unseen_pair": adherence(images[np.array(unseen)], [p for p, u in zip(prompts, unseen) if u]),
        "unseen_caption": adherence(images[~np.array(unseen)], [p for p, u in zip(prompts, unseen) if not u]),
    }
    log(f"adherence on {len(prompts)} {cfg.split} prompts: {adh}")
    ground = grounding(images, prompts, results, n_layers, cfg.batch, block_kinds=block_kinds)
    report = {"config": asdict(cfg), "model": type(pipe.transformer).__name__, "block_kinds": list(block_kinds),
              "prompts": prompts, "adherence": adh, "adherence_subsets": sub, "grounding": ground,
              "grounding_by_block_kind": grounding_by_kind(ground, block_kinds)}
    if cfg.ablations:
        table = {"none": adh}
        for name in ["zero_text", "zero_text_pooled"] + [f"skip_{L}" for L in range(n_layers)]:
            with ablation_context(pipe, name):
                ims, _ = generate(pipe, prompts, cfg)
            table[name] = adherence(ims, prompts)
            log(f"ablation {name}: {table[name]}")
        report["ablation"] = table
    log(format_report(report))
    return report


def format_report(report: dict) -> str:
    """Markdown tables of adherence, per-layer grounding and ablations."""
    # "shape" implies "colour": every prompted object is found in its colour *and* has the prompted shape —
    # the adherence criterion; "all" adds the relation.
    lines = ["| prompts | colour | colour+shape | relation | all |", "|---|---|---|---|---|"]
    name = "held-out (all)" if report["config"].get("split", "heldout") == "heldout" else "validation (all)"
    rows = [(name, report["adherence"])] + list(report.get("adherence_subsets", {}).items())
    for name, a in rows:
        lines.append(f"| {name} | {a['colour']:.2f} | {a['shape']:.2f} | {a['relation']:.2f} | {a['all']:.2f} |")
    g = report["grounding"]
    kinds = report.get("block_kinds") or []
    mixed = len(set(kinds)) > 1  # Flux: label each layer with its block kind
    lines += ["", f"| layer | colour pointing | colour IoU | shape pointing | shape IoU |  (chance pointing "
              f"{g['chance_pointing']:.2f})", "|---|---|---|---|---|"]
    for L, v in g.items():
        if L == "chance_pointing":
            continue
        c, s = v["colour"], v["shape"]
        name = f"{L} ({kinds[int(L)]})" if mixed and L.isdigit() else L
        lines.append(f"| {name} | {c['pointing']:.2f} | {c['iou']:.2f} | {s['pointing']:.2f} | {s['iou']:.2f} |")
    if "ablation" in report:
        lines += ["", "| ablation | colour | colour+shape | relation | all |", "|---|---|---|---|---|"]
        for name, a in report["ablation"].items():
            lines.append(f"| {name} | {a['colour']:.2f} | {a['shape']:.2f} | {a['relation']:.2f} | {a['all']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``evaluate-shapes``."""
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="mmdit-probe evaluate-shapes", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=d.n, help="number of held-out prompts")
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps")
    p.add_argument("--guidance", type=float, default=d.guidance, help="CFG scale (default: the model's own)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the prompts and noise")
    p.add_argument("--batch", type=int, default=d.batch, help="images generated per pipeline call")
    p.add_argument("--no-ablations", action="store_true", help="skip the zero-text / knock-out ablation checks")
    p.add_argument("--split", choices=("heldout", "validation"), default=d.split,
                   help="held-out prompts (the reported figures) or training-distribution prompts (model selection)")
    p.add_argument("--weights", default=None, help="weights folder (default: the shipped assets)")
    p.add_argument("--arch", choices=("sd3", "flux"), default=None,
                   help="the shipped model to evaluate (default sd3); with --weights, its config.json says")
    p.add_argument("--device", default="cpu", help="device of the pipeline (cpu, cuda, cuda:N)")
    p.add_argument("--out", default="shapes_eval.json", help="JSON report path")
    return p


def evaluate_main(argv: list[str] | None = None) -> dict:
    """CLI entry point: evaluate and write the JSON report."""
    from .model import shapes_pipeline

    a = build_parser().parse_args(argv)
    cfg = EvalConfig(n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed, batch=a.batch,
                     ablations=not a.no_ablations, split=a.split)
    pipe = shapes_pipeline(path=a.weights, arch=a.arch, device=a.device)
    report = evaluate(pipe, cfg, log=lambda m: print(m, file=sys.stdout, flush=True))
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    evaluate_main()
