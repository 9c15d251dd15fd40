"""Offline, in-code tokenizers that mimic the three SD3 tokenizers.

Nothing here is downloaded: the CLIP byte-level BPE tokenizers and the T5 Unigram
tokenizer are built from a word list. Every word of the list becomes a single
token (``word</w>`` for CLIP, ``▁word`` for T5); every other string still
tokenizes, via learned sub-word merges and per-character (CLIP: per-byte)
fallback tokens.
"""

from __future__ import annotations

import functools
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import regex
from transformers import CLIPTokenizer, T5Tokenizer

__all__ = [
    "DEFAULT_VOCAB",
    "CLIP_BOS",
    "CLIP_EOS",
    "clip_bpe",
    "clip_tokenizer_from_bpe",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
    "normalize_words",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "pink", "brown", "gray")
SHAPES = ("circle", "square", "triangle", "star")
RELATIONS = ("left", "right", "of", "above", "below", "next", "to", "on", "top")
ARTICLES = ("a", "an", "the")
COMMON = (
    "photo", "picture", "image", "painting", "drawing", "sketch", "portrait", "illustration", "render",
    "cat", "dog", "bird", "fish", "horse", "cow", "sheep", "lion", "tiger", "bear", "rabbit", "mouse",
    "astronaut", "man", "woman", "person", "child", "girl", "boy", "people", "robot", "king", "queen",
    "riding", "sitting", "standing", "running", "walking", "flying", "holding", "wearing", "eating",
    "city", "street", "house", "building", "castle", "tower", "bridge", "road", "car", "boat", "train",
    "tree", "forest", "flower", "grass", "mountain", "river", "lake", "sea", "ocean", "beach", "sky",
    "sun", "moon", "cloud", "rain", "snow", "night", "day", "sunset", "space", "planet",
    "table", "chair", "cup", "apple", "banana", "book", "hat", "ball", "box", "window", "door",
    "big", "small", "large", "tiny", "old", "new", "beautiful", "cute", "happy", "dark", "bright",
    "in", "with", "and", "at", "under", "behind", "front", "near", "between", "is", "two", "three",
    "style", "oil", "digital", "art", "high", "quality", "detailed", "background", "shape", "shapes",
    "color", "colour", "centre", "center", "middle", "corner", "upper", "lower", "one",
)
DEFAULT_VOCAB: tuple[str, ...] = COLOURS + SHAPES + RELATIONS + ARTICLES + COMMON

# Same split as transformers' CLIPTokenizer pre-tokenizer (minus the special-token alternatives).
_CLIP_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (printable ASCII maps to itself)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def normalize_words(words: Iterable[str]) -> tuple[str, ...]:
    """Lower-case, whitespace-split and de-duplicate a word list, keeping first-seen order."""
    seen: dict[str, None] = {}
    for entry in words:
        for w in str(entry).lower().split():
            seen.setdefault(w, None)
    if not seen:
        raise ValueError("vocab must contain at least one non-blank word")
    return tuple(seen)


def _train_bpe(words: tuple[tuple[str, ...], ...]) -> list[tuple[str, str]]:
    """Deterministic BPE training until every word is a single symbol (each word counted once)."""
    seqs = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for s in seqs:
            counts.update(zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, ties broken lexicographically
        merges.append(best)
        joined = best[0] + best[1]
        for i, s in enumerate(seqs):
            if len(s) < 2:
                continue
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == best[0] and s[j + 1] == best[1]:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out


@functools.lru_cache(maxsize=16)
def clip_bpe(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style byte-level BPE vocabulary and merges covering ``words`` as whole tokens.

    Layout follows the real CLIP vocab: 256 byte symbols, the same with ``</w>``,
    merged symbols in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` last.
    """
    b2u = _bytes_to_unicode()
    pieces: dict[str, None] = {}
    for w in words:
        for p in _CLIP_SPLIT.findall(w):
            pieces.setdefault(p, None)
    symbols = []
    for p in pieces:
        chars = [b2u[b] for b in p.encode("utf-8")]
        chars[-1] += "</w>"
        symbols.append(tuple(chars))
    merges = _train_bpe(tuple(symbols))
    vocab: dict[str, int] = {}
    for tok in list(b2u.values()) + [c + "</w>" for c in b2u.values()] + [a + b for a, b in merges]:
        vocab.setdefault(tok, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def make_clip_tokenizer(
    words: Sequence[str] = DEFAULT_VOCAB, *, pad_token: str = CLIP_EOS, model_max_length: int = 77
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer (bos ``<|startoftext|>``, eos ``<|endoftext|>``) covering ``words``.

    ``pad_token`` is ``<|endoftext|>`` for SD3's CLIP-L tokenizer and ``"!"`` for its CLIP-G one.
    """
    vocab, merges = clip_bpe(normalize_words(words))
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary")
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def t5_unigram_vocab(words: tuple[str, ...]) -> list[tuple[str, float]]:
    """T5 Unigram pieces: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``▁``, printable-ASCII chars, ``▁word`` pieces.

    Whole-word pieces score far above characters, so Viterbi keeps listed words whole.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    seen = {p for p, _ in pieces}
    for c in string.ascii_lowercase + string.digits + string.punctuation + string.ascii_uppercase:
        if c not in seen:
            pieces.append((c, -10.0))
            seen.add(c)
    for w in words:
        if "▁" + w not in seen:
            pieces.append(("▁" + w, -5.0))
            seen.add("▁" + w)
    return pieces


def make_t5_tokenizer(words: Sequence[str] = DEFAULT_VOCAB, *, model_max_length: int = 512) -> T5Tokenizer:
    """A T5 Unigram tokenizer (pad ``<pad>``=0, eos ``</s>``=1, unk ``<unk>``=2) covering ``words``."""
    return T5Tokenizer(
        vocab=t5_unigram_vocab(normalize_words(words)),
        extra_ids=0,
        model_max_length=model_max_length,
    )


def clip_tokenizer_from_bpe(bpe_path: str, directory: str, *, pad_token: str = CLIP_EOS,
                            model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer, offline, from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

    Writes ``vocab.json`` and ``merges.txt`` into ``directory`` and loads them, building the encoder the
    way OpenAI's ``SimpleTokenizer`` does: the 256 byte symbols (``bytes_to_unicode``), the same with
    ``</w>``, one token per merge (the first ``49152 - 256 - 2`` merge lines), then
    ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407. The ``open-clip-torch`` package ships
    that file (``open_clip/bpe_simple_vocab_16e6.txt.gz``).
    """
    import gzip
    import json
    import os

    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer.from_pretrained(directory, pad_token=pad_token, model_max_length=model_max_length)
