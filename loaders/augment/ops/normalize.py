"""Normalisation ``(x - mean) / std`` per channel (``[0, 1]`` scale). No random parameters."""
from __future__ import annotations

import torch

from .. import functional as AF

NAME = "normalize"
OP_ID = 8
PARAMS: dict = {}


def active(spec) -> bool:
    return True


def sample(spec, n: int, g: torch.Generator, **_) -> dict:
    return {}


def apply(x: torch.Tensor, params, spec, *, mean, std, **_) -> torch.Tensor:
    return AF.normalize(x, mean, std)
