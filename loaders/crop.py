"""What a backend that crops while decoding needs to know about a view: :class:`CropSpec`.

Boxes are drawn by the one random-resized-crop sampler
(:func:`loaders.augment.ops.crop.rrc_boxes`, torchvision's ``RandomResizedCrop.get_params``
distribution, every image with its own size), through the sampler with the batch key
(:func:`loaders.augment.sampler.draw_boxes`), so the boxes a loader worker draws are the ones
the device engine would draw for the same key. :func:`rrc_params` is the same sampler fed by a
``numpy`` Generator (for callers that hold one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

__all__ = ["CropSpec", "rrc_params"]


@dataclass(frozen=True)
class CropSpec:
    """One output view's random-resized-crop: output ``size`` (square), area ``scale`` range,
    aspect ``ratio`` range, resampling (``bilinear``, ``bicubic`` or ``nearest``), and ``seed``:
    the augmentation seed the boxes are drawn with (``Augment.crop_specs`` sets the engine's, so
    crops made while decoding equal the engine's crops for the same batch key)."""

    size: int
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    seed: int = 0

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"crop size must be positive, got {self.size}")
        if not (0 < self.scale[0] <= self.scale[1]):
            raise ValueError(f"crop scale must satisfy 0 < min <= max, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"crop interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}")


def rrc_params(rng: np.random.Generator, heights, widths,
               scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Crop boxes ``int64 [n, 4]`` rows ``(top, left, h, w)`` for ``n`` images of sizes
    ``heights[n]``, ``widths[n]``: :func:`loaders.augment.ops.crop.rrc_boxes` on a torch
    generator seeded from ``rng`` (one draw of ``rng``)."""
    import torch

    from .augment.ops.crop import rrc_boxes
    g = torch.Generator()
    g.manual_seed(int(rng.integers(0, 2**63 - 1)))
    H = torch.as_tensor(np.asarray(heights, dtype=np.int64).reshape(-1))
    W = torch.as_tensor(np.asarray(widths, dtype=np.int64).reshape(-1))
    return rrc_boxes(H, W, scale=scale, ratio=ratio, g=g).numpy()
