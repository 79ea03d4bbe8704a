"""RandomSolarize(threshold 128 of 255). ``PARAMS``: ``solarize`` ``bool [n]`` (probability ``spec.solarize``)."""
from __future__ import annotations

import torch

from .. import functional as AF
from .flip import coins

NAME = "solarize"
OP_ID = 6
PARAMS = {"solarize": ((), torch.bool)}
THRESHOLD = 128.0 / 255.0


def active(spec) -> bool:
    return spec.solarize > 0


def sample(spec, n: int, g: torch.Generator, **_) -> dict:
    return {"solarize": coins(n, spec.solarize, g)}


def apply(x: torch.Tensor, params, spec, **_) -> torch.Tensor:
    return AF.solarize(x, THRESHOLD, params["solarize"])
