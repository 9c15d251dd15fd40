"""The concept path of SD3 / SD3.5 ``JointTransformerBlock`` s.

Concepts go through ``norm1_context`` (``AdaLayerNormZero``; the last block's ``context_pre_only``
``AdaLayerNormContinuous``), ``add_q/k/v_proj`` and ``norm_added_q/k`` (SD3.5's RMS qk-norm) — or, after
``fuse_qkv_projections()``, ``to_added_qkv`` without qk-norm, as ``FusedJointAttnProcessor2_0`` does —
then ``to_add_out``, the ``c_gate_msa`` gate, ``norm2_context`` and ``ff_context``. SD3.5's ``attn2``
is image-only: concepts skip it, as the text stream does. No RoPE.
"""

from __future__ import annotations

from typing import Any

import torch

from .path import BlockInputs, ConceptQKV, execution_device


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class SD3ConceptPath:
    default_max_sequence_length = 256

    def embed(self, pipe: Any, concepts: list[str], max_sequence_length: int, clip_skip: int | None) -> torch.Tensor:
        embeds, *_ = pipe.encode_prompt(prompt=list(concepts), prompt_2=None, prompt_3=None,
                                        device=execution_device(pipe), num_images_per_prompt=1,
                                        do_classifier_free_guidance=False, clip_skip=clip_skip,
                                        max_sequence_length=max_sequence_length)
        return embeds

    def enter(self, block: torch.nn.Module, kind: str, x: torch.Tensor, inputs: BlockInputs) -> ConceptQKV:
        attn = block.attn
        if block.context_pre_only:
            nx, state = block.norm1_context(x, inputs.temb), ()
        else:
            nx, *gates = block.norm1_context(x, emb=inputs.temb)
            state = tuple(gates)  # c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp
        if getattr(attn.processor, "fused", False):  # FusedJointAttnProcessor2_0: one matmul, no qk-norm
            q, k, v = (_heads(t, attn.heads) for t in attn.to_added_qkv(nx).split(attn.to_added_qkv.out_features // 3, -1))
            return ConceptQKV(q, k, v, state)
        q, k, v = (_heads(p(nx), attn.heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            q = attn.norm_added_q(q)
        if attn.norm_added_k is not None:
            k = attn.norm_added_k(k)
        return ConceptQKV(q, k, v, state)

    def leave(self, block: torch.nn.Module, kind: str, x: torch.Tensor, o: torch.Tensor,
              qkv: ConceptQKV) -> torch.Tensor | None:
        if block.context_pre_only:
            return None
        gate_msa, shift_mlp, scale_mlp, gate_mlp = qkv.state
        x = x + gate_msa.unsqueeze(1) * block.attn.to_add_out(o)
        n = block.norm2_context(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * block.ff_context(n)
