"""``describe(pipe)`` for Flux.1 and Flux Kontext pipelines: every entry read from the objects.

Sections: ``components``; ``text`` (T5 hidden states — the only text positions —, CLIP's pooled output,
``text_ids``); ``image`` (latents, 2×2 packing, the packed grid, ``img_ids``; Kontext: the size after its
``max_area`` rescaling, and the context image's tokens); ``transformer`` (double- and single-stream
blocks in execution order, heads, qk-norm, rotary axes, guidance embedding); ``scheduler`` (timesteps and
sigmas as ``FluxPipeline`` computes them: ``linspace(1, 1/n, n)`` sigmas and the resolution-dependent
``mu``, on a deep copy); ``run`` (the ``pipe(...)`` keywords that shape a run: guidance, true CFG, T5
length, steps). With a ``prompt`` the text shapes are measured by running the encoders and ``encode_prompt``.
"""

from __future__ import annotations

from typing import Any

import torch

from .describe_table import (DescriptionRow, block_rows, call_default, component_rows, encoder_device, run_size,
                             run_value, schedule_rows)
from .families import FluxFamily, prompt_layout, resolve_family
from .families.kontext import is_kontext, kontext_sizes

__all__ = ["FLUX_SECTIONS", "flux_rows", "flux_schedule", "packed_image_rows"]

FLUX_SECTIONS = ("components", "text", "image", "transformer", "scheduler", "run")


@torch.no_grad()
def _text_rows(pipe: Any, prompt: str | None, length: int, length_source: str) -> list[DescriptionRow]:
    tr = pipe.transformer
    if prompt is not None:
        ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").input_ids
        t5 = tuple(pipe.text_encoder_2(ids.to(encoder_device(pipe.text_encoder_2)))[0].shape[1:])
        clip_ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                                  return_tensors="pt").input_ids
        out = pipe.text_encoder(clip_ids.to(encoder_device(pipe.text_encoder)), output_hidden_states=False)
        pooled = tuple(out.pooler_output.shape[1:])
        t5_src, clip_src = "measured: text_encoder_2(ids)[0]", "measured: text_encoder(ids).pooler_output"
    else:
        t5 = (length, pipe.text_encoder_2.config.d_model)
        pooled = (pipe.text_encoder.config.hidden_size,)
        t5_src, clip_src = "config: max_sequence_length, text_encoder_2.config.d_model", "config: text_encoder.config.hidden_size"
    rows = [
        DescriptionRow("text", "T5 hidden states", t5, t5_src),
        DescriptionRow("text", "T5 length (max_sequence_length)", length, length_source),
        DescriptionRow("text", "CLIP pooled (pooler_output)", pooled, clip_src + " -> time_text_embed (no positions)"),
        DescriptionRow("text", "joint text length", t5[0], "T5 positions only: CLIP is pooled only on Flux"),
        DescriptionRow("text", "context_embedder", (tr.context_embedder.in_features, tr.context_embedder.out_features),
                       "transformer.context_embedder in/out features"),
    ]
    if prompt is None:
        return rows + [DescriptionRow("text", "text_ids", (length, 3), "config: (max_sequence_length, 3) zeros")]
    embeds, pooled_embeds, text_ids = pipe.encode_prompt(prompt, None, max_sequence_length=length)
    layout = prompt_layout(pipe, prompt, max_sequence_length=length)
    return rows + [
        DescriptionRow("text", "prompt_embeds", tuple(embeds.shape[1:]), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "pooled_prompt_embeds", tuple(pooled_embeds.shape[1:]), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "text_ids", tuple(text_ids.shape), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "token groups", layout.describe().split(", text ", 1)[-1],
                       "mp.prompt_layout (tokenizer_2)"),
    ]


