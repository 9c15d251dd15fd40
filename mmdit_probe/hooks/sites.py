"""Attention sites of an MMDiT and the per-attention-call context shown to edits, observers and statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import CallContext
from ..layout import stream_slices

ATTENTIONS = ("attn", "attn2")


@dataclass(frozen=True)
class Site:
    """One attention module: block index and ``"attn"`` / ``"attn2"``. ``name`` is its stable hook name."""

    layer: int
    attention: str

    @property
    def name(self) -> str:
        return f"transformer_blocks.{self.layer}.{self.attention}"


@dataclass(frozen=True)
class AttentionCall:
    """One attention call: its site, the transformer call's :class:`CallContext`, sizes and scale.

    ``self_only_rows``: batch rows whose image queries attend only to their own image key and the
    text keys (PAG's perturbed row); ``lse`` for those rows is over exactly those keys.
    """

    site: Site
    context: CallContext
    n_image: int
    n_text: int  # 0 for the image-only attn2
    order: tuple[str, str]
    scale: float
    heads: int
    self_only_rows: tuple[int, ...] = ()

    @property
    def call(self) -> int:
        """Transformer call index (``context.index``)."""
        return self.context.index

    @property
    def image_slice(self) -> slice:
        return stream_slices(self.order, self.n_image, self.n_text)["image"]

    @property
    def text_slice(self) -> slice:
        return stream_slices(self.order, self.n_image, self.n_text)["text"]


def resolve_transformer(model: Any) -> torch.nn.Module:
    """The MMDiT inside ``model`` (a pipeline or the transformer itself), or a ``TypeError`` naming the fix."""
    candidate = getattr(model, "transformer", model)
    blocks = getattr(candidate, "transformer_blocks", None)
    if isinstance(candidate, torch.nn.Module) and blocks is not None and len(blocks) > 0 and all(
        type(b).__name__ == "JointTransformerBlock" for b in blocks
    ):
        return candidate
    raise TypeError(
        f"mmdit_probe needs an SD3-style MMDiT (a StableDiffusion3Pipeline or an SD3Transformer2DModel whose "
        f"transformer_blocks are JointTransformerBlocks); got {type(model).__name__}. Pass the pipeline or "
        f"pipe.transformer of an SD3/SD3.5 model, e.g. mmdit_probe.tiny_sd3_pipeline()."
    )


def model_sites(transformer: torch.nn.Module) -> list[Site]:
    """Every attention module that takes part in joint attention, in block order."""
    sites = []
    for i, block in enumerate(transformer.transformer_blocks):
        sites.append(Site(i, "attn"))
        if getattr(block, "attn2", None) is not None:
            sites.append(Site(i, "attn2"))
    return sites
