"""What differs between MMDiT families: attention sites, stream order, call inputs, prompt encodings.

A :class:`Family` is the only object that knows a model family; the processors, the call context
and the recorder ask it. Built-ins: :mod:`.sd3` (SD3 / SD3.5) and :mod:`.flux` (Flux.1).

:class:`BlockIO` says how one block's residual streams enter and leave it; the block-level ablations and
activation caches read and write streams through it only (:meth:`Family.block_io`).
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
    context_grid: tuple[int, int] | None = None  # Flux Kontext: the context image's token grid (after the generated one)


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
    #: with CFG the pipeline predicts ``uncond`` in a second, unnamed transformer call after each step's ``cond``
    #: call (Chroma), not in an ``[uncond ; cond]`` batch
    separate_uncond_call = False
    #: whether the transformer takes pooled text conditioning (``pooled_projections``); without it
    #: ``ZeroText(pooled=True)`` and ``Patch(stream="pooled")`` are refused before any compute
    has_pooled = True

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

    def block_io(self, transformer: torch.nn.Module, layer: int) -> BlockIO:
        """How block ``layer``'s streams enter and leave it. Default: :class:`SeparateStreams` (the block takes
        ``(hidden_states, encoder_hidden_states)`` and returns ``(encoder_hidden_states, hidden_states)``); the
        ``attn`` of a ``"single"`` block returns the joined sequence in :attr:`order`. A family whose single-stream
        blocks take the joined sequence returns :class:`JoinedStream` ``(self.order)`` for those layers."""
        return SeparateStreams(self.order, joined_attention=self.block_kinds(transformer)[layer] == "single")

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

    def schedule(self, pipe: Any, steps: int, height: int | None, width: int | None
                 ) -> tuple[list[float], list[float], float | None]:
        """``(timesteps, sigmas, mu)`` the pipeline sets for ``steps`` steps at this size (on a copy of its scheduler)."""
        raise NotImplementedError(f"mmdit_probe does not yet reproduce the {self.label} pipeline's sampling schedule "
                                  "(supported: SD3 / SD3.5, Flux.1, Chroma, Qwen-Image, Flux.2)")

    def uses_cache_context(self) -> bool:
        """Whether the pipelines wrap each call in ``transformer.cache_context("cond"/"uncond")``."""
        return False


# ---- block stream I/O --------------------------------------------------------------------------
def call_argument(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """Argument ``name`` (positional ``index``) of a forward call, or None when not given."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def with_argument(args: tuple, kwargs: dict, name: str, index: int, value: Any) -> tuple[tuple, dict]:
    """Copies of ``(args, kwargs)`` with argument ``name`` (positional ``index``) set to ``value``."""
    kwargs = dict(kwargs)
    if name in kwargs or len(args) <= index:
        kwargs[name] = value
        return args, kwargs
    return tuple(value if i == index else a for i, a in enumerate(args)), kwargs


def split_streams(x: torch.Tensor, order: tuple[str, str], n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [B, N - n_text, C], text [B, n_text, C])`` views of a joined sequence ``x [B, N, C]`` in ``order``."""
    sl = stream_slices(order, x.shape[1] - n_text, n_text)
    return x[:, sl["image"]], x[:, sl["text"]]


def join_streams(order: tuple[str, str], image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The joined sequence ``[B, N_img + N_txt, C]`` of ``image`` and ``text`` in ``order``."""
    parts = {"image": image, "text": text}
    return torch.cat([parts[s] for s in order], dim=1)


