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
    """``int64 [n, 4]`` boxes for images of ``heights[n]`` x ``widths[n]`` (int64), from ``g``."""
    dev = g.device
    H = torch.as_tensor(heights, dtype=torch.int64).reshape(-1).to(dev)
    W = torch.as_tensor(widths, dtype=torch.int64).reshape(-1).to(dev)
    if H.shape != W.shape:
        raise ValueError(f"crop sizes: heights {tuple(H.shape)} and widths {tuple(W.shape)} differ")
    n, f64 = H.shape[0], torch.float64
    area = (H * W).to(f64).unsqueeze(1)
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * (torch.rand(n, attempts, generator=g, device=dev, dtype=f64) * (scale[1] - scale[0]) + scale[0])
    aspect = torch.exp(torch.rand(n, attempts, generator=g, device=dev, dtype=f64) * (lr[1] - lr[0]) + lr[0])
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (w > 0) & (h > 0) & (w <= W.unsqueeze(1)) & (h <= H.unsqueeze(1))
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    found = ok.gather(1, first).squeeze(1)
    hh, ww = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    fh, fw = _fallback(H, W, ratio)
    hh, ww = torch.where(found, hh, fh), torch.where(found, ww, fw)
    u = torch.rand(n, 2, generator=g, device=dev, dtype=f64)
    top = torch.floor(u[:, 0] * (H - hh + 1)).to(torch.int64)
    left = torch.floor(u[:, 1] * (W - ww + 1)).to(torch.int64)
    top = torch.where(found, top, (H - hh) // 2)
    left = torch.where(found, left, (W - ww) // 2)
    return torch.stack([top, left, hh, ww], dim=1)


def _fallback(H: torch.Tensor, W: torch.Tensor, ratio: Sequence[float]):
    """Central-crop size per sample (torchvision's fallback): the whole image clamped to the ratio range."""
    in_ratio = W.to(torch.float64) / H.to(torch.float64)
    lo, hi = min(ratio), max(ratio)
    fh = torch.where(in_ratio < lo, torch.round(W.to(torch.float64) / lo).to(torch.int64), H)
    fw = torch.where(in_ratio > hi, torch.round(H.to(torch.float64) * hi).to(torch.int64), W)
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
