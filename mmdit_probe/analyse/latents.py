"""Real image → normalised VAE latents → noised latents at a level σ (flow matching).

Checks run before anything computes: the image's type, range and size (a multiple of what the model
needs), and the σ values.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch


def check_sigmas(sigmas: Any) -> tuple[float, ...]:
    """``sigmas`` as a tuple of floats in ``[0, 1]`` (a number alone is one σ); ``ValueError`` naming the fix."""
    if isinstance(sigmas, (int, float)) and not isinstance(sigmas, bool):
        sigmas = [sigmas]
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.reshape(-1).tolist()
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise ValueError(f"sigmas must be numbers in [0, 1] (noise levels), e.g. sigmas=[0.3, 0.6]; got {sigmas!r}") from None
    bad = [s for s in values if not (math.isfinite(s) and 0.0 <= s <= 1.0)]
    if not values or bad:
        raise ValueError(f"sigmas must be a non-empty list of noise levels in [0, 1] (0 = the clean image, 1 = pure "
                         f"noise); got {values if values else 'nothing'}" + (f", out of range: {bad}" if bad else ""))
    return tuple(values)


def image_size(image: Any) -> tuple[int, int]:
    """``(height, width)`` of a PIL image, a ``[3, H, W]`` / ``[1, 3, H, W]`` tensor or an ``[H, W, 3]`` array in 0…1."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.height, image.width
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        raise TypeError(f"image must be a PIL image, a torch tensor [3, H, W] or a numpy array [H, W, 3] in 0…1; "
                        f"got {type(image).__name__}")
    array = isinstance(image, np.ndarray)
    t = torch.as_tensor(image) if array else image
    ok = (t.dim() == 3 and t.shape[-1] == 3) if array else (
        (t.dim() == 3 and t.shape[0] == 3) or (t.dim() == 4 and tuple(t.shape[:2]) == (1, 3)))
    if not ok:
        want = "[H, W, 3]" if array else "[3, H, W] or [1, 3, H, W]"
        raise ValueError(f"image {type(image).__name__} has shape {tuple(t.shape)}; give one RGB image as {want} with "
                         f"values in 0…1 (or a PIL image)")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise ValueError("image values must be finite floats in 0…1 (convert uint8 images with / 255, or pass a "
                         "PIL image)")
    return (int(t.shape[0]), int(t.shape[1])) if array else (int(t.shape[-2]), int(t.shape[-1]))


def target_size(image: Any, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """The pixel size the image is analysed at (``height``/``width`` resize it); each must divide by ``multiple``."""
    h0, w0 = image_size(image)
    for name, v in (("height", height), ("width", width)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive whole number of pixels, got {v!r}")
    h, w = height or h0, width or w0
    if h % multiple or w % multiple:
        fix_h, fix_w = max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)
        raise ValueError(f"the image would be analysed at {h}×{w} px, but this model needs height and width that are "
                         f"multiples of {multiple} (VAE downsampling × patch size); pass height={fix_h}, width={fix_w} "
                         f"(the image is resized to it)")
    return h, w


def pixels(pipe: Any, image: Any, height: int, width: int) -> torch.Tensor:
    """The image as the pipeline's VAE expects it: ``[1, 3, H, W]`` in −1…1 (``pipe.image_processor.preprocess``)."""
    if isinstance(image, np.ndarray):
        image = image[None].astype(np.float32)
    return pipe.image_processor.preprocess(image, height=height, width=width)


@torch.no_grad()
def clean_latents(pipe: Any, x: torch.Tensor) -> torch.Tensor:
    """VAE posterior mode of ``x [1, 3, H, W]`` in the transformer's normalised space, ``[1, C, h, w]`` float32:
    ``(z − shift_factor) · scaling_factor``, the inverse of the pipeline's decode ``z / scaling + shift``."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_latents

    vae = pipe.vae
    z = retrieve_latents(vae.encode(x.to(device=vae.device, dtype=vae.dtype)), sample_mode="argmax")
    shift = vae.config.shift_factor or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


def noise_like(x0: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal noise shaped like ``x0`` from a CPU generator seeded with ``seed`` (one draw for every σ)."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.device)


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow matching's ``x_σ = (1 − σ)·x0 + σ·ε`` (float32; ``sigma`` a 0-d float32 tensor)."""
    return (1 - sigma) * x0 + sigma * noise


def sigma_tensors(sigmas: Sequence[float], num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ, timestep)`` float32 as the scheduler makes them: ``timestep = σ · num_train_timesteps`` in float32."""
    s = torch.tensor(list(sigmas), dtype=torch.float32)
    return s, s * num_train_timesteps
