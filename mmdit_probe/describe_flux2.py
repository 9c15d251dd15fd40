"""``describe(pipe)`` for Flux.2 (``Flux2Pipeline``): every entry read from the objects.

Sections: ``components``; ``text`` (Mistral-3 hidden states of ``text_encoder_out_layers`` stacked on channels,
for every position of the chat sequence padded to ``max_sequence_length``; ``text_ids`` ``(t, h, w, l)``);
``image`` (2×2-patchified latents, batch-norm normalised, ``img_ids``); ``transformer`` (double- then single-stream
blocks, heads, qk-norm, four rotary axes, shared modulation; no attention mask); ``scheduler``
(:meth:`Flux2Family.schedule`: the empirical ``mu`` of image tokens *and* step count); ``run`` (embedded guidance).
"""

from __future__ import annotations

from typing import Any

import torch

from .describe_table import DescriptionRow, block_rows, component_rows, run_size, run_value, schedule_rows
from .families import prompt_layout, resolve_family

__all__ = ["FLUX2_SECTIONS", "flux2_rows"]

FLUX2_SECTIONS = ("components", "text", "image", "transformer", "scheduler", "run")


@torch.no_grad()
def _text_rows(pipe: Any, prompt: str | None, length: int, length_source: str,
               layers: tuple[int, ...], layers_source: str) -> list[DescriptionRow]:
    tr, tcfg = pipe.transformer, pipe.text_encoder.config.text_config
    rows = [
        DescriptionRow("text", "text stream", "Mistral-3 hidden_states[k] for k in text_encoder_out_layers, "
                       "stacked on channels, every chat position", "Flux2Pipeline._get_mistral_3_small_prompt_embeds"),
        DescriptionRow("text", "text_encoder_out_layers", tuple(layers), layers_source),
        DescriptionRow("text", "encoder layers × hidden width", (tcfg.num_hidden_layers, tcfg.hidden_size),
                       "text_encoder.config.text_config.num_hidden_layers / hidden_size"),
        DescriptionRow("text", "text stream width", len(layers) * tcfg.hidden_size,
                       "len(text_encoder_out_layers) × hidden width = transformer joint_attention_dim"),
        DescriptionRow("text", "chat sequence (max_sequence_length)", length,
                       length_source + "; BOS, system message, [INST] prompt [/INST], padding to this length"),
        DescriptionRow("text", "joint text length", length, "every chat position, padding included (no mask)"),
        DescriptionRow("text", "context_embedder", (tr.context_embedder.in_features, tr.context_embedder.out_features),
                       "transformer.context_embedder in/out features"),
    ]
    if prompt is None:
        return rows + [DescriptionRow("text", "text_ids", (length, 4), "config: (t, h, w, l) = (0, 0, 0, position)")]
    embeds, text_ids = pipe.encode_prompt(prompt, max_sequence_length=length, text_encoder_out_layers=tuple(layers))
    layout = prompt_layout(pipe, prompt, max_sequence_length=length)
    return rows + [
        DescriptionRow("text", "text_ids", tuple(text_ids.shape[1:]), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "prompt_embeds", tuple(embeds.shape[1:]), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "token groups", layout.describe().split(", text ", 1)[-1],
                       "mp.prompt_layout (chat template; system message and markers: special)"),
    ]


