"""TokenLayout: what every position of the MMDiT joint sequence is.

The joint sequence of an SD3 block is ``[image tokens ; text tokens]``, of a Flux block ``[text ;
image]`` (each family's adapter says; :func:`mmdit_probe.joint_order`). Text tokens are ``77`` CLIP positions
(CLIP-L and CLIP-G share positions: their embeddings are joined on channels) followed by
``max_sequence_length`` T5 positions. Each text position has an encoder (``clip``/``t5``), a kind
(``real``/``special``/``padding``) and, for real tokens, the prompt word it belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch

ENCODERS = ("clip", "t5")
KINDS = ("real", "special", "padding")
#: Key groups of the fine (``group_mass``) statistic, in a fixed order: image first, then text groups.
TEXT_GROUPS = tuple(f"{e}_{k}" for e in ENCODERS for k in KINDS)
KEY_GROUPS = ("image",) + TEXT_GROUPS
QUERY_GROUPS = ("image", "text")
CLIP_LENGTH = 77


def normalise_word(word: str) -> str:
    """Lower-case a word and strip surrounding punctuation, for matching prompt words."""
    return re.sub(r"^[^\w]+|[^\w]+$", "", word.lower())


@dataclass(frozen=True)
class TextToken:
    """One position of the text sequence.

    ``position`` counts within the text sequence (0 … n_text-1); ``word_index`` numbers the
    prompt words of this encoder in order (None for special/padding/punctuation tokens).
    """

    position: int
    encoder: str
    kind: str
    token: str
    token_id: int
    word: str | None = None
    word_index: int | None = None

    @property
    def group(self) -> str:
        return f"{self.encoder}_{self.kind}"


@dataclass(frozen=True)
class TokenLayout:
    """Layout of one row of the joint sequence: image grid ``(h, w)`` and text tokens.

    ``image_grid`` is the patch grid (latent size / patch size), row-major as ``PatchEmbed``
    flattens it.
    """

    image_grid: tuple[int, int]
    text: tuple[TextToken, ...]
    order: tuple[str, str] = ("image", "text")
    prompt: str | None = None
    has_t5: bool = True

    # ---- sizes and slices -------------------------------------------------------------
    @property
    def n_image(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def n_text(self) -> int:
        return len(self.text)

    @property
    def n_tokens(self) -> int:
        return self.n_image + self.n_text

    def stream_slice(self, stream: str) -> slice:
        """Slice of ``stream`` (``"image"``/``"text"``) in the joint sequence."""
        return stream_slices(self.order, self.n_image, self.n_text)[stream]

    @property
    def image_slice(self) -> slice:
        return self.stream_slice("image")

    @property
    def text_slice(self) -> slice:
        return self.stream_slice("text")

    # ---- groups and words -------------------------------------------------------------
    def group_positions(self, group: str) -> list[int]:
        """Joint-sequence positions of a key group (``"image"`` or one of ``TEXT_GROUPS``)."""
        if group == "image":
            s = self.image_slice
            return list(range(s.start, s.stop))
        if group not in TEXT_GROUPS:
            raise KeyError(f"unknown token group {group!r}; valid groups: {', '.join(KEY_GROUPS)}")
        return [self.text_slice.start + t.position for t in self.text if t.group == group]

    @cached_property
    def words(self) -> tuple[str, ...]:
        """Distinct prompt words in order of first appearance (CLIP first, then T5 additions)."""
        seen: dict[str, None] = {}
        for t in self.text:
            if t.word:
                seen.setdefault(t.word, None)
        return tuple(seen)

    def word_positions(self, word: str, encoders: Sequence[str] = ENCODERS) -> list[int]:
        """Joint positions of every token of ``word`` (all occurrences, both encoders).

        Raises ``KeyError`` naming the prompt's words when the word is not in the prompt.
        """
        key = normalise_word(word)
        pos = [self.text_slice.start + t.position for t in self.text if t.word == key and t.encoder in encoders]
        if not pos:
            raise KeyError(
                f"word {word!r} is not in the prompt {self.prompt!r}; words present: {', '.join(self.words) or '(none)'}"
            )
        return pos

    def tokens(self, encoder: str | None = None, kind: str | None = None) -> list[TextToken]:
        return [t for t in self.text if (encoder is None or t.encoder == encoder) and (kind is None or t.kind == kind)]

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_ids(
        cls,
        image_grid: tuple[int, int],
        clip_ids: Sequence[int] | None,
        clip_tokenizer: Any,
        t5_ids: Sequence[int] | None = None,
        t5_tokenizer: Any = None,
        *,
        t5_length: int | None = None,
        order: tuple[str, str] = ("image", "text"),
        prompt: str | None = None,
    ) -> "TokenLayout":
        """Build from the token ids the encoders saw (``clip_ids``: 77 ids of CLIP-L).

        ``t5_ids=None`` means T5 was omitted: its ``t5_length`` positions are zero embeddings,
        labelled ``padding``.
        """
        tokens: list[TextToken] = []
        clip_ids = list(clip_ids) if clip_ids is not None else []
        if clip_ids:
            tokens += _clip_tokens(clip_ids, clip_tokenizer, offset=0)
        else:
            tokens += [TextToken(i, "clip", "padding", "", -1) for i in range(CLIP_LENGTH)]
        if t5_ids is not None:
            tokens += _t5_tokens(list(t5_ids), t5_tokenizer, offset=len(tokens))
        else:
            n = int(t5_length or 0)
            tokens += [TextToken(len(tokens) + i, "t5", "padding", "", -1) for i in range(n)]
        return cls(tuple(int(x) for x in image_grid), tuple(tokens), tuple(order), prompt, t5_ids is not None)

    @classmethod
    def from_t5_ids(cls, image_grid: tuple[int, int], t5_ids: Sequence[int], t5_tokenizer: Any, *,
                    order: tuple[str, str] = ("text", "image"), prompt: str | None = None) -> "TokenLayout":
        """Text = T5 tokens only (Flux: CLIP is pooled only and has no positions in the sequence)."""
        return cls(tuple(int(x) for x in image_grid), tuple(_t5_tokens(list(t5_ids), t5_tokenizer, offset=0)),
                   tuple(order), prompt, True)

    @classmethod
    def from_prompt(
        cls,
        pipe: Any,
        prompt: str,
        *,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
    ) -> "TokenLayout":
        """SD3 layout for ``pipe(prompt, height=, width=, max_sequence_length=)`` using its tokenizers.

        For any supported family (Flux too) use :func:`mmdit_probe.prompt_layout`.
        """
        if not hasattr(pipe, "text_encoder_3"):
            raise TypeError(f"TokenLayout.from_prompt builds SD3 layouts (77 CLIP + T5 positions); for a "
                            f"{type(pipe).__name__} use mmdit_probe.prompt_layout(pipe, prompt, ...)")
        tr = pipe.transformer
        vae_scale = getattr(pipe, "vae_scale_factor", 8)
        default = getattr(pipe, "default_sample_size", tr.config.sample_size) * vae_scale
        height, width = height or default, width or default
        p = tr.config.patch_size
        grid = (height // vae_scale // p, width // vae_scale // p)
        clip = pipe.tokenizer(prompt, padding="max_length", max_length=CLIP_LENGTH, truncation=True).input_ids
        t5_ids = None
        if getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None:
            t5_ids = pipe.tokenizer_3(
                prompt, padding="max_length", max_length=max_sequence_length, truncation=True, add_special_tokens=True
            ).input_ids
        return cls.from_ids(
            grid, clip, pipe.tokenizer, t5_ids, getattr(pipe, "tokenizer_3", None),
            t5_length=max_sequence_length, order=("image", "text"), prompt=prompt,
        )

    def describe(self) -> str:
        """One line per text group with counts, and the image grid."""
        counts = {g: 0 for g in TEXT_GROUPS}
        for t in self.text:
            counts[t.group] += 1
        parts = ", ".join(f"{g}={n}" for g, n in counts.items() if n)
        return f"image {self.image_grid[0]}x{self.image_grid[1]}={self.n_image}, text {self.n_text} ({parts})"


def stream_slices(order: Sequence[str], n_image: int, n_text: int) -> dict[str, slice]:
    """Slices of each stream in the joint sequence for a given order."""
    sizes = {"image": n_image, "text": n_text}
    out, start = {}, 0
    for s in order:
        out[s] = slice(start, start + sizes[s])
        start += sizes[s]
    return out


def _special_ids(tokenizer: Any) -> tuple[set[int], int | None]:
    specials = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    return specials, tokenizer.eos_token_id


def _clip_tokens(ids: list[int], tokenizer: Any, offset: int) -> list[TextToken]:
    """CLIP BPE: ``</w>`` ends a word; everything after the first EOS is padding."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    specials, eos = _special_ids(tokenizer)
    out: list[TextToken] = []
    ended, current, word_index = False, [], 0
    for i, (tid, piece) in enumerate(zip(ids, pieces)):
        if ended:
            out.append(TextToken(offset + i, "clip", "padding", piece, tid))
            continue
        if tid in specials:
            out.append(TextToken(offset + i, "clip", "special", piece, tid))
            ended = tid == eos and i > 0
            continue
        current.append(len(out))
        out.append(TextToken(offset + i, "clip", "real", piece, tid))
        if piece.endswith("</w>"):
            word_index = _close_word(out, current, lambda p: p.replace("</w>", ""), word_index)
            current = []
    if current:  # truncated mid-word
        _close_word(out, current, lambda p: p.replace("</w>", ""), word_index)
    return out


