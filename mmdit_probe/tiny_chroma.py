"""``tiny_chroma_pipeline``: a Chroma pipeline built in code (random weights, in-code T5 tokenizer), offline."""

from __future__ import annotations

import torch

from .models import _quiet_image_processor_fallback, _seed_component, _tiny_t5, _tiny_vae
from .tokenizers import DEFAULT_VOCAB, make_t5_tokenizer, normalize_words

with _quiet_image_processor_fallback():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

T5_WIDTH = 32  # T5 d_model = the transformer's joint_attention_dim
LATENT_CHANNELS = 4  # packed 2×2 → 16 transformer input channels
APPROXIMATOR_CHANNELS = 16  # the modulation approximator's input width (a multiple of 4)


def tiny_chroma_pipeline(seed: int = 0, *, num_layers: int = 2, num_single_layers: int = 2, num_heads: int = 4,
                         head_dim: int = 8, device: str = "cpu") -> ChromaPipeline:
    """A ``ChromaPipeline`` with a tiny ``ChromaTransformer2DModel``: ``num_layers`` double-stream blocks, then
    ``num_single_layers`` single-stream blocks (layers ``0 … D+S−1``), ``num_heads`` × ``head_dim``.

    A 32×40 px image is 8×10 = 80 image tokens (VAE scale 2, 2×2 packing); text = T5 tokens only
    (``max_sequence_length``), with the pipeline's padding mask. Equal arguments give bitwise-equal weights;
    the caller's RNG is restored.
    """
    if head_dim % 4:
        raise ValueError("head_dim must be a multiple of 4 (rotary axes)")
    tokenizer = make_t5_tokenizer(normalize_words(DEFAULT_VOCAB), model_max_length=512)
    with torch.random.fork_rng(devices=[]):
        _seed_component(seed, 0)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=T5_WIDTH,
            axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2),
            approximator_num_channels=APPROXIMATOR_CHANNELS, approximator_hidden_dim=2 * num_heads * head_dim,
            approximator_layers=2,
        )
        _seed_component(seed, 1)
        vae = _tiny_vae(LATENT_CHANNELS)
        _seed_component(seed, 3)
        text_encoder = _tiny_t5(len(tokenizer), T5_WIDTH)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
