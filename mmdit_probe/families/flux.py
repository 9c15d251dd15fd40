"""Flux.1 (``FluxTransformer2DModel``): double-stream blocks join ``[text, image]``; single-stream
blocks attend over the already-joined sequence. Text = T5 tokens only (CLIP is pooled only).

Layers run in execution order: double-stream blocks ``0 … D−1``, then single-stream blocks
``D … D+S−1`` (``block_kinds`` says which). The image grid comes from ``img_ids`` (packed 2×2 latents):
the generated image's tokens (``t = 0``); a Kontext context image's tokens (``t = 1``, :mod:`.kontext`)
follow them in the image stream and are read as :attr:`CallInputs.context_grid`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor


from ..layout import TokenLayout
from .base import CallInputs, DoubleSingleBlocks, Family
from .flux_processor import FluxProbeProcessor
from .kontext import is_kontext, kontext_sizes, split_image_ids
from .sd3 import argument

_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance")


class FluxFamily(DoubleSingleBlocks, Family):
    name = "flux"
    label = "Flux.1"
    transformer_class = "FluxTransformer2DModel"
    order = ("text", "image")
    text_encoder = "text_encoder_2"  # T5: its last hidden state is the text stream
    tokenizer = "tokenizer_2"

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
        groups = split_image_ids(argument(args, kwargs, "img_ids", _ARGS))
        if hs.shape[1] != groups.n_image + groups.n_context:
            raise ValueError(f"hidden_states has {hs.shape[1]} image tokens but img_ids describe {groups.n_image} "
                             f"generated + {groups.n_context} context tokens; pass img_ids of the same sequence")
        timestep = (t.reshape(-1)[0].detach() * 1000) if torch.is_tensor(t) else torch.tensor(float("nan"))
        if ehs is not None and ehs.shape[0] == 1 < hs.shape[0]:  # one negative prompt for a batch: the blocks broadcast it
            ehs = ehs.expand(hs.shape[0], -1, -1)
        return CallInputs(hs.shape[0], groups.grid, 0 if ehs is None else ehs.shape[1], timestep, ehs, False,
                              groups.context_grid)

    def encoder_hidden(self, pipe, output):
        return output[0]

    def row_text(self, row, hidden):
        return row if row.shape == hidden.shape else None

    def prompt_text(self, pipe, ids, second_ids):
        return pipe.tokenizer_2.decode(ids, skip_special_tokens=True).strip()

    def layout(self, pipe, ids, second_ids, grid, n_text, prompt):
        return TokenLayout.from_t5_ids(grid, ids, pipe.tokenizer_2, order=self.order, prompt=prompt)

    def prompt_layout(self, pipe, prompt, height, width, max_sequence_length):
        """Kontext pipelines rescale the size to their default ``max_area`` (1024²) as ``pipe(...)`` does; for
        another ``max_area`` or a context image use :func:`mmdit_probe.kontext.kontext_layout`."""
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or default, width or default
        scale = pipe.vae_scale_factor * 2  # VAE downsampling, then 2×2 packing
        grid = kontext_sizes(pipe, height=height, width=width).grid if is_kontext(pipe) else (height // scale,
                                                                                            width // scale)
        length = 512 if max_sequence_length is None else max_sequence_length
        ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        return TokenLayout.from_t5_ids(grid, ids, pipe.tokenizer_2, order=self.order, prompt=prompt)

    def uses_cache_context(self) -> bool:
        return True

    def schedule(self, pipe, steps, height, width):
        """``FluxPipeline.__call__``'s schedule: sigmas ``linspace(1, 1/n, n)``, ``mu`` from the packed token count."""
        return self.schedule_for_tokens(pipe, steps, packed_tokens(pipe, height, width))

    @staticmethod
    def schedule_for_tokens(pipe, steps: int, image_tokens: int) -> tuple[list[float], list[float], float]:
        """The schedule for ``image_tokens`` packed image tokens (FluxPipeline passes no sigmas to a scheduler with
        ``use_flow_sigmas``)."""
        return flow_schedule(pipe, steps, image_tokens, sigmas=not pipe.scheduler.config.get("use_flow_sigmas", False))


def packed_tokens(pipe, height: int | None, width: int | None) -> int:
    """Image tokens of a ``height × width`` call (the pipeline's default size if None): VAE scale, then 2×2 packing."""
    default = pipe.default_sample_size * pipe.vae_scale_factor
    scale = pipe.vae_scale_factor * 2
    return (int(height or default) // scale) * (int(width or default) // scale)


def flow_schedule(pipe, steps: int, image_tokens: int, *, sigmas: bool) -> tuple[list[float], list[float], float]:
    """``(timesteps, sigmas, mu)`` as the Flux-style pipelines set them, on a deep copy of ``pipe.scheduler``:
    ``mu = calculate_shift(image_tokens)`` and (``sigmas``) the sigmas ``linspace(1, 1/n, n)``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sch = copy.deepcopy(pipe.scheduler)
    cfg = sch.config
    mu = calculate_shift(image_tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(sch, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps) if sigmas else None,
                                      mu=mu)
    return [float(t) for t in timesteps], [float(s) for s in sch.sigmas], float(mu)
