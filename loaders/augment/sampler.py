"""THE sampler: every augmentation parameter of a batch, drawn once from the batch key.

* :func:`batch_key` ``(seed, rank, first_item) -> int``: the one per-batch key, the hash of the
  loader seed, the rank and the rank-stream item of the batch's first sample (what the torch
  backend hands its ``worker_augment`` hook; :class:`~loaders.batch.Batch` ``.key`` carries it).
* :func:`draw_view` ``(spec, n, *, key, view, ...) -> ViewParams`` and :func:`draw`
  ``(augment, n, *, key, ...) -> [ViewParams per output view]``.

Every op of view ``v`` draws from its OWN CPU ``torch.Generator`` seeded with
``mix(seed, key, v, op.OP_ID)`` (:func:`loaders.hashing.mix`; ``seed`` the augmentation seed).
So an op's draw does not depend on which other ops are drawn, nor in what order: crop boxes can
be drawn in a loader worker (which knows the image sizes) and the colour parameters later on the
device, from the same key, and they match by construction. Draws are always on the CPU (a few
hundred numbers per batch), so every place gets bit-identical parameters;
:meth:`ViewParams.to` moves them to the batch's device (pinned + ``non_blocking`` on CUDA: no
host sync).

:class:`ViewParams` fields (``n`` samples)::

    box             int64   [n, 4]  (top, left, h, w) in input pixels; None: input already cropped
    flip            bool    [n]
    jitter_apply    bool    [n]
    jitter_order    int64   [n, 4]  0 brightness 1 contrast 2 saturation 3 hue
    jitter_factors  float32 [n, 4]  (brightness, contrast, saturation factors, hue shift in turns)
    gray            bool    [n]
    blur            bool    [n]
    sigma           float32 [n]     px
    solarize        bool    [n]
    randaugment     RandAugmentDraw (the uniforms; the executor adds the per-sample strength) or None

An op a view does not use (probability 0) is still drawn (cheap, and the parameters then exist for
every executor); its executor skips it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, List, Optional

import numpy as np
import torch

from ..hashing import MASK64, mix
from . import ops as O

__all__ = ["ViewParams", "batch_key", "op_generator", "draw_view", "draw", "draw_boxes", "draw_flips"]


def batch_key(seed: int, rank: int, first_item: int) -> int:
    """The per-batch key of the batch starting at rank-stream item ``first_item`` of ``rank``
    (``seed``: the loader's seed, taken mod 2^64)."""
    return mix(int(seed) & MASK64, int(rank), int(first_item))


def op_generator(seed: int, key: int, view: int, op_id: int) -> torch.Generator:
    """The CPU generator of op ``op_id`` of view ``view`` for the batch with ``key``."""
    g = torch.Generator()
    g.manual_seed(mix(seed, key, view, op_id))
    return g


@dataclass
class ViewParams:
    """The drawn parameters of one view of one batch (fields: module docstring)."""

    box: Optional[torch.Tensor] = None
    flip: Optional[torch.Tensor] = None
    jitter_apply: Optional[torch.Tensor] = None
    jitter_order: Optional[torch.Tensor] = None
    jitter_factors: Optional[torch.Tensor] = None
    gray: Optional[torch.Tensor] = None
    blur: Optional[torch.Tensor] = None
    sigma: Optional[torch.Tensor] = None
    solarize: Optional[torch.Tensor] = None
    randaugment: Optional[object] = None

    def __getitem__(self, name: str):
        return getattr(self, name)

    def keys(self) -> List[str]:
        return [f.name for f in dataclasses.fields(self)]

    def to(self, device) -> "ViewParams":
        """A copy on ``device`` (CUDA: pinned host copies sent ``non_blocking``, no host sync)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        return ViewParams(**{k: _to(getattr(self, k), device) for k in self.keys()})

    def numpy(self) -> dict:
        """``{field: numpy array}`` of the tensor fields that were drawn (for OpenCV/DALI executors)."""
        return {k: v.cpu().numpy() for k in self.keys() if isinstance(v := getattr(self, k), torch.Tensor)}


def _to(v, device):
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if device.type == "cuda" and v.device.type == "cpu":
            v = v.pin_memory()
        return v.to(device, non_blocking=True)
    if dataclasses.is_dataclass(v):
        return dataclasses.replace(v, **{f.name: _to(getattr(v, f.name), device) for f in dataclasses.fields(v)})
    return v


def draw_view(spec, n: int, *, key: int, view: int, seed: int = 0, sizes=None,
              ops: Optional[Iterable[str]] = None) -> ViewParams:
    """The parameters of view ``view`` (a :class:`~loaders.augment.ViewSpec`, or anything with the
    attributes the drawn ops read) for ``n`` samples of the batch with ``key``.

    ``seed``: the augmentation seed; ``sizes``: ``int64 [n, 2]`` (H, W) of the input images for
    the crop op (None: no boxes, the input is already cropped); ``ops``: names of the ops to draw
    (default: all). Each op's draw depends only on ``(seed, key, view, op)`` and its own inputs.
    """
    out = {}
    for name in (O.BY_NAME if ops is None else ops):
        op = O.BY_NAME[name]
        if not op.PARAMS:
            continue
        if name == "randaugment" and not op.active(spec):
            continue
        if name == "crop" and sizes is None:
            continue
        g = op_generator(seed, key, view, op.OP_ID)
        out.update(op.sample(spec, n, g, sizes=sizes))
    return ViewParams(**out)


def draw(augment, n: int, *, key: int, sizes=None, ops: Optional[Iterable[str]] = None) -> List[ViewParams]:
    """One :class:`ViewParams` per output view of ``augment`` (its ``specs`` and ``seed``)."""
    return [draw_view(spec, n, key=key, view=v, seed=augment.seed, sizes=sizes, ops=ops)
            for v, spec in enumerate(augment.specs)]


def draw_boxes(crops, sizes, *, key: int, seed: int = 0) -> List[np.ndarray]:
    """Crop boxes ``int64 [n, 4]`` (numpy), one array per crop spec (``CropSpec`` or ``ViewSpec``:
    ``size``, ``scale``, ``ratio``; a ``CropSpec``'s own ``seed`` wins over ``seed``) for images of
    ``sizes`` ``[n, 2]`` (H, W): what a backend that crops while decoding uses; equal to the
    engine's boxes for the same key and seed."""
    sizes = torch.as_tensor(np.asarray(sizes, dtype=np.int64).reshape(-1, 2))
    n = sizes.shape[0]
    return [draw_view(c, n, key=key, view=v, seed=getattr(c, "seed", seed), sizes=sizes, ops=("crop",)).box.numpy()
            for v, c in enumerate(crops)]


def draw_flips(n: int, views: int, *, key: int, seed: int = 0, p: float = 0.5) -> np.ndarray:
    """``bool [n, views]`` flip coins of the flip op (what a backend's ``flip=True`` applies)."""
    return np.stack([O.flip.coins(n, p, op_generator(seed, key, v, O.flip.OP_ID)).numpy() for v in range(views)],
                    axis=1)
