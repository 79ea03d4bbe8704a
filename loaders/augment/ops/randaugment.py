"""RandAugment with per-sample magnitude and probability (wraps :mod:`loaders.augment.randaugment`).

``PARAMS``: ``randaugment``: a :class:`~loaders.augment.randaugment.RandAugmentDraw` (the
strength-independent uniforms: ``op`` int64 [n, k], ``u_fire`` float32 [n, k], ``u_mag`` float32
[n], ``sign`` float32 [n, k], ``centre`` float32 [n, k, 2], ``k_i`` int64 [n, 1] or None), drawn
on the CPU like every parameter; the torch executor combines it with the per-sample ``strength``
``float32 [n]`` (BCL) on the strength's device (no host sync), or the spec's fixed magnitude.
"""
from __future__ import annotations

import torch

from ..randaugment import apply_randaugment, draw_randaugment, finish_randaugment

NAME = "randaugment"
OP_ID = 7
PARAMS = {"randaugment": ((), object)}


def active(spec) -> bool:
    return spec.randaugment is not None


def sample(spec, n: int, g: torch.Generator, **_) -> dict:
    return {"randaugment": draw_randaugment(n, spec.randaugment, g)}


def apply(x: torch.Tensor, params, spec, *, strength=None, **_) -> torch.Tensor:
    d = params["randaugment"]
    if d is None:
        return x
    if strength is not None:
        strength = torch.as_tensor(strength, dtype=torch.float32).to(x.device, non_blocking=True)
    ra = finish_randaugment(d, spec.randaugment, strength=strength)
    return x if ra is None else apply_randaugment(x, spec.randaugment, ra)
