"""CUDA path: kernel LSEs, zero perturbation within dtype tolerance, exactness, no host syncs. Skips without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmdit_probe as mp
from mmdit_probe.stats import attention_with_lse, blockwise_lse

from reference import capture_attention_inputs, reference_probs

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 333, 64), (1, 3, 1100, 64), (2, 2, 77, 128)])
def test_kernel_lse_matches_blockwise_and_output_matches_sdpa(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    assert lse.shape == shape[:3] and lse.dtype == torch.float32
    assert torch.allclose(lse, blockwise_lse(q, k), atol=2e-2 if dtype != torch.float32 else 1e-4)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))  # same kernel as SDPA picks


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_on_cuda(variant, dtype):
    pipe = mp.tiny_sd3_pipeline(variant, seed=0, torch_dtype=dtype, device="cuda")
    kw = dict(num_inference_steps=2, height=32, width=48, max_sequence_length=12, guidance_scale=5.0, output_type="latent")
    base = pipe("a red circle", generator=torch.Generator("cuda").manual_seed(0), **kw).images
    with capture_attention_inputs(pipe.transformer) as calls, mp.AttentionRecorder(pipe, entropy=True) as rec:
        out = pipe("a red circle", generator=torch.Generator("cuda").manual_seed(0), **kw).images
    assert torch.equal(base, out)
    res = rec.result
    n_img = res.image_grid[0] * res.image_grid[1]
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for step, layer, name, hs, ehs in calls:
        if ehs is None:
            continue
        P = reference_probs(getattr(pipe.transformer.transformer_blocks[layer], name), hs, ehs).cpu()
        got = res.mass.values[step, layer, 0, :, :, 0, 1].double()
        assert torch.allclose(got, P[..., :n_img, n_img:].sum(-1).mean(-1), atol=tol)


def test_default_recording_does_not_sync_with_host():
    pipe = mp.tiny_sd3_pipeline("sd35", seed=0, torch_dtype=torch.bfloat16, device="cuda")
    tr = pipe.transformer
    x = torch.randn(2, 16, 16, 16, device="cuda", dtype=torch.bfloat16)
    ehs = torch.randn(2, 89, 32, device="cuda", dtype=torch.bfloat16)
    pooled = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.full((2,), 500.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        try:
            tr(x, ehs, pooled, t)
        except RuntimeError:
            pytest.skip("the unhooked transformer itself synchronises")
        rec = mp.AttentionRecorder(tr, branches=["uncond", "cond"])
        rec.__enter__()
        try:
            tr(x, ehs, pooled, t)
            tr(x, ehs, pooled, t)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            rec.__exit__(None, None, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rec.result.mass.shape["step"] == 2
