"""``tiny_qwen_image_pipeline``: a Qwen-Image pipeline built in code (random weights, in-code tokenizer), offline.

The tokenizer is a Qwen2 byte-level BPE (``Qwen2Tokenizer``: Qwen2's pre-tokenizer regex, ``Ġ`` for a
leading space) whose merges are trained here, so every word of the chat template and of
:data:`~mmdit_probe.tokenizers.DEFAULT_VOCAB` is one token, with Qwen's special tokens
``<|endoftext|>`` (pad) ``<|im_start|>`` ``<|im_end|>``. As with the real tokenizer, the template's
system prefix is exactly ``QwenImagePipeline.prompt_template_encode_start_idx`` = 34 tokens, the
positions the pipeline drops; any other string still tokenizes (per-byte fallback).
"""

from __future__ import annotations

import functools

import regex
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from .models import _quiet_image_processor_fallback, _seed_component
from .tokenizers import DEFAULT_VOCAB, _bytes_to_unicode, _train_bpe, normalize_words

with _quiet_image_processor_fallback():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

#: ``QwenImagePipeline.prompt_template_encode`` (diffusers 0.42.1): the chat template every prompt is wrapped in
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                 "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")
QWEN_PAD, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TEXT_WIDTH = 32  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim
LATENT_CHANNELS = 4  # packed 2×2 → 16 transformer input channels


@functools.lru_cache(maxsize=4)
def _qwen_bpe(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and merges: the 256 byte symbols, merged symbols in merge order, then the specials."""
    b2u = _bytes_to_unicode()
    split = regex.compile(PRETOKENIZE_REGEX)
    text = QWEN_TEMPLATE.replace("{}", "")
    for special in (QWEN_PAD, QWEN_IM_START, QWEN_IM_END):
        text = text.replace(special, "\x00")
    pieces: dict[str, None] = {}
    for segment in text.split("\x00"):
        for p in split.findall(segment):
            pieces.setdefault(p, None)
    for w in words:
        for p in (w, " " + w):  # a prompt's first word follows "user\n" with no space; later words carry one
            pieces.setdefault(p, None)
    merges = _train_bpe(tuple(tuple(b2u[b] for b in p.encode("utf-8")) for p in pieces))
    vocab: dict[str, int] = {}
    for tok in list(b2u.values()) + [a + b for a, b in merges]:
        vocab.setdefault(tok, len(vocab))
    for special in (QWEN_PAD, QWEN_IM_START, QWEN_IM_END):
        vocab[special] = len(vocab)
    return vocab, merges


def make_qwen2_tokenizer(words=DEFAULT_VOCAB) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` covering ``words`` and the Qwen-Image chat template as whole tokens.

    pad = eos = ``<|endoftext|>``, ``<|im_start|>`` / ``<|im_end|>`` special; right padding (as Qwen2.5-VL's).
    """
    vocab, merges = _qwen_bpe(normalize_words(words))
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), extra_special_tokens=[QWEN_IM_START, QWEN_IM_END])


def _tiny_qwen25_vl(tokenizer: Qwen2Tokenizer, width: int) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL (text width ``width``, 2 heads, M-RoPE sections 2/2/4) with a 1-block vision tower.

    Its image / video / vision markers get ids past the vocabulary: prompts never contain them.
    """
    n = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=n, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6,
                         rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                         bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(QWEN_IM_END),
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=width),
        image_token_id=n, video_token_id=n + 1, vision_start_token_id=n + 2, vision_end_token_id=n + 3,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen_image_pipeline(seed: int = 0, *, num_layers: int = 3, num_heads: int = 4, head_dim: int = 8,
                             torch_dtype: torch.dtype | None = None, device: str = "cpu") -> QwenImagePipeline:
    """A ``QwenImagePipeline`` with a tiny ``QwenImageTransformer2DModel`` (``num_layers`` double-stream blocks,
    ``num_heads`` × ``head_dim``), a tiny Qwen2.5-VL text encoder and a tiny ``AutoencoderKLQwenImage``.

    A 32×40 px image is 8×10 = 80 image tokens (VAE scale 2, 2×2 packing); text = the prompt's Qwen tokens
    plus the template's 5 closing tokens (the 34-token system prefix is dropped by the pipeline). Equal
    arguments give bitwise-equal weights; the caller's RNG is restored.
    """
    if head_dim % 4:
        raise ValueError("head_dim must be a multiple of 4 (rotary axes)")
    tokenizer = make_qwen2_tokenizer()
    with torch.random.fork_rng(devices=[]):
        _seed_component(seed, 0)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=num_layers,
            attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=TEXT_WIDTH,
            axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2),
        )
        _seed_component(seed, 1)
        vae = AutoencoderKLQwenImage(base_dim=24, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.0] * LATENT_CHANNELS,
                                     latents_std=[1.0] * LATENT_CHANNELS)
        _seed_component(seed, 2)
        text_encoder = _tiny_qwen25_vl(tokenizer, TEXT_WIDTH)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if torch_dtype is None else pipe.to(device, torch_dtype)
