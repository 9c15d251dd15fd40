"""Token layout of Flux.2's text stream: the Mistral-3 chat sequence the pipeline encodes.

``Flux2Pipeline`` renders ``<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]prompt[/INST]`` with the
tokenizer's chat template, pads / truncates it to ``max_sequence_length`` and puts *every* position
in the text stream. Here each position gets a kind: ``real`` (the prompt's own tokens, between the
last ``[INST]`` and its ``[/INST]``), ``special`` (BOS, the template's markers and the fixed system
message) or ``padding``; real tokens get the prompt word they spell (byte-level pieces decoded and
aligned to the prompt with the same word segmentation as every other family).

The layout vocabulary names two encoders (``clip``, ``t5``); the Mistral tokens take the ``t5`` slot
(:data:`ENCODER`), the long text stream sized by ``max_sequence_length``.
"""

from __future__ import annotations

import codecs
from typing import Any, Sequence

from ..layout import TextToken, TokenLayout
from ..text_tokens import BYTE_PIECE, Piece, byte_decoder, label_pieces

#: Encoder label of the Mistral tokens in :class:`TokenLayout` (its ``t5_*`` groups are this stream's).
ENCODER = "t5"
INST, END_INST = "[INST]", "[/INST]"


def text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer inside ``pipe.tokenizer`` (a ``PixtralProcessor`` holds it as ``.tokenizer``)."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def chat_ids(tokenizer: Any, prompt: str, system_message: str, max_length: int) -> list[int]:
    """The ids ``Flux2Pipeline`` encodes for ``prompt`` (its own ``format_input`` and chat-template call)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input  # imported when a pipeline is in use

    inputs = tokenizer.apply_chat_template(
        format_input(prompts=[prompt], system_message=system_message), add_generation_prompt=False, tokenize=True,
        return_dict=True, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
    return [int(i) for i in inputs["input_ids"][0].tolist()]


def _markers(tok: Any) -> tuple[int, int, set[int], int | None]:
    """``[INST]`` and ``[/INST]`` ids, every special id, the pad id (``TypeError`` if not a Mistral chat tokenizer)."""
    inst, end = (tok.convert_tokens_to_ids(t) for t in (INST, END_INST))
    unk = tok.unk_token_id
    if inst is None or end is None or unk in (inst, end):
        raise TypeError(f"Flux.2's text stream is a Mistral chat sequence, but {type(tok).__name__} has no "
                        f"{INST} / {END_INST} tokens; pass the pipeline's own tokenizer")
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    specials = set(tok.all_special_ids) | {int(i) for i, t in added.items() if getattr(t, "special", False)}
    return int(inst), int(end), specials, tok.pad_token_id


def prompt_positions(ids: Sequence[int], tok: Any) -> list[int]:
    """Positions of the prompt's own tokens: after the last ``[INST]``, before its ``[/INST]`` (or the end)."""
    inst, end, specials, pad = _markers(tok)
    starts = [i for i, t in enumerate(ids) if t == inst]
    if not starts:
        return []  # truncation cut the sequence inside the system message
    out = []
    for i in range(starts[-1] + 1, len(ids)):
        if ids[i] == end:
            break
        if ids[i] != pad and ids[i] not in specials:
            out.append(i)
    return out


def prompt_text(ids: Sequence[int], tok: Any) -> str:
    """The prompt as the encoder saw it (byte-level decoding is lossless; truncation keeps its beginning)."""
    real = [int(ids[i]) for i in prompt_positions(ids, tok)]
    return tok.decode(real, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def chat_layout(image_grid: tuple[int, int], ids: Sequence[int], tok: Any, *, order: tuple[str, str],
                prompt: str | None = None) -> TokenLayout:
    """Layout of one row: ``image_grid`` plus every position of the chat sequence ``ids``.

    ``prompt``: the text the tokenizer saw between ``[INST]`` and ``[/INST]`` (default: decoded from ``ids``).
    """
    ids = [int(i) for i in ids]
    _, _, specials, pad = _markers(tok)
    real = prompt_positions(ids, tok)
    pieces = tok.convert_ids_to_tokens(ids)
    is_real = set(real)
    tokens = [TextToken(i, ENCODER, "padding" if t == pad else "real" if i in is_real else "special", p, t)
              for i, (t, p) in enumerate(zip(ids, pieces))]
    text = prompt_text(ids, tok) if prompt is None else prompt
    labelled = label_pieces(tokens, real, _pieces([pieces[i] for i in real], _byte_level(tok)), text)
    return TokenLayout(tuple(int(x) for x in image_grid), tuple(labelled), tuple(order), text, True)


def _byte_level(tok: Any) -> bool:
    """Whether the tokenizer decodes byte-level pieces (``Ġ`` = space), alone or inside a decoder sequence."""
    decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    return "ByteLevel(" in repr(decoder)


def _pieces(pieces: Sequence[str], byte_level: bool) -> list[Piece]:
    """Each real piece's characters (byte-level ``Ġ``-style or SentencePiece ``▁``-style), decoded as one
    UTF-8 stream: a character split over pieces belongs to the piece that completes it."""
    b2u = byte_decoder()
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for k, piece in enumerate(pieces):
        byte = BYTE_PIECE.fullmatch(piece)
        if byte:
            data = bytes([int(byte[1], 16)])
        elif byte_level:
            data = b"".join(bytes([b2u[c]]) if c in b2u else c.encode("utf-8") for c in piece)
        else:
            data = piece.replace("▁", " ").encode("utf-8")
        out.append(Piece(dec.decode(data), k == 0 or data[:1].isspace()))
    return out
