"""Model families: the only place that knows what differs between SD3 / SD3.5 and Flux.1."""

from __future__ import annotations

from typing import Any

import torch

from ..layout import TokenLayout
from .base import AttentionCall, CallInputs, Family, Site
from .chroma import ChromaFamily
from .flux import FluxFamily
from .flux2 import Flux2Family
from .qwen import QwenImageFamily
from .sd3 import SD3Family

#: Supported families, tried in order. A new family adds one instance here.
FAMILIES: tuple[Family, ...] = (SD3Family(), FluxFamily(), Flux2Family(), QwenImageFamily(), ChromaFamily())

#: Families diffusers ships that no adapter covers yet (named in the refusal).
NOT_YET = ("Chroma", "Qwen-Image", "Flux.2", "HiDream", "Z-Image", "CogView4", "Lumina2", "AuraFlow")


def family_of(transformer: torch.nn.Module) -> Family | None:
    """The family adapter for ``transformer``, or None."""
    return next((f for f in FAMILIES if f.matches(transformer)), None)


def resolve_transformer(model: Any) -> torch.nn.Module:
    """The MMDiT inside ``model`` (a pipeline or the transformer itself), or a ``TypeError`` naming the fix."""
    candidate = getattr(model, "transformer", model)
    if isinstance(candidate, torch.nn.Module) and family_of(candidate) is not None:
        return candidate
    supported = ", ".join(f"{f.label} ({f.transformer_class})" for f in FAMILIES)
    covered = {f.label for f in FAMILIES}
    missing = ", ".join(n for n in NOT_YET if n not in covered)
    raise TypeError(
        f"mmdit_probe supports {supported}; got "
        f"{type(model).__name__}" + (f" with a {type(candidate).__name__}" if candidate is not model else "")
        + f". {missing} are not supported yet. "
        "Pass the pipeline or its transformer, e.g. mmdit_probe.tiny_sd3_pipeline() or mmdit_probe.tiny_flux_pipeline()."
    )


def model_sites(transformer: torch.nn.Module) -> list[Site]:
    """Every attention module that takes part in the model's attention, in execution order."""
    return resolve_family(transformer).sites(transformer)


def resolve_family(model: Any) -> Family:
    tr = resolve_transformer(model)
    return family_of(tr)


def joint_order(model: Any) -> tuple[str, str]:
    """Order of the two streams in ``model``'s joint attention sequence, from its family adapter
    (SD3 ``("image", "text")``, Flux ``("text", "image")``)."""
    return resolve_family(model).order


def prompt_layout(pipe: Any, prompt: str, *, height: int | None = None, width: int | None = None,
                  max_sequence_length: int | None = None) -> TokenLayout:
    """The :class:`TokenLayout` of ``pipe(prompt, height=, width=, max_sequence_length=)`` for any supported family."""
    return resolve_family(pipe).prompt_layout(pipe, prompt, height, width, max_sequence_length)


def model_blocks(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of ``model`` in execution order (layer ``i`` = block ``i``)."""
    tr = resolve_transformer(model)
    return family_of(tr).blocks(tr)


__all__ = ["FAMILIES", "AttentionCall", "CallInputs", "Family", "FluxFamily", "SD3Family", "Site", "family_of",
           "joint_order", "model_blocks", "model_sites", "prompt_layout", "resolve_family", "resolve_transformer"]
