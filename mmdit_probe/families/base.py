"""What differs between MMDiT families: attention sites, stream order, call inputs, prompt encodings.

A :class:`Family` is the only object that knows a model family; the processors, the call context
and the recorder ask it. Built-ins: :mod:`.sd3` (SD3 / SD3.5) and :mod:`.flux` (Flux.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import CallContext
from ..layout import TokenLayout, stream_slices

@dataclass(frozen=True)
class Site:
    """One attention module: layer (block index in execution order), ``"attn"``/``"attn2"``, kind (``"joint"``:
    two streams joined in the kernel; ``"single"``: an already-joined stream; ``"image"``: image tokens only), path.

    ``name`` is its stable hook name (the module path inside the transformer).
    """

    layer: int
    attention: str
    kind: str = "joint"
    path: str = ""

    @property
    def name(self) -> str:
        return self.path or f"transformer_blocks.{self.layer}.{self.attention}"


@dataclass(frozen=True)
class AttentionCall:
    """One attention call: its site, the transformer call's :class:`CallContext`, sizes and scale.

    ``self_only_rows``: batch rows whose image queries attend only to their own image key and the
    text keys (PAG's perturbed row); ``lse`` for those rows is over exactly those keys.
    """

    site: Site
    context: CallContext
    n_image: int
    n_text: int  # 0 for image-only attention (SD3.5's attn2)
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


@dataclass(frozen=True)
class CallInputs:
    """What one transformer call was given, read by the family: sizes, timestep, text stream, guidance kind."""

    batch: int
    grid: tuple[int, int]
    n_text: int
    timestep: torch.Tensor
    text: torch.Tensor | None  # encoder_hidden_states [B, n_text, C]
    slg: bool = False


class Family:
    """Base class of the family adapters (one instance per family; stateless)."""

    name = ""
    #: the family as users name it, and its transformer class (both named in refusals)
    label = ""
    transformer_class = ""
    #: order of the two streams in the joint sequence the family's processors build
    order: tuple[str, str] = ("image", "text")
    #: the pipeline attribute of the text encoder whose output becomes the text stream (matched by value)
    text_encoder = ""
    #: the pipeline attribute of that encoder's tokenizer
    tokenizer = ""
    #: whether the transformer takes ``skip_layers=`` (SD3): whole-block skips then use diffusers' own path
    skip_argument = False
    #: a second encoder whose ids complete the layout (SD3's T5), or ""
    second_encoder = ""

    def matches(self, transformer: torch.nn.Module) -> bool:
        return type(transformer).__name__ == self.transformer_class

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer blocks in execution order (layer ``i`` = ``blocks[i]``)."""
        raise NotImplementedError

    def block_kinds(self, transformer: torch.nn.Module) -> list[str]:
        """Per layer: ``"joint"`` (two-stream block) or ``"single"`` (single-stream block)."""
        return ["joint"] * len(self.blocks(transformer))

    def sites(self, transformer: torch.nn.Module) -> list[Site]:
        raise NotImplementedError

    def processor(self, site: Site, controller: Any, original: Any) -> Any:
        """The probe processor replacing ``original`` at ``site`` (``TypeError`` naming the fix if unsupported)."""
        raise NotImplementedError

    def call_inputs(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInputs:
        raise NotImplementedError

    def encoder_hidden(self, pipe: Any, output: Any) -> torch.Tensor:
        """From the text encoder's output: the hidden state ``[n, L, C]`` the pipeline places in the text stream."""
        raise NotImplementedError

    def row_text(self, row: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        """The part of one text-stream row ``[n_text, C]`` that equals a prompt's ``hidden [L, C']`` (None: cannot)."""
        raise NotImplementedError

    def prompt_text(self, pipe: Any, ids: list[int], second_ids: list[int] | None) -> str:
        """The prompt text recovered from the ids the encoders saw (the pipeline does not keep the string)."""
        raise NotImplementedError

    def layout(self, pipe: Any, ids: list[int], second_ids: list[int] | None, grid: tuple[int, int],
               n_text: int, prompt: str) -> TokenLayout:
        raise NotImplementedError

    def prompt_layout(self, pipe: Any, prompt: str, height: int | None, width: int | None,
                      max_sequence_length: int | None) -> TokenLayout:
        """The layout a pipeline call with this prompt and size would have (tokenized here, nothing run)."""
        raise NotImplementedError

    def uses_cache_context(self) -> bool:
        """Whether the pipelines wrap each call in ``transformer.cache_context("cond"/"uncond")``."""
        return False
