"""The concept path of Flux.1 blocks.

Double-stream blocks: ``norm1_context`` (``AdaLayerNormZero``), the added projections (diffusers'
``_get_qkv_projections``, fused or not), ``norm_added_q/k``, RoPE, then ``to_add_out``, the gates,
``norm2_context`` and ``ff_context``. Single-stream blocks: the block's ``norm``
(``AdaLayerNormZeroSingle``), ``proj_mlp``, ``to_q/k/v``, ``norm_q/k``, RoPE, ``proj_out`` and the gate —
the same modules the joined text tokens go through.

RoPE: concept tokens get the rotation of text position 0 (``FluxPipeline``'s ``txt_ids`` are all zero,
so this is the identity — as ConceptAttention's zero concept ids).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from .path import BlockInputs, ConceptQKV, execution_device


def _rope(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``x [B, T, H, D]`` rotated as text position 0."""
    if rotary is None:
        return x
    cos, sin = (r[:1].expand(x.shape[1], -1) for r in rotary)
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1)


class FluxConceptPath:
    default_max_sequence_length = 512

    def embed(self, pipe: Any, concepts: list[str], max_sequence_length: int, clip_skip: int | None) -> torch.Tensor:
        embeds, _pooled, _ids = pipe.encode_prompt(prompt=list(concepts), prompt_2=None, device=execution_device(pipe),
                                                   num_images_per_prompt=1, max_sequence_length=max_sequence_length)
        return embeds

    def enter(self, block: torch.nn.Module, kind: str, x: torch.Tensor, inputs: BlockInputs) -> ConceptQKV:
        attn = block.attn
        if kind == "single":
            nx, gate = block.norm(x, emb=inputs.temb)
            state: tuple = (gate, block.act_mlp(block.proj_mlp(nx)))
            q, k, v, *_ = _get_qkv_projections(attn, nx, None)
            q, k = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim))), attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        else:
            nx, *gates = block.norm1_context(x, emb=inputs.temb)
            state = tuple(gates)  # c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp
            *_, q, k, v = _get_qkv_projections(attn, nx, nx)
            q = attn.norm_added_q(q.unflatten(-1, (-1, attn.head_dim)))
            k = attn.norm_added_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        q, k = _rope(q, inputs.rotary), _rope(k, inputs.rotary)
        return ConceptQKV(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), state)

    def leave(self, block: torch.nn.Module, kind: str, x: torch.Tensor, o: torch.Tensor,
              qkv: ConceptQKV) -> torch.Tensor | None:
        if kind == "single":
            gate, mlp = qkv.state
            x = x + gate.unsqueeze(1) * block.proj_out(torch.cat([o, mlp], dim=2))
        else:
            gate_msa, shift_mlp, scale_mlp, gate_mlp = qkv.state
            x = x + gate_msa.unsqueeze(1) * block.attn.to_add_out(o)
            n = block.norm2_context(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            x = x + gate_mlp.unsqueeze(1) * block.ff_context(n)
        return x.clip(-65504, 65504) if x.dtype == torch.float16 else x
