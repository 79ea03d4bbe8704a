"""Batched per-sample augmentation on the batch's device (CUDA in production, CPU in tests).

``Augment.from_preset("symmetric")(batch, key=k)`` turns a ``Batch`` of uint8 views into
normalised float32 views with independent random parameters per sample and per view, drawn once
per batch from the batch key by :mod:`.sampler`. Each op is defined once in :mod:`.ops` (its
parameters, their sampling, its torch executor); the kernels live in :mod:`.functional`,
RandAugment in :mod:`.randaugment`, the engine and presets in :mod:`.pipeline`.
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
from .sampler import ViewParams, batch_key

__all__ = ["Augment", "ViewSpec", "RandAugmentSpec", "RANDAUGMENT_OPS", "PRESET_DIR", "JITTER_BASE",
           "list_presets", "load_preset_config", "load_grid", "apply_overrides", "ViewParams", "batch_key"]
