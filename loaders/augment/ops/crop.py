"""Random-resized-crop: the one sampler of crop boxes (torchvision's distribution).

``PARAMS``: ``box`` ``int64 [n, 4]`` rows ``(top, left, h, w)`` in input pixels.

:func:`rrc_boxes` is torchvision's ``RandomResizedCrop.get_params`` for ``n`` images with their
own sizes at once: up to 10 attempts of area fraction ~ U(scale) and log aspect ~ U(log ratio),
``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))`` (round half to even, as Python's
``round``); the first attempt that fits is placed uniformly, images where none fits take the
central crop clamped to the ratio range. Every attempt of every sample is drawn in one call
(float64: ``[n, 10]`` numbers), so there is no per-sample Python. Every place that crops (torch
workers, FFCV, resident, DALI, the device engine) draws its boxes here, through the sampler.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .. import functional as AF

NAME = "crop"
OP_ID = 1
PARAMS = {"box": ((4,), torch.int64)}
ATTEMPTS = 10


def active(spec) -> bool:
    return True


def rrc_boxes(heights: torch.Tensor, widths: torch.Tensor, *, scale: Sequence[float], ratio: Sequence[float],
              g: torch.Generator, attempts: int = ATTEMPTS) -> torch.Tensor:
    """``int64 [n, 4]`` boxes for images of ``heights[n]`` x ``widths[n]`` (int64), from ``g``.

    The three uniform draws come from ``g`` (torch, float64: ``[n, attempts]`` area fractions,
    ``[n, attempts]`` log aspects, ``[n, 2]`` placements); the arithmetic on them runs in NumPy
    on the CPU, attempt by attempt for the samples still without a box (most fit at the first):
    ~1.5x less CPU time than whole ``[n, attempts]`` torch ops (359 vs 524 us for 256 samples
    here), which loaders pay per batch while holding the GIL. A generator on another device
    draws there and the box comes back on it."""
    H = np.asarray(torch.as_tensor(heights, dtype=torch.int64).cpu(), dtype=np.int64).reshape(-1)
    W = np.asarray(torch.as_tensor(widths, dtype=torch.int64).cpu(), dtype=np.int64).reshape(-1)
    if H.shape != W.shape:
        raise ValueError(f"crop sizes: heights {tuple(H.shape)} and widths {tuple(W.shape)} differ")
    n, dev = H.shape[0], g.device
    r_area = torch.rand(n, attempts, generator=g, device=dev, dtype=torch.float64).cpu().numpy()
    r_aspect = torch.rand(n, attempts, generator=g, device=dev, dtype=torch.float64).cpu().numpy()
    u = torch.rand(n, 2, generator=g, device=dev, dtype=torch.float64).cpu().numpy()
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    area = (H * W).astype(np.float64)
    hh, ww = np.zeros(n, np.int64), np.zeros(n, np.int64)
    todo = np.arange(n)
    for a in range(attempts):  # attempt a for the samples still without a box (most fit at the first)
        if todo.size == 0:
            break
        target = area[todo] * (r_area[todo, a] * (scale[1] - scale[0]) + scale[0])
        aspect = np.exp(r_aspect[todo, a] * (lr[1] - lr[0]) + lr[0])
        w = np.rint(np.sqrt(target * aspect)).astype(np.int64)   # rint: round half to even
        h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        ok = (w > 0) & (h > 0) & (w <= W[todo]) & (h <= H[todo])
        hit = todo[ok]
        hh[hit], ww[hit] = h[ok], w[ok]
        todo = todo[~ok]
    if todo.size:  # no attempt fitted: torchvision's central crop
        hh[todo], ww[todo] = _fallback(H[todo], W[todo], ratio)
    top = np.floor(u[:, 0] * (H - hh + 1)).astype(np.int64)
    left = np.floor(u[:, 1] * (W - ww + 1)).astype(np.int64)
    top[todo], left[todo] = (H[todo] - hh[todo]) // 2, (W[todo] - ww[todo]) // 2
    return torch.from_numpy(np.stack([top, left, hh, ww], axis=1)).to(dev)


def _fallback(H: np.ndarray, W: np.ndarray, ratio: Sequence[float]):
    """Central-crop size per sample (torchvision's fallback): the whole image clamped to the ratio range."""
    in_ratio = W / H
    lo, hi = min(ratio), max(ratio)
    fh = np.where(in_ratio < lo, np.rint(W / lo).astype(np.int64), H)
    fw = np.where(in_ratio > hi, np.rint(H * hi).astype(np.int64), W)
    return fh, fw


def sample(spec, n: int, g: torch.Generator, *, sizes=None, **_) -> dict:
    """``{"box": int64 [n, 4]}`` for images of ``sizes`` ``int64 [n, 2]`` (H, W); ``sizes=None``:
    no box (the input is already cropped)."""
    if sizes is None:
        return {"box": None}
    sizes = torch.as_tensor(sizes, dtype=torch.int64).reshape(-1, 2)
    if sizes.shape[0] != n:
        raise ValueError(f"crop sizes has {sizes.shape[0]} rows for {n} samples")
    return {"box": rrc_boxes(sizes[:, 0], sizes[:, 1], scale=spec.scale, ratio=spec.ratio, g=g)}


def apply(img: torch.Tensor, params, spec, **_) -> torch.Tensor:
    """``uint8 [B,3,H,W]`` -> ``float32 [B,3,size,size]`` in ``[0, 1]``: crop ``params["box"]`` and
    resize (no box: resize the whole image, or just convert when it already has the size)."""
    B, _, H, W = img.shape
    box = params["box"]
    if box is None:
        if H == spec.size and W == spec.size:
            return AF.to_float(img)
        box = torch.tensor([[0, 0, H, W]], device=img.device).expand(B, 4)
    return AF.resized_crop(img, box, spec.size, mode=spec.interpolation, antialias=getattr(spec, "antialias", True))
