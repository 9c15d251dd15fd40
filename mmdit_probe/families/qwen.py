"""Qwen-Image (``QwenImageTransformer2DModel``): ``QwenDoubleStreamAttnProcessor2_0`` joins ``[text, image]``.

Every block is a double-stream (joint) block. The text stream is Qwen2.5-VL's last hidden state of the
chat-templated prompt (``pipe.prompt_template_encode``) with the template's system prefix
(``pipe.prompt_template_encode_start_idx`` = 34 tokens) and the tokenizer's padding removed, then
zero-padded to the longest prompt of that encode call; ``encoder_hidden_states_mask`` marks the
zero-padded positions (None when no row is padded). So a row's text positions are: the prompt's tokens,
the template's closing tokens (``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``: kind
``special``), then padding up to the call's text length (no token: kind ``padding``, masked out of the
attention). The layout labels these Qwen tokens with the encoder slot ``"t5"`` (the layout's LLM-encoder
slot), so ``t5_real`` / ``t5_special`` / ``t5_padding`` are Qwen's groups.
"""

from __future__ import annotations

import codecs

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from ..layout import TextToken, TokenLayout
from ..text_tokens import Piece, byte_decoder, label_pieces
from .base import CallInputs, Family, Site
from .flux import flow_schedule, packed_tokens
from .qwen_processor import QwenProbeProcessor
from .sd3 import argument

_ARGS = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes",
         "guidance", "attention_kwargs", "controlnet_block_samples", "additional_t_cond", "return_dict")
_ENCODER = "t5"  # the layout's LLM-encoder slot (its groups are t5_real / t5_special / t5_padding)
_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default


