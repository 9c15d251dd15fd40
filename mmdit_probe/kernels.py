"""Exact attention statistics without materialising N×N (design.md §2).

All functions take per-head tensors ``q, k, v`` of shape ``[batch, heads, n, head_dim]`` and
the softmax scale ``s``. ``lse`` is the natural-log log-sum-exp over keys, fp32,
``[batch, heads, n_query]``.

Attention masks (Chroma's T5 padding mask): :func:`attention_with_lse` takes the mask the model
passes to SDPA (boolean or additive). A query row whose every key is masked has no distribution:
its ``lse`` is ``−inf`` (log of an empty sum) and it puts probability 0 on every key (PyTorch's
kernels return a zero output row for it); the mass, entropy and key-mass helpers below return 0
for such rows. :func:`fold_mask` turns a padding mask into extra ``q``/``k`` coordinates, so every
statistic computed from ``(q, k, lse)`` is over the kernel's masked logits.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_warned: set[str] = set()

#: logit penalty (before the scale) that folded masks put on masked pairs: ``exp`` underflows to exactly 0 in fp32
MASK_PENALTY = 1.0e9
_FOLD_WIDTH = 8  # extra coordinates appended by fold_mask (head dims stay a multiple of 8 for GPU kernels)
_HUGE = 1.0e30  # fold_mask clamps additive values below −_HUGE to it (value/scale must stay finite in fp32)


def default_scale(q: torch.Tensor) -> float:
    """The scale ``F.scaled_dot_product_attention`` uses: ``1/sqrt(head_dim)``."""
    return 1.0 / math.sqrt(q.shape[-1])


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def additive_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask SDPA applies for ``attn_mask``: a boolean mask becomes 0 (keep) / −inf (drop) in
    ``dtype``, as ``F.scaled_dot_product_attention`` converts it; a float mask is already additive."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))


def attending_rows(bias: torch.Tensor) -> torch.Tensor:
    """``[B, h, Nq|1]`` bool: query rows of the additive mask ``bias [B, h, Nq|1, Nk]`` with at least one key not at −inf."""
    return (bias != float("-inf")).any(-1)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, attn_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(s·q·kᵀ + mask)·v, lse)`` from one fused kernel.

    On CPU the output is bitwise what ``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)``
    returns (same kernel, same converted mask). On CUDA the kernel SDPA would pick is asked for its LSE
    (flash, memory-efficient or cuDNN); where none applies a correct slower path (SDPA + blockwise LSE) is
    used with a one-time warning. ``attn_mask``: boolean (True = attend) or additive, broadcastable to
    ``[B, H, Nq, Nk]`` (4-D). Returns ``out [B, H, Nq, Dv]`` and ``lse [B, H, Nq]`` (fp32; −inf on rows whose
    every key is masked, whatever the kernel wrote there).
    """
    bias = additive_mask(attn_mask, q.dtype)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                               scale=scale)
    elif q.device.type == "cuda":
        out, lse = _cuda_attention_with_lse(q, k, v, scale, bias)
    else:
        _warn_once(q.device.type, f"no fused log-sum-exp kernel on {q.device.type}; using a blockwise fallback")
        out, lse = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), blockwise_lse(q, k, scale, bias=bias)
    if bias is not None:
        lse = lse.masked_fill(~attending_rows(bias), float("-inf"))
    return out, lse


