"""``describe(pipe)`` for Chroma pipelines: every entry read from the objects.

Sections: ``components``; ``text`` (T5 hidden states — computed with the tokenizer's mask —, the positions the
padding mask keeps, ``text_ids``; no pooled input); ``image`` (Flux.1's 2×2 packing, :func:`.packed_image_rows`);
``transformer`` (double- then single-stream blocks, heads, qk-norm, rotary axes, the modulation approximator,
the attention mask); ``scheduler`` (:meth:`ChromaFamily.schedule`: sigmas ``linspace(1, 1/n, n)`` always passed,
``mu`` from the packed token count); ``run`` (real CFG: ``guidance_scale > 1`` adds an uncond call per step).
"""

from __future__ import annotations

from typing import Any

import torch

from .describe_flux import packed_image_rows
from .describe_table import (DescriptionRow, block_rows, component_rows, encoder_device, run_size, run_value,
                             schedule_rows)
from .families import prompt_layout, resolve_family

__all__ = ["CHROMA_SECTIONS", "chroma_rows"]

CHROMA_SECTIONS = ("components", "text", "image", "transformer", "scheduler", "run")
_MASK_RULE = "prompt tokens + EOS + one padding position (ChromaPipeline._get_t5_prompt_embeds)"


@torch.no_grad()
def _text_rows(pipe: Any, prompt: str | None, length: int, length_source: str) -> list[DescriptionRow]:
    tr = pipe.transformer
    if prompt is not None:
        tok = pipe.tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        dev = encoder_device(pipe.text_encoder)
        t5 = tuple(pipe.text_encoder(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev))[0].shape[1:])
        t5_src = "measured: text_encoder(ids, attention_mask=tokenizer mask)[0]"
    else:
        t5, t5_src = (length, pipe.text_encoder.config.d_model), "config: max_sequence_length, text_encoder.config.d_model"
    rows = [
        DescriptionRow("text", "T5 hidden states", t5, t5_src),
        DescriptionRow("text", "T5 length (max_sequence_length)", length, length_source),
        DescriptionRow("text", "pooled text input", None,
                       "none: ChromaTransformer2DModel takes no pooled_projections (modulation from the timestep)"),
        DescriptionRow("text", "joint text length", t5[0], "T5 positions only, padded to max_sequence_length"),
        DescriptionRow("text", "context_embedder", (tr.context_embedder.in_features, tr.context_embedder.out_features),
                       "transformer.context_embedder in/out features"),
    ]
    if prompt is None:
        return rows + [
            DescriptionRow("text", "text positions kept by the mask", f"prompt-dependent (≤ {length})", _MASK_RULE),
            DescriptionRow("text", "text_ids", (length, 3), "config: (max_sequence_length, 3) zeros"),
        ]
    embeds, text_ids, mask, *_ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                    max_sequence_length=length)
    layout = prompt_layout(pipe, prompt, max_sequence_length=length)
    return rows + [
        DescriptionRow("text", "text positions kept by the mask", int(mask[0].sum()), "measured: " + _MASK_RULE),
        DescriptionRow("text", "text_ids", tuple(text_ids.shape), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "prompt_embeds", tuple(embeds.shape[1:]), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "prompt_attention_mask", tuple(mask.shape[1:]), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "token groups", layout.describe().split(", text ", 1)[-1], "mp.prompt_layout (tokenizer)"),
    ]


def _transformer_rows(pipe: Any) -> list[DescriptionRow]:
    tr, cfg = pipe.transformer, pipe.transformer.config
    # the mask is made in the encoder's dtype, then joined with boolean ones for the image tokens (torch.cat promotes)
    mask_dtype = torch.cat([torch.ones(1, dtype=pipe.text_encoder.dtype), torch.ones(1, dtype=torch.bool)]).dtype
    rows = block_rows(pipe, resolve_family(pipe), "FluxAttnProcessor: cat([text, image])") + [
        DescriptionRow("transformer", "rotary axes (t, y, x)", tuple(cfg.axes_dims_rope),
                       "config.axes_dims_rope (applied to q, k after the qk-norm)"),
        DescriptionRow("transformer", "modulation approximator (channels, hidden, layers)",
                       (cfg.approximator_num_channels, cfg.approximator_hidden_dim, cfg.approximator_layers),
                       "config.approximator_*: distilled_guidance_layer makes each block's shift/scale from the timestep"),
        DescriptionRow("transformer", "in_channels", cfg.in_channels, "config"),
        DescriptionRow("transformer", "joint_attention_dim", cfg.joint_attention_dim, "config (T5 width)"),
        DescriptionRow("transformer", "attention mask", "[B, S] over [text, image] -> m_i·m_j [B, 1, S, S]",
                       "ChromaPipeline._prepare_attention_mask: text mask ⊕ ones(image tokens); every block"),
        DescriptionRow("transformer", "attention mask dtype", str(mask_dtype),
                       "text_encoder dtype (bool only if prompt_attention_mask is passed as bool)"),
        DescriptionRow("transformer", "attention mask effect",
                       "added to the scores (+1 on kept pairs; padding not removed)" if mask_dtype.is_floating_point
                       else "padding keys removed", "SDPA: a float mask is added, a bool mask selects"),
    ]
    if len(tr.single_transformer_blocks):
        rows.append(DescriptionRow("transformer", "single-stream MLP width",
                                   tr.single_transformer_blocks[0].proj_mlp.out_features,
                                   "single_transformer_blocks[0].proj_mlp.out_features"))
    return rows


def _run_rows(pipe: Any, steps: int, steps_source: str, length: int, length_source: str) -> list[DescriptionRow]:
    guidance, g_src = run_value(pipe, "guidance_scale")
    calls = 2 if float(guidance) > 1 else 1
    return [
        DescriptionRow("run", "guidance_scale", guidance, g_src + "; real CFG: > 1 runs cond and uncond calls"),
        DescriptionRow("run", "transformer calls per step", calls,
                       "cond, then uncond (negative_prompt, '' by default) when guidance_scale > 1"),
        DescriptionRow("run", "transformer calls per step with a negative_prompt", calls, "as without one"),
        DescriptionRow("run", "num_inference_steps", steps, steps_source),
        DescriptionRow("run", "max_sequence_length", length, length_source),
    ]


def chroma_rows(pipe: Any, prompt: str | None = None, height: int | None = None, width: int | None = None,
                max_sequence_length: int | None = None, num_inference_steps: int | None = None) -> list[DescriptionRow]:
    """The rows of :func:`mmdit_probe.describe` for a Chroma pipeline (sections :data:`CHROMA_SECTIONS`)."""
    height, width, (length, length_source), (steps, steps_source) = run_size(
        pipe, height, width, max_sequence_length, num_inference_steps)
    image = packed_image_rows(pipe, height, width, length)
    tokens = next(r.value for r in image if r.item == "image tokens")
    sched = schedule_rows(pipe, steps, steps_source, resolve_family(pipe).schedule(pipe, steps, height, width),
                          "ChromaPipeline: sigmas linspace(1, 1/n, n) (always passed) and mu",
                          f"calculate_shift({tokens} image tokens, scheduler.config base/max seq len and shift)")
    return (component_rows(pipe) + _text_rows(pipe, prompt, length, length_source) + image + _transformer_rows(pipe)
            + sched + _run_rows(pipe, steps, steps_source, length, length_source))
