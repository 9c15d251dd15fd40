"""Score an attention map against an object mask: pointing (argmax inside the mask) and top-k IoU.

The same definitions as the shapes evaluation (:mod:`mmdit_probe.shapes.evaluate`): the ``[h, w]`` map is
bilinearly upsampled to the mask's ``[H, W]`` pixels; pointing hits when its argmax pixel lies in the mask;
IoU thresholds the map at its top ``k`` pixels, ``k`` = the mask's area (so a map that ranks the object's
pixels first scores 1), and compares that set with the mask.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def upsample_map(amap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``amap [h, w]`` to ``size = (H, W)`` (float32, ``align_corners=False``)."""
    if amap.dim() != 2:
        raise ValueError(f"a map is [h, w]; got shape {tuple(amap.shape)}")
    return F.interpolate(amap[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def _mask(mask) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mask)).bool()
    if m.dim() != 2 or not bool(m.any()):
        raise ValueError(f"a mask is a non-empty boolean [H, W] array; got shape {tuple(m.shape)}, {int(m.sum())} pixels")
    return m


def pointing_hit(amap: torch.Tensor, mask) -> bool:
    """Whether the argmax pixel of the upsampled ``amap`` lies inside ``mask [H, W]`` (first argmax on ties)."""
    m = _mask(mask)
    up = upsample_map(amap, tuple(m.shape))
    return bool(m.flatten()[int(up.flatten().argmax())])


def iou_top_k(amap: torch.Tensor, mask) -> float:
    """IoU of the top-``k`` pixels of the upsampled ``amap`` (``k`` = mask area) with ``mask [H, W]``."""
    m = _mask(mask).flatten()
    up = upsample_map(amap, tuple(_mask(mask).shape)).flatten()
    top = torch.zeros_like(m)
    top[up.topk(int(m.sum())).indices] = True
    return float((top & m).sum()) / float((top | m).sum())


def map_scores(amap: torch.Tensor, mask) -> tuple[bool, float] | None:
    """``(pointing hit, top-k IoU)``, or None when the map is not recorded (any NaN)."""
    if bool(torch.isnan(amap).any()):
        return None
    return pointing_hit(amap, mask), iou_top_k(amap, mask)
