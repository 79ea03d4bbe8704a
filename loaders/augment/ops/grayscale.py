"""RandomGrayscale. ``PARAMS``: ``gray`` ``bool [n]`` (True with probability ``spec.grayscale``)."""
from __future__ import annotations

import torch

from .. import functional as AF
from .flip import coins

NAME = "grayscale"
OP_ID = 4
PARAMS = {"gray": ((), torch.bool)}


def active(spec) -> bool:
    return spec.grayscale > 0


def sample(spec, n: int, g: torch.Generator, **_) -> dict:
    return {"gray": coins(n, spec.grayscale, g)}


def apply(x: torch.Tensor, params, spec, **_) -> torch.Tensor:
    return AF.masked_apply(x, params["gray"], AF.grayscale, inplace=True)
