"""``ConceptPath``: the public protocol one model family implements to carry concept tokens.

A concept path runs a block's own text-stream modules on the concept stream ``x [B, T, C]``
(``T`` concept tokens), on the side of the model's forward: :meth:`ConceptPath.enter` gives the
concept queries, keys and values ``[B, H, T, D]`` exactly as the block's attention would build them
for text tokens, :meth:`ConceptPath.leave` applies the rest of the block (output projection, gates,
MLP) to the concept attention output ``o [B, T, H·D]``. Built-ins: :mod:`.sd3`, :mod:`.flux`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class BlockInputs:
    """What a block was called with that the concept path needs: ``temb [B, C]`` and, where the family
    uses RoPE, ``rotary`` (``(cos, sin)``, each ``[S, D]`` over the block's joint sequence, text first)."""

    temb: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class ConceptQKV:
    """Concept queries, keys, values ``[B, H, T, D]`` and what :meth:`ConceptPath.leave` needs (gates, MLP input)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    state: tuple[Any, ...] = ()


class ConceptPath(Protocol):
    """Per-family concept code (one stateless instance per family, keyed by ``Family.name``)."""

    #: the T5 length the family's pipelines use when ``max_sequence_length`` is not given
    default_max_sequence_length: int

    def embed(self, pipe: Any, concepts: list[str], max_sequence_length: int, clip_skip: int | None) -> torch.Tensor:
        """The text stream the pipeline's own ``encode_prompt`` builds for each concept: ``[n, S, C_joint]``."""
        ...

    def enter(self, block: torch.nn.Module, kind: str, x: torch.Tensor, inputs: BlockInputs) -> ConceptQKV:
        """The block's text-side attention inputs for the concept stream ``x [B, T, C]``."""
        ...

    def leave(self, block: torch.nn.Module, kind: str, x: torch.Tensor, o: torch.Tensor,
              qkv: ConceptQKV) -> torch.Tensor | None:
        """The concept stream after the block (None where the block ends the text stream)."""
        ...


def block_argument(block: torch.nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """Argument ``name`` of a block's forward call, positional or keyword (None when not passed)."""
    bound = inspect.signature(block.forward).bind_partial(*args, **kwargs)
    return bound.arguments.get(name)


def execution_device(pipe: Any) -> torch.device:
    """Where the pipeline runs its text encoders (offloaded pipelines: their execution device)."""
    try:
        return pipe._execution_device
    except AttributeError:
        return pipe.transformer.device