def _t5_tokens(ids: list[int], tokenizer: Any, offset: int) -> list[TextToken]:
    """SentencePiece: ``▁`` starts a word; EOS is special, pad tokens are padding."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    pad = tokenizer.pad_token_id
    specials, _ = _special_ids(tokenizer)
    out: list[TextToken] = []
    current: list[int] = []
    word_index = 0
    for i, (tid, piece) in enumerate(zip(ids, pieces)):
        if tid == pad:
            kind = "padding"
        elif tid in specials:
            kind = "special"
        else:
            kind = "real"
        if kind != "real" or piece.startswith("▁"):
            if current:
                word_index = _close_word(out, current, lambda p: p.replace("▁", ""), word_index)
                current = []
        out.append(TextToken(offset + i, "t5", kind, piece, tid))
        if kind == "real":
            current.append(len(out) - 1)
    if current:
        _close_word(out, current, lambda p: p.replace("▁", ""), word_index)
    return out


def _close_word(out: list[TextToken], members: list[int], strip, word_index: int) -> int:
    """Give the tokens at ``members`` their word; returns the next word index."""
    word = normalise_word("".join(strip(out[m].token) for m in members))
    if not word:
        return word_index
    for m in members:
        t = out[m]
        out[m] = TextToken(t.position, t.encoder, t.kind, t.token, t.token_id, word, word_index)
    return word_index + 1


def group_index_tensor(layout: TokenLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n_tokens]`` long tensor: index into ``KEY_GROUPS`` of every joint position."""
    idx = torch.zeros(layout.n_tokens, dtype=torch.long)
    for g, name in enumerate(KEY_GROUPS):
        pos = layout.group_positions(name)
        if pos:
            idx[pos] = g
    return idx.to(device)
