"""Random horizontal flip. ``PARAMS``: ``flip`` ``bool [n]`` (True with probability ``spec.flip``)."""
from __future__ import annotations

import torch

from .. import functional as AF

NAME = "flip"
OP_ID = 2
PARAMS = {"flip": ((), torch.bool)}


def active(spec) -> bool:
    return spec.flip > 0


def coins(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    """``bool [n]``, each True with probability ``p`` (one uniform per sample, always drawn)."""
    return torch.rand(n, generator=g, device=g.device) < p


def sample(spec, n: int, g: torch.Generator, **_) -> dict:
    return {"flip": coins(n, spec.flip, g)}


def apply(x: torch.Tensor, params, spec, **_) -> torch.Tensor:
    # masked_apply: on CPU only the chosen samples are touched; on CUDA a sync-free where
    return AF.masked_apply(x, params["flip"], lambda t: t.flip(-1), inplace=True)
