"""Effect of an intervention: compare an ablated run with a baseline run of the same seed.

>>> eff = mp.run_with_effects(pipe, "a red circle", [mp.SkipLayers([3])], seed=0, num_inference_steps=28)
>>> eff.table          # metric, step, value: image/latent MSE, PSNR, cosine; velocity_* per step

Final-output metrics compare the final latents ``[B, C, h, w]`` and the decoded images
``[B, 3, H, W]`` (pixels in 0…1); per-step metrics compare the transformer's velocity prediction
of every transformer call (with CFG both halves ``[uncond ; cond]``), so one sees *when* in
denoising an ablation matters. Custom metrics are ``fn(baseline, ablated) -> float``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .ablate import check_specs, intervene
from .ablate import Spec

TARGETS = ("image", "latent", "velocity")
RESERVED_KWARGS = ("generator", "output_type", "return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs")


# ---- metrics ----------------------------------------------------------------------------
def mse(baseline: torch.Tensor, ablated: torch.Tensor) -> float:
    """Mean squared difference over every element (fp64)."""
    return float(((ablated.double() - baseline.double()) ** 2).mean())


def psnr(baseline: torch.Tensor, ablated: torch.Tensor, data_range: float | None = None) -> float:
    """``10·log10(range² / MSE)`` in dB; ``range`` defaults to the baseline's max − min. ``inf`` if equal."""
    err = mse(baseline, ablated)
    if err == 0.0:
        return math.inf
    rng = float(baseline.max() - baseline.min()) if data_range is None else float(data_range)
    return 10.0 * math.log10(max(rng, 1e-12) ** 2 / err)


def cosine(baseline: torch.Tensor, ablated: torch.Tensor) -> float:
    """Cosine similarity of each batch row flattened, averaged over rows (fp64)."""
    a, b = baseline.double().flatten(1), ablated.double().flatten(1)
    return float(F.cosine_similarity(a, b, dim=1, eps=1e-30).mean())


@dataclass(frozen=True)
class Metric:
    """``fn(baseline, ablated) -> float`` on ``on``: ``"image"``, ``"latent"`` or ``"velocity"`` (per step)."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], float]
    on: str = "image"

    def __post_init__(self):
        if self.on not in TARGETS:
            raise ValueError(f"Metric {self.name!r}: on must be one of {TARGETS}, got {self.on!r}")


def _defaults() -> tuple[Metric, ...]:
    image_psnr = functools.partial(psnr, data_range=1.0)
    out = []
    for on in ("latent", "image", "velocity"):
        out += [Metric(f"{on}_mse", mse, on), Metric(f"{on}_psnr", image_psnr if on == "image" else psnr, on),
                Metric(f"{on}_cosine", cosine, on)]
    return tuple(out)


DEFAULT_METRICS: tuple[Metric, ...] = _defaults()


def resolve_metrics(metrics: Any = None) -> tuple[Metric, ...]:
    """``None`` → :data:`DEFAULT_METRICS`; else ``Metric``\\ s, plain callables (on images, named by
    ``__name__``), or a mapping ``name → callable | Metric``."""
    if metrics is None:
        return DEFAULT_METRICS
    items = list(metrics.items()) if isinstance(metrics, Mapping) else [(None, m) for m in metrics]
    out = []
    for name, m in items:
        if isinstance(m, Metric):
            out.append(m if name is None else Metric(name, m.fn, m.on))
        elif callable(m):
            out.append(Metric(name or getattr(m, "__name__", type(m).__name__), m, "image"))
        else:
            raise TypeError(f"metrics must be Metric objects or callables fn(baseline, ablated) -> float, got {type(m).__name__}")
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup or not out:
        raise ValueError(f"metric names must be unique and non-empty; duplicated: {dup}")
    return tuple(out)


# ---- runs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunOutput:
    """One pipeline run: ``latents`` (final, as the pipeline holds them), ``images [B, 3, H, W]`` in 0…1,
    ``velocities``: the transformer output of every call, in call order."""

    latents: torch.Tensor
    images: torch.Tensor
    velocities: tuple[torch.Tensor, ...]


def run_pipeline(pipe: Any, prompt: str | Sequence[str], seed: int = 0, specs: Iterable[Spec] = (),
                 **call_kwargs: Any) -> RunOutput:
    """Run ``pipe(prompt, generator=torch.Generator().manual_seed(seed), **call_kwargs)`` under
    ``intervene(pipe, *specs)`` and keep final latents (as the pipeline holds them before decoding: Flux's
    are packed ``[B, N, C·4]``), the images the pipeline decodes (``output_type="pt"``) and per-call velocities."""
    bad = [k for k in RESERVED_KWARGS if k in call_kwargs]
    if bad:
        raise ValueError(f"{bad} are set by the effect runner (seed= picks the generator; latents and images are both "
                         "kept; the final latents are read with callback_on_step_end)")
    velocities: list[torch.Tensor] = []
    final: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        velocities.append(out.detach())

    def last_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"].detach()
        return {}

    hook = pipe.transformer.register_forward_hook(keep)
    try:
        with intervene(pipe, *specs):
            images = pipe(prompt, generator=torch.Generator().manual_seed(int(seed)), output_type="pt",
                          callback_on_step_end=last_latents, callback_on_step_end_tensor_inputs=["latents"],
                          **dict(call_kwargs)).images
    finally:
        hook.remove()
    return RunOutput(final["latents"], images, tuple(velocities))


def compare(baseline: RunOutput, ablated: RunOutput, metrics: Any = None) -> list[dict]:
    """Rows ``{"metric", "step", "value"}``: final metrics with ``step=None``, velocity metrics per step."""
    rows = []
    for m in resolve_metrics(metrics):
        if m.on == "velocity":
            if len(baseline.velocities) != len(ablated.velocities):
                raise ValueError(f"the runs made {len(baseline.velocities)} and {len(ablated.velocities)} transformer calls")
            for step, (b, a) in enumerate(zip(baseline.velocities, ablated.velocities)):
                rows.append({"metric": m.name, "step": step, "value": float(m.fn(b, a))})
        else:
            b, a = (baseline.images, ablated.images) if m.on == "image" else (baseline.latents, ablated.latents)
            rows.append({"metric": m.name, "step": None, "value": float(m.fn(b, a))})
    return rows


@dataclass(frozen=True)
class Effect:
    """Baseline and ablated runs and their comparison ``table`` (DataFrame: metric, step, value)."""

    baseline: RunOutput
    ablated: RunOutput
    table: Any


def run_with_effects(pipe: Any, prompt: str | Sequence[str], specs: Spec | Iterable[Spec], seed: int = 0,
                     metrics: Any = None, baseline: RunOutput | None = None, **call_kwargs: Any) -> Effect:
    """Run the baseline (unless given) and the ablated run with the same seed; compare them."""
    import pandas as pd

    specs = [specs] if isinstance(specs, Spec) else list(specs)
    metric_list = resolve_metrics(metrics)  # fail on bad metrics or specs before any run
    check_specs(pipe, *specs)
    base = baseline if baseline is not None else run_pipeline(pipe, prompt, seed, (), **call_kwargs)
    ablated = run_pipeline(pipe, prompt, seed, specs, **call_kwargs)
    table = pd.DataFrame(compare(base, ablated, metric_list), columns=["metric", "step", "value"])
    table["step"] = table["step"].astype("Int64")
    return Effect(base, ablated, table)
