"""Exact attention statistics without materialising N×N (design.md §2).

All functions take per-head tensors ``q, k, v`` of shape ``[batch, heads, n, head_dim]`` and
the softmax scale ``s``. ``lse`` is the natural-log log-sum-exp over keys, fp32,
``[batch, heads, n_query]``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

_warned: set[str] = set()


def default_scale(q: torch.Tensor) -> float:
    """The scale ``F.scaled_dot_product_attention`` uses: ``1/sqrt(head_dim)``."""
    return 1.0 / math.sqrt(q.shape[-1])


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(s·q·kᵀ)·v, lse)`` from one fused kernel.

    On CPU the output is bitwise what ``F.scaled_dot_product_attention(q, k, v)`` returns (same
    kernel). On CUDA the flash kernel is tried first, then the memory-efficient one; where neither
    applies a correct slower path (SDPA + blockwise LSE) is used with a one-time warning.
    Returns ``out [B, H, Nq, Dv]`` and ``lse [B, H, Nq]`` (fp32).
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse
    if q.device.type == "cuda":
        return _cuda_attention_with_lse(q, k, v, scale)
    _warn_once(q.device.type, f"no fused log-sum-exp kernel on {q.device.type}; using a blockwise fallback")
    return F.scaled_dot_product_attention(q, k, v, scale=scale), blockwise_lse(q, k, scale)


def _cuda_attention_with_lse(q, k, v, scale):
    """Run the kernel ``F.scaled_dot_product_attention`` would pick, asking it for the LSE.

    ``torch._fused_sdp_choice`` names the backend SDPA dispatches to for these inputs; calling the
    same kernel keeps the output bitwise equal to the unhooked run. Kernels pad the LSE
    (efficient: to a multiple of 32 queries; cuDNN: a trailing 1) — trimmed here.
    """
    from torch.nn.attention import SDPBackend

    n_q = q.shape[-2]
    choice = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale))
    try:
        if choice == SDPBackend.FLASH_ATTENTION:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        elif choice == SDPBackend.EFFICIENT_ATTENTION:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
        elif choice == SDPBackend.CUDNN_ATTENTION:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
        else:
            raise RuntimeError(f"SDPA chose {choice.name}, which returns no log-sum-exp")
    except RuntimeError as err:  # pragma: no cover - depends on the GPU and shapes
        _warn_once(f"cuda-{choice.name}", f"fused LSE kernel unavailable ({err}); using a slower exact fallback")
        return F.scaled_dot_product_attention(q, k, v, scale=scale), blockwise_lse(q, k, scale)
    lse = lse.reshape(*lse.shape[:2], -1)[..., :n_q] if lse.dim() == 4 else lse[..., :n_q]
    return out, lse.float()


def blockwise_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, block: int = 1024) -> torch.Tensor:
    """Exact ``lse`` in query blocks (memory ``B·H·block·Nk``), fp32. Fallback and reference."""
    s = default_scale(q) if scale is None else scale
    out = []
    for start in range(0, q.shape[-2], block):
        logits = torch.matmul(q[..., start : start + block, :].float(), k.float().transpose(-1, -2)) * s
        out.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(out, dim=-1)


def lse_over_keys(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``LSE_S(i)`` for the key set ``k`` (``[B, H, |S|, D]``) through the fused kernel: ``[B, H, Nq]``."""
    if k.shape[-2] == 0:
        return torch.full(q.shape[:-1], float("-inf"), device=q.device)
    return attention_with_lse(q, k, k, scale)[1]


def key_set_mass(lse_set: torch.Tensor, lse_all: torch.Tensor) -> torch.Tensor:
    """``mass(i→S) = exp(LSE_S(i) − LSE_all(i))``: probability each query puts on the key set."""
    return torch.exp(lse_set - lse_all)


def complement_mass(lse_set: torch.Tensor, lse_all: torch.Tensor) -> torch.Tensor:
    """``1 − mass(i→S)``, computed as ``−expm1(LSE_S − LSE_all)`` for accuracy."""
    return -torch.expm1(lse_set - lse_all)


def entropy(q: torch.Tensor, k: torch.Tensor, lse_all: torch.Tensor, scale: float) -> torch.Tensor:
    """Row entropy ``H_i = LSE_all(i) − s·q_i·SDPA(Q, K, K)_i`` (nats), ``[B, H, Nq]``.

    One extra fused pass (values = keys); never forms the attention matrix.
    """
    pk = attention_with_lse(q, k, k, scale)[0]
    return lse_all - scale * (q.float() * pk.float()).sum(-1)


def key_column_mass(q: torch.Tensor, k: torch.Tensor, lse_all: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention each key receives summed over the queries ``q``: ``Σ_i P_ij``, ``[B, H, Nk]``.

    A fused pass with keys as queries and queries as keys, the bias ``−LSE_all(i)`` folded into an
    extra coordinate: ``s·[k_j, 1]·[q_i, −LSE_i/s] = s·q_i·k_j − LSE_i``.
    """
    if q.shape[-2] == 0:
        return torch.zeros(k.shape[:-1], device=k.device)
    dtype = torch.float32
    pad = 8  # keep the head dim a multiple of 8 for GPU kernels
    extra_k = torch.zeros(*k.shape[:-1], pad, dtype=dtype, device=k.device)
    extra_k[..., 0] = 1.0
    extra_q = torch.zeros(*q.shape[:-1], pad, dtype=dtype, device=q.device)
    extra_q[..., 0] = -lse_all.float() / scale
    kq = torch.cat([k.to(dtype), extra_k], dim=-1)
    qk = torch.cat([q.to(dtype), extra_q], dim=-1)
    return torch.exp(attention_with_lse(kq, qk, qk, scale)[1])


def probabilities(
    q: torch.Tensor, k: torch.Tensor, lse_all: torch.Tensor, scale: float
) -> torch.Tensor:
    """Exact softmax rows restricted to the keys ``k``: ``exp(s·q·kᵀ − LSE_all)``, fp32 ``[B, H, Nq, Nk]``.

    ``lse_all`` must be the LSE over *all* keys of the joint sequence, so the block is the true
    slice of the full attention matrix.
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.exp(logits - lse_all.float().unsqueeze(-1))
