"""Flux Kontext: the context image's tokens, a third token group after the generated image's.

``FluxKontextPipeline`` packs the context image's latents like the generated ones and appends them
to the image stream (``hidden_states = [latents ; image_latents]``), so the joint sequence of every
block is ``[text, image, context]``. diffusers marks them in ``img_ids`` (``[S, 3]``: ``(t, y, x)``):
the generated tokens have ``t = 0``, the context tokens ``t = 1`` (``image_ids[..., 0] = 1`` in
``prepare_latents``), each on its own ``(y, x)`` grid. :func:`split_image_ids` reads both grids from a
call's ``img_ids``; :func:`kontext_sizes` predicts them for a pipeline call, as the pipeline computes
them (``max_area`` rescaling, ``_auto_resize`` to Kontext's preferred resolutions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..layout import TokenLayout

__all__ = ["ImageIds", "is_kontext", "kontext_layout", "kontext_sizes", "split_image_ids"]


@dataclass(frozen=True)
class ImageIds:
    """The token groups of one Flux call's ``img_ids``: generated grid ``(h, w)`` and context grid (None: none)."""

    grid: tuple[int, int]
    context_grid: tuple[int, int] | None = None

    @property
    def n_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_context(self) -> int:
        return self.context_grid[0] * self.context_grid[1] if self.context_grid else 0


def _grid(ids: torch.Tensor, what: str) -> tuple[int, int]:
    """``(h, w)`` of a row-major ``(y, x)`` grid held in ``ids [n, 3]``; ``ValueError`` if it is not one."""
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    expected = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    if ids.shape[0] != h * w or not torch.equal(ids[:, 1:].round().long().cpu(), expected):
        raise ValueError(f"the {what} tokens' img_ids are not one row-major grid ({ids.shape[0]} tokens, y < {h}, "
                         f"x < {w}); mmdit_probe reads FluxPipeline / FluxKontextPipeline ids with at most one context "
                         f"image (FluxKontextInpaintPipeline's image_reference adds a second one: leave it out)")
    return h, w


def split_image_ids(img_ids: torch.Tensor) -> ImageIds:
    """Generated and context grids of ``img_ids`` (``[S, 3]``, or the deprecated ``[B, S, 3]``).

    Generated tokens have ``t = img_ids[:, 0] = 0`` and come first; context tokens (``t = 1``) follow.
    """
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    t = ids[:, 0].round().long()
    n_gen = int((t == 0).sum())
    if not bool((t[:n_gen] == 0).all()) or not bool((t[n_gen:] == 1).all()):
        found = sorted({int(v) for v in t.unique().tolist()})
        raise ValueError(f"img_ids carry the token groups t = {found} in an order mmdit_probe does not know: it reads "
                         f"the generated image (t = 0) followed by one Kontext context image (t = 1)")
    grid = _grid(ids[:n_gen], "generated image's")
    return ImageIds(grid, _grid(ids[n_gen:], "context image's") if n_gen < ids.shape[0] else None)


def is_kontext(pipe: Any) -> bool:
    """Whether ``pipe`` is a ``FluxKontextPipeline`` (whose ``__call__`` rescales to ``max_area``)."""
    from diffusers import FluxKontextPipeline

    return isinstance(pipe, FluxKontextPipeline)


def kontext_sizes(pipe: Any, image: Any = None, *, height: int | None = None, width: int | None = None,
                  max_area: int = 1024 ** 2, auto_resize: bool = True) -> ImageIds:
    """The grids ``pipe(image=image, height=, width=, max_area=, _auto_resize=auto_resize)`` runs with.

    As ``FluxKontextPipeline.__call__`` computes them: the generated size is rescaled to ``max_area`` at
    the same aspect ratio and floored to multiples of ``2 × vae_scale_factor``; a context image given as
    pixels (PIL, array, tensor) is first snapped to the preferred Kontext resolution of its aspect ratio
    (``auto_resize``), then floored likewise; one given as latents (``[B, C_latent, h, w]``) is used as is.
    Each grid is latent size / 2 (2×2 packing).
    """
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    f = pipe.vae_scale_factor
    multiple = f * 2
    height = height or pipe.default_sample_size * f
    width = width or pipe.default_sample_size * f
    aspect = width / height
    width, height = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    grid = (height // multiple, width // multiple)
    if image is None:
        return ImageIds(grid)
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == pipe.latent_channels:
        return ImageIds(grid, (image.shape[2] // 2, image.shape[3] // 2))
    first = image[0] if isinstance(image, list) else image
    h, w = pipe.image_processor.get_default_height_width(first)
    if auto_resize:
        _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    h, w = h // multiple * multiple, w // multiple * multiple
    return ImageIds(grid, (h // multiple, w // multiple))


def kontext_layout(pipe: Any, prompt: str, image: Any = None, *, height: int | None = None, width: int | None = None,
                   max_sequence_length: int = 512, max_area: int = 1024 ** 2, auto_resize: bool = True) -> TokenLayout:
    """The :class:`TokenLayout` of ``pipe(image=image, prompt=prompt, height=, width=, max_sequence_length=,
    max_area=, _auto_resize=auto_resize)`` on a ``FluxKontextPipeline``: T5 text, the generated grid and the
    context image's grid (:func:`kontext_sizes`), joint order ``[text, image, context]``. Tokenized here, nothing run.
    """
    if not is_kontext(pipe):
        raise TypeError(f"kontext_layout reads FluxKontextPipeline calls; for a {type(pipe).__name__} use "
                        f"mmdit_probe.prompt_layout(pipe, prompt, ...)")
    sizes = kontext_sizes(pipe, image, height=height, width=width, max_area=max_area, auto_resize=auto_resize)
    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=max_sequence_length, truncation=True).input_ids
    layout = TokenLayout.from_t5_ids(sizes.grid, ids, pipe.tokenizer_2, order=("text", "image"), prompt=prompt)
    return layout.with_context(sizes.context_grid)
