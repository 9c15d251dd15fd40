"""Flux.2 (``Flux2Transformer2DModel``, ``Flux2Pipeline``): double-stream blocks join ``[text, image]``
in ``Flux2AttnProcessor``; single-stream blocks attend over the already-joined sequence in
``Flux2ParallelSelfAttnProcessor`` (attention and MLP in parallel).

Layers run in execution order: double-stream blocks ``0 … D−1``, then single-stream blocks
``D … D+S−1``. The text stream is the Mistral-3 encoder's hidden states of layers
``text_encoder_out_layers`` (default ``(10, 20, 30)``) stacked on channels, for every position of the
chat sequence (system message, prompt, padding; :mod:`.flux2_layout`). The image grid comes from
``img_ids`` ``(t, h, w, l)`` of the target image (``t = 0``). Reference images (``pipe(image=...)``),
which append tokens with ``t > 0``, and the Klein pipelines' KV cache are refused.

Single-stream blocks take the joined ``[text, image]`` sequence as ``hidden_states``
(``encoder_hidden_states=None``) and return it (:class:`~.base.JoinedStream`); there is no pooled text
conditioning (``has_pooled = False``).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

from ..context import CallContextError
from .base import CallInputs, DoubleSingleBlocks, Family, JoinedStream
from .flux2_layout import chat_ids, chat_layout, prompt_text, text_tokenizer
from .flux2_processor import Flux2ParallelProbeProcessor, Flux2ProbeProcessor
from .sd3 import argument

_ARGS = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "guidance",
         "joint_attention_kwargs", "return_dict", "kv_cache", "kv_cache_mode", "num_ref_tokens", "ref_fixed_timestep")
#: The encoder layers ``Flux2Pipeline`` stacks into the text stream unless told otherwise (its
#: ``text_encoder_out_layers`` default in diffusers 0.42.1; tests/test_flux2.py checks they agree).
HIDDEN_LAYERS: tuple[int, ...] = (10, 20, 30)
_PROCESSORS = {"joint": (Flux2AttnProcessor, Flux2ProbeProcessor),
               "single": (Flux2ParallelSelfAttnProcessor, Flux2ParallelProbeProcessor)}


class Flux2Family(DoubleSingleBlocks, Family):
    name = "flux2"
    label = "Flux.2"
    transformer_class = "Flux2Transformer2DModel"
    order = ("text", "image")
    text_encoder = "text_encoder"  # Mistral-3: hidden states of HIDDEN_LAYERS, stacked on channels
    tokenizer = "tokenizer"
    has_pooled = False  # the transformer takes no pooled_projections

    def block_io(self, transformer, layer):
        if layer >= len(transformer.transformer_blocks):  # single-stream: the joined sequence in, one tensor out
            return JoinedStream(self.order)
        return super().block_io(transformer, layer)

    def processor(self, site, controller, original):
        expected, probe = _PROCESSORS[site.kind]
        if type(original) is not expected:
            raise TypeError(
                f"mmdit_probe replaces {expected.__name__} on Flux.2, but {site.name} uses {type(original).__name__} "
                f"(the Klein KV-cache processors and other adapters are not supported). Put diffusers' defaults back "
                f"first: {_PROCESSORS['joint'][0].__name__} in transformer_blocks, "
                f"{_PROCESSORS['single'][0].__name__} in single_transformer_blocks")
        return probe(site, controller, original)

    def call_inputs(self, transformer, args, kwargs):
        if argument(args, kwargs, "kv_cache_mode", _ARGS) is not None:
            raise CallContextError("mmdit_probe does not record Flux.2 with a reference-image KV cache "
                                   "(kv_cache_mode, Flux2KleinKVPipeline); call the transformer without it")
        hs = argument(args, kwargs, "hidden_states", _ARGS)
        ehs = argument(args, kwargs, "encoder_hidden_states", _ARGS)
        t = argument(args, kwargs, "timestep", _ARGS)
        ids = argument(args, kwargs, "img_ids", _ARGS)
        ids = ids[0] if ids.dim() == 3 else ids
        extra = int((ids[:, 0] != 0).sum())
        if extra:
            raise CallContextError(
                f"this Flux.2 call carries {extra} reference-image tokens (pipe(image=...): img_ids with t > 0) after "
                f"the {ids.shape[0] - extra} tokens of the image being generated; mmdit_probe does not label "
                f"reference-image tokens yet. Record Flux.2 without image=")
        grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        timestep = (t.reshape(-1)[0].detach() * 1000) if torch.is_tensor(t) else torch.tensor(float("nan"))
        return CallInputs(hs.shape[0], grid, 0 if ehs is None else ehs.shape[1], timestep, ehs, False)

    def encoder_hidden(self, pipe, output):
        """``torch.stack(hidden_states[k] for k in HIDDEN_LAYERS)`` laid out as ``Flux2Pipeline`` does:
        ``[n, L, len(HIDDEN_LAYERS)·C]``. A call with other ``text_encoder_out_layers`` matches no row."""
        _check_pipeline(pipe)
        out = torch.stack([output.hidden_states[k] for k in HIDDEN_LAYERS], dim=1)
        batch, layers, length, width = out.shape
        return out.permute(0, 2, 1, 3).reshape(batch, length, layers * width)

    def row_text(self, row, hidden):
        return row if row.shape == hidden.shape else None

    def prompt_text(self, pipe, ids, second_ids):
        return prompt_text(ids, text_tokenizer(pipe.tokenizer))

    def layout(self, pipe, ids, second_ids, grid, n_text, prompt):
        return chat_layout(grid, ids, text_tokenizer(pipe.tokenizer), order=self.order, prompt=prompt)

    def prompt_layout(self, pipe, prompt, height, width, max_sequence_length):
        _check_pipeline(pipe)
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or default, width or default
        scale = pipe.vae_scale_factor * 2  # VAE downsampling, then 2×2 patchifying
        length = pipe.tokenizer_max_length if max_sequence_length is None else max_sequence_length
        ids = chat_ids(pipe.tokenizer, prompt, pipe.system_message, length)
        clean = prompt.replace("[IMG]", "")  # what Flux2Pipeline's format_input hands the tokenizer
        return chat_layout((height // scale, width // scale), ids, text_tokenizer(pipe.tokenizer), order=self.order,
                           prompt=clean)

    def schedule(self, pipe, steps, height, width):
        """``Flux2Pipeline.__call__``'s schedule: sigmas ``linspace(1, 1/n, n)`` (None for a scheduler with
        ``use_flow_sigmas``), ``mu = compute_empirical_mu(packed image tokens, steps)`` (depends on the step count)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

        default = pipe.default_sample_size * pipe.vae_scale_factor
        scale = pipe.vae_scale_factor * 2  # VAE downsampling, then 2×2 patchifying
        tokens = (int(height or default) // scale) * (int(width or default) // scale)
        sch = copy.deepcopy(pipe.scheduler)
        sigmas = None if sch.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu(image_seq_len=tokens, num_steps=steps)
        timesteps, _ = retrieve_timesteps(sch, steps, "cpu", sigmas=sigmas, mu=mu)
        return [float(t) for t in timesteps], [float(s) for s in sch.sigmas], float(mu)


def _check_pipeline(pipe) -> None:
    """Flux2Pipeline only: the Klein pipelines encode with Qwen3 and run cond / uncond as separate calls."""
    from diffusers import Flux2Pipeline  # the pipelines package is imported only when a pipeline is in use

    if not isinstance(pipe, Flux2Pipeline):
        raise NotImplementedError(
            f"mmdit_probe records Flux.2 through Flux2Pipeline (Mistral-3 text stream); {type(pipe).__name__} is not "
            f"supported yet. Record its transformer alone: AttentionRecorder(pipe.transformer, branches=...)")
