"""Move uint8 batches to the device one batch ahead, then augment them there.

``DevicePrefetcher(loader, device, augment=aug)`` wraps any iterable of :class:`~loaders.Batch`
(a backend loader). On CUDA it copies batch ``b + 1`` host -> device on a side stream (from
pinned memory, ``non_blocking``) while the model works on batch ``b``; the main stream waits
for that copy (``wait_stream``) and the copied tensors are marked as used by the main stream
(``record_stream``) so the caching allocator never hands their memory to the next copy too
early. Augmentation then runs on the main stream, on the device, from uint8. On CPU it is a
plain pass-through that still augments (no side stream, no read-ahead). Batches already on
``device`` (``data.backend: resident``) pass through uncopied (``Batch.to`` is then a no-op).

Each batch keeps its host-side ids in ``batch.meta["host_index"]`` (logs read them without a
device sync). :class:`loaders.stream.Stream` builds on this class (it passes the place-aware
finishing step as ``augment``).

``state_dict()`` returns the wrapped loader's state as of the last batch *handed out* (not the
one being prefetched), so a checkpoint resumes at exactly the next unseen sample; it is the
loader's own format, so ``loader.load_state_dict(prefetcher.state_dict())`` works.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from .batch import Batch

__all__ = ["DevicePrefetcher"]


class DevicePrefetcher:
    """Iterate ``loader``'s batches on ``device``, augmented.

    ``augment``: an :class:`~loaders.augment.Augment` (or any ``f(batch, *, step, strength)``);
    None yields the uint8 batch on the device. ``strength_fn(batch) -> Tensor[B]`` gives the
    per-sample RandAugment strength (BCL maps ``batch.index`` to its weights). ``start_step``
    is the step of the first batch (augmentation seeds are ``(seed, step)``; pass the resumed
    step after a restart). ``step`` is the step of the next batch to hand out.
    """

    def __init__(self, loader, device, *, augment=None,
                 strength_fn: Optional[Callable[[Batch], torch.Tensor]] = None, start_step: int = 0,
                 non_blocking: bool = True):
        self.loader = loader
        self.device = torch.device(device)
        self.augment = augment
        self.strength_fn = strength_fn
        self.step = int(start_step)
        self.non_blocking = bool(non_blocking)
        self._state: Optional[Dict[str, Any]] = None

    def __len__(self) -> int:
        return len(self.loader)

    # -------------------------------------------------------------- state

    def _loader_state(self) -> Optional[Dict[str, Any]]:
        fn = getattr(self.loader, "state_dict", None)
        return copy.deepcopy(fn()) if fn is not None else None

    def state_dict(self) -> Dict[str, Any]:
        """The loader's ``state_dict()`` as of the last batch handed out."""
        if not hasattr(self.loader, "state_dict"):
            raise TypeError(f"{type(self.loader).__name__} has no state_dict(); cannot checkpoint it")
        return copy.deepcopy(self._state) if self._state is not None else self._loader_state()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Delegate to the loader (call before iterating)."""
        if not hasattr(self.loader, "load_state_dict"):
            raise TypeError(f"{type(self.loader).__name__} has no load_state_dict()")
        self.loader.load_state_dict(state)
        self._state = None

    # -------------------------------------------------------------- iteration

    def _finish(self, batch: Batch) -> Batch:
        """Augment a batch that is already on the device and advance the step."""
        if self.augment is not None:
            strength = self.strength_fn(batch) if self.strength_fn is not None else None
            batch = self.augment(batch, step=self.step, strength=strength)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type == "cuda":
            return self._iter_cuda()
        return self._iter_plain()

    def _iter_plain(self) -> Iterator[Batch]:
        for batch in self.loader:
            state = self._loader_state()
            batch.meta.setdefault("host_index", batch.index)
            batch = batch.to(self.device)
            out = self._finish(batch)
            self._state = state
            yield out

    def _iter_cuda(self) -> Iterator[Batch]:
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)

        def preload():
            try:
                host = next(it)
            except StopIteration:
                return None, None
            state = self._loader_state()
            host.meta.setdefault("host_index", host.index)
            # pinned memory makes the copy truly asynchronous; pin here only if the loader did not.
            # A batch already on the device (the resident backend) is neither pinned nor copied.
            if self.non_blocking and host.device.type == "cpu" and not host.views[0].is_pinned():
                host = host.pin_memory()
            with torch.cuda.stream(stream):
                dev = host.to(self.device, non_blocking=self.non_blocking)
            return dev, state

        nxt, nxt_state = preload()
        while nxt is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            batch, state = nxt, nxt_state
            for t in (*batch.views, batch.index, batch.source, batch.label):
                t.record_stream(current)
            # start the next copy before this batch's augmentation and the model's work
            nxt, nxt_state = preload()
            out = self._finish(batch)
            self._state = state
            yield out
