"""Which tokens carry each concept, checked before anything is computed, and their embeddings.

Every concept is encoded on its own (one batched call of the pipeline's own ``encode_prompt``, at
the T5 length given), exactly as a prompt would be; the concept keeps its *real word tokens* — no
BOS / EOS / padding, no punctuation-only pieces; SD3: its CLIP positions and its T5 positions, Flux:
its T5 positions — read from the family's own :class:`~mmdit_probe.TokenLayout` of the concept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..families import Family
from ..layout import normalise_word
from .path import ConceptPath


class ConceptError(ValueError):
    """Concepts that cannot be carried (empty list, a concept without a word token, duplicates, bad options)."""


@dataclass(frozen=True)
class ConceptTokens:
    """The concept tokens of one probe.

    ``positions[c]``: text-stream positions of concept ``c``'s tokens in its own encoding;
    ``pieces[c]``: those tokens as the tokenizers wrote them; ``hidden [T, C_joint]``: the encoder
    states of all concept tokens (concept 0's first), before the transformer's ``context_embedder``;
    ``owner [T]``: the concept index of each token.
    """

    concepts: tuple[str, ...]
    positions: tuple[tuple[int, ...], ...]
    pieces: tuple[tuple[str, ...], ...]
    max_sequence_length: int
    hidden: torch.Tensor | None = None

    @property
    def owner(self) -> torch.Tensor:
        return torch.tensor([c for c, pos in enumerate(self.positions) for _ in pos], dtype=torch.long)

    @property
    def n_tokens(self) -> int:
        return sum(len(p) for p in self.positions)

    def weights(self, device: torch.device | None = None) -> torch.Tensor:
        """``[n_concepts, T]``: the mean over each concept's own tokens, as a matrix."""
        w = torch.zeros(len(self.concepts), self.n_tokens, device=device)
        w[self.owner.to(w.device), torch.arange(self.n_tokens, device=w.device)] = 1.0
        return w / w.sum(1, keepdim=True)


def check_concepts(concepts: Any) -> tuple[str, ...]:
    """``concepts`` as a tuple of stripped strings, or a :class:`ConceptError` naming the fix."""
    if isinstance(concepts, str):
        raise ConceptError(f"concepts must be a list of strings, e.g. [{concepts!r}], not one string")
    try:
        items = list(concepts)
    except TypeError:
        raise ConceptError(f"concepts must be a list of strings, got {type(concepts).__name__}") from None
    if not items:
        raise ConceptError("concepts is empty: pass at least one concept word, e.g. concepts=['dog', 'sky']")
    bad = [c for c in items if not isinstance(c, str)]
    if bad:
        raise ConceptError(f"concepts must be strings; got {bad!r}")
    out = tuple(c.strip() for c in items)
    seen: dict[str, str] = {}
    for c in out:
        key = normalise_word(c)
        if key in seen and key:
            raise ConceptError(f"concepts {seen[key]!r} and {c!r} are the same concept; pass each once")
        seen[key] = c
    return out


def plan_tokens(pipe: Any, family: Family, path: ConceptPath, concepts: Sequence[str],
                max_sequence_length: int | None) -> ConceptTokens:
    """The tokens each concept is carried as (tokenizers only, nothing computed)."""
    length = path.default_max_sequence_length if max_sequence_length is None else int(max_sequence_length)
    if length < 1:
        raise ConceptError(f"max_sequence_length must be a positive T5 length, got {max_sequence_length!r}")
    positions, pieces = [], []
    for c in concepts:
        lay = family.prompt_layout(pipe, c, None, None, length)
        toks = [t for t in lay.text if t.kind == "real" and t.word is not None]
        if not toks:
            raise ConceptError(
                f"concept {c!r} tokenizes to no word token (only special, padding or punctuation pieces); "
                f"use a word such as 'dog' or 'blue sky'")
        positions.append(tuple(t.position for t in toks))
        pieces.append(tuple(f"{t.encoder}:{t.token}" for t in toks))
    return ConceptTokens(tuple(concepts), tuple(positions), tuple(pieces), length)


@torch.no_grad()
def embed_tokens(pipe: Any, path: ConceptPath, plan: ConceptTokens, clip_skip: int | None) -> ConceptTokens:
    """``plan`` with ``hidden [T, C_joint]``: the concepts' own text streams at their tokens' positions."""
    embeds = path.embed(pipe, list(plan.concepts), plan.max_sequence_length, clip_skip)  # [n, S, C_joint]
    for c, pos in zip(plan.concepts, plan.positions):
        if max(pos) >= embeds.shape[1]:
            raise ConceptError(f"concept {c!r}: token positions {pos} beyond the text stream ({embeds.shape[1]})")
    hidden = torch.cat([embeds[i, list(pos)] for i, pos in enumerate(plan.positions)], 0)
    return ConceptTokens(plan.concepts, plan.positions, plan.pieces, plan.max_sequence_length, hidden)
