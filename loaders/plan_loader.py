"""The shared Loader semantics every backend (torch, DALI, FFCV) builds on.

A loader reads one rank's batches of a mixture :class:`~loaders.mixture.Plan` and yields
:class:`~loaders.batch.Batch` es. This base validates the shared constructor arguments, keeps the
cursor of handed-out batches and the ``skipped`` count, draws the per-batch random parameters
from (seed, rank, rank-stream position of the batch's first sample) — so they do not depend on
workers, threads or restarts — and saves/loads state as ``{"plan": Plan.state_dict(),
"skipped": n}``: a checkpoint from one backend resumes on any other at exactly the next sample.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .base import Source
from .crop import CropSpec, rrc_params
from .errors import ConfigError, SampleError

__all__ = ["PlanLoader", "rng_key"]

_M64 = (1 << 64) - 1


def rng_key(seed: int, rank: int, first_item: int) -> list:
    """Seed of a batch's random parameters: (seed, rank, rank-stream item of its first sample)."""
    return [int(seed) & _M64, int(rank), int(first_item)]


class PlanLoader:
    """Cursor over this rank's batches of a mixture plan, with the shared Loader semantics.

    Subclasses implement ``_batches(plan)`` (yield a :class:`Batch` per non-empty plan batch,
    with ``meta["batch"]`` = its number after the cursor). This base holds the plan, the
    ``skipped`` counter, crop sampling and ``state_dict``/``load_state_dict`` in the torch
    backend's format (``{"plan": Plan.state_dict(), "skipped": n}``), so a checkpoint resumes
    on any backend at exactly the next sample, with the same crops.
    """

    backend = "plan"

    def __init__(self, sources: Sequence[Source], mixture, *, batch_size: int,
                 crops: Optional[Sequence[CropSpec]] = None, resize: Optional[int] = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 2, seed: int = 0,
                 on_error: str = "raise", pin_memory: bool = False, drop_last: bool = True):
        from .mixture import Plan

        self.sources = list(sources)
        if len(self.sources) != mixture.num_sources:
            raise ConfigError(f"{self.backend} loader: {len(self.sources)} sources for a mixture of "
                              f"{mixture.num_sources}")
        for s, (src, n) in enumerate(zip(self.sources, mixture.sizes.tolist())):
            if len(src) != n:
                raise ConfigError(f"{self.backend} loader: source '{mixture.names[s]}' has {len(src)} samples "
                                  f"but the mixture expects {n}")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"{self.backend} loader: on_error must be 'raise' or 'skip', got {on_error!r}")
        if crops is not None:
            crops = list(crops)
            if not crops or not all(isinstance(c, CropSpec) for c in crops):
                raise ConfigError(f"{self.backend} loader: crops must be a non-empty list of CropSpec, got {crops!r}")
        if resize is not None and (not isinstance(resize, int) or resize <= 0):
            raise ConfigError(f"{self.backend} loader: resize must be a positive integer or None, got {resize!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"{self.backend} loader: num_workers must be an integer >= 0, got {num_workers!r}")
        self.mixture = mixture
        self.offsets = np.asarray(mixture.offsets, np.int64)
        self.crops = crops
        self.resize = resize
        self.num_workers = num_workers
        self.seed = int(seed)
        self.on_error = on_error
        self.pin_memory = bool(pin_memory)
        self._plan = Plan(mixture, batch_size=batch_size, rank=rank, world_size=world_size, drop_last=drop_last)
        #: samples skipped under on_error="skip", in the batches handed out so far
        self.skipped = 0
        self._iterating = False

    @property
    def batch_size(self) -> int:
        return self._plan.batch_size

    @property
    def rank(self) -> int:
        return self._plan.rank

    @property
    def world_size(self) -> int:
        return self._plan.world_size

    @property
    def plan(self):
        return self._plan

    def __len__(self) -> int:
        """Batches left (TypeError for an unlimited mixture)."""
        return len(self._plan)

    def __iter__(self):
        plan = self._plan.copy()  # frozen cursor for the readers; self._plan counts handed-out batches
        done = 0
        self._iterating = True
        try:
            for batch in self._batches(plan):
                b = int(batch.meta["batch"])
                self._plan.advance(b + 1 - done)  # all-skipped batches in between are consumed too
                done = b + 1
                self.skipped += batch.skipped
                yield batch
        finally:
            self._iterating = False

    def _batches(self, plan):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _batch_ids(plan):
        """Batch numbers after ``plan``'s cursor: ``0 .. num_batches-1`` (endless if unlimited)."""
        total = plan.num_batches
        b = 0
        while total is None or b < total:
            yield b
            b += 1

    # -- random parameters ---------------------------------------------------------------------
    def _rng_key(self, plan, b: int) -> list:
        # the torch backend's key: (seed, rank, rank-stream item of the batch's first sample)
        return rng_key(self.seed, plan.rank, plan.samples + b * plan.batch_size)

    def crop_boxes(self, plan, b: int, heights, widths) -> List[np.ndarray]:
        """Random-resized-crop boxes ``int64 [n, 4]`` (top, left, h, w), one array per CropSpec,
        for batch ``b`` after ``plan``'s cursor: a function of the batch's position in the rank's
        stream only (not of workers, threads or restarts), identical to the torch backend's."""
        rng = np.random.default_rng(self._rng_key(plan, b))
        return [rrc_params(rng, heights, widths, spec.scale, spec.ratio) for spec in self.crops]

    def aux_rng(self, plan, b: int) -> np.random.Generator:
        """Generator for the other per-sample parameters of batch ``b`` (flips, colour)."""
        return np.random.default_rng(self._rng_key(plan, b) + [1])

    # -- reading ---------------------------------------------------------------------------------
    def read_samples(self, src: np.ndarray, sample: np.ndarray, pool=None):
        """``source.read`` for every pair; returns (data list, label int64[n], ok bool[n]).

        A :class:`SampleError` re-raises under ``on_error="raise"``; under ``"skip"`` the
        sample's ``ok`` is False (the caller drops it and counts it).
        """
        def one(k):
            try:
                return self.sources[int(src[k])].read(int(sample[k]))
            except SampleError:
                if self.on_error == "raise":
                    raise
                return None

        n = len(src)
        # reading is I/O (file reads, tar offsets) that releases the GIL: threads overlap it
        got = list(pool.map(one, range(n))) if pool is not None and n > 1 else [one(k) for k in range(n)]
        ok = np.array([g is not None for g in got], bool)
        labels = np.array([g[1] if g is not None else -1 for g in got], np.int64)
        data = [g[0] if g is not None else None for g in got]
        return data, labels, ok

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The plan cursor after the batches handed out so far, plus the skipped count."""
        return {"plan": self._plan.state_dict(), "skipped": int(self.skipped)}

    def load_state_dict(self, sd: dict) -> None:
        """Resume at the next sample (call before iterating)."""
        if self._iterating:
            raise RuntimeError("load_state_dict() while iterating: call it before the for-loop")
        if "plan" not in sd:
            raise ConfigError(f"{self.backend} loader state_dict lacks 'plan'; got keys {sorted(sd)}")
        self._plan.load_state_dict(sd["plan"])
        self.skipped = int(sd.get("skipped", 0))

    def _views_spec(self) -> List[Tuple[int, Optional[CropSpec]]]:
        """(output size or 0 = as-is, crop spec or None) per output view."""
        if self.crops:
            return [(c.size, c) for c in self.crops]
        return [(self.resize or 0, None)]
