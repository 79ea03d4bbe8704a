"""Random-resized-crop parameters, sampled for a whole batch at once.

The distribution is torchvision's ``RandomResizedCrop.get_params``: up to 10 attempts of
(area fraction ~ U(scale), log aspect ratio ~ U(log ratio)), ``w = round(sqrt(A*r))``,
``h = round(sqrt(A/r))``, the first attempt that fits is placed uniformly; otherwise a central
crop clamped to the ratio range. Here all attempts for all samples are drawn as arrays, so
there is no per-sample Python. Used by backends that crop while decoding and by the device
augmentation engine, so both draw crops from one definition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

__all__ = ["CropSpec", "rrc_params"]

_ATTEMPTS = 10


@dataclass(frozen=True)
class CropSpec:
    """One output view's random-resized-crop: output ``size`` (square), area ``scale`` range,
    aspect ``ratio`` range and resampling (``bilinear`` or ``bicubic``)."""

    size: int
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"

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
    """Crop boxes for ``n`` images of sizes ``heights[n]``, ``widths[n]``.

    Returns ``int64 [n, 4]`` rows ``(top, left, h, w)``, distributed as torchvision's
    ``RandomResizedCrop.get_params`` on each image.
    """
    H = np.asarray(heights, dtype=np.int64).reshape(-1)
    W = np.asarray(widths, dtype=np.int64).reshape(-1)
    if H.shape != W.shape:
        raise ValueError(f"heights {H.shape} and widths {W.shape} differ")
    n = H.shape[0]
    area = (H * W).astype(np.float64)[:, None]
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * rng.uniform(scale[0], scale[1], size=(n, _ATTEMPTS))
    aspect = np.exp(rng.uniform(log_r[0], log_r[1], size=(n, _ATTEMPTS)))
    # round half to even, as Python's round() in torchvision
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(n), first]
    hh = h[np.arange(n), first]
    ww = w[np.arange(n), first]
    u = rng.random((n, 2))
    top = np.floor(u[:, 0] * (H - hh + 1)).astype(np.int64)
    left = np.floor(u[:, 1] * (W - ww + 1)).astype(np.int64)
    if not found.all():
        nf = ~found
        in_ratio = W[nf] / H[nf]
        fw = W[nf].copy()
        fh = H[nf].copy()
        lo = in_ratio < min(ratio)
        hi = in_ratio > max(ratio)
        fw[lo] = W[nf][lo]
        fh[lo] = np.rint(fw[lo] / min(ratio)).astype(np.int64)
        fh[hi] = H[nf][hi]
        fw[hi] = np.rint(fh[hi] * max(ratio)).astype(np.int64)
        hh[nf], ww[nf] = fh, fw
        top[nf] = (H[nf] - fh) // 2
        left[nf] = (W[nf] - fw) // 2
    return np.stack([top, left, hh, ww], axis=1)
