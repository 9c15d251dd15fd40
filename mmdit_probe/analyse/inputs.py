"""``analysis_inputs``: the transformer calls that analyse a real image at noise levels σ.

One call per σ, each exactly what the pipeline's own sampler would pass its transformer at a step whose
σ is that value with the noised image latents as ``latents`` (tested against the pipeline).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..families import prompt_layout
from ..layout import TokenLayout
from .families import analysis_family
from .latents import check_sigmas, clean_latents, noise_like, noised, pixels, sigma_tensors, target_size


@dataclass(frozen=True)
class AnalysisInputs:
    """What :func:`~mmdit_probe.analyse_image` runs: ``calls[i]`` are the transformer's keyword arguments at
    ``sigmas[i]``; ``clean`` / ``noise`` are ``x0`` and ``ε`` in the transformer's token layout (SD3
    ``[1, C, h, w]``, Flux packed ``[1, h/2 · w/2, 4C]``), float32; ``branches`` / ``layouts`` describe the
    batch rows (``uncond`` first when CFG is on); ``settings`` is JSON-ready."""

    sigmas: tuple[float, ...]
    calls: tuple[dict, ...] = field(repr=False)
    clean: torch.Tensor = field(repr=False)
    noise: torch.Tensor = field(repr=False)
    branches: tuple[str, ...]
    layouts: tuple[TokenLayout, ...] = field(repr=False)
    settings: dict = field(default_factory=dict)


def run_defaults(pipe: Any) -> dict[str, Any]:
    """``guidance_scale`` and ``max_sequence_length``: the ones the pipeline ships with (embedded models'
    ``shipped_run_kwargs``), else the defaults of the pipeline's own ``__call__``."""
    fam = analysis_family(pipe)
    out = dict(fam.defaults())
    params = inspect.signature(type(pipe).__call__).parameters
    for k in out:
        if k in params and params[k].default is not inspect.Parameter.empty and params[k].default is not None:
            out[k] = params[k].default
    shipped = getattr(pipe, "shipped_run_kwargs", None) or {}
    out.update({k: shipped[k] for k in out if k in shipped})
    return out


def _check_settings(prompt: Any, negative_prompt: Any, seed: Any, guidance_scale: Any, max_sequence_length: Any) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string, got {type(prompt).__name__} (analyse one image at a time)")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a whole number from 0 to 2**64-1, got {seed!r}")
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if not isinstance(max_sequence_length, int) or isinstance(max_sequence_length, bool) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be a positive whole number, got {max_sequence_length!r}")


@dataclass(frozen=True)
class AnalysisPlan:
    """The checked settings of an analysis (nothing computed yet): σ values, sizes, rows and their layouts."""

    sigmas: tuple[float, ...]
    branches: tuple[str, ...]
    layouts: tuple[TokenLayout, ...] = field(repr=False)
    settings: dict = field(default_factory=dict)


def plan_analysis(pipe: Any, image: Any, prompt: str, sigmas: Sequence[float] | float = (0.3, 0.6), *, seed: int = 0,
                  guidance_scale: float | None = None, negative_prompt: str | None = None,
                  max_sequence_length: int | None = None, height: int | None = None,
                  width: int | None = None) -> AnalysisPlan:
    """Check every argument of :func:`analysis_inputs` and fill in the defaults (tokenizers only, no model runs)."""
    fam = analysis_family(pipe)
    if getattr(pipe, "vae", None) is None or getattr(pipe, "image_processor", None) is None:
        raise TypeError("analyse_image needs the whole pipeline (its VAE encodes the image), not a bare transformer")
    sig = check_sigmas(sigmas)
    d = run_defaults(pipe)
    guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
    max_sequence_length = d["max_sequence_length"] if max_sequence_length is None else max_sequence_length
    _check_settings(prompt, negative_prompt, seed, guidance_scale, max_sequence_length)
    if fam.name == "flux" and negative_prompt:
        raise ValueError("negative_prompt: Flux analysis runs the pipeline's cond call only (Flux is guidance-"
                         "distilled; true CFG makes a second call that is not analysed). Leave negative_prompt out")
    h, w = target_size(image, height, width, fam.pixel_multiple(pipe))
    cfg = fam.name == "sd3" and guidance_scale > 1
    texts = ((negative_prompt or "",) if cfg else ()) + (prompt,)
    layouts = tuple(prompt_layout(pipe, t, height=h, width=w, max_sequence_length=max_sequence_length) for t in texts)
    settings = {"prompt": prompt, "negative_prompt": negative_prompt if cfg else None, "sigmas": list(sig),
                "seed": seed, "guidance_scale": float(guidance_scale), "max_sequence_length": max_sequence_length,
                "height": h, "width": w, "family": fam.name}
    return AnalysisPlan(sig, ("uncond", "cond") if cfg else ("cond",), layouts, settings)


def inputs_from_plan(pipe: Any, image: Any, plan: AnalysisPlan) -> AnalysisInputs:
    """Encode ``image`` and the prompt, noise the latents to each σ and build the calls of ``plan``."""
    fam, st = analysis_family(pipe), plan.settings
    with torch.no_grad():
        text = fam.encode_prompt(pipe, st["prompt"], st["negative_prompt"], st["guidance_scale"],
                                 st["max_sequence_length"])
        x0 = clean_latents(pipe, pixels(pipe, image, st["height"], st["width"]))
    latent_hw = tuple(x0.shape[-2:])
    eps = noise_like(x0, st["seed"])
    s32, t32 = sigma_tensors(plan.sigmas, pipe.scheduler.config.num_train_timesteps)
    dtype = text.extra["encoder_hidden_states"].dtype  # the pipeline's latents dtype (prompt_embeds.dtype)
    calls = []
    for s, t in zip(s32, t32):
        x = fam.to_tokens(pipe, noised(x0, eps, s).to(dtype))
        calls.append(fam.call_kwargs(pipe, x, latent_hw, t.to(x.device), text, st["guidance_scale"]))
    return AnalysisInputs(plan.sigmas, tuple(calls), fam.to_tokens(pipe, x0), fam.to_tokens(pipe, eps), plan.branches,
                          plan.layouts, dict(st))


def analysis_inputs(pipe: Any, image: Any, prompt: str, sigmas: Sequence[float] | float = (0.3, 0.6), *, seed: int = 0,
                    guidance_scale: float | None = None, negative_prompt: str | None = None,
                    max_sequence_length: int | None = None, height: int | None = None,
                    width: int | None = None) -> AnalysisInputs:
    """Encode ``image`` with ``pipe``'s VAE, noise it to each σ (one ``ε`` from ``seed``) and build the calls.

    ``guidance_scale`` / ``max_sequence_length`` default to what the pipeline runs with (:func:`run_defaults`);
    SD3 adds ``uncond`` rows (``negative_prompt``, default ``""``) when ``guidance_scale > 1``, as its sampler
    does; Flux feeds ``guidance_scale`` to its guidance embedding. Every argument is checked before any model runs.
    """
    plan = plan_analysis(pipe, image, prompt, sigmas, seed=seed, guidance_scale=guidance_scale,
                         negative_prompt=negative_prompt, max_sequence_length=max_sequence_length, height=height,
                         width=width)
    return inputs_from_plan(pipe, image, plan)
