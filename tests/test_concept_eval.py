"""Shapes-world grounding evaluation (issue 16): pointing and IoU against hand-computed values and the shapes
evaluation's own definitions, and a smoke run on 2 generated + 2 real scenes with real pipeline maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmdit_probe as mp
from mmdit_probe.analyse import analyse_image
from mmdit_probe.analyse.grounding import iou_top_k, map_scores, pointing_hit
from mmdit_probe.analyse.shapes_eval import (CONCEPTS, MAP_KINDS, ConceptEvalConfig, Tally, format_tables,
                                             group_output_map, score_generated, score_real, targets)
from mmdit_probe.shapes.evaluate import _point_iou, grounding
from mmdit_probe.shapes.world import make_batch


def _block(r: int, c: int, size: int = 64, cell: int = 8) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = True
    return m


def test_pointing_of_a_hand_built_map():
    amap = torch.zeros(8, 8)
    amap[2, 5] = 1.0  # the upsampled peak lies in pixels 16..23 × 40..47
    assert pointing_hit(amap, _block(2, 5)) is True
    assert pointing_hit(amap, _block(2, 6)) is False and pointing_hit(amap, _block(3, 5)) is False
    big = _block(2, 5) | _block(6, 1)
    assert pointing_hit(amap, big) is True


def test_iou_hand_computed():
    a = _block(1, 1, cell=16)  # 256 px
    assert iou_top_k(torch.from_numpy(a).float(), a) == 1.0  # a mask against itself (same size: no resampling)
    assert iou_top_k(torch.from_numpy(_block(2, 2, cell=16)).float(), a) == 0.0  # disjoint, same area
    half = np.zeros((64, 64), bool)
    half[16:32, 24:40] = True  # 256 px, 128 of them inside a
    assert iou_top_k(torch.from_numpy(half).float(), a) == pytest.approx(128 / (256 + 256 - 128))
    assert map_scores(torch.full((8, 8), float("nan")), a) is None
    with pytest.raises(ValueError, match="non-empty"):
        iou_top_k(torch.zeros(8, 8), np.zeros((64, 64), bool))


def test_same_definitions_as_the_shapes_evaluation():
    g = torch.Generator().manual_seed(0)
    scenes = make_batch(6, 11).scenes
    for s in scenes:
        for mask in s.masks:
            amap = torch.rand(8, 8, generator=g)
            assert (pointing_hit(amap, mask), iou_top_k(amap, mask)) == _point_iou(amap, mask)


def test_targets_skip_repeated_shapes_and_missing_objects():
    m = np.ones((4, 4), bool)
    assert [(t.kind, t.word) for t in targets("a red circle left of a blue circle", [m, m])] == [
        ("colour", "red"), ("colour", "blue")]
    assert [(t.kind, t.word) for t in targets("a red circle above a blue square", [None, m])] == [
        ("colour", "blue"), ("shape", "square")]


@pytest.fixture(scope="module")
def pipe():
    p = mp.default_pipeline()
    if not hasattr(p, "shapes_config"):
        pytest.skip("the shapes model's weights are not in this checkout")
    return p


def test_smoke_generated_and_real(pipe):
    """2 generated scenes (4 sampler steps) and 2 real ones: the word tally equals the shapes evaluation's own
    grounding on the same runs; real maps have the right shape and range; counts are the captions' targets."""
    batch = make_batch(2, 5, split="train")
    cfg = ConceptEvalConfig(n=2, steps=4, batch=2, sigmas=(0.5,), concepts=CONCEPTS)
    tally = Tally()
    images, results = score_generated(tally, pipe, batch.captions, cfg)
    rows = {(r["source"], r["map"], r["kind"], r["layer"]): r for r in tally.rows()}
    ref = grounding(images, batch.captions, [res for res, _ in results], 4, cfg.batch)
    for layer in ["0", "1", "2", "3", "mean"]:
        for kind in ("colour", "shape"):
            r, e = rows.get(("generated", "word", kind, layer)), ref[layer][kind]
            assert (0 if r is None else r["n"]) == e["n"]
            if e["n"]:
                assert r["pointing"] == pytest.approx(e["pointing"]) and r["iou"] == pytest.approx(e["iou"])
    assert tally.chance()["generated"] == pytest.approx(ref["chance_pointing"])

    _, cm = results[0]
    assert cm.raw.shape[-2:] == (8, 8) and cm.concepts == CONCEPTS
    torch.testing.assert_close(cm.raw.sum((-1, -2)), torch.ones(cm.raw.shape[:-2]), atol=1e-5, rtol=0)

    real = Tally()
    score_real(real, pipe, batch, cfg)
    n_targets = {k: sum(len([t for t in targets(s.caption, list(s.masks)) if t.kind == k]) for s in batch.scenes)
                 for k in ("colour", "shape")}
    got = {(r["source"], r["map"], r["kind"], r["layer"]): r for r in real.rows()}
    for source, kinds in (("real σ=0.5", MAP_KINDS), ("real σ=0.5, prompt ''", MAP_KINDS[1:])):
        for m in kinds:
            for k, n in n_targets.items():
                if n:
                    r = got[(source, m, k, "mean")]
                    assert r["n"] == n and 0 <= r["pointing"] <= 1 and 0 <= r["iou"] <= 1
    assert ("real σ=0.5, prompt ''", "word", "colour", "mean") not in got
    area = np.mean([m.mean() for s in batch.scenes for m in s.masks])
    assert real.chance()["real σ=0.5"] == pytest.approx(area)

    res = analyse_image(pipe, batch.scenes[0].image, batch.captions[0], [0.5], words=True, concepts=["red", "blue"])
    word = res.word_map(batch.captions[0].split()[1], step=0)
    assert res.branches == ("uncond", "cond") and word.shape == (2, 8, 8)
    assert bool(word[0].isnan().all()) and bool(((word[1] >= 0) & (word[1] <= 1)).all())  # uncond: "" has no words
    total = sum(res.word_map(w, step=0, layer=layer)[1] for w in res.words for layer in range(4)) / 4
    assert bool((total <= 1 + 1e-5).all())  # per image token, the words share at most all of its attention
    out = res.concepts.output_space
    assert bool(((out >= 0) & (out <= 1)).all())
    torch.testing.assert_close(out.sum(3), torch.ones_like(out.sum(3)), atol=1e-5, rtol=0)
    for layer in (None, 2):  # two colour concepts: the within-group softmax is the probe's own output map
        torch.testing.assert_close(group_output_map(res.concepts, "blue", step=0, layer=layer, index=0),
                                   res.concepts.output_map("blue", step=0, layer=layer), rtol=0, atol=1e-6)
    table = format_tables({"rows": real.rows(), "chance": real.chance()})
    assert "| prompt word | real σ=0.5 |" in table and "concept, output space maps" in table