def _grid(pipe: Any, height: int, width: int) -> tuple[tuple[int, int], str]:
    """The packed grid of the generated image (Kontext: after its ``max_area`` rescaling) and where it came from."""
    if is_kontext(pipe):
        area = call_default(pipe, "max_area")
        return (kontext_sizes(pipe, height=height, width=width, max_area=area).grid,
                f"FluxKontextPipeline rescales to max_area={area:,} at this aspect ratio, then / (2 × vae_scale_factor)")
    f2 = 2 * pipe.vae_scale_factor
    return (height // f2, width // f2), "height, width / (2 × vae_scale_factor): VAE, then 2×2 packing"


def packed_image_rows(pipe: Any, height: int, width: int, n_text: int) -> list[DescriptionRow]:
    """The ``image`` section of a Flux.1-style pipeline (2×2-packed latents, ``img_ids`` ``(t, y, x)``; also Chroma)."""
    grid, grid_src = _grid(pipe, height, width)
    f, c = pipe.vae_scale_factor, pipe.vae.config.latent_channels
    n = grid[0] * grid[1]
    rows = [
        DescriptionRow("image", "height × width", (height, width), "argument or default_sample_size × vae_scale_factor"),
        DescriptionRow("image", "vae_scale_factor", f, "2 ** (len(vae.config.block_out_channels) - 1)"),
        DescriptionRow("image", "latent shape", (c, 2 * grid[0], 2 * grid[1]), "vae.config.latent_channels, 2 × grid"),
        DescriptionRow("image", "vae scaling / shift factor", (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor),
                       "vae.config (latents = (z - shift) × scaling)"),
        DescriptionRow("image", "packed channels (2×2 patches)", 4 * c, "4 × latent_channels = transformer in_channels"),
        DescriptionRow("image", "patch grid", grid, grid_src),
        DescriptionRow("image", "image tokens", n, "patch grid h × w"),
        DescriptionRow("image", "img_ids", (n, 3), "(t, y, x) per image token; t = 0 for the generated image"),
        DescriptionRow("image", "joint sequence length", n_text + n, "text tokens + image tokens, order [text, image]"),
    ]
    if is_kontext(pipe):
        rows.append(DescriptionRow("image", "context image tokens", "its own grid, after the image tokens",
                                   "pipe(image=...): packed context latents appended to the image stream, img_ids "
                                   "t = 1 (mmdit_probe.kontext.kontext_layout gives the grid for an image)"))
    return rows


def _transformer_rows(pipe: Any) -> list[DescriptionRow]:
    tr, cfg = pipe.transformer, pipe.transformer.config
    s = len(tr.single_transformer_blocks)
    rows = block_rows(pipe, resolve_family(pipe), "FluxAttnProcessor: cat([text, image])") + [
        DescriptionRow("transformer", "rotary axes (t, y, x)", tuple(cfg.axes_dims_rope),
                       "config.axes_dims_rope (applied to q, k after the qk-norm)"),
        DescriptionRow("transformer", "guidance_embeds", bool(cfg.guidance_embeds), "config (guidance-distilled)"),
        DescriptionRow("transformer", "in_channels", cfg.in_channels, "config"),
        DescriptionRow("transformer", "joint_attention_dim", cfg.joint_attention_dim, "config (T5 width)"),
        DescriptionRow("transformer", "pooled_projection_dim", cfg.pooled_projection_dim, "config (CLIP pooled width)"),
    ]
    if s:
        rows.append(DescriptionRow("transformer", "single-stream MLP width", tr.single_transformer_blocks[0].proj_mlp.out_features,
                                   "single_transformer_blocks[0].proj_mlp.out_features"))
    return rows


def flux_schedule(pipe: Any, steps: int, image_tokens: int) -> tuple[list[float], list[float], float]:
    """``(timesteps, sigmas, mu)`` of ``steps`` steps as ``FluxPipeline.__call__`` sets them, on a deep copy."""
    return FluxFamily.schedule_for_tokens(pipe, steps, image_tokens)


def _scheduler_rows(pipe: Any, steps: int, steps_source: str, image_tokens: int) -> list[DescriptionRow]:
    return schedule_rows(pipe, steps, steps_source, flux_schedule(pipe, steps, image_tokens),
                         "FluxPipeline: sigmas linspace(1, 1/n, n) (None with use_flow_sigmas) and mu",
                         f"calculate_shift({image_tokens} image tokens, scheduler.config base/max seq len and shift)")


def _run_rows(pipe: Any, steps: int, steps_source: str, length: int, length_source: str) -> list[DescriptionRow]:
    guidance, g_src = run_value(pipe, "guidance_scale")
    true_cfg, t_src = run_value(pipe, "true_cfg_scale")
    embedded = bool(pipe.transformer.config.guidance_embeds)
    rows = [
        DescriptionRow("run", "guidance_scale", guidance,
                       g_src + ("; embedded (guidance_embeds): no uncond batch" if embedded else "; unused: no guidance embedding")),
        DescriptionRow("run", "true_cfg_scale", true_cfg,
                       t_src + "; > 1 with a negative_prompt adds an uncond transformer call per step"),
        DescriptionRow("run", "transformer calls per step", 1, "pipe(prompt): one cond call (no negative_prompt)"),
        DescriptionRow("run", "transformer calls per step with a negative_prompt", 2 if float(true_cfg) > 1 else 1,
                       "true CFG (true_cfg_scale > 1): cond and uncond calls; else the negative_prompt is ignored"),
        DescriptionRow("run", "num_inference_steps", steps, steps_source),
        DescriptionRow("run", "max_sequence_length", length, length_source),
    ]
    if is_kontext(pipe):
        for name in ("max_area", "_auto_resize"):
            value, src = run_value(pipe, name)
            rows.append(DescriptionRow("run", name, value, src))
    return rows


def flux_rows(pipe: Any, prompt: str | None = None, height: int | None = None, width: int | None = None,
              max_sequence_length: int | None = None, num_inference_steps: int | None = None) -> list[DescriptionRow]:
    """The rows of :func:`mmdit_probe.describe` for a Flux.1 / Kontext pipeline (sections :data:`FLUX_SECTIONS`)."""
    height, width, (length, length_source), (steps, steps_source) = run_size(
        pipe, height, width, max_sequence_length, num_inference_steps)
    text = _text_rows(pipe, prompt, length, length_source)
    image = packed_image_rows(pipe, height, width, length)
    tokens = next(r.value for r in image if r.item == "image tokens")
    return (component_rows(pipe) + text + image + _transformer_rows(pipe)
            + _scheduler_rows(pipe, steps, steps_source, tokens) + _run_rows(pipe, steps, steps_source, length, length_source))
