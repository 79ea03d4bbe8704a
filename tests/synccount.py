"""Count host syncs: Python-level calls that need a tensor's value on the host.

On a GPU each of these waits for the device's queue of work to drain. On the CPU they cost
nothing, so tests count the calls instead of timing them::

    with count_host_syncs() as counts:
        run_the_step()
    assert sum(counts.values()) == 0, counts

Counted: ``Tensor.item/tolist/numpy/cpu``, ``float()/int()/bool()`` of a tensor, and the ops
whose output shape depends on tensor values (``nonzero``, ``unique``, ``masked_select`` and
indexing with a boolean mask), which copy a count to the host on CUDA.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator

import torch

__all__ = ["count_host_syncs", "suspend", "METHOD_NAMES"]

#: Tensor methods that read values on the host
METHOD_NAMES = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__",
                "nonzero", "unique", "masked_select")
_FUNCTIONS = ("nonzero", "unique", "masked_select")
_PAUSED = [0]


@contextlib.contextmanager
def suspend() -> Iterator[None]:
    """Calls made inside are not counted (e.g. the data loader's host-side work)."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def _has_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Dict[str, int]]:
    """Patch ``torch.Tensor``/``torch`` for the duration; yields ``{name: calls}``."""
    counts: Dict[str, int] = {}
    saved = []

    def counted(owner, name, fn, when=None):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not _PAUSED[0] and (when is None or when(*args, **kwargs)):
                counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        saved.append((owner, name, fn))
        setattr(owner, name, inner)

    for name in METHOD_NAMES:
        counted(torch.Tensor, name, getattr(torch.Tensor, name))
    for name in _FUNCTIONS:
        counted(torch, name, getattr(torch, name))
    counted(torch.Tensor, "__getitem__", torch.Tensor.__getitem__,
            when=lambda self, index: _has_mask(index))
    counted(torch.Tensor, "__setitem__", torch.Tensor.__setitem__,
            when=lambda self, index, value: _has_mask(index))
    try:
        yield counts
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