class QwenImageFamily(Family):
    name = "qwen_image"
    label = "Qwen-Image"
    transformer_class = "QwenImageTransformer2DModel"
    has_pooled = False  # no pooled_projections: ZeroText(pooled=True) / Patch(stream="pooled") are refused
    order = ("text", "image")  # QwenDoubleStreamAttnProcessor2_0: torch.cat([txt, img], dim=1)
    text_encoder = "text_encoder"  # Qwen2.5-VL: hidden_states[-1], template prefix dropped
    tokenizer = "tokenizer"

    def blocks(self, transformer):
        return list(transformer.transformer_blocks)

    def sites(self, transformer):
        n = len(transformer.transformer_blocks)
        return [Site(i, "attn", "joint", f"transformer_blocks.{i}.attn") for i in range(n)]

    def processor(self, site, controller, original):
        if type(original) is not QwenDoubleStreamAttnProcessor2_0:
            raise TypeError(
                f"mmdit_probe replaces QwenDoubleStreamAttnProcessor2_0 on Qwen-Image, but {site.name} uses "
                f"{type(original).__name__}. Reset it with transformer.set_attn_processor("
                f"QwenDoubleStreamAttnProcessor2_0()) or remove the adapter that installed it."
            )
        return QwenProbeProcessor(site, controller, original)

    def call_inputs(self, transformer, args, kwargs):
        hs = argument(args, kwargs, "hidden_states", _ARGS)
        ehs = argument(args, kwargs, "encoder_hidden_states", _ARGS)
        t = argument(args, kwargs, "timestep", _ARGS)
        shapes = argument(args, kwargs, "img_shapes", _ARGS)
        grid = _grid(shapes, hs.shape[1])
        timestep = (t.reshape(-1)[0].detach() * 1000) if torch.is_tensor(t) else torch.tensor(float("nan"))
        if ehs is not None and ehs.shape[0] == 1 < hs.shape[0]:
            # one negative prompt for several prompts: the blocks broadcast its single text row over the batch
            ehs = ehs.expand(hs.shape[0], -1, -1)
        return CallInputs(hs.shape[0], grid, 0 if ehs is None else ehs.shape[1], timestep, ehs, False)

    def encoder_hidden(self, pipe, output):
        """``[n, L, C]``: what ``_get_qwen_prompt_embeds`` makes of this encoder call — the last hidden state at
        the non-padding positions, template prefix dropped, zero-padded to the longest row.

        The encoder's output carries no attention mask; padding positions are those whose input embedding
        (``hidden_states[0]``) is the pad token's (exactly the tokenizer's padding, since the pipeline's
        prompts hold no literal pad token).
        """
        states = output.hidden_states
        pad_id = pipe.tokenizer.pad_token_id
        first, last = states[0], states[-1]
        if pad_id is None:
            valid = torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
        else:
            pad = pipe.text_encoder.get_input_embeddings().weight[pad_id].to(device=first.device, dtype=first.dtype)
            valid = (first != pad).any(-1)
        drop = pipe.prompt_template_encode_start_idx
        rows = [h[v][drop:] for h, v in zip(last, valid)]
        length = max(r.shape[0] for r in rows)
        return torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])

    def row_text(self, row, hidden):
        return row if row.shape == hidden.shape else None

    def prompt_text(self, pipe, ids, second_ids):
        prompt_ids, _ = _split(pipe, ids)
        return pipe.tokenizer.decode(prompt_ids)

    def layout(self, pipe, ids, second_ids, grid, n_text, prompt):
        prompt_ids, closing_ids = _split(pipe, ids)
        return qwen_layout(grid, prompt_ids, closing_ids, pipe.tokenizer, n_text, prompt=prompt, order=self.order)

    def prompt_layout(self, pipe, prompt, height, width, max_sequence_length):
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or default, width or default
        scale = pipe.vae_scale_factor * 2  # VAE downsampling, then 2×2 packing
        limit = _DEFAULT_MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length
        ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt), truncation=True,
                             max_length=pipe.tokenizer_max_length + pipe.prompt_template_encode_start_idx).input_ids
        prompt_ids, closing_ids = _split(pipe, ids)
        n_text = min(len(prompt_ids) + len(closing_ids), limit)
        return qwen_layout((height // scale, width // scale), prompt_ids, closing_ids, pipe.tokenizer, n_text,
                           prompt=prompt, order=self.order)

    def uses_cache_context(self) -> bool:
        return True

    def schedule(self, pipe, steps, height, width):
        """``QwenImagePipeline.__call__``'s schedule: sigmas ``linspace(1, 1/n, n)`` (always passed),
        ``mu = calculate_shift(packed image tokens)``; the transformer receives ``timestep / 1000``."""
        return flow_schedule(pipe, steps, packed_tokens(pipe, height, width), sigmas=True)


def _grid(shapes, n_image: int) -> tuple[int, int]:
    """The packed latent grid ``(h, w)`` from ``img_shapes`` (``[[(frames, h, w)], …]`` per row)."""
    if not shapes:
        raise ValueError("Qwen-Image transformer called without img_shapes; pass img_shapes=[[(1, h, w)]] * batch "
                         "as QwenImagePipeline does")
    per_row = shapes[0] if isinstance(shapes, list) else shapes  # as QwenEmbedRope reads it
    per_row = per_row if isinstance(per_row, list) else [per_row]
    if len(per_row) != 1 or int(per_row[0][0]) != 1:
        raise NotImplementedError(
            f"mmdit_probe records Qwen-Image text-to-image calls (one 1-frame image per row); this call's img_shapes "
            f"{shapes[0]} hold several images or frames (Qwen-Image-Edit / Layered context images), whose tokens "
            f"the layout does not cover yet. Use QwenImagePipeline"
        )
    _, h, w = (int(x) for x in per_row[0])
    if h * w != n_image:
        raise ValueError(f"img_shapes says a {h}x{w} image grid but hidden_states has {n_image} image tokens")
    return h, w


def _split(pipe, ids) -> tuple[list[int], list[int]]:
    """Of the ids the encoder saw (template, prompt, padding): the prompt's ids and the template's closing ids."""
    ids = [int(i) for i in ids]
    pad = pipe.tokenizer.pad_token_id
    kept = [i for i in ids if i != pad][pipe.prompt_template_encode_start_idx:]
    n_closing = len(_closing_ids(pipe.tokenizer, pipe.prompt_template_encode))
    return kept[: len(kept) - n_closing], kept[len(kept) - n_closing:]


def _closing_ids(tokenizer, template: str) -> list[int]:
    """Ids of the template after ``{}`` (``<|im_end|>\\n<|im_start|>assistant\\n``): it starts with a special token,
    so it tokenizes alone exactly as after any prompt."""
    return tokenizer(template.split("{}", 1)[1], add_special_tokens=False).input_ids


def qwen_layout(grid: tuple[int, int], prompt_ids, closing_ids, tokenizer, n_text: int, *, prompt: str | None = None,
                order: tuple[str, str] = ("text", "image")) -> TokenLayout:
    """Layout of one Qwen-Image row: ``prompt_ids`` (real, or special for special tokens), ``closing_ids`` (the
    template's closing tokens: special), then padding positions (no token) up to ``n_text``; truncated to
    ``n_text`` (``max_sequence_length``). Words are the words of ``prompt`` (default: the decoded prompt ids)."""
    ids = (list(prompt_ids) + list(closing_ids))[:n_text]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    specials = set(tokenizer.all_special_ids)
    b2u = byte_decoder()
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens: list[TextToken] = []
    real: list[int] = []
    texts: list[Piece] = []
    for i, (tid, piece) in enumerate(zip(ids, pieces)):
        kind = "special" if i >= len(prompt_ids) or tid in specials else "real"
        tokens.append(TextToken(i, _ENCODER, kind, piece, tid))
        if kind == "real":
            real.append(i)
            text = dec.decode(bytes(b2u[c] for c in piece if c in b2u))
            texts.append(Piece(text, not texts or text[:1].isspace()))
    tokens += [TextToken(i, _ENCODER, "padding", "", -1) for i in range(len(ids), n_text)]
    if prompt is None:
        prompt = tokenizer.decode(list(prompt_ids))
    return TokenLayout(tuple(int(x) for x in grid), tuple(label_pieces(tokens, real, texts, prompt)), tuple(order), prompt,
                       True)
