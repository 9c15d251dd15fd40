"""Grounding on the shapes world: do word maps and concept maps point at the object they name?

Sources of scenes (the same seeded captions for all):

* ``generated``: the pipeline draws each caption (:func:`mmdit_probe.shapes.evaluate.generate`); object masks
  come from the detector (largest blob of the object's colour) on the generated image, as in the shapes
  evaluation; maps are averaged over the denoising steps;
* ``real σ=s``: ground-truth scenes of the world, analysed with :func:`analyse_image` at each σ; masks are
  the world's own;
* ``real σ=s, prompt ''``: the same, read with the empty prompt — concept maps only (no prompt words), the
  "where is the dog" case.

Per layer (and ``mean``: the map averaged over layers): pointing (argmax inside the mask) and top-k IoU
(:mod:`.grounding`), for colour words and shape words (a shape word only if unique in its caption) — as
prompt-word maps (``word``), raw concept→image attention (``concept_raw``), ConceptAttention's
output-space maps (``concept_output``: softmax over all probed concepts, colours and shapes together) and
the same softmax taken within the word's own group (``concept_output_group``: over the colour concepts for
a colour word, the shape concepts for a shape word — the object's pixels are both "red" and "circle", so
across groups the two words share them).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..record import AttentionRecorder
from ..shapes.detect import DetectorConfig, colour_masks, largest_component
from ..shapes.evaluate import EvalConfig, generate, sampling_defaults
from ..shapes.world import COLOURS, SHAPES, make_batch, parse_caption
from .grounding import map_scores
from .inputs import inputs_from_plan, plan_analysis
from .run import run_analysis

CONCEPTS = (*COLOURS, *SHAPES)
MAP_KINDS = ("word", "concept_raw", "concept_output", "concept_output_group")
CONCEPT_KINDS = MAP_KINDS[1:]


@dataclass(frozen=True)
class ConceptEvalConfig:
    """``n`` scenes (training captions, new layouts, seeded), sampler ``steps`` for generated scenes, ``sigmas``
    for real ones; ``concepts`` probed (None: prompt words only); ``empty_prompt``: also read real scenes with ""."""

    n: int = 48
    seed: int = 0
    steps: int = 20
    batch: int = 16
    sigmas: tuple[float, ...] = (0.3, 0.6, 0.9)
    concepts: tuple[str, ...] | None = CONCEPTS
    empty_prompt: bool = True


@dataclass(frozen=True)
class Target:
    """One object to find: ``kind`` (``colour`` / ``shape``), the ``word`` naming it, its ``mask [H, W]``."""

    kind: str
    word: str
    mask: np.ndarray = field(repr=False)


def targets(caption: str, masks: list[np.ndarray | None]) -> list[Target]:
    """Colour and shape words of ``caption`` with the mask of their object (``masks`` in caption order; None:
    not found). A shape word is a target only if no other object of the caption has that shape."""
    objs, _ = parse_caption(caption)
    shapes = [s for _, s in objs]
    out = []
    for (colour, shape), mask in zip(objs, masks):
        if mask is None:
            continue
        out.append(Target("colour", colour, mask))
        if shapes.count(shape) == 1:
            out.append(Target("shape", shape, mask))
    return out


class Tally:
    """Pointing hits and IoUs per ``(source, map kind, word kind, layer)``; mask areas per source (chance)."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str, str, str], tuple[list[bool], list[float]]] = {}
        self.areas: dict[str, list[float]] = {}

    def score(self, source: str, map_kind: str, found: list[Target], layers: list[int | str],
              get_map: Callable[[str, int | str], torch.Tensor]) -> None:
        """Score ``get_map(word, layer) -> [h, w]`` (layer ``"mean"``: averaged) against each target's mask."""
        for t in found:
            for layer in layers:
                s = map_scores(get_map(t.word, layer), t.mask)
                if s is None:
                    continue
                hits, ious = self.cells.setdefault((source, map_kind, t.kind, str(layer)), ([], []))
                hits.append(s[0])
                ious.append(s[1])

    def add_areas(self, source: str, found: list[Target]) -> None:
        self.areas.setdefault(source, []).extend(float(t.mask.mean()) for t in found if t.kind == "colour")

    def rows(self) -> list[dict]:
        return [{"source": s, "map": m, "kind": k, "layer": l, "pointing": float(np.mean(h)), "iou": float(np.mean(i)),
                 "n": len(h)} for (s, m, k, l), (h, i) in self.cells.items()]

    def chance(self) -> dict[str, float]:
        """Mean mask area fraction per source: the pointing accuracy of a uniformly random point."""
        return {s: float(np.mean(a)) for s, a in self.areas.items() if a}


