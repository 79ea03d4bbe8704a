"""The one batch layout every backend yields.

``Batch.views`` is a list of ``V`` tensors, each ``[B, 3, H, W]``. Backends emit ``uint8``
(values 0..255, RGB); the augmentation engine turns them into normalised ``float32`` on the
device. ``index`` is the sample's global id in the mixture (``Mixture.offsets[source] +
sample index within its source``), ``source`` says which source it came from and ``label``
is its class (``-1`` when unknown, e.g. generated images). All three are ``int64 [B]``.

``stage`` says what was already done to the views, so nothing is done twice:

- ``"raw"``: whole decoded images, uint8 (each view may be the same image).
- ``"cropped"``: uint8, one crop per output view at that view's size.
- ``"augmented-uint8"``: the recipe applied and rounded to uint8, not normalised
  (``loaders.cpu_augment.WorkerAugment.finish`` normalises it); in a view with pending ops
  (``WorkerAugment.pending_ops(view)``, static per recipe: ops the workers' OpenCV executor
  lacks) only the ops before those, which ``finish`` applies with the batch ``key``.
- ``"augmented"``: float32, augmented and normalised: final. The device engine refuses it.

``key`` is the batch's seed key (``loaders.augment.sampler.batch_key(seed, rank, first_item)``,
``first_item`` = position of the batch's first sample in this rank's stream) or None when the
backend did not set one; every place that augments draws its parameters from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch

__all__ = ["Batch", "STAGES", "AUGMENTED_STAGES"]

#: every value of ``Batch.stage``, in the order a batch goes through them
STAGES = ("raw", "cropped", "augmented-uint8", "augmented")
#: stages the device augmentation must not see again
AUGMENTED_STAGES = ("augmented-uint8", "augmented")


@dataclass
class Batch:
    views: List[torch.Tensor]
    index: torch.Tensor
    source: torch.Tensor
    label: torch.Tensor
    #: plan samples that failed under ``on_error: skip`` and were replaced by later ones while this
    #: batch was filled (counted in the loader's ``skipped``; never returned)
    skipped: int = 0
    meta: dict = field(default_factory=dict)
    #: what was already done to the views (one of ``STAGES``)
    stage: str = "raw"
    #: the batch's seed key (see the module docstring); None when the backend set none
    key: Optional[int] = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"Batch.stage {self.stage!r}; expected one of {', '.join(STAGES)}")
        if not isinstance(self.views, (list, tuple)) or not self.views:
            raise ValueError("Batch.views must be a non-empty list of [B,3,H,W] tensors")
        self.views = list(self.views)
        n = self.index.shape[0]
        for name in ("source", "label"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"Batch.{name} has {getattr(self, name).shape[0]} rows, index has {n}")
        for v in self.views:
            if v.dim() != 4 or v.shape[0] != n or v.shape[1] != 3:
                raise ValueError(f"Batch view of shape {tuple(v.shape)}; expected [{n},3,H,W]")

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def device(self) -> torch.device:
        return self.views[0].device

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """Move every tensor to ``device`` (uint8 travels; floats are made there)."""
        return replace(
            self,
            views=[v.to(device, non_blocking=non_blocking) for v in self.views],
            index=self.index.to(device, non_blocking=non_blocking),
            source=self.source.to(device, non_blocking=non_blocking),
            label=self.label.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "Batch":
        return replace(
            self,
            views=[v.pin_memory() for v in self.views],
            index=self.index.pin_memory(),
            source=self.source.pin_memory(),
            label=self.label.pin_memory(),
        )

    def with_views(self, views: List[torch.Tensor], stage: Optional[str] = None) -> "Batch":
        """The same batch with new views (and, when given, the stage those views are at)."""
        return replace(self, views=list(views), stage=self.stage if stage is None else stage)

    @property
    def augmented(self) -> bool:
        """True when the recipe was already applied (uint8 or final float views)."""
        return self.stage in AUGMENTED_STAGES
