"""Every recorded number equals explicit fp64 softmax from the model's own projections."""

from __future__ import annotations

import math

import pytest
import torch

import mmdit_probe as mp
from mmdit_probe.layout import KEY_GROUPS

from reference import capture_attention_inputs, reference_probs

PROMPTS = ["a red circle left of a blue square", "a green star above the yellow triangle"]

CASES = [
    # variant, cfg, dtype, height, width, prompts, images per prompt
    ("sd3", True, torch.float32, 32, 48, PROMPTS[:1], 1),
    ("sd3", False, torch.float32, 40, 24, PROMPTS, 1),
    ("sd35", True, torch.float32, 24, 40, PROMPTS, 1),
    ("sd35", False, torch.float32, 32, 32, PROMPTS[:1], 2),
    ("sd3", True, torch.bfloat16, 32, 24, PROMPTS[:1], 1),
    ("sd35", True, torch.bfloat16, 24, 32, PROMPTS, 1),
]
# fp32: recorded statistics come from fp32 fused-kernel LSEs; bf16: the same identities, but q·k of
# bf16 inputs are accumulated differently by the kernel, so compare at bf16-level tolerance.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _run(case, **recorder_kwargs):
    variant, cfg, dtype, h, w, prompts, n = case
    pipe = mp.tiny_sd3_pipeline(variant, seed=3, torch_dtype=dtype)
    with capture_attention_inputs(pipe.transformer) as calls, mp.AttentionRecorder(pipe, **recorder_kwargs) as rec:
        pipe(prompts, num_inference_steps=2, height=h, width=w, max_sequence_length=12,
             guidance_scale=5.0 if cfg else 1.0, num_images_per_prompt=n, generator=torch.manual_seed(0),
             output_type="latent")
    return pipe, calls, rec.result


def _blocks(pipe, layer, name):
    return getattr(pipe.transformer.transformer_blocks[layer], name)


@pytest.fixture(scope="module", params=range(len(CASES)), ids=lambda i: "-".join(str(x) for x in CASES[i][:3]))
def recorded(request):
    case = CASES[request.param]
    maps = [mp.MapSelection(q, layers=[1], steps=[1]) for q in mp.QUADRANTS]
    pipe, calls, res = _run(case, groups=True, words=True, word_heads="all", entropy=True, key_mass=True, maps=maps)
    return case, pipe, calls, res


def test_quadrant_mass_entropy_and_maps_match_fp64(recorded):
    case, pipe, calls, res = recorded
    tol = TOL[case[2]]
    att = res.mass.labels("attention")
    grid = res.image_grid
    n_img = grid[0] * grid[1]
    assert len(calls) == len(res.mass.labels("step")) * len(pipe.transformer.transformer_blocks) + (
        len(res.mass.labels("step")) * sum(1 for b in pipe.transformer.transformer_blocks if b.attn2 is not None)
    )
    for step, layer, name, hs, ehs in calls:
        P = reference_probs(_blocks(pipe, layer, name), hs, ehs)  # [B, H, N, N]
        got = res.mass.values[step, layer, att.index(name)]  # [B, H, 2, 2]
        img, txt = slice(0, n_img), slice(n_img, P.shape[-1])
        if ehs is None:  # attn2: image-only
            assert torch.allclose(got[..., 0, 0].double(), torch.ones_like(P[..., 0, 0]), atol=tol)
            assert torch.isnan(got[..., 1, :]).all() and torch.isnan(got[..., 0, 1]).all()
        else:
            ref = torch.stack([
                torch.stack([P[..., img, img].sum(-1).mean(-1), P[..., img, txt].sum(-1).mean(-1)], -1),
                torch.stack([P[..., txt, img].sum(-1).mean(-1), P[..., txt, txt].sum(-1).mean(-1)], -1),
            ], -2)
            assert torch.allclose(got.double(), ref, atol=tol), (step, layer, name, (got.double() - ref).abs().max())
        # entropy per query group
        H = -(P * torch.log(P.clamp_min(1e-300))).sum(-1)
        ent = res.stat("entropy").values[step, layer, att.index(name)]
        assert torch.allclose(ent[..., 0].double(), H[..., img].mean(-1), atol=tol * 10)
        if ehs is not None:
            assert torch.allclose(ent[..., 1].double(), H[..., txt].mean(-1), atol=tol * 10)
        # key-column mass: attention each key receives from image / text queries
        km = res.stat("key_mass").values[step, layer, att.index(name)]
        assert torch.allclose(km[..., 0, : P.shape[-1]].double(), P[..., img, :].sum(-2), atol=tol * n_img)
        if ehs is not None:
            assert torch.allclose(km[..., 1, :].double(), P[..., txt, :].sum(-2), atol=tol * P.shape[-1])
        # full maps (layer 1, step 1, every quadrant)
        if step == 1 and layer == 1 and name == "attn":
            sl = {"image": img, "text": txt}
            for quad in mp.QUADRANTS:
                qs, ks = quad.split("->")
                m = res.attention_map(1, 1, qs, ks)
                assert m.shape == P[..., sl[qs], sl[ks]].shape
                assert torch.allclose(m.double(), P[..., sl[qs], sl[ks]], atol=tol)


