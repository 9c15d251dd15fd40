"""``describe(pipe)`` for Qwen-Image pipelines: every entry read from the objects.

Sections: ``components``; ``text`` (Qwen2.5-VL's last hidden state of the chat-templated prompt, the
template's system prefix dropped, so the text length is the prompt's tokens + the template's closing tokens —
measured with a ``prompt``, capped by ``max_sequence_length``); ``image`` (a 1-frame video latent, 2×2-packed;
``img_shapes``); ``transformer`` (double-stream blocks only, heads, qk-norm, rotary axes and where the text
positions start, the attention mask); ``scheduler`` (:meth:`QwenImageFamily.schedule`); ``run`` (true CFG needs
a ``negative_prompt``).
"""

from __future__ import annotations

from typing import Any

import torch

from .describe_table import DescriptionRow, block_rows, component_rows, run_size, run_value, schedule_rows
from .families import prompt_layout, resolve_family
from .families.qwen import _closing_ids

__all__ = ["QWEN_SECTIONS", "qwen_rows"]

QWEN_SECTIONS = ("components", "text", "image", "transformer", "scheduler", "run")


@torch.no_grad()
def _text_rows(pipe: Any, prompt: str | None, length: int, length_source: str) -> tuple[list[DescriptionRow], Any]:
    """The rows and the joint text length (an int measured with a prompt, else a description)."""
    tr = pipe.transformer
    closing = len(_closing_ids(pipe.tokenizer, pipe.prompt_template_encode))
    rows = [
        DescriptionRow("text", "text stream", "Qwen2.5-VL hidden_states[-1] of the chat-templated prompt",
                       "QwenImagePipeline._get_qwen_prompt_embeds (pipe.prompt_template_encode)"),
        DescriptionRow("text", "encoder hidden width", pipe.text_encoder.config.text_config.hidden_size,
                       "text_encoder.config.text_config.hidden_size"),
        DescriptionRow("text", "template prefix dropped", pipe.prompt_template_encode_start_idx,
                       "pipe.prompt_template_encode_start_idx (system message tokens)"),
        DescriptionRow("text", "template closing tokens", closing,
                       "tokens after the prompt in the template (<|im_end|> … assistant): kind special"),
        DescriptionRow("text", "max_sequence_length (cap)", length,
                       length_source + "; prompt_embeds[:, :max_sequence_length]"),
        DescriptionRow("text", "txt_norm -> txt_in", (tr.txt_in.in_features, tr.txt_in.out_features),
                       "RMSNorm, then transformer.txt_in in/out features"),
    ]
    if prompt is None:
        n_text = f"prompt tokens + {closing} (≤ {length})"
        return rows + [DescriptionRow("text", "joint text length", n_text,
                                      "prompt-dependent: no padding to a fixed length (pass a prompt to measure)")], n_text
    embeds, mask = pipe.encode_prompt(prompt, max_sequence_length=length)
    layout = prompt_layout(pipe, prompt, max_sequence_length=length)
    return rows + [
        DescriptionRow("text", "joint text length", embeds.shape[1], "measured: pipe.encode_prompt"),
        DescriptionRow("text", "prompt_embeds", tuple(embeds.shape[1:]), "measured: pipe.encode_prompt"),
        DescriptionRow("text", "prompt_embeds_mask", None if mask is None else tuple(mask.shape[1:]),
                       "measured: pipe.encode_prompt (None: no padded row)"),
        DescriptionRow("text", "token groups", layout.describe().split(", text ", 1)[-1], "mp.prompt_layout (tokenizer)"),
    ], embeds.shape[1]


