"""Text tokens and prompt words: which prompt word every encoder piece belongs to.

Words come from one segmentation of the prompt text (:func:`split_words`), shared by every encoder:
each encoder's pieces are decoded (CLIP's byte-level symbols as UTF-8, T5's ``▁`` as spaces, byte pieces
``<0xNN>``; ``<unk>`` is never text) and aligned to the prompt's characters (:func:`label_pieces`), so
``left-hand``, ``don't``, ``3d`` and ``café`` are one word with the same label and ``word_index`` on every
encoder. :class:`~mmdit_probe.layout.TokenLayout` is built from these tokens; family adapters with their own
tokenizers (Qwen-Image, Flux.2) use :class:`Piece`, :func:`label_pieces` and :func:`byte_decoder` directly.
"""

from __future__ import annotations

import bisect
import codecs
import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

import regex

from .tokenizers import _bytes_to_unicode

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
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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
            return _clip_bytes(self.token.removesuffix("</w>"), byte_decoder()).decode("utf-8", "replace")
        byte = BYTE_PIECE.fullmatch(self.token)
        if byte:
            return bytes([int(byte[1], 16)]).decode("utf-8", "replace")
        return "" if self.token == "<unk>" else self.token.replace("▁", " ")


def _special_ids(tokenizer: Any) -> tuple[set[int], int | None]:
    specials = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    return specials, tokenizer.eos_token_id


@dataclass
class Piece:
    """What one real token contributes to the text: its decoded characters (None: unknown, e.g. T5's
    ``<unk>``) and whether it begins a new chunk (T5: ``▁``; CLIP: the previous piece ended in ``</w>``)."""

    text: str | None
    starts: bool


def clip_raw(ids: list[int], tokenizer: Any, offset: int) -> tuple[list[TextToken], list[int], list[Piece]]:
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


def _clip_pieces(pieces: Sequence[str], decoder: dict[str, int] | None = None) -> list[Piece]:
    """Byte-level BPE pieces back to text: each symbol is one byte (the tokenizer's byte decoder, else
    GPT-2/CLIP's standard map); bytes are decoded as one UTF-8 stream, so a character split over
    several pieces belongs to the piece that completes it."""
    b2u = decoder or byte_decoder()
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, starts = [], True
    for piece in pieces:
        end = piece.endswith("</w>")
        out.append(Piece(dec.decode(_clip_bytes(piece[: -len("</w>")] if end else piece, b2u)), starts))
        starts = end
    return out


def _clip_bytes(symbols: str, b2u: dict[str, int]) -> bytes:
    return b"".join(bytes([b2u[c]]) if c in b2u else c.encode("utf-8") for c in symbols)


def t5_raw(ids: list[int], tokenizer: Any, offset: int) -> tuple[list[TextToken], list[int], list[Piece]]:
    """SentencePiece kinds (EOS special, pad padding) and the decoded text of every real piece."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    pad = tokenizer.pad_token_id
    unk = getattr(tokenizer, "unk_token_id", None)
    specials, _ = _special_ids(tokenizer)
    out: list[TextToken] = []
    real: list[int] = []
    texts: list[Piece] = []
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i, (tid, piece) in enumerate(zip(ids, pieces)):
        kind = "padding" if tid == pad else "special" if tid in specials else "real"
        out.append(TextToken(offset + i, "t5", kind, piece, tid))
        if kind != "real":
            continue
        real.append(len(out) - 1)
        byte = BYTE_PIECE.fullmatch(piece)
        if unk is not None and tid == unk:
            text = None  # <unk> is never text: the characters it stands for come from the prompt
        elif byte:
            text = dec.decode(bytes([int(byte[1], 16)]))
        else:
            dec.reset()
            text = piece.replace("▁", " ")
        texts.append(Piece(text, piece.startswith("▁")))
    return out, real, texts


def joined(pieces: Sequence[Piece]) -> str:
    """An encoder's own text (used only when no prompt is given): a space before every chunk start."""
    return "".join((" " if p.starts else "") + (p.text or "") for p in pieces)


def own_text(encoded: Sequence[tuple[list[TextToken], list[int], list[Piece]]]) -> str:
    """Without a prompt: an encoder's own decoding stands in for it, the last (T5, whose ``▁`` keep the
    spaces) that was not truncated (it has padding), else the one that covers the most text."""
    texts = [(joined(p), any(t.kind == "padding" for t in toks)) for toks, real, p in encoded if real]
    complete = [t for t, padded in texts if padded]
    if complete:
        return complete[-1]
    return max((t for t, _ in texts), key=lambda t: len("".join(t.split())), default="")


def _canon(ch: str) -> str:
    """What a character becomes after the encoders' normalisers (NFKC, lower case, plain quotes)."""
    return "".join(unicodedata.normalize("NFKC", ch).lower().translate(_PLAIN_QUOTES).split())


def _align(pieces: Sequence[Piece], text: str) -> list[tuple[int, int] | int | None]:
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


def label_pieces(tokens: list[TextToken], real: list[int], pieces: list[Piece], text: str) -> list[TextToken]:
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
def byte_decoder() -> dict[str, int]:
    return {u: b for b, u in _bytes_to_unicode().items()}