class _Probes:
    """An :class:`~mmdit_probe.AttentionRecorder` (word maps) and a concept probe entered together; ``result``
    is ``(attention result, concept maps or None)`` (the factory :func:`~mmdit_probe.shapes.evaluate.generate` takes)."""

    def __init__(self, pipe: Any, concepts: tuple[str, ...] | None, max_sequence_length: int):
        from ..concepts import ConceptProbe

        self.rec = AttentionRecorder(pipe, words=True)
        self.cp = None if concepts is None else ConceptProbe(pipe, concepts, max_sequence_length=max_sequence_length)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "_Probes":
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.rec)
            if self.cp is not None:
                stack.enter_context(self.cp)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    @property
    def result(self) -> tuple[Any, Any]:
        return self.rec.result, None if self.cp is None else self.cp.result


def _layers(n_layers: int) -> list[int | str]:
    return list(range(n_layers)) + ["mean"]


def group_output_map(cm: Any, word: str, *, step: int | None, layer: int | None, index: int) -> torch.Tensor:
    """``[y, x]``: softmax of the output-space scores over the concepts of ``word``'s group (colours or shapes),
    at step slot ``step`` (None: mean over steps) and layer ``layer`` (None: mean over layers), cond row ``index``."""
    group = [c for c in (COLOURS if word in COLOURS else SHAPES) if c in cm.concepts]
    idx = [cm.concept_index(c) for c in group]
    scores = cm.scores[:, :, cm.row("cond", index)][:, :, idx]  # [step, layer, group, y, x]
    p = torch.softmax(scores, dim=2)[:, :, group.index(word)]
    if step is not None:
        p = p[step: step + 1]
    if layer is not None:
        p = p[:, cm.layers.index(layer): cm.layers.index(layer) + 1]
    return p.nanmean((0, 1))


def _concept_getter(cm: Any, kind: str, step: int | None, index: int) -> Callable[[str, int | str], torch.Tensor]:
    if kind == "concept_output_group":
        return lambda word, layer: group_output_map(cm, word, step=step, layer=None if layer == "mean" else layer,
                                                    index=index)
    fn = cm.raw_map if kind == "concept_raw" else cm.output_map
    return lambda word, layer: fn(word, step=step, layer=None if layer == "mean" else layer, branch="cond", index=index)


def score_generated(tally: Tally, pipe: Any, captions: list[str], cfg: ConceptEvalConfig,
                    det: DetectorConfig = DetectorConfig()) -> tuple[np.ndarray, list]:
    """Generate every caption under the probes and score them; returns ``(images, per-chunk results)``."""
    _, max_len = sampling_defaults(pipe)
    ecfg = EvalConfig(n=len(captions), steps=cfg.steps, seed=cfg.seed, batch=cfg.batch)
    images, results = generate(pipe, captions, ecfg, lambda p: _Probes(p, cfg.concepts, max_len))
    layers = _layers(len(pipe.transformer.transformer_blocks))
    for ci, (res, cm) in enumerate(results):
        cond = [r for r, b in enumerate(res.branches) if b == "cond"]
        cache: dict = {}

        def word_map(word, layer, row):
            if (word, layer) not in cache:
                cache[(word, layer)] = res.word_map(word, layer=None if layer == "mean" else layer)
            return cache[(word, layer)][row]

        for j, row in enumerate(cond):
            idx = ci * cfg.batch + j
            masks = colour_masks(images[idx], det)
            objs, _ = parse_caption(captions[idx])
            blobs = [largest_component(masks[c]) for c, _ in objs]
            found = targets(captions[idx], [b if b.sum() >= det.min_pixels else None for b in blobs])
            tally.add_areas("generated", found)
            tally.score("generated", "word", found, layers, lambda w, l, row=row: word_map(w, l, row))
            if cm is not None:
                for kind in CONCEPT_KINDS:
                    tally.score("generated", kind, found, layers, _concept_getter(cm, kind, None, j))
    return images, results


