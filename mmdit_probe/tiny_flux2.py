"""``tiny_flux2_pipeline``: a ``Flux2Pipeline`` built in code (random weights, in-code tokenizer), offline.

The text encoder is a tiny ``Mistral3ForConditionalGeneration`` with enough layers for the pipeline's
default ``text_encoder_out_layers`` ``(10, 20, 30)``; the tokenizer is a byte-level BPE built here with
the Mistral/Tekken special tokens (same ids as the real ones) and a chat template that renders
``<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]`` like Mistral-Small-3.1's. The real pipeline
wraps its tokenizer in a ``PixtralProcessor`` (which needs torchvision); ``Flux2Pipeline`` only calls
``apply_chat_template`` on it, which the tokenizer provides with the same arguments.
"""

from __future__ import annotations

import functools

import regex
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

from .families.flux2 import HIDDEN_LAYERS
from .models import _quiet_image_processor_fallback, _seed_component
from .tokenizers import DEFAULT_VOCAB, _bytes_to_unicode, _train_bpe, normalize_words

with _quiet_image_processor_fallback():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

#: Mistral / Tekken control tokens, at their real ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 11, …).
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")
#: Tekken's pre-tokenizer split (a word keeps its leading space; digits alone; punctuation runs).
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Mistral-Small-3.1's chat template, text parts (an image block renders as ``[IMG]``).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set ns = namespace(text=message['content']) %}"
    "{%- else %}{%- set ns = namespace(text='') %}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{%- set ns.text = ns.text + block['text'] %}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{%- set ns.text = ns.text + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + ns.text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + ns.text + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ns.text + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
TEXT_WIDTH = 16  # Mistral hidden size; the text stream has len(HIDDEN_LAYERS) × 16 = 48 channels
LATENT_CHANNELS = 4  # 2×2 patchified → 16 transformer input channels


@functools.lru_cache(maxsize=4)
def _mistral_bpe(words: tuple[str, ...], system_message: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Specials at their ids, the 256 byte symbols, then merges that make every word (with and without a
    leading space) and every piece of the system message one token."""
    b2u = _bytes_to_unicode()
    split = regex.compile(TEKKEN_SPLIT)
    pieces: dict[tuple[str, ...], None] = {}
    for text in [*words, *(" " + w for w in words), system_message]:
        for piece in split.findall(text):
            pieces.setdefault(tuple(b2u[b] for b in piece.encode("utf-8")), None)
    merges = _train_bpe(tuple(pieces))
    vocab = {s: i for i, s in enumerate(MISTRAL_SPECIALS)}
    for symbol in [b2u[b] for b in range(256)] + [a + b for a, b in merges]:
        vocab.setdefault(symbol, len(vocab))
    return vocab, merges


def make_mistral_tokenizer(words=DEFAULT_VOCAB, *, system_message: str = SYSTEM_MESSAGE,
                           model_max_length: int = 131072) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Tekken's split, Mistral's control tokens and chat template, covering ``words``
    and ``system_message`` as whole tokens (other text falls back to byte pieces). Pads on the right with ``<pad>``."""
    vocab, merges = _mistral_bpe(normalize_words(words), system_message)
    backend = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in MISTRAL_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE, model_max_length=model_max_length)


def _tiny_mistral3(tokenizer: PreTrainedTokenizerFast) -> Mistral3ForConditionalGeneration:
    specials = {s: tokenizer.convert_tokens_to_ids(s) for s in ("<s>", "</s>", "<pad>", "[IMG]")}
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH,
                         intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=max(HIDDEN_LAYERS), num_attention_heads=2,
                         num_key_value_heads=1, head_dim=TEXT_WIDTH // 2, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None, bos_token_id=specials["<s>"],
                         eos_token_id=specials["</s>"], pad_token_id=specials["<pad>"]),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=32, patch_size=8, num_channels=3, head_dim=8),
        image_token_index=specials["[IMG]"], spatial_merge_size=1, vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(config)


def _tiny_vae() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False)


def tiny_flux2_pipeline(seed: int = 0, *, num_layers: int = 2, num_single_layers: int = 2, num_heads: int = 4,
                        head_dim: int = 8, device: str = "cpu") -> Flux2Pipeline:
    """A ``Flux2Pipeline`` with a tiny ``Flux2Transformer2DModel``: ``num_layers`` double-stream blocks, then
    ``num_single_layers`` single-stream blocks (layers ``0 … D+S−1``), ``num_heads`` × ``head_dim``.

    A 32×40 px image is 8×10 = 80 image tokens (VAE scale 2, 2×2 patchifying); the text stream is the whole
    chat sequence (``max_sequence_length`` positions: BOS, system message, prompt, markers, padding).
    Equal arguments give bitwise-equal weights; the caller's RNG is restored.
    """
    if head_dim % 4:
        raise ValueError("head_dim must be a multiple of 4 (four rotary axes: t, h, w, l)")
    tokenizer = make_mistral_tokenizer()
    with torch.random.fork_rng(devices=[]):
        _seed_component(seed, 0)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=head_dim, num_attention_heads=num_heads,
            joint_attention_dim=len(HIDDEN_LAYERS) * TEXT_WIDTH, timestep_guidance_channels=32,
            axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=True)
        _seed_component(seed, 1)
        vae = _tiny_vae()
        _seed_component(seed, 2)
        text_encoder = _tiny_mistral3(tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
