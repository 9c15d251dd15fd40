"""How each family's pipeline turns latents and a prompt into one transformer call (SD3 / SD3.5, Flux.1).

An :class:`AnalysisFamily` reproduces, for one denoising step, exactly the tensors the pipeline's own
``__call__`` hands its transformer: the prompt encodings (``pipe.encode_prompt``), the CFG batch, the
latent layout (Flux packs 2×2 with ``pipe._pack_latents`` and numbers the tokens with
``pipe._prepare_latent_image_ids``) and the timestep (the scheduler's ``σ · num_train_timesteps`` in
float32; Flux divides it by 1000 again, as its pipeline does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..families import resolve_family


@dataclass(frozen=True)
class PromptInputs:
    """Text side of every call: ``extra`` kwargs (embeddings, pooled, ids) and one branch name per batch row."""

    extra: dict
    branches: tuple[str, ...]
    prompts: tuple[str, ...]  # the text each row carries (negative prompt for ``uncond`` rows)


class AnalysisFamily:
    """Base class: the pipeline-specific steps of :func:`~mmdit_probe.analyse.analyse_image`."""

    name = ""

    def pixel_multiple(self, pipe: Any) -> int:
        """What image height and width must be multiples of (VAE downsampling × patch / packing)."""
        raise NotImplementedError

    def defaults(self) -> dict[str, Any]:
        """``guidance_scale`` and ``max_sequence_length`` of the pipeline's ``__call__``."""
        raise NotImplementedError

    def encode_prompt(self, pipe: Any, prompt: str, negative_prompt: str | None, guidance_scale: float,
                      max_sequence_length: int) -> PromptInputs:
        raise NotImplementedError

    def to_tokens(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents ``[1, C, h, w]`` → the transformer's ``hidden_states`` layout."""
        return latents

    def call_kwargs(self, pipe: Any, hidden: torch.Tensor, latent_hw: tuple[int, int], timestep: torch.Tensor,
                    text: PromptInputs, guidance_scale: float) -> dict:
        """Keyword arguments of the transformer call, given ``hidden [1, ...]`` (from latents of ``latent_hw``)
        and the scheduler's ``timestep`` (0-d, float32)."""
        raise NotImplementedError


class SD3Analysis(AnalysisFamily):
    """``StableDiffusion3Pipeline``: rows ``[uncond; cond]`` when ``guidance_scale > 1`` (its ``do_classifier_free_guidance``)."""

    name = "sd3"

    def pixel_multiple(self, pipe):
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def defaults(self):
        return {"guidance_scale": 7.0, "max_sequence_length": 256}

    def encode_prompt(self, pipe, prompt, negative_prompt, guidance_scale, max_sequence_length):
        cfg = guidance_scale > 1
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=cfg, device=pipe._execution_device, max_sequence_length=max_sequence_length)
        if cfg:
            return PromptInputs({"encoder_hidden_states": torch.cat([npe, pe]),
                                 "pooled_projections": torch.cat([npooled, pooled])},
                                ("uncond", "cond"), (negative_prompt or "", prompt))
        return PromptInputs({"encoder_hidden_states": pe, "pooled_projections": pooled}, ("cond",), (prompt,))

    def call_kwargs(self, pipe, hidden, latent_hw, timestep, text, guidance_scale):
        rows = len(text.branches)
        x = torch.cat([hidden] * rows) if rows > 1 else hidden
        return {"hidden_states": x, "timestep": timestep.expand(rows), **text.extra,
                "joint_attention_kwargs": None, "return_dict": False}


class FluxAnalysis(AnalysisFamily):
    """``FluxPipeline``: one ``cond`` row (guidance-distilled: ``guidance_scale`` goes in as an embedding)."""

    name = "flux"

    def pixel_multiple(self, pipe):
        return pipe.vae_scale_factor * 2

    def defaults(self):
        return {"guidance_scale": 3.5, "max_sequence_length": 512}

    def encode_prompt(self, pipe, prompt, negative_prompt, guidance_scale, max_sequence_length):
        pe, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=pipe._execution_device,
                                                  num_images_per_prompt=1, max_sequence_length=max_sequence_length)
        return PromptInputs({"encoder_hidden_states": pe, "pooled_projections": pooled, "txt_ids": text_ids},
                            ("cond",), (prompt,))

    def to_tokens(self, pipe, latents):
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w)

    def call_kwargs(self, pipe, hidden, latent_hw, timestep, text, guidance_scale):
        pe = text.extra["encoder_hidden_states"]
        h, w = latent_hw
        ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, hidden.device, pe.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=hidden.device, dtype=torch.float32).expand(1)
        t = timestep.expand(1).to(hidden.dtype)
        return {"hidden_states": hidden, "timestep": t / 1000, "guidance": guidance, **text.extra,
                "img_ids": ids, "joint_attention_kwargs": {}, "return_dict": False}


def analysis_family(pipe: Any) -> AnalysisFamily:
    """The analysis adapter of ``pipe``'s family (``TypeError`` naming what is supported otherwise)."""
    fam = resolve_family(pipe)  # refuses unsupported models with the library's own message
    table = {"sd3": SD3Analysis, "flux": FluxAnalysis}
    if fam.name not in table:
        raise TypeError(f"analyse_image supports {', '.join(sorted(table))} pipelines; got the {fam.label} family")
    return table[fam.name]()
