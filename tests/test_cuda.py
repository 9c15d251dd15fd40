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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_key_column_mass_matches_fp64(dtype):
    """Column sums of the attention matrix from the keys-as-queries pass (half precision runs in its own dtype
    with the −LSE bias split in three parts) equal fp64 column sums of the same q/k."""
    from mmdit_probe.kernels import key_column_mass

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 3, n, 64, device="cuda", dtype=dtype, generator=g) for n in (700, 333))
    s = 64 ** -0.5
    logits = q.double() @ k.double().transpose(-1, -2) * s
    lse = torch.logsumexp(logits, -1)
    ref = torch.exp(logits - lse[..., None]).sum(-2)
    got = key_column_mass(q, k, lse.float(), s).double()
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux_pipeline_on_cuda(dtype):
    """Flux.1 on CUDA: output unchanged by recording, and the recorded image→text mass equals fp64 softmax of
    the q/k the native SDPA kernel received (double- and single-stream blocks)."""
    from unittest import mock

    pipe = mp.tiny_flux_pipeline(seed=1, device="cuda").to(dtype=dtype)
    kw = dict(height=32, width=40, max_sequence_length=16, num_inference_steps=2, output_type="latent")
    seen, real, active = [], F.scaled_dot_product_attention, {"on": False}

    def spy(*args, **kwargs):  # the transformer's kernel calls only (the text encoders use SDPA too)
        if active["on"]:
            q = kwargs.get("query", args[0] if args else None)
            k = kwargs.get("key", args[1] if len(args) > 1 else None)
            seen.append((q.detach().double().cpu(), k.detach().double().cpu()))
        return real(*args, **kwargs)

    tr = pipe.transformer
    hooks = [tr.register_forward_pre_hook(lambda *a: active.__setitem__("on", True)),
             tr.register_forward_hook(lambda *a: active.__setitem__("on", False))]
    try:
        with mock.patch("torch.nn.functional.scaled_dot_product_attention", spy):
            base = pipe("a red circle", generator=torch.Generator("cuda").manual_seed(0), **kw).images
    finally:
        for h in hooks:
            h.remove()
    with mp.AttentionRecorder(pipe) as rec:
        out = pipe("a red circle", generator=torch.Generator("cuda").manual_seed(0), **kw).images
    assert torch.equal(base, out)
    res = rec.result
    n_layers, n_text = res.mass.shape["layer"], res.layouts[0].n_text
    assert len(seen) == 2 * n_layers
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for i, (q, k) in enumerate(seen):
        step, layer = divmod(i, n_layers)
        P = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)[0]  # [H, S, S], text first
        got = res.mass.values[step, layer, 0, 0, :, 0, 1].double()  # image queries → text keys
        assert torch.allclose(got, P[:, n_text:, :n_text].sum(-1).mean(-1), atol=tol)