def test_group_masses_and_word_maps_match_fp64(recorded):
    case, pipe, calls, res = recorded
    tol = TOL[case[2]]
    att = res.mass.labels("attention")
    assert res.stat("word_map").labels("attention") == ("attn",)  # no always-NaN attn2 slot
    n_img = res.image_grid[0] * res.image_grid[1]
    gm = res.stat("group_mass")
    wm = res.stat("word_map")
    for step, layer, name, hs, ehs in calls:
        if ehs is None:
            continue
        P = reference_probs(_blocks(pipe, layer, name), hs, ehs)
        for b, lay in enumerate(res.layouts):
            for gi, group in enumerate(KEY_GROUPS):
                pos = lay.group_positions(group)
                ref = P[b][..., pos].sum(-1)  # [H, N]
                got = gm.values[step, layer, att.index(name), b, :, :, gi].double()
                assert torch.allclose(got[:, 0], ref[:, :n_img].mean(-1), atol=tol), (group, b)
                assert torch.allclose(got[:, 1], ref[:, n_img:].mean(-1), atol=tol), (group, b)
            # the fine groups partition the keys
            assert torch.allclose(gm.values[step, layer, att.index(name), b].sum(-1).double(),
                                  torch.ones(2, dtype=torch.float64), atol=tol * 10)
            for wi, word in enumerate(wm.labels("word")):
                if word not in lay.words:
                    assert torch.isnan(wm.values[step, layer, 0, b, :, wi]).all()
                    continue
                ref = P[b][:, :n_img, lay.word_positions(word)].sum(-1)
                assert torch.allclose(wm.values[step, layer, 0, b, :, wi].double(), ref, atol=tol)


def test_fp64_projection_reference_fp32():
    """fp32 model: statistics also agree with projections recomputed entirely in float64."""
    case = CASES[0]
    pipe, calls, res = _run(case)
    for step, layer, name, hs, ehs in calls:
        attn = _blocks(pipe, layer, name)
        import copy

        attn64 = copy.deepcopy(attn).double()
        P = reference_probs(attn64, hs.double(), None if ehs is None else ehs.double())
        n_img = res.image_grid[0] * res.image_grid[1]
        got = res.mass.values[step, layer, 0, :, :, 0, 1].double()
        assert torch.allclose(got, P[..., :n_img, n_img:].sum(-1).mean(-1), atol=1e-4)


def test_word_map_and_timesteps(recorded):
    case, pipe, calls, res = recorded
    word = "red" if "red" in res.words else res.words[0]
    m = res.word_map(word, layer=1)
    rows = len(res.layouts)
    assert m.shape == (rows, *res.image_grid)
    # averaging over steps by hand gives the same map
    by_hand = torch.nanmean(res.stat("word_map").sel(word=word, layer=1, attention="attn").values, dim=(0, 2))
    assert torch.allclose(m.flatten(1), by_hand, equal_nan=True)
    # timesteps are the scheduler's (flow-matching: first is 1000)
    assert len(res.timesteps) == 2 and math.isclose(res.timesteps[0], 1000.0, rel_tol=1e-4)
    cfg = case[1]
    assert res.branches == (("uncond",) * (rows // 2) + ("cond",) * (rows // 2) if cfg else ("cond",) * rows)
