"""Kernels under attention masks: the fused kernel with a mask is SDPA with that mask (bitwise on CPU),
its LSE is the masked one, and every statistic computed from folded ``q, k`` equals an explicit fp64
masked softmax (masked keys probability 0; rows whose every key is masked put 0 everywhere)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmdit_probe import kernels as kn

B, H, S, D = 2, 3, 12, 8
LENGTHS = (5, 9)  # unmasked positions per batch row (Chroma: prompt + EOS + one padding token)


def _padding(dtype_bool: bool) -> torch.Tensor:
    m = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        m[b, :n] = True
    return m if dtype_bool else m.float()


def chroma_mask(kind: str) -> torch.Tensor:
    """The masks a Chroma block hands SDPA: ``m_i · m_j`` for a float (diffusers 0.42.1) or boolean padding mask."""
    m = _padding(kind == "bool")
    return m[:, None, None, :] * m[:, None, :, None]


def masks() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    key_bool = _padding(True)[:, None, None, :]
    key_add = torch.randn(B, 1, 1, S, generator=g).masked_fill(~key_bool, float("-inf"))
    u, w = torch.randn(B, 1, S, 1, generator=g), torch.randn(B, 1, 1, S, generator=g)
    finfo_min = torch.zeros(B, 1, 1, S).masked_fill(~key_bool, torch.finfo(torch.float32).min)  # transformers' style
    return {"chroma-float": chroma_mask("float"), "chroma-bool": chroma_mask("bool"), "key-bool": key_bool,
            "key-additive": key_add, "rank-one": u * w, "per-head-key": torch.randn(B, H, 1, S, generator=g),
            "finfo-min": finfo_min}


def reference(q, k, mask):
    """fp64 ``softmax(s·q·kᵀ + mask)`` ``[B, H, S, S]``, 0 on rows whose every key is masked, and its LSE (−inf there)."""
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    live = (logits != float("-inf")).any(-1, keepdim=True)
    P = torch.softmax(logits.masked_fill(~live, 0.0), -1) * live
    lse = torch.logsumexp(logits, -1)
    return P, lse


def qkv(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("name", list(masks()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_with_mask_is_sdpa_bitwise_and_lse_is_masked(name, dtype):
    mask = masks()[name]
    mask = mask if mask.dtype == torch.bool else mask.to(dtype)
    q, k, v = qkv(dtype)
    out, lse = kn.attention_with_lse(q, k, v, attn_mask=mask)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    _, ref = reference(q, k, mask)
    dead = ref == float("-inf")
    assert torch.equal(lse == float("-inf"), dead)  # the CPU kernel writes 0 there; the LSE says "no key"
    assert torch.allclose(lse[~dead].double(), ref[~dead], atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.allclose(kn.blockwise_lse(q, k, bias=kn.additive_mask(mask, dtype), block=5).double(), ref,
                          atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("name", list(masks()))
def test_statistics_from_folded_qk_equal_fp64_masked_softmax(name):
    mask = masks()[name]
    q, k, v = qkv(seed=1)
    s = kn.default_scale(q)
    P, _ = reference(q, k, mask)
    out, lse = kn.attention_with_lse(q, k, v, attn_mask=mask)
    fold = kn.fold_mask(mask, s, S)
    fq, fk = fold.apply(q, k)
    assert fq.shape == (B, H, S, D + 8) and fq.dtype == torch.float32
    assert torch.equal(fold.attends.expand(B, H, S), lse != float("-inf"))
    tol = 2e-6
    # full probabilities, and the mass on a key set (the text-like first 4 keys) and its complement
    assert torch.allclose(kn.probabilities(fq, fk, lse, s).double(), P, atol=tol)
    keys = slice(0, 4)
    lse_set = kn.lse_over_keys(fq, fk[:, :, keys], s)
    assert torch.allclose(kn.key_set_mass(lse_set, lse).double(), P[..., keys].sum(-1), atol=tol)
    assert torch.allclose(kn.complement_mass(lse_set, lse).double(), P[..., 4:].sum(-1), atol=tol)
    # entropy (0·log 0 = 0; a row that attends nowhere has entropy 0)
    H_ref = -(P * torch.log(P.clamp_min(1e-300))).sum(-1)
    assert torch.allclose(kn.entropy(fq, fk, lse, s).double(), H_ref, atol=1e-5)
    # key-column mass over a subset of queries
    rows = slice(2, 10)
    km = kn.key_column_mass(fq[:, :, rows], fk, lse[..., rows], s)
    assert torch.allclose(km.double(), P[:, :, rows].sum(-2), atol=1e-5)
    # an attention recomputed over a key subset from the folded view is the masked one
    sub_out, sub_lse = kn.attention_with_lse(fq, fk[:, :, 2:], F.pad(v, (0, 8))[:, :, 2:], s)
    Psub, lse_sub_ref = reference(q, k[:, :, 2:], mask[..., 2:])
    live = lse_sub_ref != float("-inf")
    assert torch.allclose(sub_lse.double()[live], lse_sub_ref[live], atol=1e-5)
    assert torch.allclose(sub_out[..., :D].double()[live], (Psub @ v[:, :, 2:].double())[live], atol=1e-5)


def test_chroma_float_mask_is_a_bias_not_a_mask():
    """diffusers 0.42.1's float Chroma mask adds +1 to unmasked pairs; padding keys keep probability > 0."""
    q, k, v = qkv(seed=2)
    P, _ = reference(q, k, chroma_mask("float"))
    assert (P[0, :, :, LENGTHS[0]:] > 0).all()
    Pb, _ = reference(q, k, chroma_mask("bool"))
    assert (Pb[0, :, :, LENGTHS[0]:] == 0).all() and (Pb[0, :, LENGTHS[0]:] == 0).all()


