"""TokenLayout: what every position of the MMDiT joint sequence is.

The joint sequence of an SD3 block is ``[image tokens ; text tokens]``, of a Flux block ``[text ;
image]`` (each family's adapter says; :func:`mmdit_probe.joint_order`). Text tokens are ``77`` CLIP positions
(CLIP-L and CLIP-G share positions: their embeddings are joined on channels) followed by
``max_sequence_length`` T5 positions. Each text position has an encoder (``clip``/``t5``), a kind
(``real``/``special``/``padding``) and, for real tokens, the prompt word it belongs to.

Words come from one segmentation of the prompt text (:func:`split_words`), shared by both encoders:
each encoder's pieces are decoded (CLIP's byte-level symbols as UTF-8, T5's ``▁`` as spaces; ``<unk>``
is never text) and aligned to the prompt's characters, so ``left-hand``, ``don't``, ``3d`` and
``café`` are one word with the same label and ``word_index`` on CLIP and on T5. A word truncation cut
off raises :class:`WordTruncatedError` from :meth:`TokenLayout.word_positions`.
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import functools
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import regex

from .tokenizers import _bytes_to_unicode

ENCODERS = ("clip", "t5")
KINDS = ("real", "special", "padding")
#: Key groups of the fine (``group_mass``) statistic, in a fixed order: image first, then text groups.
TEXT_GROUPS = tuple(f"{e}_{k}" for e in ENCODERS for k in KINDS)
KEY_GROUPS = ("image",) + TEXT_GROUPS
QUERY_GROUPS = ("image", "text")
CLIP_LENGTH = 77
_NAMES = {"clip": "CLIP", "t5": "T5"}

#: A word of a prompt: letters, marks, digits (and ``_``), with single ``-``, ``'``/``’`` or ``.`` inside
#: (``left-hand``, ``don't``, ``joe's``, ``3d``, ``3.5``, ``café``). Anything else separates words.
WORD_PATTERN = r"\w+(?:[-'’.]\w+)*"
_WORD = regex.compile(WORD_PATTERN)
_EDGE = regex.compile(r"^\W+|\W+$")
_CHUNK = regex.compile(r"\S+")
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'"})
_PLAIN_QUOTES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "“": '"', "”": '"', "„": '"'})
_SLACK = 32  # most characters skipped at once where the pieces and the prompt differ (see _match_chars)
_CONFIRM = 6  # characters that must agree after such a skip
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def normalise_word(word: str) -> str:
    """A word as the layout labels it: NFC, lower case, ``’`` as ``'``, surrounding punctuation stripped.

    ``normalise_word("Left-hand,") == "left-hand"``; ``normalise_word("Joe’s") == "joe's"``.
    """
    return _EDGE.sub("", unicodedata.normalize("NFC", str(word)).lower().translate(_APOSTROPHES))


def split_words(text: str) -> list[tuple[int, int, str]]:
    """The words of a prompt, ``(start, end, word)`` with offsets into ``NFC(text)``: the one segmentation
    every encoder's tokens are mapped onto (:data:`WORD_PATTERN`, labels by :func:`normalise_word`).

    ``[w for *_, w in split_words("A café, left-hand of Joe's 3D cube!")]`` is
    ``['a', 'café', 'left-hand', 'of', "joe's", '3d', 'cube']``.
    """
    text = unicodedata.normalize("NFC", text)
    return [(m.start(), m.end(), normalise_word(m.group())) for m in _WORD.finditer(text)]


class WordTruncatedError(KeyError):
    """The word is in the prompt, but the encoders' truncation cut it off (CLIP keeps 77 tokens, T5
    ``max_sequence_length``). ``cut`` maps each encoder asked for to the token its text stops at."""

    def __init__(self, message: str, word: str = "", cut: dict[str, int] | None = None):
        super().__init__(message)
        self.word, self.cut = word, dict(cut or {})


@dataclass(frozen=True)
class TextToken:
    """One position of the text sequence.

    ``position`` counts within the text sequence (0 … n_text-1); ``token`` is the tokenizer's own piece
    (CLIP byte-level symbols with ``</w>``, T5 pieces with ``▁``; :attr:`text` decodes it). ``word`` is
    the prompt word the token belongs to, as written in the prompt (:func:`normalise_word`), the same on
    every encoder; ``word_index`` is that word's index among the prompt's words (:func:`split_words`),
    so both encoders' tokens of one word share it. Both are None for special/padding/punctuation tokens.
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

    @property
    def text(self) -> str:
        """The piece decoded: CLIP's byte symbols as UTF-8 (``cafÃ©</w>`` → ``café``; a piece holding only
        part of a character shows ``\ufffd``), T5's ``▁`` as a space, ``<unk>`` as ``""``; special and
        padding tokens as their piece."""
        if self.kind != "real":
            return self.token
        if self.encoder == "clip":
            return _clip_bytes(self.token.removesuffix("</w>"), _byte_decoder()).decode("utf-8", "replace")
        byte = _BYTE_PIECE.fullmatch(self.token)
        if byte:
            return bytes([int(byte[1], 16)]).decode("utf-8", "replace")
        return "" if self.token == "<unk>" else self.token.replace("▁", " ")


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
            encoded.append(_clip_raw(clip_ids, clip_tokenizer, offset=0))
        else:
            encoded.append(([TextToken(i, "clip", "padding", "", -1) for i in range(CLIP_LENGTH)], [], []))
        n_clip = len(encoded[0][0])
        if t5_ids is not None:
            encoded.append(_t5_raw(list(t5_ids), t5_tokenizer, offset=n_clip))
        else:
            n = int(t5_length or 0)
            encoded.append(([TextToken(n_clip + i, "t5", "padding", "", -1) for i in range(n)], [], []))
        text = prompt if prompt is not None else _own_text(encoded)
        tokens = [t for toks, real, pieces in encoded for t in _label(toks, real, pieces, text)]
        return cls(tuple(int(x) for x in image_grid), tuple(tokens), tuple(order), prompt, t5_ids is not None)

    @classmethod
    def from_t5_ids(cls, image_grid: tuple[int, int], t5_ids: Sequence[int], t5_tokenizer: Any, *,
                    order: tuple[str, str] = ("text", "image"), prompt: str | None = None) -> "TokenLayout":
        """Text = T5 tokens only (Flux: CLIP is pooled only and has no positions in the sequence)."""
        toks, real, pieces = _t5_raw(list(t5_ids), t5_tokenizer, offset=0)
        text = prompt if prompt is not None else _joined(pieces)
        return cls(tuple(int(x) for x in image_grid), tuple(_label(toks, real, pieces, text)), tuple(order), prompt,
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


def _special_ids(tokenizer: Any) -> tuple[set[int], int | None]:
    specials = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    return specials, tokenizer.eos_token_id


@dataclass
class _Piece:
    """What one real token contributes to the text: its decoded characters (None: unknown, e.g. T5's
    ``<unk>``) and whether it begins a new chunk (T5: ``▁``; CLIP: the previous piece ended in ``</w>``)."""

    text: str | None
    starts: bool


def _clip_raw(ids: list[int], tokenizer: Any, offset: int) -> tuple[list[TextToken], list[int], list[_Piece]]:
    """CLIP kinds (everything after the first EOS is padding) and the decoded text of every real piece."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    specials, eos = _special_ids(tokenizer)
    out: list[TextToken] = []
    real: list[int] = []
    ended = False
    for i, (tid, piece) in enumerate(zip(ids, pieces)):
        if ended:
            out.append(TextToken(offset + i, "clip", "padding", piece, tid))
        elif tid in specials:
            out.append(TextToken(offset + i, "clip", "special", piece, tid))
            ended = tid == eos and i > 0
        else:
            real.append(len(out))
            out.append(TextToken(offset + i, "clip", "real", piece, tid))
    return out, real, _clip_pieces([out[r].token for r in real], getattr(tokenizer, "byte_decoder", None))


def _clip_pieces(pieces: Sequence[str], byte_decoder: dict[str, int] | None = None) -> list[_Piece]:
    """Byte-level BPE pieces back to text: each symbol is one byte (the tokenizer's byte decoder, else
    GPT-2/CLIP's standard map); bytes are decoded as one UTF-8 stream, so a character split over
    several pieces belongs to the piece that completes it."""
    b2u = byte_decoder or _byte_decoder()
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, starts = [], True
    for piece in pieces:
        end = piece.endswith("</w>")
        out.append(_Piece(dec.decode(_clip_bytes(piece[: -len("</w>")] if end else piece, b2u)), starts))
        starts = end
    return out


def _clip_bytes(symbols: str, b2u: dict[str, int]) -> bytes:
    return b"".join(bytes([b2u[c]]) if c in b2u else c.encode("utf-8") for c in symbols)


def _t5_raw(ids: list[int], tokenizer: Any, offset: int) -> tuple[list[TextToken], list[int], list[_Piece]]:
    """SentencePiece kinds (EOS special, pad padding) and the decoded text of every real piece."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    pad = tokenizer.pad_token_id
    unk = getattr(tokenizer, "unk_token_id", None)
    specials, _ = _special_ids(tokenizer)
    out: list[TextToken] = []
    real: list[int] = []
    texts: list[_Piece] = []
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i, (tid, piece) in enumerate(zip(ids, pieces)):
        kind = "padding" if tid == pad else "special" if tid in specials else "real"
        out.append(TextToken(offset + i, "t5", kind, piece, tid))
        if kind != "real":
            continue
        real.append(len(out) - 1)
        byte = _BYTE_PIECE.fullmatch(piece)
        if unk is not None and tid == unk:
            text = None  # <unk> is never text: the characters it stands for come from the prompt
        elif byte:
            text = dec.decode(bytes([int(byte[1], 16)]))
        else:
            dec.reset()
            text = piece.replace("▁", " ")
        texts.append(_Piece(text, piece.startswith("▁")))
    return out, real, texts


def _clip_tokens(ids: list[int], tokenizer: Any, offset: int, text: str | None = None) -> list[TextToken]:
    """CLIP tokens labelled with the words of ``text`` (the prompt); without it, of CLIP's own decoding."""
    toks, real, pieces = _clip_raw(ids, tokenizer, offset)
    return _label(toks, real, pieces, _joined(pieces) if text is None else text)


def _t5_tokens(ids: list[int], tokenizer: Any, offset: int, text: str | None = None) -> list[TextToken]:
    """T5 tokens labelled with the words of ``text`` (the prompt); without it, of T5's own decoding."""
    toks, real, pieces = _t5_raw(ids, tokenizer, offset)
    return _label(toks, real, pieces, _joined(pieces) if text is None else text)


def _joined(pieces: Sequence[_Piece]) -> str:
    """An encoder's own text (used only when no prompt is given): a space before every chunk start."""
    return "".join((" " if p.starts else "") + (p.text or "") for p in pieces)


def _own_text(encoded: Sequence[tuple[list[TextToken], list[int], list[_Piece]]]) -> str:
    """Without a prompt: an encoder's own decoding stands in for it, the last (T5, whose ``▁`` keep the
    spaces) that was not truncated (it has padding), else the one that covers the most text."""
    texts = [(_joined(p), any(t.kind == "padding" for t in toks)) for toks, real, p in encoded if real]
    complete = [t for t, padded in texts if padded]
    if complete:
        return complete[-1]
    return max((t for t, _ in texts), key=lambda t: len("".join(t.split())), default="")


def _canon(ch: str) -> str:
    """What a character becomes after the encoders' normalisers (NFKC, lower case, plain quotes)."""
    return "".join(unicodedata.normalize("NFKC", ch).lower().translate(_PLAIN_QUOTES).split())


def _align(pieces: Sequence[_Piece], text: str) -> list[tuple[int, int] | int | None]:
    """Where every piece lies in ``text``: a character span, the index of the piece whose word it
    shares (a piece with no characters of its own), or None.

    The pieces' characters are matched to the text's in order (whitespace ignored, both sides
    normalised by :func:`_canon`; :func:`_match_chars`), so a prompt that differs slightly from what was
    tokenized (html entities, a changed letter) loses only the characters that differ. Pieces left
    unmatched (``<unk>``, a lone ``▁``, a changed piece) take the unmatched text between their matched
    neighbours, one whitespace chunk per chunk start.
    """
    ref, ref_at = [], []
    for i, ch in enumerate(text):
        for c in _canon(ch):
            ref.append(c)
            ref_at.append(i)
    own, owner = [], []
    for k, p in enumerate(pieces):
        for ch in p.text or "":
            for c in _canon(ch):
                own.append(c)
                owner.append(k)
    a, b = "".join(own), "".join(ref)
    out: list[Any] = [None] * len(pieces)
    for i, j in _match_chars(a, b):
        k, at = owner[i], ref_at[j]
        out[k] = (at, at + 1) if out[k] is None else (min(out[k][0], at), max(out[k][1], at + 1))
    n, k = len(pieces), 0
    while k < n:  # runs of unmatched pieces
        if out[k] is not None:
            k += 1
            continue
        j = k
        while j < n and out[j] is None:
            j += 1
        lo = out[k - 1][1] if k > 0 else 0
        hi = out[j][0] if j < n else len(text)
        chunks = [(lo + m.start(), lo + m.end()) for m in _CHUNK.finditer(text[lo:max(lo, hi)])]
        c, started = 0, k == 0
        for t in range(k, j):
            started = started or pieces[t].starts
            c += t > k and pieces[t].starts
            if c < len(chunks):
                out[t] = chunks[c]
            elif not started:
                out[t] = k - 1  # no text left between its neighbours: a continuation joins the previous
            elif j < n:
                out[t] = j  # word, a word start (and what follows it) the next one
            elif chunks:
                out[t] = chunks[-1]
        k = j
    return out


def _match_chars(a: str, b: str) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` with ``a[i] == b[j]``, in order: ``a`` (the pieces' characters) read along ``b``
    (the prompt's). At a difference, the cheapest skip (characters of ``a`` plus of ``b``, at most
    ``_SLACK``) after which ``_CONFIRM`` characters agree again is taken; no such skip drops ``a[i]``."""
    if b.startswith(a):  # the usual case: the pieces spell the prompt (or, truncated, its beginning)
        return list(zip(range(len(a)), range(len(a))))
    pairs, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
            continue
        skip = None
        for cost in range(1, _SLACK + 1):
            for da in range(cost, -1, -1):  # a substitution (da == db) is tried with the others of its cost
                db = cost - da
                n = min(_CONFIRM, len(a) - i - da)
                if n > 0 and j + db + n <= len(b) and a[i + da : i + da + n] == b[j + db : j + db + n]:
                    skip = (da, db)
                    break
            if skip:
                break
        i, j = (i + skip[0], j + skip[1]) if skip else (i + 1, j)
    return pairs


def _word_at(words: Sequence[tuple[int, int, str]], starts: Sequence[int], span: tuple[int, int]) -> int | None:
    """Index of the word overlapping ``span`` the most (None: the span is punctuation between words)."""
    s, e = span
    best, best_overlap = None, 0
    i = bisect.bisect_right(starts, e - 1) - 1
    while i >= 0 and words[i][1] > s:  # words do not overlap: earlier ones end earlier
        overlap = min(e, words[i][1]) - max(s, words[i][0])
        if overlap > 0 and overlap >= best_overlap:
            best, best_overlap = i, overlap
        i -= 1
    return best


def _label(tokens: list[TextToken], real: list[int], pieces: list[_Piece], text: str) -> list[TextToken]:
    """Give the real tokens at ``real`` the word of ``text`` they spell; ``word_index`` counts the words
    of ``text`` (so the same word has the same index on every encoder)."""
    text = unicodedata.normalize("NFC", text)
    words = split_words(text)
    starts = [w[0] for w in words]
    where = _align(pieces, text)
    index: list[int | None] = [None] * len(where)
    for k, w in enumerate(where):
        if isinstance(w, tuple):
            index[k] = _word_at(words, starts, w)
    for k, w in enumerate(where):
        if isinstance(w, int):
            index[k] = index[w]
    for k, wi in zip(real, index):
        if wi is not None:
            t = tokens[k]
            tokens[k] = TextToken(t.position, t.encoder, t.kind, t.token, t.token_id, words[wi][2], wi)
    return tokens


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {u: b for b, u in _bytes_to_unicode().items()}