def _cuda_attention_with_lse(q, k, v, scale, bias):
    """Run the kernel ``F.scaled_dot_product_attention`` would pick, asking it for the LSE.

    ``torch._fused_sdp_choice`` names the backend SDPA dispatches to for these inputs; calling the
    same kernel with the same (converted, expanded) bias keeps the output bitwise equal to the unhooked
    run. Kernels pad the LSE (efficient: to a multiple of 32 queries; cuDNN: a trailing 1) — trimmed here.
    """
    from torch.nn.attention import SDPBackend

    n_q = q.shape[-2]
    choice = SDPBackend(torch._fused_sdp_choice(q, k, v, bias, 0.0, False, scale=scale))
    try:
        if choice == SDPBackend.FLASH_ATTENTION and bias is None:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        elif choice == SDPBackend.EFFICIENT_ATTENTION:
            b = None if bias is None else _aligned_bias(bias, q, k)
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, b, True, 0.0, False, scale=scale)[:2]
        elif choice == SDPBackend.CUDNN_ATTENTION:
            b = None if bias is None else bias.expand(q.shape[0], q.shape[1], n_q, k.shape[-2])
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, b, True, 0.0, False, False, scale=scale)[:2]
        else:
            raise RuntimeError(f"SDPA chose {choice.name}, which returns no log-sum-exp")
    except RuntimeError as err:  # pragma: no cover - depends on the GPU and shapes
        _warn_once(f"cuda-{choice.name}", f"fused LSE kernel unavailable ({err}); using a slower exact fallback")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), blockwise_lse(q, k, scale, bias=bias)
    lse = lse.reshape(*lse.shape[:2], -1)[..., :n_q] if lse.dim() == 4 else lse[..., :n_q]
    return out, lse.float()


def _aligned_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The bias as SDPA hands it to the memory-efficient kernel: last dim padded in memory to a multiple of 16
    (same values), expanded to ``[B, H, Nq, Nk]``."""
    n_k = bias.shape[-1]
    if n_k % 16:
        bias = F.pad(bias, (0, 16 - n_k % 16))[..., :n_k]
    return bias.expand(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])


class MaskFoldError(ValueError):
    """An attention mask that :func:`fold_mask` cannot express as extra ``q``/``k`` coordinates."""


@dataclass(frozen=True)
class MaskFold:
    """A padding mask as extra coordinates: ``s·(q_extra_i · k_extra_j)`` equals the mask's additive value on
    every allowed pair of an attending row and is ``−MASK_PENALTY·s`` on masked pairs (``exp`` is exactly 0).

    ``q_extra [B, h, Nq, 8]``, ``k_extra [B, h, Nk, 8]`` (fp32; ``B``, ``h`` may be 1 and broadcast);
    ``attends [B, h, Nq]``: rows with at least one allowed key (the others attend nowhere: ``lse = −inf``).
    """

    q_extra: torch.Tensor
    k_extra: torch.Tensor
    attends: torch.Tensor

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q, k [B, H, N, D]`` → fp32 ``[B, H, N, D + 8]``: ``s·q'·k'ᵀ`` is the masked logits of the kernel."""
        b, h = q.shape[:2]
        qe = self.q_extra.expand(b, h, -1, -1)
        ke = self.k_extra.expand(b, h, -1, -1)
        return torch.cat([q.float(), qe], -1), torch.cat([k.float(), ke], -1)


def fold_mask(attn_mask: torch.Tensor, scale: float, n_query: int) -> MaskFold:
    """Fold a padding mask (boolean or additive, broadcastable to ``[B, H, Nq, Nk]``) into a :class:`MaskFold`.

    Padding masks are the ones whose allowed pairs are (attending rows) × (visible keys) and whose finite
    additive values are ``r_i · w_j`` (rank one): key masks ``[B, 1, 1, Nk]``, Chroma's ``m_i · m_j`` (float:
    an additive +1 bias on unmasked pairs) and ``m_i ∧ m_j`` (boolean). Other masks raise
    :class:`MaskFoldError` (no exact low-rank encoding exists). Additive values below −1e30 (``finfo.min``
    masks) are clamped there (probability 0 either way). Cost: about six passes over a ``[B, 1, N, N]`` mask.
    """
    if attn_mask.dim() > 4:
        raise MaskFoldError(f"an attention mask has at most 4 dims [B, H, Nq, Nk], got shape {tuple(attn_mask.shape)}")
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    finite = None if mask.dtype == torch.bool else mask.float()
    if finite is None:
        allowed = mask
    elif bool((finite < -_HUGE).any()):  # dropped pairs (−inf), or finfo.min-style values: clamped
        allowed = finite != float("-inf")
        finite = finite.masked_fill(~allowed, 0.0).clamp_min(-_HUGE)
    else:  # nothing dropped (diffusers 0.42.1's float Chroma mask): only a bias
        allowed = None
    if allowed is None:
        attends = torch.ones(mask.shape[:-1], dtype=torch.bool, device=mask.device)
        visible = torch.ones(*mask.shape[:-2], mask.shape[-1], dtype=torch.bool, device=mask.device)
        separable = torch.ones((), dtype=torch.bool, device=mask.device)
    else:
        attends, visible = allowed.any(-1), allowed.any(-2)  # [B, h, Nq'], [B, h, Nk]
        separable = (allowed == (attends.unsqueeze(-1) & visible.unsqueeze(-2))).all()
    if finite is None:  # boolean: no additive values
        r, w = torch.zeros(attends.shape, device=mask.device), torch.zeros(visible.shape, device=mask.device)
        rank_one = separable
    else:
        r, w, rank_one = _rank_one(finite)
    separable, rank_one = torch.stack([separable, rank_one]).tolist()  # one host sync for both checks
    if not separable:
        raise MaskFoldError(_fold_refusal(mask, "its allowed (query, key) pairs are not (query rows) × (keys)"))
    if not rank_one:
        raise MaskFoldError(_fold_refusal(mask, "its additive values are not (query value) × (key value)"))
    q_extra = torch.zeros(*attends.shape, _FOLD_WIDTH, device=mask.device)
    k_extra = torch.zeros(*visible.shape, _FOLD_WIDTH, device=mask.device)
    q_extra[..., 0] = 1.0
    k_extra[..., 0] = (~visible).float() * -MASK_PENALTY
    q_extra[..., 1] = r
    k_extra[..., 1] = w / scale
    return MaskFold(q_extra.expand(*attends.shape[:2], n_query, _FOLD_WIDTH),
                    k_extra, attends.expand(*attends.shape[:2], n_query))