class BlockIO:
    """How one block's residual streams enter and leave it, and what its ``attn`` returns: the protocol the
    block-level ablations (``SkipLayers`` of blocks / the image stream, ``ZeroText``, ``Patch``) and
    ``record_activations`` use, so a family with another block signature overrides :meth:`Family.block_io`.

    Streams are ``image [B, N_img, C]`` and ``text [B, N_txt, C]`` (``None`` where the block has none, e.g. SD3's
    last text output); ``n_text`` is the call's text length (``CallContext.n_text``). Methods never mutate their
    arguments: rebuilt inputs are copies of ``(args, kwargs)``.
    """

    def inputs(self, args: tuple, kwargs: dict, n_text: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(image, text)`` entering the block, from its forward's ``(args, kwargs)``."""
        raise NotImplementedError

    def with_inputs(self, args: tuple, kwargs: dict, n_text: int, *, image: torch.Tensor | None = None,
                    text: torch.Tensor | None = None) -> tuple[tuple, dict]:
        """Copies of ``(args, kwargs)`` with the image and/or text stream (those not None) replaced."""
        raise NotImplementedError

    def outputs(self, output: Any, n_text: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(image, text)`` leaving the block, from its output."""
        raise NotImplementedError

    def pack(self, output: Any, n_text: int, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        """The block's output, in its own form, made of ``image`` and ``text``."""
        raise NotImplementedError

    def attention(self, output: Any, n_text: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(image, text)`` of the block's ``attn`` output."""
        raise NotImplementedError

    def pack_attention(self, output: Any, n_text: int, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        """The ``attn`` output, in its own form, made of ``image`` and ``text``."""
        raise NotImplementedError


@dataclass(frozen=True)
class SeparateStreams(BlockIO):
    """Two-stream I/O (SD3, Flux.1, Qwen-Image blocks; Flux.1's single blocks, which join inside): the block
    takes ``hidden_states`` (image, argument 0) and ``encoder_hidden_states`` (text, argument 1) and returns
    ``(encoder_hidden_states, hidden_states)``. ``attn`` returns ``(image, text)``, or with ``joined_attention``
    one tensor, the joined sequence in ``order``."""

    order: tuple[str, str] = ("image", "text")
    joined_attention: bool = False

    def inputs(self, args, kwargs, n_text):
        return call_argument(args, kwargs, "hidden_states", 0), call_argument(args, kwargs, "encoder_hidden_states", 1)

    def with_inputs(self, args, kwargs, n_text, *, image=None, text=None):
        if image is not None:
            args, kwargs = with_argument(args, kwargs, "hidden_states", 0, image)
        if text is not None:
            args, kwargs = with_argument(args, kwargs, "encoder_hidden_states", 1, text)
        return args, kwargs

    def outputs(self, output, n_text):
        text, image = output
        return image, text

    def pack(self, output, n_text, image, text):
        return text, image

    def attention(self, output, n_text):
        if self.joined_attention:
            return split_streams(output, self.order, n_text)
        image, text = output
        return image, text

    def pack_attention(self, output, n_text, image, text):
        return join_streams(self.order, image, text) if self.joined_attention else (image, text)


@dataclass(frozen=True)
class JoinedStream(BlockIO):
    """Single-stream I/O (Flux.2's and Chroma's single blocks): the block takes the joined sequence in ``order``
    as ``hidden_states`` (argument 0) and returns one tensor, the joined sequence; so does its ``attn``."""

    order: tuple[str, str] = ("text", "image")

    def inputs(self, args, kwargs, n_text):
        return split_streams(call_argument(args, kwargs, "hidden_states", 0), self.order, n_text)

    def with_inputs(self, args, kwargs, n_text, *, image=None, text=None):
        old_image, old_text = self.inputs(args, kwargs, n_text)
        joined = join_streams(self.order, old_image if image is None else image, old_text if text is None else text)
        return with_argument(args, kwargs, "hidden_states", 0, joined)

    def outputs(self, output, n_text):
        return split_streams(output, self.order, n_text)

    def pack(self, output, n_text, image, text):
        return join_streams(self.order, image, text)

    def attention(self, output, n_text):
        return split_streams(output, self.order, n_text)

    def pack_attention(self, output, n_text, image, text):
        return join_streams(self.order, image, text)


class DoubleSingleBlocks:
    """Layers of a transformer with ``transformer_blocks`` (double-stream, ``"joint"``) then
    ``single_transformer_blocks`` (``"single"``), one ``attn`` each (Flux.1, Chroma, Flux.2)."""

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

    def block_kinds(self, transformer: torch.nn.Module) -> list[str]:
        return ["joint"] * len(transformer.transformer_blocks) + ["single"] * len(transformer.single_transformer_blocks)

    def sites(self, transformer: torch.nn.Module) -> list[Site]:
        d = len(transformer.transformer_blocks)
        return ([Site(i, "attn", "joint", f"transformer_blocks.{i}.attn") for i in range(d)]
                + [Site(d + j, "attn", "single", f"single_transformer_blocks.{j}.attn")
                   for j in range(len(transformer.single_transformer_blocks))])
