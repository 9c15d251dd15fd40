"""Chroma (``ChromaTransformer2DModel``): Flux.1's blocks and ``FluxAttnProcessor``, T5 text only, with a
T5 padding mask in every attention call, and real classifier-free guidance.

What differs from Flux.1 (:class:`~.flux.FluxFamily`, whose sites, block order and processor it keeps):

- text: ``pipe.text_encoder`` / ``pipe.tokenizer`` are T5 (Flux's ``_2``); there is no pooled CLIP input.
- mask: ``ChromaPipeline`` passes ``attention_mask [B, S]`` = 1 on the prompt's tokens, its EOS and *one*
  padding token, and on every image token; each block builds ``m_i · m_j`` (``[B, 1, S, S]``). In diffusers
  0.42.1 the mask is float, so SDPA *adds* it: a +1 bias on unmasked pairs, padding keys not removed
  (diffusers issues #12116, #13619). With a boolean mask (``prompt_attention_mask`` passed as bool)
  padding keys get probability 0 and padding *queries* attend nowhere. The probe records what the
  kernel computes in both cases (:func:`~mmdit_probe.kernels.fold_mask`).
- guidance: with ``guidance_scale > 1`` the pipeline calls the transformer twice per step, the ``cond``
  batch and then the ``uncond`` batch (negative prompt), without ``cache_context`` names.
- blocks: the single-stream blocks take and return the joined ``[text; image]`` sequence (:class:`JoinedStream`);
  no pooled text conditioning (the modulation comes from the timestep alone).
"""

from __future__ import annotations


import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ..layout import TokenLayout
from .base import CallInputs, JoinedStream
from .flux import FluxFamily, flow_schedule, packed_tokens
from .flux_processor import FluxProbeProcessor
from .sd3 import argument

_ARGS = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "attention_mask")


class ChromaFamily(FluxFamily):
    name = "chroma"
    label = "Chroma"
    transformer_class = "ChromaTransformer2DModel"
    text_encoder = "text_encoder"  # T5: its last hidden state (computed with the tokenizer's mask) is the text stream
    tokenizer = "tokenizer"
    has_pooled = False  # no pooled_projections: ZeroText(pooled=True) / Patch(stream="pooled") are refused
    #: the uncond prediction is a second, unnamed transformer call after the cond call of each step
    separate_uncond_call = True

    def block_io(self, transformer, layer):
        if layer >= len(transformer.transformer_blocks):  # single-stream: the joined sequence in, one tensor out
            return JoinedStream(self.order)
        return super().block_io(transformer, layer)

    def processor(self, site, controller, original):
        if type(original) is not FluxAttnProcessor:
            raise TypeError(
                f"mmdit_probe replaces FluxAttnProcessor on Chroma, but {site.name} uses {type(original).__name__} "
                f"(an IP-Adapter or another adapter). Remove it (pipe.unload_ip_adapter()) or reset the processors."
            )
        return FluxProbeProcessor(site, controller, original)

    def call_inputs(self, transformer, args, kwargs) -> CallInputs:
        hs = argument(args, kwargs, "hidden_states", _ARGS)
        ehs = argument(args, kwargs, "encoder_hidden_states", _ARGS)
        t = argument(args, kwargs, "timestep", _ARGS)
        ids = argument(args, kwargs, "img_ids", _ARGS)
        ids = ids[0] if ids.dim() == 3 else ids
        grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        timestep = (t.reshape(-1)[0].detach() * 1000) if torch.is_tensor(t) else torch.tensor(float("nan"))
        return CallInputs(hs.shape[0], grid, 0 if ehs is None else ehs.shape[1], timestep, ehs, False)

    def prompt_text(self, pipe, ids, second_ids):
        return pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def layout(self, pipe, ids, second_ids, grid, n_text, prompt):
        return TokenLayout.from_t5_ids(grid, ids, pipe.tokenizer, order=self.order, prompt=prompt)

    def prompt_layout(self, pipe, prompt, height, width, max_sequence_length):
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or default, width or default
        scale = pipe.vae_scale_factor * 2  # VAE downsampling, then 2×2 packing
        length = 512 if max_sequence_length is None else max_sequence_length
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        return TokenLayout.from_t5_ids((height // scale, width // scale), ids, pipe.tokenizer, order=self.order,
                                       prompt=prompt)

    def uses_cache_context(self) -> bool:
        return False

    def schedule(self, pipe, steps, height, width):
        """``ChromaPipeline.__call__``'s schedule: sigmas ``linspace(1, 1/n, n)`` always passed (Flux.1 passes None to a
        scheduler with ``use_flow_sigmas``, Chroma does not), ``mu = calculate_shift(packed image tokens)``."""
        return flow_schedule(pipe, steps, packed_tokens(pipe, height, width), sigmas=True)
