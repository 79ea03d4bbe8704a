"""The sample order: a deterministic, resumable mixture of sources.

A :class:`Mixture` turns per-source sizes plus ``weights`` (relative proportions) or ``dups``
(replication, AdaInf's ``real x dup (+) generated``), ``fractions`` (DiversitySSL's seeded
subset of unique samples) and a ``budget`` (images to see) into an infinite-or-finite *stream*
of ``(source, sample)`` pairs. The stream is a pure function of
``(seed, sizes, unique counts, per-epoch counts)``: nothing is materialised, any global range
``positions(start, stop)`` is computed directly with vectorised numpy in ``O(stop - start)``
time and memory, so 100M+ sample plans cost nothing to build or to resume.

How the order is defined (``u_s`` unique samples of source ``s`` after ``fraction``, ``c_s``
draws of source ``s`` per epoch, ``L = sum(c_s)`` the epoch length):

* **subset** -- the unique samples of source ``s`` are ``phi_s(0..u_s-1)`` where ``phi_s`` is a
  keyed permutation of ``[0, N_s)`` (key: seed, s). Fixed for the run; a smaller fraction
  selects a subset of a larger one's samples (same seed).
* **epoch slots** -- epoch ``e`` has ``c_s`` slots of source ``s`` (sources in order). Slot
  ``k`` of source ``s`` is that source's draw number ``g = e * c_s + k``; draws cycle through
  a fresh keyed permutation of the unique subset per pass ``g // u_s``. In ``dups`` mode
  ``c_s = dup_s * u_s`` so every epoch holds each unique sample exactly ``dup_s`` times; in
  ``weights`` mode ``c_s`` are the largest-remainder rounding of ``L * p_s``.
* **epoch shuffle** -- stream position ``e * L + j`` reads slot ``pi_e(j)``, ``pi_e`` a keyed
  permutation of ``[0, L)`` (key: seed, e).

Keyed permutations are a vectorised (unbalanced) Feistel network on the bits covering the
domain, with cycle-walking back into ``[0, n)`` (the network's domain is < 2n, so under two
walks on average).

A :class:`Plan` cuts the stream for one rank: rank ``r`` of ``W`` reads global positions
``r, r + W, r + 2W, ...`` (disjoint ranks that together cover the plan), in batches of
``batch_size``; its state is one integer (rank-stream samples consumed).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .hashing import GOLDEN, MASK64, splitmix64, splitmix64_np

__all__ = ["Mixture", "Plan", "keyed_permutation", "largest_remainder"]

_U64 = np.uint64
_GOLDEN = GOLDEN
_ROUNDS = 6
#: positions are computed in chunks of this many, bounding temporaries (~100 B per position)
_CHUNK = 1 << 20
# key tags: distinct streams of keys for the three permutations
_TAG_EPOCH, _TAG_PASS, _TAG_SUBSET = 1, 2, 3


# the one hash (loaders/hashing.py): the mixture's keys and permutations use its bits
_splitmix = splitmix64_np
_splitmix_int = splitmix64
_M = MASK64


def _key(*parts) -> np.ndarray:
    """Hash integers and/or int arrays (broadcast together) into uint64 keys."""
    if all(isinstance(p, (int, np.integer)) for p in parts):  # all scalars: Python ints, same bits
        h = 0
        for p in parts:
            h = _splitmix_int(h ^ _splitmix_int(int(p) & 0x7FFFFFFFFFFFFFFF))
        return np.array([h], dtype=_U64)
    h = np.zeros(1, dtype=_U64)
    for p in parts:
        a = np.asarray(p)
        if a.dtype != _U64:
            a = (a.astype(np.int64) & 0x7FFFFFFFFFFFFFFF).astype(_U64) if a.dtype.kind in "iu" else a.astype(_U64)
        h = _splitmix(h ^ _splitmix(np.atleast_1d(a)))
    return h


def _uniform(a: np.ndarray):
    """``a``'s single value when all its entries are equal (the usual case inside one batch),
    else ``a``. Speed: a scalar key gives one Feistel round key instead of one per element
    (per-element key hashing was ~half of a 256-sample batch lookup); same permutation values."""
    if a.size and a[0] == a[-1] and (a.size < 3 or (a == a[0]).all()):
        return int(a[0])
    return a


def keyed_permutation(x: np.ndarray, n: int, key: np.ndarray, *, rounds: int = _ROUNDS) -> np.ndarray:
    """Apply a keyed pseudo-random permutation of ``[0, n)`` to ``x``.

    Args:
        x: int64 ``[m]`` values in ``[0, n)``.
        n: domain size (>= 1).
        key: uint64 ``[1]`` (one permutation for all) or ``[m]`` (one permutation per element).
    Returns:
        int64 ``[m]``: ``pi_key(x)``; for a fixed key, distinct ``x`` give distinct outputs.
    """
    x = np.asarray(x, dtype=np.int64)
    if n <= 1:
        return np.zeros_like(x)
    # unbalanced Feistel on k = bits(n-1) bits (domain 2^k < 2n: fewer cycle-walks than a
    # balanced one on an even bit count, whose domain may reach 4n). The value is (hi | lo)
    # with widths (a, b); a round maps it to (lo | hi ^ F(lo)) with widths (b, a), a bijection.
    k = max(2, int(n - 1).bit_length())
    widths = (k - k // 2, k // 2)
    key = np.asarray(key, dtype=_U64)
    # round keys [rounds][1 or m]
    if key.size == 1:  # one permutation for all: round keys in Python ints (same bits, faster)
        k0 = int(key.reshape(-1)[0])
        rkeys = [np.array([_splitmix_int(k0 ^ ((_GOLDEN * (i + 1)) & _M))], dtype=_U64) for i in range(rounds)]
    else:
        rkeys = [_splitmix(key ^ _U64((_GOLDEN * (i + 1)) & 0xFFFFFFFFFFFFFFFF)) for i in range(rounds)]

    def encrypt(v: np.ndarray, sel) -> np.ndarray:
        a, b = widths
        for rk in rkeys:
            kk = rk if rk.shape[0] == 1 or sel is None else rk[sel]
            hi, lo = v >> _U64(b), v & _U64((1 << b) - 1)
            f = _splitmix(lo ^ kk) & _U64((1 << a) - 1)
            v = (lo << _U64(a)) | (hi ^ f)
            a, b = b, a
        return v

    y = encrypt(x.astype(_U64), None)
    # cycle-walking: re-encrypt values that left [0, n) (each walk succeeds with p > 1/2)
    bad = np.flatnonzero(y >= _U64(n))
    while bad.size:
        y[bad] = encrypt(y[bad], bad)
        bad = bad[y[bad] >= _U64(n)]
    return y.astype(np.int64)


def largest_remainder(total: int, p: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``total * p`` (Hamilton's method).

    ``p``: float ``[S]`` summing to 1. Remainders are handed out largest first, ties to the
    lower source index. Returns int64 ``[S]``.
    """
    q = total * np.asarray(p, dtype=np.float64)
    c = np.floor(q).astype(np.int64)
    left = int(total - c.sum())
    if left > 0:
        order = np.argsort(-(q - c), kind="stable")
        c[order[:left]] += 1
    return c


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())


