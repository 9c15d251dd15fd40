"""SD3 / SD3.5 (``SD3Transformer2DModel``): ``JointAttnProcessor2_0`` joins ``[image, text]``."""

from __future__ import annotations

import copy

from typing import Any

import torch
from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

from ..layout import CLIP_LENGTH, TokenLayout
from .base import CallInputs, Family, Site
from .sd3_processor import ProbeProcessor

_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
         "block_controlnet_hidden_states", "joint_attention_kwargs", "return_dict", "skip_layers")


def argument(args: tuple, kwargs: dict, name: str, names: tuple[str, ...] = _ARGS) -> Any:
    """Argument ``name`` of a forward call, positional or keyword."""
    if name in kwargs:
        return kwargs[name]
    i = names.index(name)
    return args[i] if len(args) > i else None


class SD3Family(Family):
    name = "sd3"
    label = "SD3 / SD3.5"
    transformer_class = "SD3Transformer2DModel"
    order = ("image", "text")
    text_encoder = "text_encoder"  # CLIP-L: its hidden state fills the first 77 × 768 text channels
    tokenizer = "tokenizer"
    second_encoder = "text_encoder_3"
    skip_argument = True

    def matches(self, transformer) -> bool:
        blocks = getattr(transformer, "transformer_blocks", None)
        return (type(transformer).__name__ == "SD3Transformer2DModel" or (
            blocks is not None and len(blocks) > 0 and all(type(b).__name__ == "JointTransformerBlock" for b in blocks)))

    def blocks(self, transformer):
        return list(transformer.transformer_blocks)

    def sites(self, transformer):
        out = []
        for i, block in enumerate(transformer.transformer_blocks):
            out.append(Site(i, "attn", "joint", f"transformer_blocks.{i}.attn"))
            if getattr(block, "attn2", None) is not None:
                out.append(Site(i, "attn2", "image", f"transformer_blocks.{i}.attn2"))
        return out

    def processor(self, site, controller, original):
        if type(original) not in (JointAttnProcessor2_0, FusedJointAttnProcessor2_0):
            raise TypeError(
                f"mmdit_probe replaces JointAttnProcessor2_0 (and its fused form) on SD3, but {site.name} uses "
                f"{type(original).__name__}. Reset it with transformer.set_attn_processor(JointAttnProcessor2_0()) "
                f"or remove the adapter that installed it."
            )
        return ProbeProcessor(site, controller, fused=type(original) is FusedJointAttnProcessor2_0)

    def call_inputs(self, transformer, args, kwargs):
        hs = argument(args, kwargs, "hidden_states")
        ehs = argument(args, kwargs, "encoder_hidden_states")
        t = argument(args, kwargs, "timestep")
        p = transformer.config.patch_size
        timestep = t.reshape(-1)[0].detach() if torch.is_tensor(t) else torch.tensor(float("nan") if t is None else float(t))
        return CallInputs(hs.shape[0], (hs.shape[-2] // p, hs.shape[-1] // p), 0 if ehs is None else ehs.shape[1],
                          timestep, ehs, argument(args, kwargs, "skip_layers") is not None)

    def encoder_hidden(self, pipe, output):
        try:
            skip = pipe.clip_skip
        except AttributeError:  # encode_prompt called outside __call__
            skip = None
        states = output.hidden_states
        return states[-2] if skip is None else states[-(skip + 2)]

    def row_text(self, row, hidden):
        if row.shape[0] < CLIP_LENGTH or row.shape[1] < hidden.shape[-1]:
            return None
        return row[:CLIP_LENGTH, : hidden.shape[-1]]

    def prompt_layout(self, pipe, prompt, height, width, max_sequence_length):
        return TokenLayout.from_prompt(pipe, prompt, height=height, width=width,
                                       max_sequence_length=256 if max_sequence_length is None else max_sequence_length)

    def prompt_text(self, pipe, ids, second_ids):
        """T5's decoding when T5 saw the whole prompt with no unknown piece (SentencePiece keeps the
        prompt's spacing: ``left-hand``, ``joe's``), else CLIP's (byte-level: every character survives, but its
        pre-tokenizer splits ``left-hand`` into three words). For exact words pass ``layout=mp.prompt_layout(...)``."""
        tok3 = getattr(pipe, "tokenizer_3", None)
        if (second_ids is not None and tok3 is not None and tok3.pad_token_id in second_ids
                and tok3.unk_token_id not in second_ids):
            return tok3.decode(second_ids, skip_special_tokens=True).strip()
        return pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def layout(self, pipe, ids, second_ids, grid, n_text, prompt):
        return TokenLayout.from_ids(grid, ids, pipe.tokenizer, second_ids, getattr(pipe, "tokenizer_3", None),
                                    t5_length=n_text - CLIP_LENGTH, order=self.order, prompt=prompt)

    def schedule(self, pipe, steps, height, width):
        """``StableDiffusion3Pipeline``'s ``set_timesteps`` (with its resolution-dependent ``mu`` under dynamic shifting)."""
        sch = copy.deepcopy(pipe.scheduler)
        cfg, kwargs, mu = sch.config, {}, None
        if cfg.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            f, p = pipe.vae_scale_factor, pipe.transformer.config.patch_size
            default = pipe.default_sample_size * f
            h, w = int(height or default) // f, int(width or default) // f
            mu = calculate_shift((h // p) * (w // p), cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
            kwargs["mu"] = mu
        sch.set_timesteps(int(steps), device="cpu", **kwargs)
        return [float(t) for t in sch.timesteps], [float(s) for s in sch.sigmas], mu
