"""Batched per-sample augmentation on the batch's device (CUDA in production, CPU in tests).

``Augment.from_preset("symmetric")(batch, step=s)`` turns a ``Batch`` of uint8 views into
normalised float32 views with independent random parameters per sample and per view, seeded
from ``(seed, step, view)``. Ops live in :mod:`.functional` (explicit parameters), samplers in
:mod:`.params`, RandAugment in :mod:`.randaugment`, the engine and presets in :mod:`.pipeline`.
"""
from .pipeline import (
                       JITTER_BASE,
                       PRESET_DIR,
                       Augment,
                       ViewSpec,
                       apply_overrides,
                       list_presets,
                       load_grid,
                       load_preset_config,
)
from .randaugment import OPS as RANDAUGMENT_OPS
from .randaugment import RandAugmentSpec

__all__ = ["Augment", "ViewSpec", "RandAugmentSpec", "RANDAUGMENT_OPS", "PRESET_DIR", "JITTER_BASE",
           "list_presets", "load_preset_config", "load_grid", "apply_overrides"]
