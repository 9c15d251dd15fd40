"""Flux.1 (``FluxTransformer2DModel``): double-stream blocks join ``[text, image]``; single-stream
blocks attend over the already-joined sequence. Text = T5 tokens only (CLIP is pooled only).

Layers run in execution order: double-stream blocks ``0 … D−1``, then single-stream blocks
``D … D+S−1`` (``block_kinds`` says which). The image grid comes from ``img_ids`` (packed 2×2 latents).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ..layout import TokenLayout
from .base import CallInputs, Family, Site
from .flux_processor import FluxProbeProcessor
from .sd3 import argument

_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance")


class FluxFamily(Family):
    name = "flux"
    label = "Flux.1"
    transformer_class = "FluxTransformer2DModel"
    order = ("text", "image")
    text_encoder = "text_encoder_2"  # T5: its last hidden state is the text stream
    tokenizer = "tokenizer_2"

    def blocks(self, transformer):
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

    def block_kinds(self, transformer):
        return ["joint"] * len(transformer.transformer_blocks) + ["single"] * len(transformer.single_transformer_blocks)

    def sites(self, transformer):
        d = len(transformer.transformer_blocks)
        return ([Site(i, "attn", "joint", f"transformer_blocks.{i}.attn") for i in range(d)]
                + [Site(d + j, "attn", "single", f"single_transformer_blocks.{j}.attn")
                   for j in range(len(transformer.single_transformer_blocks))])

    def processor(self, site, controller, original):
        if type(original) is not FluxAttnProcessor:
            raise TypeError(
                f"mmdit_probe replaces FluxAttnProcessor on Flux, but {site.name} uses {type(original).__name__} "
                f"(an IP-Adapter or another adapter). Remove it (pipe.unload_ip_adapter()) or reset the processors."
            )
        return FluxProbeProcessor(site, controller, original)

    def call_inputs(self, transformer, args, kwargs):
        hs = argument(args, kwargs, "hidden_states", _ARGS)
        ehs = argument(args, kwargs, "encoder_hidden_states", _ARGS)
        t = argument(args, kwargs, "timestep", _ARGS)
        ids = argument(args, kwargs, "img_ids", _ARGS)
        ids = ids[0] if ids.dim() == 3 else ids
        grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        timestep = (t.reshape(-1)[0].detach() * 1000) if torch.is_tensor(t) else torch.tensor(float("nan"))
        return CallInputs(hs.shape[0], grid, 0 if ehs is None else ehs.shape[1], timestep, ehs, False)

    def encoder_hidden(self, pipe, output):
        return output[0]

    def row_text(self, row, hidden):
        return row if row.shape == hidden.shape else None

    def prompt_text(self, pipe, ids, second_ids):
        return pipe.tokenizer_2.decode(ids, skip_special_tokens=True).strip()

    def layout(self, pipe, ids, second_ids, grid, n_text, prompt):
        return TokenLayout.from_t5_ids(grid, ids, pipe.tokenizer_2, order=self.order, prompt=prompt)

    def prompt_layout(self, pipe, prompt, height, width, max_sequence_length):
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or default, width or default
        scale = pipe.vae_scale_factor * 2  # VAE downsampling, then 2×2 packing
        length = 512 if max_sequence_length is None else max_sequence_length
        ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        return TokenLayout.from_t5_ids((height // scale, width // scale), ids, pipe.tokenizer_2, order=self.order,
                                       prompt=prompt)

    def uses_cache_context(self) -> bool:
        return True
