"""The concept attention and its two maps, as plain functions of tensors.

Concept queries attend over ``[image keys, concept keys]`` (ConceptAttention's choice: they read the
image and each other, never the prompt). Everything is computed in fp32 from the ``q, k, v`` given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConceptAttention:
    """One block's concept attention.

    ``out [B, H, T, D]``: the concept tokens' attention output; ``image_probs [B, H, T, N]``: softmax of
    the concept-query logits over the image keys alone (= the full softmax over ``[image, concept]`` keys
    restricted to the image keys and renormalised); ``image_mass [B, H, T]``: the full softmax's mass on
    the image keys (the rest went to concept keys).
    """

    out: torch.Tensor
    image_probs: torch.Tensor
    image_mass: torch.Tensor


def concept_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_image: torch.Tensor,
                      v_image: torch.Tensor, scale: float) -> ConceptAttention:
    """Concept queries ``q [B, H, T, D]`` over image keys ``k_image [B, H, N, D]`` and concept keys ``k [B, H, T, D]``."""
    q = q.float()
    s_img = scale * q @ k_image.float().transpose(-1, -2)  # [B, H, T, N]
    s_con = scale * q @ k.float().transpose(-1, -2)  # [B, H, T, T]
    lse_img, lse_con = s_img.logsumexp(-1), s_con.logsumexp(-1)
    lse = torch.logaddexp(lse_img, lse_con)
    out = torch.exp(s_img - lse[..., None]) @ v_image.float() + torch.exp(s_con - lse[..., None]) @ v.float()
    return ConceptAttention(out, torch.exp(s_img - lse_img[..., None]), torch.exp(lse_img - lse))


def per_concept(x: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over each concept's tokens along ``dim`` (``weights [n_concepts, T]``, rows sum to 1)."""
    x = x.movedim(dim, -1)
    return (x @ weights.t().to(x.dtype)).movedim(-1, dim)


def output_scores(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """ConceptAttention's output-space scores ``[B, n_concepts, N]``: the image tokens' attention outputs
    ``image_out [B, H, N, D]`` dotted with each concept's attention output ``concept_out [B, H, n_concepts, D]``
    over all channels (heads concatenated)."""
    return torch.einsum("bhnd,bhcd->bcn", image_out.float(), concept_out.float())
