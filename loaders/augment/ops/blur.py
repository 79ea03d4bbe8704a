"""``RandomApply([GaussianBlur(k, sigma)], p=blur_p)``; the one blur-kernel rule.

``PARAMS``: ``blur`` ``bool [n]`` (RandomApply's coin), ``sigma`` ``float32 [n]`` ~
U(``spec.blur_sigma``) px. Kernel size: :func:`kernel_size` of the view size unless the view
fixes ``blur_kernel``; taps: :func:`taps` (the engine's normalised Gaussian, optionally cut to
``ceil(tail * sigma)`` for the per-image OpenCV executor). The DALI graph and the OpenCV worker
path take their kernel sizes and taps from here.
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from .. import functional as AF
from .flip import coins

NAME = "blur"
OP_ID = 5
PARAMS = {"blur": ((), torch.bool), "sigma": ((), torch.float32)}


def active(spec) -> bool:
    return spec.blur_p > 0


def kernel_size(image_size: int, fixed: Optional[int] = None) -> int:
    """Gaussian-blur kernel for a view of ``image_size`` px: ``fixed`` when given, else 23 at 224
    (SimCLR's 10% rule) with the half-width scaled linearly to the view (5 at 32, 11 at 96), odd, >= 3."""
    if fixed:
        return int(fixed)
    return max(3, 2 * int(round(image_size * 11.0 / 224.0)) + 1)


def taps(sigma: torch.Tensor, size: int, tail: Optional[float] = None, renormalize: bool = False
         ) -> List[np.ndarray]:
    """Per-sample ``float32`` 1-D taps: the engine's normalised Gaussian of ``size`` taps
    (:func:`~loaders.augment.functional.gaussian_kernel1d`), cut to the central
    ``2 * min(size // 2, ceil(tail * sigma)) + 1`` when ``tail`` is given (at 4 sigma the dropped
    taps weigh < 1e-4), rescaled to sum to 1 with ``renormalize``."""
    k = AF.gaussian_kernel1d(sigma.cpu(), size).numpy()
    half = size // 2
    out = []
    for row, s in zip(k, sigma.tolist()):
        r = half if tail is None else min(half, int(math.ceil(tail * s)))
        t = row[half - r:half + r + 1].astype(np.float64)
        out.append(np.ascontiguousarray(t / t.sum() if renormalize else t, dtype=np.float32))
    return out


def sample(spec, n: int, g: torch.Generator, **_) -> dict:
    on = coins(n, spec.blur_p, g)
    lo, hi = spec.blur_sigma
    return {"blur": on, "sigma": torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo}


def apply(x: torch.Tensor, params, spec, **_) -> torch.Tensor:
    k = kernel_size(spec.size, spec.blur_kernel)
    return AF.masked_apply(x, params["blur"], lambda t, s: AF.gaussian_blur(t, s, k), params["sigma"],
                           inplace=True)
