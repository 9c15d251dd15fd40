"""``tiny_flux_pipeline``: a Flux.1 (or Flux Kontext) pipeline built in code (random weights, in-code tokenizers), offline."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from .models import CLIP_MAX_LENGTH, _quiet_image_processor_fallback, _seed_component, _tiny_t5, _tiny_vae
from .tokenizers import DEFAULT_VOCAB, make_clip_tokenizer, make_t5_tokenizer, normalize_words

with _quiet_image_processor_fallback():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel

T5_WIDTH = 32  # T5 d_model = the transformer's joint_attention_dim
CLIP_WIDTH = 32  # CLIP hidden size = pooled_projection_dim (Flux takes CLIP's pooled output only)
LATENT_CHANNELS = 4  # packed 2×2 → 16 transformer input channels


def tiny_flux_pipeline(seed: int = 0, *, num_layers: int = 2, num_single_layers: int = 2, num_heads: int = 4,
                       head_dim: int = 8, guidance_embeds: bool = True, kontext: bool = False,
                       device: str = "cpu") -> FluxPipeline | FluxKontextPipeline:
    """A ``FluxPipeline`` with a tiny ``FluxTransformer2DModel``: ``num_layers`` double-stream blocks, then
    ``num_single_layers`` single-stream blocks (layers ``0 … D+S−1``), ``num_heads`` × ``head_dim``.

    A 32×40 px image is 8×10 = 80 image tokens (VAE scale 2, 2×2 packing); text = T5 tokens only
    (``max_sequence_length``). Equal arguments give bitwise-equal weights; the caller's RNG is restored.

    ``kontext=True``: the same components in a ``FluxKontextPipeline`` (``pipe(image=..., prompt=...)``: the
    context image's tokens follow the generated ones). Pass ``max_area=height * width`` and
    ``_auto_resize=False`` to keep its sizes tiny (its defaults rescale to 1024² and Kontext's resolutions).
    """
    if head_dim % 4:
        raise ValueError("head_dim must be a multiple of 4 (rotary axes)")
    words = normalize_words(DEFAULT_VOCAB)
    tokenizer = make_clip_tokenizer(words, model_max_length=CLIP_MAX_LENGTH)
    tokenizer_2 = make_t5_tokenizer(words, model_max_length=512)
    with torch.random.fork_rng(devices=[]):
        _seed_component(seed, 0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance_embeds,
            axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2),
        )
        _seed_component(seed, 1)
        vae = _tiny_vae(LATENT_CHANNELS)
        _seed_component(seed, 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        _seed_component(seed, 3)
        text_encoder_2 = _tiny_t5(len(tokenizer_2), T5_WIDTH)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