def _rank_one(finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(r [B, h, Nq'], w [B, h, Nk], ok)``: ``finite ≈ r_i · w_j`` (fp32 rounding) where ``ok`` (a 0-d bool tensor).

    The pivot is an entry of largest ``|value|``: its row gives ``w`` (scaled by the pivot), its column ``r``.
    """
    lo, hi = torch.aminmax(finite, dim=-1)  # [B, h, Nq']
    row_size = torch.maximum(lo.abs(), hi.abs())
    size, i_star = row_size.max(-1)  # [B, h]
    n_k = finite.shape[-1]
    row = finite.gather(-2, i_star[..., None, None].expand(*finite.shape[:-2], 1, n_k)).squeeze(-2)
    j_star = row.abs().argmax(-1)
    r = finite.gather(-1, j_star[..., None, None].expand(*finite.shape[:-1], 1)).squeeze(-1)
    pivot = row.gather(-1, j_star.unsqueeze(-1))
    w = torch.where(pivot == 0, torch.zeros_like(row), row / torch.where(pivot == 0, torch.ones_like(pivot), pivot))
    flat = finite.expand(*r.shape[:2], *finite.shape[-2:]).reshape(-1, *finite.shape[-2:])
    error = torch.baddbmm(flat, r.reshape(-1, r.shape[-1], 1), w.reshape(-1, 1, n_k), alpha=-1)
    worst = torch.linalg.vector_norm(error, ord=float("inf"), dim=(-2, -1)).reshape(size.shape)
    return r, w, (worst <= 1e-6 * size).all()


def _fold_refusal(mask: torch.Tensor, why: str) -> str:
    return (f"mmdit_probe records and edits attention under padding masks (a key mask, or query rows × keys as "
            f"Chroma builds it; boolean or additive), but this attention call's mask {tuple(mask.shape)} is not one: "
            f"{why}. Run this model without recording or attention edits, or pass a padding mask")


def blockwise_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, block: int = 1024, *,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``lse`` in query blocks (memory ``B·H·block·Nk``), fp32, with an optional additive ``bias``
    (4-D, broadcastable to ``[B, H, Nq, Nk]``). Fallback and reference."""
    s = default_scale(q) if scale is None else scale
    out = []
    for start in range(0, q.shape[-2], block):
        logits = torch.matmul(q[..., start : start + block, :].float(), k.float().transpose(-1, -2)) * s
        if bias is not None:
            logits = logits + (bias if bias.shape[-2] == 1 else bias[..., start : start + block, :]).float()
        out.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(out, dim=-1)


def lse_over_keys(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``LSE_S(i)`` for the key set ``k`` (``[B, H, |S|, D]``) through the fused kernel: ``[B, H, Nq]``."""
    if k.shape[-2] == 0:
        return torch.full(q.shape[:-1], float("-inf"), device=q.device)
    return attention_with_lse(q, k, k, scale)[1]


def _nowhere(lse_all: torch.Tensor) -> torch.Tensor:
    """Rows that attend to no key (every key masked): ``lse_all = −inf``."""
    return lse_all == float("-inf")


def key_set_mass(lse_set: torch.Tensor, lse_all: torch.Tensor) -> torch.Tensor:
    """``mass(i→S) = exp(LSE_S(i) − LSE_all(i))``: probability each query puts on the key set (0 on rows
    that attend nowhere)."""
    return torch.exp(lse_set - lse_all).masked_fill(_nowhere(lse_all), 0.0)


def complement_mass(lse_set: torch.Tensor, lse_all: torch.Tensor) -> torch.Tensor:
    """``1 − mass(i→S)``, computed as ``−expm1(LSE_S − LSE_all)`` for accuracy (0 on rows that attend nowhere)."""
    return (-torch.expm1(lse_set - lse_all)).masked_fill(_nowhere(lse_all), 0.0)


def entropy(q: torch.Tensor, k: torch.Tensor, lse_all: torch.Tensor, scale: float) -> torch.Tensor:
    """Row entropy ``H_i = LSE_all(i) − s·q_i·SDPA(Q, K, K)_i`` (nats), ``[B, H, Nq]``.

    One extra fused pass (values = keys); never forms the attention matrix. 0 on rows that attend nowhere.
    """
    pk = attention_with_lse(q, k, k, scale)[0]
    return (lse_all - scale * (q.float() * pk.float()).sum(-1)).masked_fill(_nowhere(lse_all), 0.0)


def key_column_mass(q: torch.Tensor, k: torch.Tensor, lse_all: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention each key receives summed over the queries ``q``: ``Σ_i P_ij``, ``[B, H, Nk]``.

    A fused pass with keys as queries and queries as keys, the bias ``−LSE_all(i)`` folded into extra
    coordinates: ``s·[k_j, 1, 1, 1]·[q_i, b1, b2, b3] = s·q_i·k_j − LSE_i`` with ``b1 + b2 + b3 = −LSE_i/s``.
    On CUDA with half-precision ``q``/``k`` the pass runs in that dtype (the flash kernel; the bias split in
    three parts keeps ~24 bits of it), elsewhere in fp32. Rows that attend nowhere add 0.
    """
    if q.shape[-2] == 0:
        return torch.zeros(k.shape[:-1], device=k.device)
    half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
    dtype = q.dtype if half else torch.float32
    pad = 8  # keep the head dim a multiple of 8 for GPU kernels
    penalty = min(MASK_PENALTY, torch.finfo(dtype).max / 4)
    bias = (-lse_all.float() / scale).masked_fill(_nowhere(lse_all), -penalty)
    extra_k = torch.zeros(*k.shape[:-1], pad, dtype=dtype, device=k.device)
    extra_q = torch.zeros(*q.shape[:-1], pad, dtype=dtype, device=q.device)
    for part in range(3 if half else 1):  # b1 = round(bias), b2 = round(bias − b1), …
        extra_k[..., part] = 1.0
        extra_q[..., part] = bias.to(dtype)
        bias = bias - extra_q[..., part].float()
    kq = torch.cat([k.to(dtype), extra_k], dim=-1)
    qk = torch.cat([q.to(dtype), extra_q], dim=-1)
    return torch.exp(attention_with_lse(kq, qk, qk, scale)[1])


def probabilities(
    q: torch.Tensor, k: torch.Tensor, lse_all: torch.Tensor, scale: float
) -> torch.Tensor:
    """Exact softmax rows restricted to the keys ``k``: ``exp(s·q·kᵀ − LSE_all)``, fp32 ``[B, H, Nq, Nk]``.

    ``lse_all`` must be the LSE over *all* keys of the joint sequence, so the block is the true
    slice of the full attention matrix. Rows that attend nowhere are 0.
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.exp(logits - lse_all.float().unsqueeze(-1)).masked_fill(_nowhere(lse_all).unsqueeze(-1), 0.0)
