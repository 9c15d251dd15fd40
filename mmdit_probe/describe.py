"""``describe(pipe)``: the anatomy of a pipeline of any supported family as a table, every entry read from the objects.

Flux.1 (and Kontext): :mod:`.describe_flux`; Chroma: :mod:`.describe_chroma`; Qwen-Image: :mod:`.describe_qwen`;
Flux.2: :mod:`.describe_flux2` (each with a ``run`` section of the call defaults). For SD3 / SD3.5:

Sections: ``components`` (class, parameters, dtype, device), ``text`` (per-encoder shapes, how CLIP-L
and CLIP-G are joined and zero-padded to the T5 width, the joint text length), ``image`` (latent
shape, VAE scale factor, patch size, image tokens), ``transformer`` (blocks, heads × head dim,
``attn2``, qk-norm, ``context_pre_only``) and ``scheduler`` (class, shift, timesteps / sigmas).
Shapes are per prompt (no batch dim). With a ``prompt`` the text shapes are *measured* by running
the encoders and ``encode_prompt``; without one they are read from the configs. The T5 length and the
step count are those the model runs with: its shipped run kwargs (``pipe.shipped_run_kwargs``, the
embedded default model's), else ``pipe(...)``'s defaults. ``mmdit-probe describe`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .describe_chroma import chroma_rows
from .describe_flux import flux_rows
from .describe_flux2 import flux2_rows
from .describe_qwen import qwen_rows
from .describe_table import (COLUMNS, Description, DescriptionRow, call_default, component_rows, encoder_device,
                             format_value, run_default, run_size)
from .families import resolve_family
from .steps import schedule

__all__ = ["COLUMNS", "DescriptionRow", "Description", "call_default", "describe", "format_value", "run_default"]

SECTIONS = ("components", "text", "image", "transformer", "scheduler")
#: family name -> the function making its rows (same arguments as :func:`describe`); SD3 is described here
FAMILY_ROWS: dict[str, Callable[..., list[DescriptionRow]]] = {
    "flux": flux_rows, "chroma": chroma_rows, "qwen_image": qwen_rows, "flux2": flux2_rows}


@torch.no_grad()
def _measure_clip(pipe: Any, index: int, prompt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(hidden_states[-2] shape, text_embeds shape)`` of CLIP ``index`` (0 = L, 1 = G), batch dim dropped."""
    tok = (pipe.tokenizer, pipe.tokenizer_2)[index]
    enc = (pipe.text_encoder, pipe.text_encoder_2)[index]
    ids = tok(prompt, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
              return_tensors="pt").input_ids
    out = enc(ids.to(encoder_device(enc)), output_hidden_states=True)
    return tuple(out.hidden_states[-2].shape[1:]), tuple(out.text_embeds.shape[1:])


