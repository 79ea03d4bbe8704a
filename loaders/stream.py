"""One data stream: the backend that reads, the place augmentation runs, the copy to the device,
and the loader cursor for checkpoints.

.. code-block:: python

    stream = Stream(cfg["data"], Augment.from_preset("symmetric"), where="auto", device="cuda:0",
                    rank=rank, world_size=world)
    stream.load_state_dict(saved)           # optional: resume at the exact next sample
    for batch in stream:                     # Batch, views float32 [B,3,S,S] normalised, on device
        ...
        saved = stream.state_dict()          # the cursor after the last batch handed out

**Where augmentation runs** (``where``; the config key ``augment.where``):

* ``"device"``: the backend hands over uint8 views (whole images, ``stage="raw"``, or one crop
  per view when it crops while decoding, ``"cropped"``); they are copied to ``device`` one batch
  ahead (:class:`~loaders.prefetch.DevicePrefetcher`) and the batched engine
  (:class:`~loaders.augment.Augment`) augments them there;
* ``"workers"``: the torch backend's workers crop *and* augment
  (:class:`~loaders.cpu_augment.WorkerAugment`, OpenCV, ``output="uint8"``); uint8
  ``"augmented-uint8"`` views travel to the device, where one fused op normalises them
  (:meth:`WorkerAugment.finish`). Ops the OpenCV executor lacks (solarize, RandAugment:
  :meth:`WorkerAugment.pending_ops`, static per recipe) run there instead, for those views only:
  uint8 -> float [0, 1], the ops' torch executors with the sampler's parameters for the same
  batch key and view (the engine's), then normalise (:meth:`WorkerAugment.tail`); the stream
  says so once when it is built (a warning naming the views and ops), not once per worker.
  Needs ``data.backend: torch`` and ``data.crop_in_decode: true``.
  The decoder stays the configured one (``backend_options.decoder: cv2`` is the measured fast
  path; its resampling differs from PIL's, so it is not switched on behind the user's back);
* ``"dali"``: the DALI graph runs the whole recipe (``data.backend: dali``); its float views are
  final (``"augmented"``);
* ``"auto"``: ``"workers"`` with the torch backend on a CPU-only device, ``"device"`` otherwise.

A recipe with per-sample augmentation strength (``strength_fn``, e.g. BCL) needs the engine for
its strength-dependent op (RandAugment): with ``where=workers`` that op runs on the device anyway
(above), so the strength is applied there; with ``where=dali`` (or a recipe whose RandAugment
could not be left to the device) the stream augments on the device instead and says so once
(stderr).

**Stages and keys.** Every batch the stream yields has ``stage == "augmented"`` (float32,
normalised). The device engine runs only on ``"raw"``/``"cropped"`` batches; handing it an
augmented batch raises (:func:`device_augment`): nothing is augmented twice. Each batch is
augmented with its seed key (``Batch.key``, set by the backend from the batch's position in the
rank's stream), so every place draws the same parameters for the same batch; a backend that sets
no key gets the old per-rank step counter ``step * world_size + rank`` (``stream.step``: set it
to the resumed micro-step before iterating).

**The one cursor.** ``state_dict()`` is the backend's state as of the last batch handed out
(prefetching runs one batch ahead), in the backend's own format; ``load_state_dict`` resumes
there.

Errors are one-line :class:`~loaders.errors.ConfigError` naming the key: an unknown ``where``,
``where`` that the backend cannot do, and ``data.backend_options.worker_augment`` /
``backend_options.augment`` (DALI) set by hand (the stream owns them: use ``augment.where``).
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from .augment import functional as AF
from .augment.cv2_ops import normalize_uint8
from .batch import AUGMENTED_STAGES, Batch
from .errors import ConfigError
from .prefetch import DevicePrefetcher

__all__ = ["Stream", "WHERE", "WORKER_PRECISIONS", "resolve_where", "check_backend_options", "device_augment"]

#: the values of ``augment.where``
WHERE = ("auto", "device", "workers", "dali")
#: ``worker_precision`` values (see :class:`loaders.cpu_augment.WorkerAugment`)
WORKER_PRECISIONS = ("float", "uint8")


def resolve_where(where: str, *, backend: str, device, per_sample_strength: bool = False,
                  strength_on_device: bool = False) -> Tuple[str, str]:
    """``(where, note)``: the place augmentation runs and, when the request was changed, why.

    ``strength_on_device``: with ``where=workers`` every strength-dependent op is left to the
    device (:func:`loaders.cpu_augment.strength_on_device`), so a per-sample strength does not
    force the device engine there. Refuses (ConfigError naming ``augment.where``) a value not in
    :data:`WHERE` and a place the backend cannot do."""
    if where not in WHERE:
        raise ConfigError(f"augment.where must be one of {', '.join(WHERE)}, got {where!r}")
    dev = torch.device(device)
    workers_ok = not per_sample_strength or strength_on_device
    if where == "auto":
        where = "workers" if backend == "torch" and dev.type == "cpu" and workers_ok else "device"
        return where, ""
    if where == "workers" and backend != "torch":
        raise ConfigError(f"augment.where=workers runs the recipe in the torch backend's workers; "
                          f"data.backend is {backend!r} (use augment.where=device or data.backend: torch)")
    if where == "dali" and backend != "dali":
        raise ConfigError(f"augment.where=dali runs the recipe in the DALI graph; data.backend is {backend!r} "
                          f"(set data.backend: dali or use augment.where=device)")
    if where != "device" and per_sample_strength and not (where == "workers" and strength_on_device):
        return "device", (f"augment.where={where}: a recipe sets per-sample augmentation strength, which only "
                          f"the device engine applies; augmenting on the device instead")
    return where, ""


def check_backend_options(data_cfg: Mapping) -> None:
    """The augmentation hooks the stream owns are not set by hand in ``data.backend_options``."""
    options = data_cfg.get("backend_options") or {}
    if not isinstance(options, Mapping):
        return  # build_loader names the bad value
    if "worker_augment" in options:
        raise ConfigError("data.backend_options.worker_augment: set augment.where=workers instead "
                          "(the stream builds the workers' augmentation from the augment section)")
    if "augment" in options and data_cfg.get("backend") == "dali":
        raise ConfigError("data.backend_options.augment: set augment.where=dali instead (the stream builds "
                          "the DALI graph's recipe from the augment section)")


def _takes_key(aug) -> bool:
    """Whether the engine's call takes ``key=`` (else its ``step=`` is the key)."""
    try:
        return "key" in inspect.signature(aug.__call__).parameters
    except (TypeError, ValueError):
        return False


