"""The one hash of the data layer: SplitMix64 (Steele, Lea and Flood's finaliser), scalar and vectorised.

* :func:`splitmix64` -- one Python int in ``[0, 2^64)`` -> int in ``[0, 2^64)``.
* :func:`splitmix64_np` -- the same bits on a ``uint64`` numpy array (wrapping arithmetic).
* :func:`mix` -- a chain of integers ``(seed, key, view, op, ...)`` -> one 63-bit seed:
  ``h = splitmix64(h ^ (part mod 2^64))`` over the parts (the keys of augmentation draws and of
  the per-batch key, :func:`loaders.augment.sampler.batch_key`).

The mixture's keyed permutations (:mod:`loaders.mixture`) and the augmentation sampler use these
two functions; nothing else in ``loaders`` hashes integers.
"""
from __future__ import annotations

import numpy as np

__all__ = ["GOLDEN", "MASK64", "splitmix64", "splitmix64_np", "mix"]

GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_U64 = np.uint64


def splitmix64(z: int) -> int:
    """SplitMix64 of one int in ``[0, 2^64)`` (Python ints: ~1 us, no numpy call overhead)."""
    z = (z + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def splitmix64_np(z: np.ndarray) -> np.ndarray:
    """SplitMix64 of a ``uint64`` array, elementwise (the same bits as :func:`splitmix64`)."""
    z = z + _U64(GOLDEN)
    z = (z ^ (z >> _U64(30))) * _U64(_MIX1)
    z = (z ^ (z >> _U64(27))) * _U64(_MIX2)
    return z ^ (z >> _U64(31))


def mix(*parts: int) -> int:
    """Hash integers (seed, key, view, op, ...) into one seed in ``[0, 2^63)``: a SplitMix64 chain,
    order-sensitive (``mix(1, 2) != mix(2, 1)``); negative parts are taken mod ``2^64``."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (int(p) & MASK64))
    return h & _MASK63
