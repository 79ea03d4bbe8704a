"""Random-number helpers for a whole batch (thin users of the ops' samplers).

The augmentation parameters of a batch are drawn by :mod:`loaders.augment.sampler` (one CPU
generator per op, keyed by ``(seed, key, view, op)``); this module keeps the generic helpers
other code uses: :func:`make_generator` (a ``torch.Generator`` on any device seeded from
``(seed, step, view)`` by the one hash, :func:`loaders.hashing.mix`), :func:`uniform`,
:func:`bernoulli`, and the op samplers called with an explicit generator
(:func:`sample_crop_boxes`: :func:`loaders.augment.ops.crop.rrc_boxes` for ``n`` images of one
size; :func:`sample_jitter`). Every sampler returns tensors with a leading ``n`` dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..hashing import mix
from .ops import crop as _crop
from .ops import jitter as _jitter

__all__ = [
    "mix_seed", "make_generator", "uniform", "bernoulli", "sample_crop_boxes",
    "JitterParams", "sample_jitter", "jitter_ranges",
]

#: hash integers (seed, step, view, ...) into one 63-bit seed: :func:`loaders.hashing.mix`
mix_seed = mix
#: factor ranges of ColorJitter: :func:`loaders.augment.ops.jitter.ranges`
jitter_ranges = _jitter.ranges


def make_generator(device, seed: int, step: int, view: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from ``(seed, step, view)``."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(mix(seed, step, view))
    return g


def uniform(n: int, lo: float, hi: float, g: torch.Generator, device=None) -> torch.Tensor:
    """``float32 [n]`` ~ U(lo, hi)."""
    return torch.rand(n, generator=g, device=device or g.device) * (hi - lo) + lo


def bernoulli(n: int, p, g: torch.Generator, device=None) -> torch.Tensor:
    """``bool [n]``, each True with probability ``p`` (a float or a ``[n]`` tensor)."""
    return torch.rand(n, generator=g, device=device or g.device) < p


def sample_crop_boxes(n: int, height: int, width: int, *, scale: Sequence[float] = (0.08, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3), g: torch.Generator) -> torch.Tensor:
    """Random-resized-crop boxes ``int64 [n, 4]`` (top, left, h, w) for ``n`` images of
    ``height x width`` from ``g``: :func:`loaders.augment.ops.crop.rrc_boxes`."""
    full = torch.full((n,), 0, dtype=torch.int64)
    return _crop.rrc_boxes(full + height, full + width, scale=scale, ratio=ratio, g=g)


@dataclass
class JitterParams:
    """Per-sample colour-jitter parameters (see :mod:`loaders.augment.ops.jitter`):
    ``apply`` ``bool [n]``, ``order`` ``int64 [n, 4]``, ``factors`` ``float32 [n, 4]``."""

    apply: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor


class _JitterSpec:
    def __init__(self, brightness, contrast, saturation, hue, p):
        self.brightness, self.contrast, self.saturation, self.hue, self.jitter_p = (brightness, contrast,
                                                                                    saturation, hue, p)


def sample_jitter(n: int, *, brightness: float, contrast: float, saturation: float, hue: float,
                  p: float, g: torch.Generator) -> JitterParams:
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` for ``n`` samples."""
    d = _jitter.sample(_JitterSpec(brightness, contrast, saturation, hue, p), n, g)
    return JitterParams(apply=d["jitter_apply"], order=d["jitter_order"], factors=d["jitter_factors"])