def _image_rows(pipe: Any, height: int, width: int, n_text: Any) -> list[DescriptionRow]:
    f, c = pipe.vae_scale_factor, pipe.vae.config.z_dim
    grid = (height // (2 * f), width // (2 * f))
    n = grid[0] * grid[1]
    return [
        DescriptionRow("image", "height × width", (height, width), "argument or default_sample_size × vae_scale_factor"),
        DescriptionRow("image", "vae_scale_factor", f, "2 ** len(vae.temperal_downsample)"),
        DescriptionRow("image", "latent shape", (c, 1, 2 * grid[0], 2 * grid[1]),
                       "vae.config.z_dim, 1 frame, 2 × grid; (z - latents_mean) / latents_std per channel"),
        DescriptionRow("image", "packed channels (2×2 patches)", 4 * c, "4 × z_dim = transformer in_channels"),
        DescriptionRow("image", "patch grid", grid, "height, width / (2 × vae_scale_factor): VAE, then 2×2 packing"),
        DescriptionRow("image", "image tokens", n, "patch grid h × w"),
        DescriptionRow("image", "img_shapes", [(1, *grid)], "per batch row: [(frames, h, w)] -> transformer"),
        DescriptionRow("image", "joint sequence length", n_text + n if isinstance(n_text, int) else f"{n_text} + {n}",
                       "text tokens + image tokens, order [text, image]"),
    ]


def _transformer_rows(pipe: Any, grid: tuple[int, int]) -> list[DescriptionRow]:
    cfg = pipe.transformer.config
    rope = pipe.transformer.pos_embed
    centred = bool(getattr(rope, "scale_rope", False))
    start = max(grid[0] // 2, grid[1] // 2) if centred else max(grid)
    return block_rows(pipe, resolve_family(pipe), "QwenDoubleStreamAttnProcessor2_0: cat([text, image])") + [
        DescriptionRow("transformer", "rotary axes (frame, y, x)", tuple(cfg.axes_dims_rope),
                       "config.axes_dims_rope (QwenEmbedRope, applied after the qk-norm)"),
        DescriptionRow("transformer", "rotary image positions centred", centred,
                       "pos_embed.scale_rope: y, x run from -(h - h//2) to h//2 - 1"),
        DescriptionRow("transformer", "rotary text start", start,
                       "text position i sits at start + i on every axis (max(h//2, w//2) with scale_rope)"),
        DescriptionRow("transformer", "guidance_embeds", bool(cfg.guidance_embeds), "config (guidance-distilled)"),
        DescriptionRow("transformer", "zero_cond_t", bool(cfg.get("zero_cond_t", False)), "config"),
        DescriptionRow("transformer", "in_channels", cfg.in_channels, "config"),
        DescriptionRow("transformer", "joint_attention_dim", cfg.joint_attention_dim, "config (Qwen2.5-VL width)"),
        DescriptionRow("transformer", "attention mask", "None for one prompt; a batch's padding keys: bool [B, 1, 1, S]",
                       "encoder_hidden_states_mask (None when no row is padded) ⊕ ones(image tokens), keys only"),
    ]


def _run_rows(pipe: Any, steps: int, steps_source: str, length: int, length_source: str) -> list[DescriptionRow]:
    guidance, g_src = run_value(pipe, "guidance_scale")
    true_cfg, t_src = run_value(pipe, "true_cfg_scale")
    embedded = bool(pipe.transformer.config.guidance_embeds)
    return [
        DescriptionRow("run", "true_cfg_scale", true_cfg, t_src + "; > 1 with a negative_prompt adds an uncond call"),
        DescriptionRow("run", "guidance_scale", guidance,
                       g_src + ("; embedded (guidance_embeds)" if embedded else "; unused: no guidance embedding")),
        DescriptionRow("run", "transformer calls per step", 1, "pipe(prompt): one cond call (no negative_prompt)"),
        DescriptionRow("run", "transformer calls per step with a negative_prompt", 2 if float(true_cfg) > 1 else 1,
                       "true CFG (true_cfg_scale > 1): cond and uncond calls; else the negative_prompt is ignored"),
        DescriptionRow("run", "num_inference_steps", steps, steps_source),
        DescriptionRow("run", "max_sequence_length", length, length_source),
    ]


def qwen_rows(pipe: Any, prompt: str | None = None, height: int | None = None, width: int | None = None,
              max_sequence_length: int | None = None, num_inference_steps: int | None = None) -> list[DescriptionRow]:
    """The rows of :func:`mmdit_probe.describe` for a Qwen-Image pipeline (sections :data:`QWEN_SECTIONS`)."""
    from diffusers import QwenImagePipeline

    if not isinstance(pipe, QwenImagePipeline):
        raise NotImplementedError(f"describe() reads QwenImagePipeline; {type(pipe).__name__} (edit / layered: context "
                                  "images in the text and image streams) is not described yet")
    height, width, (length, length_source), (steps, steps_source) = run_size(
        pipe, height, width, max_sequence_length, num_inference_steps)
    text, n_text = _text_rows(pipe, prompt, length, length_source)
    image = _image_rows(pipe, height, width, n_text)
    grid = next(r.value for r in image if r.item == "patch grid")
    sched = schedule_rows(pipe, steps, steps_source, resolve_family(pipe).schedule(pipe, steps, height, width),
                          "QwenImagePipeline: sigmas linspace(1, 1/n, n) (always passed) and mu",
                          f"calculate_shift({grid[0] * grid[1]} image tokens, scheduler.config base/max seq len, shift)")
    return (component_rows(pipe) + text + image + _transformer_rows(pipe, grid) + sched
            + _run_rows(pipe, steps, steps_source, length, length_source))