@pytest.mark.parametrize("bad", ["causal", "rank-two"])
def test_masks_without_a_padding_structure_are_refused(bad):
    if bad == "causal":
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        why = "not \\(query rows\\) × \\(keys\\)"
    else:
        g = torch.Generator().manual_seed(0)
        mask = torch.randn(1, 1, S, 2, generator=g) @ torch.randn(1, 1, 2, S, generator=g)
        why = "not \\(query value\\) × \\(key value\\)"
    with pytest.raises(kn.MaskFoldError, match=why):
        kn.fold_mask(mask, 0.3, S)


def test_fully_masked_rows_add_nothing_to_key_mass():
    q, k, _ = qkv(seed=3)
    lse = torch.full((B, H, S), float("-inf"))
    assert torch.equal(kn.key_column_mass(q, k, lse, kn.default_scale(q)), torch.zeros(B, H, S))
    assert torch.equal(kn.entropy(q, k, lse, 0.3), torch.zeros(B, H, S))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["chroma-float", "chroma-bool", "key-bool"])
@pytest.mark.parametrize("shape", [(2, 4, 333, 64), (1, 3, 590, 128)])
def test_cuda_kernel_with_mask_is_sdpa_bitwise(dtype, kind, shape):
    """The kernel SDPA picks under a mask (memory-efficient / cuDNN, with the bias as SDPA prepares it) gives
    SDPA's output bitwise, and its LSE is the masked one."""
    b, h, s, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    m = torch.arange(s, device="cuda")[None, :] < torch.tensor([[s // 3], [s // 2]], device="cuda")[:b]
    mask = {"chroma-float": (m[:, None, None, :] * m[:, None, :, None]).to(dtype),
            "chroma-bool": m[:, None, None, :] & m[:, None, :, None], "key-bool": m[:, None, None, :]}[kind]
    out, lse = kn.attention_with_lse(q, k, v, attn_mask=mask)
    ref_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    live = (kn.additive_mask(mask, dtype) != float("-inf")).any(-1).expand(b, h, s)
    assert torch.equal(out[live], ref_out[live])  # rows that attend nowhere: whatever SDPA writes (0 or NaN)
    assert torch.equal(out.isnan(), ref_out.isnan())
    _, ref = reference(q.cpu(), k.cpu(), mask.cpu())
    assert torch.equal((lse == float("-inf")).cpu(), ref == float("-inf"))
    assert torch.allclose(lse.cpu().double()[live.cpu()], ref[live.cpu()], atol=1e-4 if dtype == torch.float32 else 2e-2)