def _image_rows(pipe: Any, height: int, width: int, n_text: int) -> list[DescriptionRow]:
    f, c = pipe.vae_scale_factor, pipe.vae.config.latent_channels
    grid = (height // (2 * f), width // (2 * f))
    n = grid[0] * grid[1]
    return [
        DescriptionRow("image", "height × width", (height, width), "argument or default_sample_size × vae_scale_factor"),
        DescriptionRow("image", "vae_scale_factor", f, "2 ** (len(vae.config.block_out_channels) - 1)"),
        DescriptionRow("image", "latent shape", (c, 2 * grid[0], 2 * grid[1]), "vae.config.latent_channels, 2 × grid"),
        DescriptionRow("image", "patchified channels (2×2)", 4 * c, "4 × latent_channels = transformer in_channels"),
        DescriptionRow("image", "latent batch-norm eps", pipe.vae.config.batch_norm_eps,
                       "vae.config: patchified latents normalised by vae.bn's running mean / var"),
        DescriptionRow("image", "patch grid", grid, "height, width / (2 × vae_scale_factor): VAE, then 2×2 patchifying"),
        DescriptionRow("image", "image tokens", n, "patch grid h × w"),
        DescriptionRow("image", "img_ids", (n, 4), "(t, h, w, l) per image token; t = 0 for the generated image"),
        DescriptionRow("image", "joint sequence length", n_text + n, "text tokens + image tokens, order [text, image]"),
    ]


def _transformer_rows(pipe: Any) -> list[DescriptionRow]:
    tr, cfg = pipe.transformer, pipe.transformer.config
    rows = block_rows(pipe, resolve_family(pipe), "Flux2AttnProcessor: cat([text, image])") + [
        DescriptionRow("transformer", "rotary axes (t, h, w, l)", tuple(cfg.axes_dims_rope),
                       "config.axes_dims_rope (applied to q, k after the qk-norm)"),
        DescriptionRow("transformer", "rope_theta", cfg.rope_theta, "config"),
        DescriptionRow("transformer", "guidance_embeds", bool(cfg.guidance_embeds), "config (guidance-distilled)"),
        DescriptionRow("transformer", "modulation",
                       "shared by all blocks: double-stream image, double-stream text, single-stream",
                       "double_stream_modulation_img / _txt, single_stream_modulation (from timestep + guidance)"),
        DescriptionRow("transformer", "in_channels", cfg.in_channels, "config"),
        DescriptionRow("transformer", "joint_attention_dim", cfg.joint_attention_dim, "config (stacked Mistral width)"),
        DescriptionRow("transformer", "attention mask", None, "none: Flux2Pipeline passes no mask (padding is attended)"),
    ]
    if len(tr.single_transformer_blocks):
        rows.append(DescriptionRow("transformer", "single-stream MLP width",
                                   tr.single_transformer_blocks[0].attn.mlp_hidden_dim,
                                   "single_transformer_blocks[0].attn.mlp_hidden_dim (SwiGLU, fused with qkv)"))
    return rows


def _run_rows(pipe: Any, steps: int, steps_source: str, length: int, length_source: str) -> list[DescriptionRow]:
    guidance, g_src = run_value(pipe, "guidance_scale")
    embedded = bool(pipe.transformer.config.guidance_embeds)
    return [
        DescriptionRow("run", "guidance_scale", guidance,
                       g_src + ("; embedded (guidance_embeds): no uncond call" if embedded else "; unused")),
        DescriptionRow("run", "transformer calls per step", 1, "Flux2Pipeline: one call (no negative prompt)"),
        DescriptionRow("run", "num_inference_steps", steps, steps_source),
        DescriptionRow("run", "max_sequence_length", length, length_source),
    ]


def flux2_rows(pipe: Any, prompt: str | None = None, height: int | None = None, width: int | None = None,
               max_sequence_length: int | None = None, num_inference_steps: int | None = None) -> list[DescriptionRow]:
    """The rows of :func:`mmdit_probe.describe` for a ``Flux2Pipeline`` (sections :data:`FLUX2_SECTIONS`)."""
    from diffusers import Flux2Pipeline

    if not isinstance(pipe, Flux2Pipeline):
        raise NotImplementedError(f"describe() reads Flux2Pipeline; {type(pipe).__name__} (Klein: Qwen3 text, separate "
                                  "uncond calls) is not described yet")
    family = resolve_family(pipe)
    height, width, (length, length_source), (steps, steps_source) = run_size(
        pipe, height, width, max_sequence_length, num_inference_steps)
    layers, layers_source = run_value(pipe, "text_encoder_out_layers")
    image = _image_rows(pipe, height, width, length)
    tokens = next(r.value for r in image if r.item == "image tokens")
    sched = schedule_rows(pipe, steps, steps_source, family.schedule(pipe, steps, height, width),
                          "Flux2Pipeline: sigmas linspace(1, 1/n, n) (None with use_flow_sigmas) and mu",
                          f"compute_empirical_mu({tokens} image tokens, {steps} steps)")
    return (component_rows(pipe) + _text_rows(pipe, prompt, length, length_source, tuple(layers), layers_source) + image
            + _transformer_rows(pipe) + sched + _run_rows(pipe, steps, steps_source, length, length_source))
