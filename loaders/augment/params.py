"""Random parameters for a whole batch, drawn on the batch's device.

Every sampler takes ``n`` (samples) and a ``torch.Generator`` and returns tensors with a
leading ``n`` dimension; nothing is drawn per sample in Python. Distributions are those of the
torchvision transform of the same name (tests/test_augment_params.py checks them with
Kolmogorov-Smirnov tests against torchvision's own ``get_params`` and against
:func:`loaders.crop.rrc_params`).

:func:`make_generator` seeds a generator from ``(seed, step, view)`` only, so the same seed and
step give the same views after a restart without saving any RNG state, and every view (and
every sample within it) draws independent parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

__all__ = [
    "mix_seed", "make_generator", "uniform", "bernoulli", "sample_crop_boxes",
    "JitterParams", "sample_jitter", "jitter_ranges",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers (seed, step, view, ...) into one 63-bit seed (splitmix64 chain)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


def make_generator(device, seed: int, step: int, view: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``(seed, step, view)``."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(seed, step, view))
    return g


def uniform(n: int, lo: float, hi: float, g: torch.Generator, device=None) -> torch.Tensor:
    """``float32 [n]`` ~ U(lo, hi)."""
    return torch.rand(n, generator=g, device=device or g.device) * (hi - lo) + lo


def bernoulli(n: int, p, g: torch.Generator, device=None) -> torch.Tensor:
    """``bool [n]``, each True with probability ``p`` (a float or a ``[n]`` tensor)."""
    return torch.rand(n, generator=g, device=device or g.device) < p


def sample_crop_boxes(n: int, height: int, width: int, *, scale: Sequence[float] = (0.08, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3), g: torch.Generator,
                      attempts: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes ``int64 [n, 4]`` rows ``(top, left, h, w)`` for ``n`` images
    of ``height x width``: the torch port of :func:`loaders.crop.rrc_params` (torchvision's
    ``RandomResizedCrop.get_params``), all attempts of all samples drawn at once.

    Up to ``attempts`` tries of area fraction ~ U(scale) and log aspect ~ U(log ratio),
    ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))``; the first try that fits is placed
    uniformly; samples where none fits take the central crop clamped to the ratio range.
    """
    dev = g.device
    area = float(height * width)
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    # float64 here only: [n, 10] numbers, and it keeps round() ties identical to numpy/Python
    target = area * (torch.rand(n, attempts, generator=g, device=dev, dtype=torch.float64)
                     * (scale[1] - scale[0]) + scale[0])
    aspect = torch.exp(torch.rand(n, attempts, generator=g, device=dev, dtype=torch.float64)
                       * (lr[1] - lr[0]) + lr[0])
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)   # round half to even, as Python
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    found = ok.gather(1, first).squeeze(1)
    hh = h.gather(1, first).squeeze(1)
    ww = w.gather(1, first).squeeze(1)
    # fallback: central crop, clamped to the ratio range (same for every failing sample)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    hh = torch.where(found, hh, torch.full_like(hh, fh))
    ww = torch.where(found, ww, torch.full_like(ww, fw))
    u = torch.rand(n, 2, generator=g, device=dev, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (height - hh + 1)).to(torch.int64)
    left = torch.floor(u[:, 1] * (width - ww + 1)).to(torch.int64)
    top = torch.where(found, top, (height - hh) // 2)
    left = torch.where(found, left, (width - ww) // 2)
    return torch.stack([top, left, hh, ww], dim=1)


def jitter_ranges(brightness: float, contrast: float, saturation: float, hue: float
                  ) -> Tuple[Tuple[float, float], ...]:
    """Factor ranges of ``ColorJitter(b, c, s, h)``: ``[max(0, 1-x), 1+x]`` for the first three,
    ``[-h, h]`` for hue (torchvision's definition)."""
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if v < 0:
            raise ValueError(f"color jitter {name} must be >= 0, got {v}")
    if not 0 <= hue <= 0.5:
        raise ValueError(f"color jitter hue must be in [0, 0.5], got {hue}")
    return ((max(0.0, 1 - brightness), 1 + brightness), (max(0.0, 1 - contrast), 1 + contrast),
            (max(0.0, 1 - saturation), 1 + saturation), (-hue, hue))


@dataclass
class JitterParams:
    """Per-sample colour-jitter parameters.

    ``apply``: ``bool [n]`` (RandomApply's coin); ``order``: ``int64 [n, 4]`` a random
    permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue) per sample, like
    ``ColorJitter``'s ``randperm(4)``; ``factors``: ``float32 [n, 4]`` (brightness, contrast,
    saturation factors and the hue shift).
    """

    apply: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor


def sample_jitter(n: int, *, brightness: float, contrast: float, saturation: float, hue: float,
                  p: float, g: torch.Generator) -> JitterParams:
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` for ``n`` samples."""
    dev = g.device
    ranges = jitter_ranges(brightness, contrast, saturation, hue)
    apply = bernoulli(n, p, g)
    # argsort of i.i.d. uniforms is a uniformly random permutation per row
    order = torch.argsort(torch.rand(n, 4, generator=g, device=dev), dim=1)
    u = torch.rand(n, 4, generator=g, device=dev)
    lo = torch.tensor([r[0] for r in ranges], device=dev)
    hi = torch.tensor([r[1] for r in ranges], device=dev)
    return JitterParams(apply=apply, order=order, factors=lo + u * (hi - lo))