def device_augment(aug, batch: Batch, *, key: int, strength: Optional[torch.Tensor] = None) -> Batch:
    """The engine ``aug`` on ``batch`` (uint8, on its device) with seed key ``key`` -> float32
    normalised views, ``stage="augmented"``. ``"raw"`` views are cropped by the engine,
    ``"cropped"`` ones are not. An already augmented batch is refused (ValueError): never a
    silent second pass."""
    if batch.stage in AUGMENTED_STAGES:
        raise ValueError(f"device augmentation of a batch that is already {batch.stage!r} (augmented where "
                         f"it was loaded): augmenting it again would change the recipe")
    crop = batch.stage == "raw"
    if _takes_key(aug):
        out = aug(batch, key=int(key), strength=strength, crop=crop)
    else:
        out = aug(batch, step=int(key), strength=strength, crop=crop)
    return out.with_views(out.views, stage="augmented")


def _strength_on_device(augment) -> bool:
    """Whether the workers' augmentation of ``augment`` leaves every strength-dependent op to the device."""
    from .augment import Augment
    if not isinstance(augment, Augment):
        return False
    from .cpu_augment import strength_on_device
    return strength_on_device(augment)


class Stream:
    """Batches of the ``data:`` config, augmented where ``where`` says, on ``device``.

    ``data_cfg``: the ``data:`` mapping (:func:`loaders.pipeline.build_loader`); ``augment``: the
    :class:`~loaders.augment.Augment` recipe; ``where``: see the module docstring;
    ``strength_fn(batch) -> float [B] or None``: per-sample RandAugment strength (applied on the
    device: the engine, or the workers' RandAugment left to the device); ``worker_precision``:
    ``"uint8"`` (default, the measured fast path: rounded per op like torchvision's PIL pipeline)
    or ``"float"`` (the engine's result up to one final rounding) for ``where="workers"``;
    ``note``: where the one-time fallback note goes
    (default: stderr on rank 0). Attributes: ``loader`` (the backend), ``where`` (resolved),
    ``where_requested``, ``hook`` (the workers' augmentation or None).
    """

    def __init__(self, data_cfg: Mapping, augment, *, where: str = "auto", device="cpu", rank: int = 0,
                 world_size: int = 1, strength_fn: Optional[Callable[[Batch], Optional[torch.Tensor]]] = None,
                 worker_precision: str = "uint8", non_blocking: bool = True,
                 note: Optional[Callable[[str], None]] = None):
        from .pipeline import DATA_DEFAULTS

        if worker_precision not in WORKER_PRECISIONS:
            raise ConfigError(f"augment.worker_precision must be one of {', '.join(WORKER_PRECISIONS)}, "
                              f"got {worker_precision!r}")
        data_cfg = dict(data_cfg)
        check_backend_options(data_cfg)
        self.data_cfg = data_cfg
        self.strength_fn, self.worker_precision, self.non_blocking = strength_fn, worker_precision, non_blocking
        self.augment = augment
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        backend = data_cfg.get("backend", DATA_DEFAULTS["backend"])
        self.where_requested = where
        self.where, why = resolve_where(where, backend=backend, device=self.device,
                                        per_sample_strength=strength_fn is not None,
                                        strength_on_device=_strength_on_device(augment))
        if why and self.rank == 0:
            (note or (lambda m: print(f"fastssl: {m}", file=sys.stderr)))(why)
        self.note = why
        self.hook = None
        self.loader = self._build(data_cfg, worker_precision)
        self.crops_in_decode = getattr(self.loader, "crops", None) is not None
        # the strength is asked for once per batch where the engine runs or the workers leave RandAugment
        # to the device (resolve_where moved every other place to the device)
        self._pf = DevicePrefetcher(self.loader, self.device, augment=self._finish,
                                    strength_fn=strength_fn if self.where in ("device", "workers") else None,
                                    non_blocking=non_blocking)

    def with_where(self, where: str) -> "Stream":
        """A new stream over the same data, recipe and device with augmentation at ``where``
        (benchmarks compare places side by side)."""
        return Stream(self.data_cfg, self.augment, where=where, device=self.device, rank=self.rank,
                      world_size=self.world_size, strength_fn=self.strength_fn,
                      worker_precision=self.worker_precision, non_blocking=self.non_blocking)

    # ------------------------------------------------------------------ building

    def _build(self, data_cfg: Dict[str, Any], precision: str):
        from .pipeline import build_loader

        options = dict(data_cfg.get("backend_options") or {})
        if self.where in ("workers", "dali") and data_cfg.get("crop_in_decode") is False:
            raise ConfigError(f"augment.where={self.where} needs data.crop_in_decode: true (the loader cuts "
                              f"the views it augments)")
        if self.where == "workers":
            from .cpu_augment import WorkerAugment
            self.hook = WorkerAugment(self.augment, output="uint8", precision=precision)
            self.hook.warn_once(quiet=self.rank != 0)   # here, once: the workers inherit the flag, stay quiet
            options["worker_augment"] = self.hook
        elif self.where == "dali":
            options["augment"] = self.augment
        if data_cfg.get("backend") == "dali" and self.device.type == "cuda" and "device_id" not in options:
            # this rank's GPU (the accelerator's device already is the local rank's)
            options["device_id"] = self.device.index if self.device.index is not None else torch.cuda.current_device()
        crops = self.hook.crop_specs if self.hook is not None else list(self.augment.crop_specs)
        return build_loader({**data_cfg, "backend_options": options}, crops=crops, rank=self.rank,
                            world_size=self.world_size, device=self.device)

    # ------------------------------------------------------------------ the one cursor

    def state_dict(self) -> Dict[str, Any]:
        """The backend's cursor after the last batch handed out (its own format)."""
        return self._pf.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume at the sample after ``state``'s (call before iterating)."""
        self._pf.load_state_dict(state)

    @property
    def step(self) -> int:
        """The fallback seed counter of the next batch (used only for batches without a key)."""
        return self._pf.step

    @step.setter
    def step(self, value: int) -> None:
        self._pf.step = int(value)

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._pf)

    def stage_of(self, batch: Batch) -> str:
        """The batch's stage; a backend that left the default ``"raw"`` is labelled by what this
        stream asked it to do."""
        if batch.stage != "raw":
            return batch.stage
        if batch.views[0].is_floating_point():
            return "augmented"
        if self.where == "workers":
            return "augmented-uint8"
        return "cropped" if self.crops_in_decode else "raw"

    def _finish(self, batch: Batch, *, step: int, strength=None) -> Batch:
        """A batch on the device -> final float32 views, doing only what is still to do."""
        stage = self.stage_of(batch)
        if stage == "augmented":
            return batch.with_views(batch.views, stage="augmented")
        if stage == "augmented-uint8":
            if self.hook is None:
                raise ValueError("a batch augmented to uint8 elsewhere reached a stream that did not ask for it")
            if batch.device.type == "cpu":  # the hook's fused CPU normalise into recycled buffers (+ pending ops)
                out = self.hook.finish(batch, strength=strength)
                return out.with_views(out.views, stage="augmented")
            pending = self.hook.pending_ops()
            if any(pending) and batch.key is None:
                raise ValueError("a batch with views left to the device (pending ops) has no key")
            views = [self._normalize(self.hook.tail(v, img, key=batch.key, strength=strength) if pending[v] else img)
                     for v, img in enumerate(batch.views)]
            return batch.with_views(views, stage="augmented")
        if self.where != "device":
            raise ValueError(f"augment.where={self.where} but the backend handed over a {stage!r} batch")
        key = batch.key if batch.key is not None else step * self.world_size + self.rank
        return device_augment(self.augment, batch.with_views(batch.views, stage=stage), key=key, strength=strength)

    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        """``uint8 [B,3,H,W]`` -> ``(img / 255 - mean) / std`` float32 (float input in ``[0, 1]``:
        ``(img - mean) / std``), on the image's device with cached constants (no per-batch copy)."""
        mean, std = self.augment.mean, self.augment.std
        if img.is_floating_point():
            return AF.normalize(img, mean, std)
        return normalize_uint8(img, mean, std)

    def __repr__(self) -> str:
        return (f"Stream(backend={type(self.loader).__name__}, where={self.where!r}, device={self.device}, "
                f"rank={self.rank}/{self.world_size})")