class Mixture:
    """A deterministic stream of ``(source, sample)`` over several sources.

    Args:
        sizes: ``N_s`` samples per source (``S`` sources).
        weights: relative proportions per source (normalised; zeros allowed, not all). Weight
            mode: an epoch holds ``epoch_length`` draws, ``round_lr(L * p_s)`` from source ``s``.
        dups: integer replication per source (dup mode, the default with all 1): an epoch is
            every unique sample of source ``s`` exactly ``dup_s`` times. Exclusive with weights.
        fractions: per source, the fraction of unique samples to use (seeded subset of
            ``round(f * N_s)`` samples); ``None`` or ``<= 0`` means all; ``> 1`` is an error.
        budget: total images in the stream (all ranks); ``None`` = infinite.
        epoch_length: weight mode only; samples per epoch (default: sum of unique counts).
        seed: the order's seed.
        names: source names for messages (default ``source0``, ...).
    """

    def __init__(self, sizes: Sequence[int], *, weights: Optional[Sequence[float]] = None,
                 dups: Optional[Sequence[int]] = None, fractions: Optional[Sequence[Optional[float]]] = None,
                 budget: Optional[int] = None, epoch_length: Optional[int] = None, seed: int = 0,
                 names: Optional[Sequence[str]] = None):
        sizes = list(sizes)
        if not sizes:
            raise ValueError("a mixture needs at least one source")
        S = len(sizes)
        self.names: List[str] = [str(n) for n in names] if names is not None else [f"source{i}" for i in range(S)]
        if len(self.names) != S:
            raise ValueError(f"{len(self.names)} names for {S} sources")
        for i, n in enumerate(sizes):
            if not _is_int(n) or int(n) <= 0:
                raise ValueError(f"source '{self.names[i]}' is empty or has an invalid size ({n!r})")
        self.sizes = np.asarray([int(n) for n in sizes], dtype=np.int64)
        if not _is_int(seed):
            raise ValueError(f"mixture seed must be an integer, got {seed!r}")
        self.seed = int(seed)

        # ---- unique subset per source (fraction) ----
        if fractions is None:
            fractions = [None] * S
        if len(fractions) != S:
            raise ValueError(f"{len(fractions)} fractions for {S} sources")
        unique = []
        for i, (n, f) in enumerate(zip(self.sizes.tolist(), fractions)):
            if f is None or f <= 0:
                unique.append(n)
                continue
            if f > 1:
                raise ValueError(f"source '{self.names[i]}': fraction {f} > 1 (a fraction selects a subset)")
            u = int(math.floor(f * n + 0.5))
            if u <= 0:
                raise ValueError(f"source '{self.names[i]}': fraction {f} of {n} samples selects no sample")
            unique.append(u)
        self.fractions = [None if (f is None or f <= 0) else float(f) for f in fractions]
        self.unique = np.asarray(unique, dtype=np.int64)

        # ---- per-epoch counts (dup or weight mode) ----
        if weights is not None and dups is not None:
            raise ValueError("give either weights (proportions) or dups (replication) for a mixture, not both")
        if weights is not None:
            self.mode = "weights"
            if len(weights) != S:
                raise ValueError(f"{len(weights)} weights for {S} sources")
            w = np.asarray(weights, dtype=np.float64)
            for i, v in enumerate(w):
                if not np.isfinite(v) or v < 0:
                    raise ValueError(f"source '{self.names[i]}': weight {v} must be a finite number >= 0")
            if w.sum() <= 0:
                raise ValueError(f"all mixture weights are zero ({dict(zip(self.names, w.tolist()))})")
            self.weights = w / w.sum()
            if epoch_length is None:
                epoch_length = int(self.unique.sum())
            if not _is_int(epoch_length) or int(epoch_length) <= 0:
                raise ValueError(f"epoch_length must be a positive integer, got {epoch_length!r}")
            self.counts_per_epoch = largest_remainder(int(epoch_length), self.weights)
            self.dups = None
        else:
            self.mode = "dups"
            if epoch_length is not None:
                raise ValueError("epoch_length applies to weight mode only; in dup mode an epoch is "
                                 "every unique sample dup times")
            dups = [1] * S if dups is None else list(dups)
            if len(dups) != S:
                raise ValueError(f"{len(dups)} dups for {S} sources")
            for i, d in enumerate(dups):
                if isinstance(d, bool) or not _is_int(d) or int(d) < 0:
                    raise ValueError(f"source '{self.names[i]}': dup {d!r} must be a non-negative integer")
            self.dups = np.asarray([int(d) for d in dups], dtype=np.int64)
            if self.dups.sum() == 0:
                raise ValueError("all dups are zero: the mixture would be empty")
            self.counts_per_epoch = self.unique * self.dups
            self.weights = self.counts_per_epoch / self.counts_per_epoch.sum()
        self.epoch_length = int(self.counts_per_epoch.sum())
        self._block_ends = np.cumsum(self.counts_per_epoch)
        self._block_starts = self._block_ends - self.counts_per_epoch

        if budget is not None and (not _is_int(budget) or int(budget) <= 0):
            raise ValueError(f"budget must be a positive integer (images to see) or None, got {budget!r}")
        self.budget = None if budget is None else int(budget)
        #: int64 [S+1]: a sample's global id is ``offsets[source] + sample``
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    # ------------------------------------------------------------------ properties
    @property
    def num_sources(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> Optional[int]:
        """Length of the stream (the budget), or ``None`` for an infinite stream."""
        return self.budget

    def fingerprint(self) -> str:
        """A hash of everything the order depends on (not the budget: extending a run is fine)."""
        spec = {"v": 1, "seed": self.seed, "sizes": self.sizes.tolist(), "unique": self.unique.tolist(),
                "counts": self.counts_per_epoch.tolist()}
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {u}/{N} unique, {c}/epoch" for n, u, N, c in
                          zip(self.names, self.unique.tolist(), self.sizes.tolist(), self.counts_per_epoch.tolist()))
        return (f"Mixture({parts}; epoch_length={self.epoch_length}, total={self.total}, seed={self.seed}, "
                f"mode={self.mode})")

    # ------------------------------------------------------------------ order
    def subset(self, s: int) -> np.ndarray:
        """The unique sample indices of source ``s`` (int64 ``[u_s]``, in subset order)."""
        return self._subset(s, np.arange(self.unique[s], dtype=np.int64))

    def _subset(self, s: int, r: np.ndarray) -> np.ndarray:
        if self.unique[s] == self.sizes[s]:
            return r
        return keyed_permutation(r, int(self.sizes[s]), _key(self.seed, _TAG_SUBSET, s))

    def lookup(self, pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(source, sample)`` int64 arrays for global stream positions ``pos`` (any order)."""
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        if pos.size and pos.min() < 0:
            raise IndexError(f"negative stream position {int(pos.min())}")
        if self.total is not None and pos.size and pos.max() >= self.total:
            raise IndexError(f"stream position {int(pos.max())} is past the budget ({self.total})")
        source = np.empty(pos.shape, np.int64)
        sample = np.empty(pos.shape, np.int64)
        for lo in range(0, pos.size, _CHUNK):
            sl = slice(lo, lo + _CHUNK)
            source[sl], sample[sl] = self._lookup(pos[sl])
        return source, sample

    def _lookup(self, pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        L = self.epoch_length
        epoch, j = np.divmod(pos, L)
        slot = keyed_permutation(j, L, _key(self.seed, _TAG_EPOCH, _uniform(epoch)))
        src = np.searchsorted(self._block_ends, slot, side="right").astype(np.int64)
        k = slot - self._block_starts[src]
        sample = np.empty_like(pos)
        for s in range(self.num_sources):
            sel = np.flatnonzero(src == s)
            if not sel.size:
                continue
            u = int(self.unique[s])
            draw = epoch[sel] * self.counts_per_epoch[s] + k[sel]  # source s's draw number
            npass, r = np.divmod(draw, u)
            r = keyed_permutation(r, u, _key(self.seed, _TAG_PASS, s, _uniform(npass)))
            sample[sel] = self._subset(s, r)
        return src, sample

    def positions(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(source int64[n], sample int64[n])`` for global stream positions ``[start, stop)``."""
        if stop < start:
            raise ValueError(f"positions({start}, {stop}): stop < start")
        return self.lookup(np.arange(start, stop, dtype=np.int64))

    def global_ids(self, source: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Global sample ids (``Batch.index``): ``offsets[source] + sample``."""
        return self.offsets[np.asarray(source)] + np.asarray(sample)


class Plan:
    """One rank's cursor over a mixture's stream, in batches.

    Rank ``r`` of ``W`` reads global positions ``r, r+W, r+2W, ...``; with a budget each rank
    gets ``floor(total / W)`` samples. Batch ``b`` is the rank-stream items
    ``[cursor + b*B, cursor + (b+1)*B)`` counted from the cursor (``samples`` consumed, moved by
    :meth:`advance` and :meth:`load_state_dict`). ``drop_last`` drops a final partial batch.
    """

    def __init__(self, mixture: Mixture, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not _is_int(world_size) or world_size <= 0 or not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank!r} / world_size {world_size!r}: need 0 <= rank < world_size")
        self.mixture = mixture
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.samples = 0  # rank-stream items consumed (the cursor)
        total = mixture.total
        #: rank-stream length (None: infinite)
        self.rank_total: Optional[int] = None if total is None else total // self.world_size

    # ------------------------------------------------------------------ size
    @property
    def num_batches(self) -> Optional[int]:
        """Batches left after the cursor (``None`` for an infinite stream)."""
        if self.rank_total is None:
            return None
        left = max(0, self.rank_total - self.samples)
        return left // self.batch_size if self.drop_last else -(-left // self.batch_size)

    def __len__(self) -> int:
        n = self.num_batches
        if n is None:
            raise TypeError("the plan is infinite (no budget): it has no length")
        return n

    # ------------------------------------------------------------------ batches
    def batch_items(self, b: int) -> np.ndarray:
        """Rank-stream item numbers of batch ``b`` after the cursor (int64 ``[<= B]``)."""
        lo = self.samples + b * self.batch_size
        hi = lo + self.batch_size
        if self.rank_total is not None:
            n = self.num_batches
            if not 0 <= b < n:
                raise IndexError(f"batch {b} out of range: {n} batches left")
            hi = min(hi, self.rank_total)
        return np.arange(lo, hi, dtype=np.int64)

    def batch(self, b: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(source, sample, global_index)`` int64 ``[B]`` for batch ``b`` after the cursor.

        ``global_index`` is the sample's global id ``offsets[source] + sample`` (``Batch.index``).
        """
        pos = self.rank + self.batch_items(b) * self.world_size
        src, smp = self.mixture.lookup(pos)
        return src, smp, self.mixture.global_ids(src, smp)

    def advance(self, batches: int = 1) -> None:
        """Move the cursor past ``batches`` batches (clamped to the end of a finite stream)."""
        self.samples += batches * self.batch_size
        if self.rank_total is not None:
            self.samples = min(self.samples, self.rank_total)

    def copy(self) -> "Plan":
        return copy.copy(self)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, object]:
        return {"samples": int(self.samples), "batch_size": self.batch_size, "world_size": self.world_size,
                "seed": self.mixture.seed, "fingerprint": self.mixture.fingerprint()}

    def load_state_dict(self, sd: Dict[str, object]) -> None:
        """Resume at the next sample. Another world size maps the global position consumed
        (``samples * W_old``, exact when divisible by the new world size); another batch size
        is fine (the cursor counts samples); another plan (fingerprint) is a ValueError."""
        missing = [k for k in ("samples", "world_size", "fingerprint") if k not in sd]
        if missing:
            raise ValueError(f"plan state_dict lacks {missing}; got keys {sorted(sd)}")
        fp = self.mixture.fingerprint()
        if sd["fingerprint"] != fp:
            raise ValueError(f"cannot resume: the state_dict was saved for another mixture "
                             f"(fingerprint {sd['fingerprint']}, seed {sd.get('seed')}) than this one "
                             f"(fingerprint {fp}, seed {self.mixture.seed}): sources, fractions, "
                             f"weights/dups or seed differ")
        consumed_global = int(sd["samples"]) * int(sd["world_size"])
        self.samples = consumed_global // self.world_size
        if self.rank_total is not None:
            self.samples = min(self.samples, self.rank_total)