@torch.no_grad()
def _measure_t5(pipe: Any, prompt: str, length: int) -> tuple[int, ...]:
    ids = pipe.tokenizer_3(prompt, padding="max_length", max_length=length, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids
    return tuple(pipe.text_encoder_3(ids.to(encoder_device(pipe.text_encoder_3)))[0].shape[1:])


def _text_rows(pipe: Any, prompt: str | None, max_sequence_length: int, length_source: str) -> list[DescriptionRow]:
    tcfg = pipe.transformer.config
    n_clip = int(pipe.tokenizer_max_length)
    has_t5 = pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    rows: list[DescriptionRow] = []
    measured = prompt is not None
    clip_shapes = []
    for index, (label, attr) in enumerate((("CLIP-L", "text_encoder"), ("CLIP-G", "text_encoder_2"))):
        enc = getattr(pipe, attr)
        if measured:
            hidden, pooled = _measure_clip(pipe, index, prompt)
            src = f"measured: {attr}(ids, output_hidden_states=True)"
        else:
            hidden, pooled = (n_clip, enc.config.hidden_size), (enc.config.projection_dim,)
            src = f"config: {attr}.config.hidden_size / projection_dim; tokenizer_max_length"
        clip_shapes.append((hidden, pooled))
        rows += [
            DescriptionRow("text", f"{label} hidden_states[-2]", hidden, src + ".hidden_states[-2]" if measured else src),
            DescriptionRow("text", f"{label} pooled (text_embeds)", pooled, src + ".text_embeds" if measured else src),
        ]
    clip_width = clip_shapes[0][0][-1] + clip_shapes[1][0][-1]
    if has_t5:
        if measured:
            t5 = _measure_t5(pipe, prompt, max_sequence_length)
            t5_src = "measured: text_encoder_3(ids)[0]"
        else:
            t5 = (max_sequence_length, pipe.text_encoder_3.config.d_model)
            t5_src = "config: max_sequence_length, text_encoder_3.config.d_model"
    else:
        t5 = (max_sequence_length, tcfg.joint_attention_dim)
        t5_src = "T5 omitted: pipeline feeds zeros (max_sequence_length, transformer.config.joint_attention_dim)"
    t5_width = t5[-1]
    rows += [
        DescriptionRow("text", "T5 present", has_t5, "pipe.text_encoder_3 / tokenizer_3 not None"),
        DescriptionRow("text", "T5 hidden states" if has_t5 else "T5 zeros (omitted)", t5, t5_src),
        DescriptionRow("text", "CLIP joined width (L ⊕ G)", clip_width, "concatenated on channels: hidden L + hidden G"),
        DescriptionRow("text", "CLIP zero-padding", t5_width - clip_width,
                       f"zero channels appended to reach the T5 width {t5_width}"),
        DescriptionRow("text", "T5 length (max_sequence_length)", max_sequence_length, length_source),
        DescriptionRow("text", "joint text length", clip_shapes[0][0][0] + t5[0],
                       "CLIP positions + T5 positions (concatenated on the sequence)"),
        DescriptionRow("text", "pooled (L ⊕ G)", (clip_shapes[0][1][-1] + clip_shapes[1][1][-1],),
                       "concat of the pooled outputs -> time_text_embed"),
        DescriptionRow("text", "context_embedder", (pipe.transformer.context_embedder.in_features,
                                                    pipe.transformer.context_embedder.out_features),
                       "transformer.context_embedder in/out features"),
    ]
    if measured:
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                      max_sequence_length=max_sequence_length)
        rows += [
            DescriptionRow("text", "prompt_embeds", tuple(embeds.shape[1:]), "measured: pipe.encode_prompt"),
            DescriptionRow("text", "pooled_prompt_embeds", tuple(pooled.shape[1:]), "measured: pipe.encode_prompt"),
        ]
        from .layout import TokenLayout

        lay = TokenLayout.from_prompt(pipe, prompt, max_sequence_length=max_sequence_length)
        rows.append(DescriptionRow("text", "token groups", lay.describe().split(", text ", 1)[-1],
                                   "TokenLayout.from_prompt (tokenizers)"))
    return rows


