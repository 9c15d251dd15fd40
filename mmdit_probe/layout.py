"""TokenLayout: what every position of the MMDiT joint sequence is.

The joint sequence of an SD3 block is ``[image tokens ; text tokens]``, of a Flux block ``[text ;
image]`` (each family's adapter says; :func:`mmdit_probe.joint_order`). Text tokens are ``77`` CLIP positions
(CLIP-L and CLIP-G share positions: their embeddings are joined on channels) followed by
``max_sequence_length`` T5 positions. Each text position has an encoder (``clip``/``t5``), a kind
(``real``/``special``/``padding``) and, for real tokens, the prompt word it belongs to.

Words come from one segmentation of the prompt text (:mod:`.text_tokens`: pieces, words, alignment), shared by both encoders:
each encoder's pieces are decoded (CLIP's byte-level symbols as UTF-8, T5's ``▁`` as spaces; ``<unk>``
is never text) and aligned to the prompt's characters, so ``left-hand``, ``don't``, ``3d`` and
``café`` are one word with the same label and ``word_index`` on CLIP and on T5. A word truncation cut
off raises :class:`WordTruncatedError` from :meth:`TokenLayout.word_positions`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence


from .text_tokens import (TextToken, WordTruncatedError, clip_raw, joined, label_pieces, normalise_word,
                          own_text, split_words, t5_raw)

ENCODERS = ("clip", "t5")
KINDS = ("real", "special", "padding")
#: Key groups of the fine (``group_mass``) statistic, in a fixed order: image first, then text groups.
TEXT_GROUPS = tuple(f"{e}_{k}" for e in ENCODERS for k in KINDS)
KEY_GROUPS = ("image",) + TEXT_GROUPS
QUERY_GROUPS = ("image", "text")
CLIP_LENGTH = 77
_NAMES = {"clip": "CLIP", "t5": "T5"}



@dataclass(frozen=True)
class TokenLayout:
    """Layout of one row of the joint sequence: image grid ``(h, w)`` and text tokens.

    ``image_grid`` is the patch grid (latent size / patch size), row-major as ``PatchEmbed``
    flattens it. ``context_grid`` (Flux Kontext) is the grid of the context image's tokens, which
    travel at the end of the image stream: the joint sequence is then ``[text, image, context]``.
    """

    image_grid: tuple[int, int]
    text: tuple[TextToken, ...]
    order: tuple[str, str] = ("image", "text")
    prompt: str | None = None
    has_t5: bool = True
    context_grid: tuple[int, int] | None = None

    # ---- sizes and slices -------------------------------------------------------------
    @property
    def n_image(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def n_text(self) -> int:
        return len(self.text)

    @property
    def n_context(self) -> int:
        """Context-image tokens (Flux Kontext); 0 without a context image."""
        return self.context_grid[0] * self.context_grid[1] if self.context_grid else 0

    @property
    def n_tokens(self) -> int:
        return self.n_image + self.n_text + self.n_context

    def stream_slice(self, stream: str) -> slice:
        """Slice of ``stream`` (``"image"``/``"text"``/``"context"``) in the joint sequence."""
        return stream_slices(self.order, self.n_image, self.n_text, self.n_context)[stream]

    @property
    def context_slice(self) -> slice:
        return self.stream_slice("context")

    def with_context(self, context_grid: tuple[int, int] | None) -> "TokenLayout":
        """This layout with a context image of ``context_grid`` tokens (None: without one)."""
        grid = None if context_grid is None else tuple(int(x) for x in context_grid)
        return dataclasses.replace(self, context_grid=grid)

    @property
    def image_slice(self) -> slice:
        return self.stream_slice("image")

    @property
    def text_slice(self) -> slice:
        return self.stream_slice("text")

    # ---- groups and words -------------------------------------------------------------
    def group_positions(self, group: str) -> list[int]:
        """Joint-sequence positions of a key group (``"image"``, ``"context"`` or one of ``TEXT_GROUPS``)."""
        if group in ("image", "context"):
            s = self.stream_slice(group)
            return list(range(s.start, s.stop))
        if group not in TEXT_GROUPS:
            raise KeyError(f"unknown token group {group!r}; valid groups: {', '.join(KEY_GROUPS)}")
        return [self.text_slice.start + t.position for t in self.text if t.group == group]

    @cached_property
    def words(self) -> tuple[str, ...]:
        """Distinct prompt words the tokens carry, in order of first appearance (CLIP first, then T5
        additions); a word truncation cut off from every encoder is not here (see :attr:`prompt_words`)."""
        seen: dict[str, None] = {}
        for t in self.text:
            if t.word:
                seen.setdefault(t.word, None)
        return tuple(seen)

    @cached_property
    def prompt_words(self) -> tuple[str, ...]:
        """Every word of the prompt text in order, repeats included, kept by truncation or not
        (:func:`split_words`; ``()`` when the layout has no prompt). ``word_index`` indexes it."""
        return tuple(w for *_, w in split_words(self.prompt)) if self.prompt else ()

    def word_positions(self, word: str, encoders: Sequence[str] = ENCODERS) -> list[int]:
        """Joint positions of every token of ``word`` (all occurrences, both encoders).

        ``word`` is matched after :func:`normalise_word` (``"Left-hand"`` finds ``left-hand``). Raises
        :class:`WordTruncatedError` (a ``KeyError``) when the word is in the prompt but truncation cut it
        off from the encoders asked for (naming the token each one stopped at), and ``KeyError`` naming the
        prompt's words when the word is not in the prompt.
        """
        key = normalise_word(word)
        pos = [self.text_slice.start + t.position for t in self.text if t.word == key and t.encoder in encoders]
        if pos:
            return pos
        kept_words = dict.fromkeys(t.word for t in self.text if t.word and t.encoder in encoders)
        present = f"words present: {', '.join(kept_words) or '(none)'}"
        cut = {e: self._cut_at(e) for e in encoders}
        if key and key in self.prompt_words:
            first = self.prompt_words.index(key)
            why: dict[str, str] = {}
            for e in encoders:
                kept = [t.word_index for t in self.text if t.encoder == e and t.word_index is not None]
                if not any(t.encoder == e and t.kind == "real" for t in self.text):
                    why[e] = f"{_NAMES.get(e, e)} has no tokens (not encoded)"
                elif cut[e] is not None and (not kept or max(kept) < first):
                    why[e] = self._cut_phrase(e, cut[e])
            truncated = {e: cut[e] for e in why if cut[e] is not None}
            if len(why) == len(encoders) and truncated:
                raise WordTruncatedError(f"word {word!r} is in the prompt but was cut off by truncation: "
                                         f"{'; '.join(why.values())}; {present}", key, truncated)
            if len(why) == len(encoders):
                raise KeyError(f"word {word!r} is in the prompt but {'; '.join(why.values())}; {present}")
        hint = "".join(f" ({self._cut_phrase(e, n)})" for e, n in cut.items() if n is not None and not self.prompt)
        raise KeyError(f"word {word!r} is not in the prompt {self.prompt!r}{hint}; {present}")

    def _cut_at(self, encoder: str) -> int | None:
        """Where truncation stopped ``encoder``'s text (the position, within the encoder, of its final
        token); None when it was not truncated (it has padding, or no real tokens)."""
        toks = [t for t in self.text if t.encoder == encoder]
        if not toks or any(t.kind == "padding" for t in toks) or not any(t.kind == "real" for t in toks):
            return None
        return len(toks) - 1

    def _cut_phrase(self, encoder: str, at: int) -> str:
        n = sum(t.encoder == encoder for t in self.text)
        limit = f"CLIP's {n}-token limit" if encoder == "clip" else f"max_sequence_length={n}"
        return f"{_NAMES.get(encoder, encoder)} cut it off at token {at} ({limit})"

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
        labelled ``padding``. Words are the words of ``prompt`` (:func:`split_words`), each encoder's
        tokens mapped onto them by aligning the decoded pieces to the prompt's characters; give the exact
        text the tokenizers saw. Without ``prompt``, an encoder's own decoding stands in for it: T5's when
        it was not truncated (its ``▁`` keep the spaces, but ``<unk>`` characters are lost), else CLIP's
        (which keeps no spaces at punctuation or digits: ``left-hand`` becomes ``left``, ``hand``).
        """
        clip_ids = list(clip_ids) if clip_ids is not None else []
        encoded = []  # (tokens, real indices, pieces) per encoder
        if clip_ids:
            encoded.append(clip_raw(clip_ids, clip_tokenizer, offset=0))
        else:
            encoded.append(([TextToken(i, "clip", "padding", "", -1) for i in range(CLIP_LENGTH)], [], []))
        n_clip = len(encoded[0][0])
        if t5_ids is not None:
            encoded.append(t5_raw(list(t5_ids), t5_tokenizer, offset=n_clip))
        else:
            n = int(t5_length or 0)
            encoded.append(([TextToken(n_clip + i, "t5", "padding", "", -1) for i in range(n)], [], []))
        text = prompt if prompt is not None else own_text(encoded)
        tokens = [t for toks, real, pieces in encoded for t in label_pieces(toks, real, pieces, text)]
        return cls(tuple(int(x) for x in image_grid), tuple(tokens), tuple(order), prompt, t5_ids is not None)

    @classmethod
    def from_t5_ids(cls, image_grid: tuple[int, int], t5_ids: Sequence[int], t5_tokenizer: Any, *,
                    order: tuple[str, str] = ("text", "image"), prompt: str | None = None) -> "TokenLayout":
        """Text = T5 tokens only (Flux: CLIP is pooled only and has no positions in the sequence)."""
        toks, real, pieces = t5_raw(list(t5_ids), t5_tokenizer, offset=0)
        text = prompt if prompt is not None else joined(pieces)
        return cls(tuple(int(x) for x in image_grid), tuple(label_pieces(toks, real, pieces, text)), tuple(order), prompt,
                   True)

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
        context = f", context {self.context_grid[0]}x{self.context_grid[1]}={self.n_context}" if self.n_context else ""
        return f"image {self.image_grid[0]}x{self.image_grid[1]}={self.n_image}, text {self.n_text} ({parts}){context}"


def stream_slices(order: Sequence[str], n_image: int, n_text: int, n_context: int = 0) -> dict[str, slice]:
    """Slices of each stream in the joint sequence for a given order; ``"context"`` (Flux Kontext's
    context-image tokens, empty when ``n_context`` is 0) follows the image tokens in the image stream."""
    sizes = {"image": n_image, "text": n_text}
    out, start = {}, 0
    for s in order:
        out[s] = slice(start, start + sizes[s])
        start += sizes[s]
        if s == "image":
            out["context"] = slice(start, start + n_context)
            start += n_context
    return out
