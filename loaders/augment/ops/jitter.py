"""``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p)``.

``PARAMS``: ``jitter_apply`` ``bool [n]`` (RandomApply's coin), ``jitter_order`` ``int64 [n, 4]``
(a random permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue per sample, as
ColorJitter's ``randperm(4)``), ``jitter_factors`` ``float32 [n, 4]`` (brightness, contrast,
saturation factors and the hue shift in turns), from torchvision's ranges (:func:`ranges`).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import functional as AF

NAME = "jitter"
OP_ID = 3
PARAMS = {"jitter_apply": ((), torch.bool), "jitter_order": ((4,), torch.int64),
          "jitter_factors": ((4,), torch.float32)}
#: the four ops in ``jitter_order``'s numbering
FUNCS = (AF.adjust_brightness, AF.adjust_contrast, AF.adjust_saturation, AF.adjust_hue)


def active(spec) -> bool:
    return spec.jitter_p > 0


def ranges(brightness: float, contrast: float, saturation: float, hue: float) -> Tuple[Tuple[float, float], ...]:
    """Factor ranges of ``ColorJitter(b, c, s, h)``: ``[max(0, 1-x), 1+x]`` for the first three,
    ``[-h, h]`` for hue (torchvision's definition); raises ``ValueError`` for invalid strengths."""
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if v < 0:
            raise ValueError(f"color jitter {name} must be >= 0, got {v}")
    if not 0 <= hue <= 0.5:
        raise ValueError(f"color jitter hue must be in [0, 0.5], got {hue}")
    return ((max(0.0, 1 - brightness), 1 + brightness), (max(0.0, 1 - contrast), 1 + contrast),
            (max(0.0, 1 - saturation), 1 + saturation), (-hue, hue))


def strengths(spec) -> Tuple[float, float, float, float]:
    return (spec.brightness, spec.contrast, spec.saturation, spec.hue)


def sample(spec, n: int, g: torch.Generator, **_) -> dict:
    r = ranges(*strengths(spec))
    apply_ = torch.rand(n, generator=g, device=g.device) < spec.jitter_p
    # argsort of i.i.d. uniforms is a uniformly random permutation per row
    order = torch.argsort(torch.rand(n, 4, generator=g, device=g.device), dim=1)
    u = torch.rand(n, 4, generator=g, device=g.device)
    lo = torch.tensor([a for a, _ in r], device=g.device)
    hi = torch.tensor([b for _, b in r], device=g.device)
    return {"jitter_apply": apply_, "jitter_order": order, "jitter_factors": lo + u * (hi - lo)}


def apply(x: torch.Tensor, params, spec, **_) -> torch.Tensor:
    """Position by position: each sample runs op ``order[i, pos]`` there; each op touches only the
    samples that have it at this position (masked_apply), so the four positions together cost
    about one pass of each op. Ops of strength 0 are skipped, as in torchvision."""
    on, order, factors = params["jitter_apply"], params["jitter_order"], params["jitter_factors"]
    for pos in range(4):
        which = order[:, pos]
        for k, (s, fn) in enumerate(zip(strengths(spec), FUNCS)):
            if s != 0:
                x = AF.masked_apply(x, on & (which == k), fn, factors[:, k], inplace=True)
    return x