def _image_grid(pipe: Any, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, int]]:
    f = pipe.vae_scale_factor
    p = pipe.transformer.config.patch_size
    latent = (pipe.vae.config.latent_channels, height // f, width // f)
    return latent, (latent[1] // p, latent[2] // p)


def _image_rows(pipe: Any, height: int, width: int, n_text: int) -> list[DescriptionRow]:
    latent, grid = _image_grid(pipe, height, width)
    vcfg = pipe.vae.config
    return [
        DescriptionRow("image", "height × width", (height, width), "argument or default_sample_size × vae_scale_factor"),
        DescriptionRow("image", "vae_scale_factor", pipe.vae_scale_factor, "2 ** (len(vae.config.block_out_channels) - 1)"),
        DescriptionRow("image", "latent shape", latent, "vae.config.latent_channels, height / f, width / f"),
        DescriptionRow("image", "vae scaling / shift factor", (vcfg.scaling_factor, vcfg.shift_factor),
                       "vae.config (latents = (z - shift) × scaling)"),
        DescriptionRow("image", "patch size", pipe.transformer.config.patch_size, "transformer.config.patch_size"),
        DescriptionRow("image", "patch grid", grid, "latent / patch size"),
        DescriptionRow("image", "image tokens", grid[0] * grid[1], "patch grid h × w"),
        DescriptionRow("image", "joint sequence length", grid[0] * grid[1] + n_text, "image tokens + joint text length"),
    ]


def _transformer_rows(transformer: Any) -> list[DescriptionRow]:
    blocks = transformer.transformer_blocks
    attn = blocks[0].attn
    heads, inner = attn.heads, attn.inner_dim

    def norm_name(mod: Any, attr: str) -> str | None:
        m = getattr(mod, attr, None)
        return type(m).__name__ if m is not None else None

    return [
        DescriptionRow("transformer", "class", type(transformer).__name__, "type(pipe.transformer)"),
        DescriptionRow("transformer", "blocks", len(blocks), "len(transformer.transformer_blocks)"),
        DescriptionRow("transformer", "heads × head dim", f"{heads} × {inner // heads} = {inner}",
                       "transformer_blocks[0].attn.heads, .inner_dim"),
        DescriptionRow("transformer", "blocks with attn2", [i for i, b in enumerate(blocks) if getattr(b, "attn2", None) is not None],
                       "blocks whose .attn2 is not None (image-only self-attention)"),
        DescriptionRow("transformer", "qk-norm (image)", norm_name(attn, "norm_q"), "type(attn.norm_q)"),
        DescriptionRow("transformer", "qk-norm (text)", norm_name(attn, "norm_added_q"), "type(attn.norm_added_q)"),
        DescriptionRow("transformer", "context_pre_only blocks", [i for i, b in enumerate(blocks) if b.context_pre_only],
                       "block.context_pre_only (text output discarded)"),
        DescriptionRow("transformer", "joint_attention_dim", transformer.config.joint_attention_dim, "config"),
        DescriptionRow("transformer", "pooled_projection_dim", transformer.config.pooled_projection_dim, "config"),
        DescriptionRow("transformer", "pos_embed_max_size", transformer.config.pos_embed_max_size, "config"),
    ]


def _scheduler_rows(pipe: Any, steps: int, steps_source: str, height: int, width: int) -> list[DescriptionRow]:
    sch = pipe.scheduler
    cfg = sch.config
    sched = schedule(pipe, steps, height=height, width=width)
    return [
        DescriptionRow("scheduler", "class", type(sch).__name__, "type(pipe.scheduler)"),
        DescriptionRow("scheduler", "shift", cfg.get("shift"), "scheduler.config.shift"),
        DescriptionRow("scheduler", "dynamic shifting", bool(cfg.get("use_dynamic_shifting", False)),
                       "scheduler.config.use_dynamic_shifting" + (f" (mu={sched.mu:.4g})" if sched.mu is not None else "")),
        DescriptionRow("scheduler", "num_train_timesteps", cfg.get("num_train_timesteps"), "scheduler.config"),
        DescriptionRow("scheduler", "num_inference_steps", steps, steps_source),
        DescriptionRow("scheduler", "timesteps", [round(t, 2) for t in sched.timesteps],
                       "set_timesteps on a deep copy of pipe.scheduler"),
        DescriptionRow("scheduler", "sigmas", [round(s, 4) for s in sched.sigmas],
                       "set_timesteps on a deep copy (last entry: the final, noise-free sigma)"),
    ]


def describe(
    pipe: Any,
    prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    num_inference_steps: int | None = None,
) -> Description:
    """Components, text path, image path, MMDiT and scheduler of ``pipe``, read from the objects
    (SD3 / SD3.5; Flux.1 / Kontext, Chroma, Qwen-Image and Flux.2 also get a ``run`` section: :data:`FAMILY_ROWS`).

    ``prompt`` runs the text encoders to measure the text shapes. ``height``/``width`` default to
    ``pipe(...)``'s; ``max_sequence_length`` and ``num_inference_steps`` to what the model runs with
    (:func:`run_default`: its shipped run kwargs, else ``pipe(...)``'s defaults).
    The pipeline is not modified (the scheduler is deep-copied).
    """
    family = resolve_family(pipe)
    if family.name in FAMILY_ROWS:
        rows = FAMILY_ROWS[family.name](pipe, prompt, height, width, max_sequence_length, num_inference_steps)
        return Description(tuple(rows))
    if family.name != "sd3":
        raise NotImplementedError(
            f"describe() reads SD3 / SD3.5, Flux.1, Chroma, Qwen-Image and Flux.2 pipelines; {type(pipe).__name__} "
            f"({family.label}) is recorded and ablated like them, but its anatomy table is not written yet. Use "
            f"mp.prompt_layout(pipe, prompt).describe() for its token layout"
        )
    height, width, (length, length_source), (steps, steps_source) = run_size(
        pipe, height, width, max_sequence_length, num_inference_steps)
    text = _text_rows(pipe, prompt, length, length_source)
    n_text = next(r.value for r in text if r.item == "joint text length")
    rows = component_rows(pipe) + text + _image_rows(pipe, height, width, n_text)
    rows += _transformer_rows(pipe.transformer) + _scheduler_rows(pipe, steps, steps_source, height, width)
    return Description(tuple(rows))