def score_real(tally: Tally, pipe: Any, batch: Any, cfg: ConceptEvalConfig) -> None:
    """Analyse every ground-truth scene at ``cfg.sigmas`` (and with the empty prompt) and score it."""
    layers = _layers(len(pipe.transformer.transformer_blocks))
    for scene in batch.scenes:
        found = targets(scene.caption, list(scene.masks))
        for prompt in [scene.caption] + ([""] if cfg.empty_prompt and cfg.concepts else []):
            plan = plan_analysis(pipe, scene.image, prompt, cfg.sigmas, seed=cfg.seed)
            res = run_analysis(pipe, inputs_from_plan(pipe, scene.image, plan), words=bool(prompt),
                               concepts=cfg.concepts)
            for i, s in enumerate(cfg.sigmas):
                source = f"real σ={s:g}" + ("" if prompt else ", prompt ''")
                tally.add_areas(source, found)
                if prompt:
                    tally.score(source, "word", found, layers,
                                lambda w, l, i=i: res.word_map(w, step=i, layer=None if l == "mean" else l,
                                                               batch=res.batch_labels[res.branches.index("cond")]))
                if res.concepts is not None:
                    for kind in CONCEPT_KINDS:
                        tally.score(source, kind, found, layers, _concept_getter(res.concepts, kind, i, 0))


def evaluate_concepts(pipe: Any, cfg: ConceptEvalConfig = ConceptEvalConfig(), *, log=print) -> dict:
    """Both sources on ``cfg.n`` seeded scenes; a JSON-ready report (``rows``, ``chance``, timings)."""
    batch = make_batch(cfg.n, 3_000_000 + cfg.seed, split="train")
    tally = Tally()
    t0 = time.perf_counter()
    score_generated(tally, pipe, batch.captions, cfg)
    t1 = time.perf_counter()
    log(f"generated {cfg.n} scenes ({cfg.steps} steps) in {t1 - t0:.0f} s")
    score_real(tally, pipe, batch, cfg)
    t2 = time.perf_counter()
    log(f"analysed {cfg.n} real scenes at sigmas {list(cfg.sigmas)} in {t2 - t1:.0f} s")
    guidance, max_len = sampling_defaults(pipe)
    return {"config": {**asdict(cfg), "guidance": guidance, "max_sequence_length": max_len},
            "seconds": {"generated": round(t1 - t0, 1), "real": round(t2 - t1, 1)},
            "chance": tally.chance(), "rows": tally.rows()}


MAP_NAMES = {"word": "prompt word", "concept_raw": "concept, raw attention", "concept_output": "concept, output space",
             "concept_output_group": "concept, output space within group"}


def _cell(r: dict | None) -> str:
    return "–" if r is None else f"{r['pointing']:.2f} / {r['iou']:.2f}"


def format_tables(report: dict) -> str:
    """Markdown: a summary (the layer-mean map per map kind and source, with the best single layer) and, per map
    kind, pointing / IoU by layer and source."""
    rows = {(r["source"], r["map"], r["kind"], r["layer"]): r for r in report["rows"]}
    sources = list(dict.fromkeys(r["source"] for r in report["rows"]))
    layers = list(dict.fromkeys(r["layer"] for r in report["rows"]))
    chance = report["chance"]
    out = ["| map | scenes | colour: pointing / IoU | shape: pointing / IoU | best layer (colour pointing) | n (colour, "
           "shape) | chance pointing |", "|---|---|---|---|---|---|---|"]
    for m in MAP_KINDS:
        for s in sources:
            c, sh = rows.get((s, m, "colour", "mean")), rows.get((s, m, "shape", "mean"))
            if c is None and sh is None:
                continue
            per = [(rows[(s, m, "colour", l)]["pointing"], l) for l in layers if l != "mean" and (s, m, "colour", l) in rows]
            best = max(per) if per else None
            out.append(f"| {MAP_NAMES[m]} | {s} | {_cell(c)} | {_cell(sh)} | "
                       f"{'–' if best is None else f'{best[1]}: {best[0]:.2f}'} | {0 if c is None else c['n']}, "
                       f"{0 if sh is None else sh['n']} | {chance.get(s, float('nan')):.2f} |")
    for m in MAP_KINDS:
        here = [s for s in sources if any((s, m, k, "mean") in rows for k in ("colour", "shape"))]
        if not here:
            continue
        out += ["", f"{MAP_NAMES[m]} maps, pointing / IoU by layer (colour; shape)", "",
                "| layer | " + " | ".join(here) + " |", "|---" * (len(here) + 1) + "|"]
        for l in layers:
            cells = [f"{_cell(rows.get((s, m, 'colour', l)))}; {_cell(rows.get((s, m, 'shape', l)))}" for s in here]
            out.append(f"| {l} | " + " | ".join(cells) + " |")
    return "\n".join(out)
