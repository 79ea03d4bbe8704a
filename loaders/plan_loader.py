"""The shared Loader semantics every backend (torch, resident, DALI, FFCV) builds on.

A loader reads one rank's batches of a mixture :class:`~loaders.mixture.Plan` and yields
:class:`~loaders.batch.Batch` es. This base validates the shared constructor arguments, keeps the
cursor of handed-out samples and the skip counts, draws the per-batch random parameters from
(seed, rank, rank-stream position of the chunk's first sample) -- so they do not depend on
workers, threads or restarts -- and saves/loads state (:meth:`PlanLoader.state_dict`): a checkpoint
from one backend resumes on any other at exactly the next sample.

**Chunks and batches.** A backend reads the rank's stream in *chunks*: chunk ``b`` is the
rank-stream items ``[g + b*B, g + (b+1)*B)`` on a grid of ``B = batch_size`` items (``g`` is fixed
for the run, 0 unless a resume changed the world or batch size) and reports, with each chunk, the
slots that failed (``Batch.meta["failed"]``: ``(slot, one-line reason)`` pairs; a chunk it never
yields counts as all failed). Crops, flips and worker hooks are drawn per chunk, so a chunk's
pixels are a pure function of its position. This base then hands out batches of exactly ``B``
readable samples in plan order:

**The replacement rule** (``on_error: skip``). A sample that cannot be read or decoded is dropped
and its place is taken by the next sample of this rank's own plan stream: batch ``j`` holds the
``B`` readable samples that follow batch ``j-1``'s last one, and the cursor (``Plan.samples``,
the resume point) moves to just after the last sample handed out. So every rank's every batch
has exactly ``batch_size`` samples as long as the plan has samples left; only where a finite plan
(a ``budget``) runs out is the last batch short (yielded with ``drop_last=False``, dropped
otherwise). The batches do not depend on the number of workers or threads (chunks are), and a
run resumed from ``state_dict()`` re-reads the chunk its cursor falls in and yields the same
batches as an uninterrupted one. Batches that straddle two chunks are joined by one copy of
their views in the consumer's process (none without skips).

**Skip accounting.** ``skipped`` (total), ``skipped_by_source`` (``{source name: n}``) and
``skipped_files`` (the files of the last :data:`SKIPPED_FILES_KEPT` failures, ``source.describe``)
count the failed samples before the cursor, i.e. of the samples read so far by this rank, and
are part of ``state_dict`` (``skip_reasons``: the same failures' one-line messages, not saved).
**The threshold rule**: once this rank has read at least
:data:`MIN_READS_FOR_SKIP_CHECK` samples (the cursor, counted from the start of the run), a
skipped fraction above ``max_skip_fraction`` (``data.max_skip_fraction``, default 0.01) stops
the loader with a :class:`DataError` naming a few files and the key; checked whenever a chunk
arrives, so one bad file early on never stops a run, and a stream that only fails stops after
at most ``max(100, B)`` reads instead of looping forever.

**Bounded reads** (``read_timeout_s``, ``data.read_timeout_s``, default 60 s; None/0 = off).
:class:`TimedReader` runs ``source.read(i)`` in a helper thread of the reading process and waits
at most that long for each sample; a read that takes longer is a :class:`SampleError` "read of
<file> timed out after N s" (raised, or a counted skip replaced like any other). A thread blocked
in a read (a FIFO, a hung network mount) cannot be killed: it is abandoned (a daemon thread that
exits if the read ever returns) and a fresh one takes over; once :data:`MAX_HUNG_READS` abandoned
reads of a process are still blocked, the loader stops with a :class:`DataError` instead of
leaking more threads. Cost: one thread hand-off per chunk plus two lock round trips per sample;
measured on the 2-core CPU machine (10k reads, median of 5): +1.1 us per sample for 32 px PNG
files read in chunks of 256 (11.6 -> 12.7 us per read), +1.9 us in chunks of 32; the torch
backend's whole per-sample cost (read, decode, two 32 px crops) 107.5 -> 108.2 us (+0.7%).

**Several ranks.** Each rank's cursor moves by its own skips, so a checkpoint must hold every
rank's ``state_dict`` for a multi-rank resume under ``on_error: skip`` to be exact; a state saved
by another rank (``state_dict()["rank"]``) is loaded with a warning saying so.
"""
from __future__ import annotations

import collections
import numbers
import os
import queue
import threading
import time
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import InMemorySource, Source, prefetch_calls
from .crop import CropSpec
from .errors import ConfigError, DataError, SampleError, check_on_error

__all__ = ["PlanLoader", "TimedReader", "hung_reads", "rng_key", "one_line", "sample_error",
           "MIN_READS_FOR_SKIP_CHECK", "SKIPPED_FILES_KEPT", "MAX_HUNG_READS",
           "DEFAULT_READ_TIMEOUT_S", "DEFAULT_MAX_SKIP_FRACTION"]

_M64 = (1 << 64) - 1
#: the skip threshold is checked only once a rank has read this many samples
MIN_READS_FOR_SKIP_CHECK = 100
#: how many recent failures ``skipped_files`` keeps
SKIPPED_FILES_KEPT = 20
#: abandoned (still blocked) reads per process before the loader gives up
MAX_HUNG_READS = 8
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_MAX_SKIP_FRACTION = 0.01
#: longest message kept for one failure
_MAX_MESSAGE = 300


def rng_key(seed: int, rank: int, first_item: int) -> list:
    """The parts of a batch's key: (seed, rank, rank-stream item of its first sample); the key
    itself is their hash, :func:`loaders.augment.sampler.batch_key`."""
    return [int(seed) & _M64, int(rank), int(first_item)]


def one_line(text: str, limit: int = _MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def sample_error(e: SampleError, source: Source, index: int) -> SampleError:
    """``e`` as a one-line :class:`SampleError` that names the file, the sample and its source."""
    msg = one_line(e)
    name = getattr(source, "name", "") or "?"
    if f"source '{name}'" not in msg:
        msg = f"{msg} (source '{name}')" if f"sample {index}" in msg else f"{msg} (source '{name}', sample {index})"
    return SampleError(msg, path=getattr(e, "path", "") or source.describe(index), index=index)


# -----------------------------------------------------------------------------------------------
# bounded reads
# -----------------------------------------------------------------------------------------------

def _read_one(source: Source, index: int):
    try:
        return source.read(index)
    except Exception as e:  # handed to the caller, which re-raises what is not a SampleError
        return e


class _Job:
    """Reads ``calls[lo:hi]`` into ``out`` on a helper thread; ``k``/``t0`` say which read is in
    progress since when. After ``abandoned`` the thread writes nothing more."""

    def __init__(self, calls, lo: int, hi: int, out: list):
        self.calls, self.lo, self.hi, self.out = calls, lo, hi, out
        self.k, self.t0 = lo, time.monotonic()
        self.done = self.abandoned = False
        self.lock = threading.Lock()
        self.event = threading.Event()

    def run(self) -> None:
        prefetch_calls(self.calls[self.lo:self.hi])  # remote shards: one batched fetch for the slice
        for k in range(self.lo, self.hi):
            with self.lock:
                if self.abandoned:
                    return
                self.k, self.t0 = k, time.monotonic()
            r = _read_one(*self.calls[k])
            with self.lock:
                if self.abandoned:
                    return
                self.out[k] = r
        with self.lock:
            self.done = True
        self.event.set()


#: (thread, file) of this process's abandoned reads; pruned as they return
_HUNG: list = []
_HUNG_LOCK = threading.Lock()


def hung_reads() -> List[str]:
    """The files of this process's abandoned reads that are still blocked."""
    with _HUNG_LOCK:
        _HUNG[:] = [h for h in _HUNG if h[0].is_alive() and h[2] == os.getpid()]
        return [h[1] for h in _HUNG]


def _serve(q: "queue.SimpleQueue") -> None:
    while True:
        job = q.get()
        if job is None:
            return
        job.run()
        if job.abandoned:  # a replacement thread serves the slot now
            return


class TimedReader:
    """``source.read(i)`` for many samples, each bounded by ``timeout`` seconds.

    ``read_all([(source, i), ...])`` returns, per call, ``(data, label)`` or the exception the
    read raised (a timed-out read: a :class:`SampleError` "read of <file> timed out after N s").
    Reads run on ``threads`` daemon helper threads of the calling process (contiguous slices of
    the calls, one slice per thread); with one thread they run inline when there is no timeout
    or every source holds its samples in memory (:class:`~loaders.base.InMemorySource`).
    Picklable and fork-safe: threads are made lazily in the process that reads.
    """

    def __init__(self, timeout: Optional[float] = None, threads: int = 1, max_hung: int = MAX_HUNG_READS):
        self.timeout = float(timeout) if timeout else None
        self.threads = max(1, int(threads))
        self.max_hung = int(max_hung)
        self._pid = None
        self._slots: list = []

    def __getstate__(self):
        d = dict(self.__dict__)
        d.update(_pid=None, _slots=[])
        return d

    def _ensure(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._slots = [None] * self.threads  # (queue, thread) per slot; None: made on demand

    def _submit(self, t: int, job: _Job) -> _Job:
        if self._slots[t] is None:
            q = queue.SimpleQueue()
            th = threading.Thread(target=_serve, args=(q,), name=f"fastssl-read-{t}", daemon=True)
            th.start()
            self._slots[t] = (q, th)
        job.t0 = time.monotonic()
        self._slots[t][0].put(job)
        return job

    def read_all(self, calls: Sequence[Tuple[Source, int]]) -> list:
        n = len(calls)
        inline = self.timeout is None or all(isinstance(s, InMemorySource) for s, _ in calls)  # RAM: cannot hang
        if inline and (self.threads == 1 or n < 2):
            prefetch_calls(calls)
            return [_read_one(s, i) for s, i in calls]
        self._ensure()
        out: list = [None] * n
        k = min(self.threads, n)
        jobs = [self._submit(t, _Job(calls, n * t // k, n * (t + 1) // k, out)) for t in range(k)]
        for t, job in enumerate(jobs):
            self._wait(t, job)
        return out

    def _wait(self, t: int, job: _Job) -> None:
        T = self.timeout
        while True:
            if T is None:
                job.event.wait()
                return
            if job.event.wait(max(0.0, job.t0 + T - time.monotonic())):
                return
            with job.lock:
                stuck = not job.done and time.monotonic() - job.t0 >= T
                job.abandoned = stuck
            if not stuck:
                continue
            k = job.k
            src, i = job.calls[k]
            where = src.describe(i)
            job.out[k] = SampleError(f"read of {where} timed out after {T:g} s (data.read_timeout_s)",
                                     path=where, index=i)
            self._abandon(t, where)
            if k + 1 >= job.hi:
                return
            job = self._submit(t, _Job(job.calls, k + 1, job.hi, job.out))

    def _abandon(self, t: int, where: str) -> None:
        q, th = self._slots[t]
        self._slots[t] = None
        with _HUNG_LOCK:
            _HUNG.append((th, where, os.getpid()))
        hung = hung_reads()
        if len(hung) >= self.max_hung:
            raise DataError(f"{len(hung)} reads are still blocked after data.read_timeout_s={self.timeout:g} s "
                            f"(e.g. {where}; {hung[0]}): the storage does not respond")


# -----------------------------------------------------------------------------------------------
# the loader base
# -----------------------------------------------------------------------------------------------

def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_read_timeout(value, what: str = "data.read_timeout_s") -> Optional[float]:
    """``value`` as seconds (> 0) or None (None/0 = no timeout); a ConfigError naming ``what``."""
    if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ConfigError(f"{what} must be a number of seconds > 0, or 0/null for no timeout; got {value!r}")
    return float(value)


def check_skip_fraction(value, what: str = "data.max_skip_fraction") -> float:
    """``value`` as a float in [0, 1); a ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ConfigError(f"{what} must be a number in [0, 1) (the tolerated fraction of failed samples), "
                          f"got {value!r}")
    return float(value)


class PlanLoader:
    """Cursor over this rank's batches of a mixture plan, with the shared Loader semantics.

    Subclasses implement ``_batches(plan)``: yield a :class:`Batch` per chunk ``b`` of ``plan``
    (``plan.batch(b)``; ``meta["batch"] = b``, ``meta["failed"]`` = ``(slot, reason)`` pairs of
    the chunk's samples that failed under ``on_error="skip"``, its rows being the other slots in
    order); a chunk may be left out when every sample failed. This base regroups them into
    batches (see the module doc), and holds the cursor, the skip counts, crop sampling and
    ``state_dict``/``load_state_dict``.

    ``read_timeout_s``: bound on one ``source.read`` (None/0: none); ``max_skip_fraction``: the
    threshold rule of the module doc.
    """

    backend = "plan"

    def __init__(self, sources: Sequence[Source], mixture, *, batch_size: int,
                 crops: Optional[Sequence[CropSpec]] = None, resize: Optional[int] = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 2, seed: int = 0,
                 on_error: str = "raise", pin_memory: bool = False, drop_last: bool = True,
                 read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION):
        from .mixture import Plan

        self.sources = list(sources)
        if len(self.sources) != mixture.num_sources:
            raise ConfigError(f"{self.backend} loader: {len(self.sources)} sources for a mixture of "
                              f"{mixture.num_sources}")
        for s, (src, n) in enumerate(zip(self.sources, mixture.sizes.tolist())):
            if len(src) != n:
                raise ConfigError(f"{self.backend} loader: source '{mixture.names[s]}' has {len(src)} samples "
                                  f"but the mixture expects {n}")
        check_on_error(on_error, f"{self.backend} loader")
        if crops is not None:
            crops = list(crops)
            if not crops or not all(isinstance(c, CropSpec) for c in crops):
                raise ConfigError(f"{self.backend} loader: crops must be a non-empty list of CropSpec, got {crops!r}")
        if resize is not None and (not isinstance(resize, int) or resize <= 0):
            raise ConfigError(f"{self.backend} loader: resize must be a positive integer or None, got {resize!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"{self.backend} loader: num_workers must be an integer >= 0, got {num_workers!r}")
        batch_size = _check_positive_int(batch_size, f"{self.backend} loader: batch_size")
        self.read_timeout_s = check_read_timeout(read_timeout_s, f"{self.backend} loader: read_timeout_s")
        self.max_skip_fraction = check_skip_fraction(max_skip_fraction, f"{self.backend} loader: max_skip_fraction")
        self.mixture = mixture
        self.offsets = np.asarray(mixture.offsets, np.int64)
        self.crops = crops
        self.resize = resize
        self.num_workers = num_workers
        self.seed = int(seed)
        self.on_error = on_error
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self._plan = Plan(mixture, batch_size=batch_size, rank=rank, world_size=world_size, drop_last=drop_last)
        #: samples skipped under on_error="skip" among the samples read so far (before the cursor)
        self.skipped = 0
        self._skipped_by = np.zeros(mixture.num_sources, np.int64)
        self._skipped_files: collections.deque = collections.deque(maxlen=SKIPPED_FILES_KEPT)
        #: one-line messages of the last skipped samples (why they failed; not in the state)
        self.skip_reasons: collections.deque = collections.deque(maxlen=SKIPPED_FILES_KEPT)
        self._grid = 0  # chunks start at rank-stream items = _grid (mod batch_size)
        self._pool = None  # recycled CPU buffers for batches joined from two chunks
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

    @property
    def skipped_by_source(self) -> dict:
        """``{source name: samples skipped}`` (every source, zeros included)."""
        return {n: int(c) for n, c in zip(self.mixture.names, self._skipped_by.tolist())}

    @property
    def skipped_files(self) -> List[str]:
        """Where the last :data:`SKIPPED_FILES_KEPT` skipped samples live (``source.describe``:
        a file path, ``shard.tar:key``, ...), oldest first."""
        return list(self._skipped_files)

    def __len__(self) -> int:
        """Batches left if no further sample fails (an upper bound under ``on_error: skip``);
        TypeError for an unlimited mixture."""
        return len(self._plan)

    def _chunk_plan(self):
        """The plan the backend reads: chunks on the run's grid from the one holding the cursor
        (with skips, a finite plan's partial last chunk too: it holds replacements)."""
        chunks = self._plan.copy()
        B = chunks.batch_size
        chunks.samples -= (chunks.samples - self._grid) % B
        if self.on_error == "skip":
            chunks.drop_last = False
        return chunks

    def __iter__(self):
        chunks = self._chunk_plan()
        it = self._batches(chunks)
        self._iterating = True
        try:
            yield from _Assembler(self, chunks).batches(it)
        finally:
            self._iterating = False
            close = getattr(it, "close", None)
            if close is not None:
                close()

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
    def batch_key(self, plan, b: int) -> int:
        """The sampler's key of batch ``b`` after ``plan``'s cursor (the torch backend's):
        :func:`loaders.augment.sampler.batch_key` of (seed, rank, rank-stream item of its first sample)."""
        from .augment.sampler import batch_key
        return batch_key(self.seed, plan.rank, plan.samples + b * plan.batch_size)

    def crop_boxes(self, plan, b: int, heights, widths) -> List[np.ndarray]:
        """Random-resized-crop boxes ``int64 [n, 4]`` (top, left, h, w), one array per CropSpec,
        for batch ``b`` after ``plan``'s cursor, drawn by the one sampler with the batch key: a
        function of the batch's position in the rank's stream only (not of workers, threads or
        restarts), identical to the torch backend's and to the engine's for that key."""
        from .augment.sampler import draw_boxes
        hw = np.stack([np.asarray(heights, np.int64).reshape(-1), np.asarray(widths, np.int64).reshape(-1)], 1)
        return draw_boxes(self.crops, hw, key=self.batch_key(plan, b))

    def flips(self, plan, b: int, n: int, views: int) -> np.ndarray:
        """``bool [n, views]`` horizontal flips (p = 0.5) of batch ``b``: the sampler's flip op with
        the batch key (the torch backend's ``flip=True`` draws)."""
        from .augment.sampler import draw_flips
        seed = self.crops[0].seed if self.crops else 0
        return draw_flips(n, views, key=self.batch_key(plan, b), seed=seed)

    # -- reading ---------------------------------------------------------------------------------
    def read_samples(self, src: np.ndarray, sample: np.ndarray, reader: Optional[TimedReader] = None):
        """``source.read`` for every pair (through ``reader``: threads and the read timeout);
        returns (data list, label int64[n], failed list of ``(k, one-line reason)``).

        A :class:`SampleError` re-raises (one line, naming the source) under ``on_error="raise"``;
        under ``"skip"`` the sample's data is None and it is listed in ``failed``.
        """
        calls = [(self.sources[int(s)], int(j)) for s, j in zip(src.tolist(), sample.tolist())]
        got = (reader or TimedReader(self.read_timeout_s)).read_all(calls)
        data, labels, failed = [], np.full(len(calls), -1, np.int64), []
        for k, r in enumerate(got):
            if isinstance(r, BaseException):
                if not isinstance(r, SampleError):
                    raise r
                err = sample_error(r, *calls[k])
                if self.on_error == "raise":
                    raise err from None
                failed.append((k, str(err)))
                data.append(None)
                continue
            data.append(r[0])
            labels[k] = r[1]
        return data, labels, failed

    # -- skip accounting -----------------------------------------------------------------------
    def _count_skip(self, s: int, where: str, message: str) -> None:
        self.skipped += 1
        self._skipped_by[s] += 1
        self._skipped_files.append(where)
        self.skip_reasons.append(message)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The plan cursor after the batches handed out so far, the skip counts and the chunk grid."""
        return {"plan": self._plan.state_dict(), "skipped": int(self.skipped),
                "skipped_by_source": self.skipped_by_source, "skipped_files": self.skipped_files,
                "grid": int(self._grid), "rank": self.rank}

    def load_state_dict(self, sd: dict) -> None:
        """Resume at the next sample (call before iterating)."""
        if self._iterating:
            raise RuntimeError("load_state_dict() while iterating: call it before the for-loop")
        if "plan" not in sd:
            raise ConfigError(f"{self.backend} loader state_dict lacks 'plan'; got keys {sorted(sd)}")
        self._plan.load_state_dict(sd["plan"])
        self.skipped = int(sd.get("skipped", 0))
        by = sd.get("skipped_by_source") or {}
        self._skipped_by = np.array([int(by.get(n, 0)) for n in self.mixture.names], np.int64)
        self._skipped_files = collections.deque(sd.get("skipped_files") or [], maxlen=SKIPPED_FILES_KEPT)
        p = sd["plan"]
        same = int(p.get("world_size", 0)) == self.world_size and int(p.get("batch_size", 0)) == self.batch_size
        saved_by = sd.get("rank", self.rank)
        if self.on_error == "skip" and saved_by != self.rank and same:
            warnings.warn(f"{self.backend} loader (rank {self.rank}): resuming from rank {saved_by}'s loader state; "
                          f"under on_error: skip each rank's cursor moves by its own skips, so this rank may "
                          f"repeat or miss a few samples (save every rank's state_dict to resume exactly)",
                          stacklevel=2)
        # another world or batch size: a new grid starting at the cursor
        self._grid = int(sd.get("grid", 0)) if same else self._plan.samples % self.batch_size

    def _views_spec(self) -> List[Tuple[int, Optional[CropSpec]]]:
        """(output size or 0 = as-is, crop spec or None) per output view."""
        if self.crops:
            return [(c.size, c) for c in self.crops]
        return [(self.resize or 0, None)]


# -----------------------------------------------------------------------------------------------
# chunks -> batches of exactly batch_size
# -----------------------------------------------------------------------------------------------

def _stage_key(batch) -> dict:
    """The chunk's ``stage`` and ``key`` for a batch cut from it (a joined batch: its first chunk's key,
    the one its first rows were augmented with)."""
    return {k: getattr(batch, k) for k in ("stage", "key") if hasattr(batch, k)}


class _Assembler:
    """Regroups one iteration's chunks into batches of ``batch_size`` readable samples, moving
    the loader's cursor and skip counts as batches are handed out (the module doc's rules)."""

    def __init__(self, loader: PlanLoader, chunks):
        self.L = loader
        self.chunks = chunks
        self.B = chunks.batch_size
        self.c0 = loader._plan.samples   # the cursor: items before it were handed out already
        self.pieces: collections.deque = collections.deque()   # [batch, row_lo, row_hi, items]
        self.rows = 0
        self.pending: collections.deque = collections.deque()  # (item, source, file, message) after the cursor
        self.next_b = 0
        self.out_no = 0
        self.read_end = self.c0

    def batches(self, it):
        for chunk in it:
            b = int(chunk.meta["batch"])
            while self.next_b < b:
                self._ingest(self.next_b, None)
            self._ingest(b, chunk)
            while self.rows >= self.B:
                yield self._emit(self.B)
        total = self.chunks.num_batches
        if total is None:
            return
        while self.next_b < total:
            self._ingest(self.next_b, None)
        while self.rows >= self.B:
            yield self._emit(self.B)
        if self.rows and not self.L.drop_last:
            yield self._emit(self.rows)
        self._finish()

    def _ingest(self, b: int, chunk) -> None:
        """Chunk ``b`` (None: every sample failed): queue its rows and its failures."""
        first = self.chunks.samples + b * self.B
        n = self.B if self.chunks.rank_total is None else min(self.B, self.chunks.rank_total - first)
        failed = dict(chunk.meta.get("failed", ())) if chunk is not None else {k: "" for k in range(n)}
        kept = np.ones(n, bool)
        kept[list(failed)] = False
        kept = np.flatnonzero(kept)
        if chunk is not None and len(chunk) != len(kept):
            raise RuntimeError(f"{self.L.backend} loader: chunk {b} has {len(chunk)} rows for {len(kept)} samples "
                               f"that did not fail")
        lo = max(0, self.c0 - first)  # slots handed out before this iteration (a resumed chunk)
        if failed:
            src, smp, _ = self.chunks.batch(b)
            for slot in sorted(failed):
                if slot >= lo:
                    s, j = int(src[slot]), int(smp[slot])
                    where = self.L.sources[s].describe(j)
                    msg = failed[slot] or f"{where}: sample {j} could not be read"
                    self.pending.append((first + slot, s, where, one_line(msg)))
        r0 = int(np.searchsorted(kept, lo))
        if chunk is not None and len(kept) > r0:
            self.pieces.append([chunk, r0, len(kept), first + kept])
            self.rows += len(kept) - r0
        self.read_end = first + n
        self.next_b = b + 1
        self._check_fraction()

    def _check_fraction(self) -> None:
        L = self.L
        reads = self.read_end
        skips = L.skipped + len(self.pending)
        if L.on_error != "skip" or reads < MIN_READS_FOR_SKIP_CHECK or skips <= L.max_skip_fraction * reads:
            return
        recent = (list(L._skipped_files) + [p[2] for p in self.pending])[-3:]
        why = (list(L.skip_reasons) + [p[3] for p in self.pending])[-1]
        raise DataError(f"{L.backend} loader (rank {L.rank}): {skips} of the {reads} samples read failed "
                        f"({skips / reads:.1%}), more than data.max_skip_fraction={L.max_skip_fraction:g}; "
                        f"last files: {', '.join(recent)} (last error: {one_line(why, 160)}). "
                        f"Fix or remove those files, or raise data.max_skip_fraction")

    def _emit(self, k: int):
        take = []
        while k:
            p = self.pieces[0]
            m = min(k, p[2] - p[1])
            take.append((p[0], p[1], p[1] + m, p[3]))
            p[1] += m
            k -= m
            self.rows -= m
            if p[1] == p[2]:
                self.pieces.popleft()
        batch, lo, hi, items = take[-1]
        cursor = int(items[hi - 1]) + 1
        n_skip = self._commit(cursor)
        out = self._join(take)
        out.skipped = n_skip
        out.meta = {**out.meta, "batch": self.out_no}
        out.meta.pop("failed", None)
        self.out_no += 1
        self.L._plan.samples = cursor
        return out

    def _commit(self, cursor: int) -> int:
        n = 0
        while self.pending and self.pending[0][0] < cursor:
            _, s, where, msg = self.pending.popleft()
            self.L._count_skip(s, where, msg)
            n += 1
        return n

    def _finish(self) -> None:
        """The plan ran out: every sample read counts, leftover rows (dropped) included."""
        self._commit(self.read_end)
        plan = self.L._plan
        plan.samples = max(plan.samples, self.read_end)
        if plan.rank_total is not None:
            plan.samples = min(plan.samples, plan.rank_total)

    def _join(self, take):
        """One Batch from row ranges of chunks: the chunk itself, a slice of it, or one copy."""
        from .batch import Batch
        if len(take) == 1:
            batch, lo, hi, _ = take[0]
            if lo == 0 and hi == len(batch):
                return batch
            return Batch(views=[v[lo:hi] for v in batch.views], index=batch.index[lo:hi],
                         source=batch.source[lo:hi], label=batch.label[lo:hi], meta=dict(batch.meta),
                         **_stage_key(batch))
        parts = [(b, lo, hi) for b, lo, hi, _ in take if hi > lo]
        try:
            views = [self._cat([b.views[v][lo:hi] for b, lo, hi in parts]) for v in range(len(parts[0][0].views))]
        except RuntimeError as e:
            raise DataError(f"{self.L.backend} loader: the images of one batch differ in size; set data.image_size "
                            f"(resize) or crops ({one_line(e, 120)})") from None
        out = Batch(views=views, index=torch.cat([b.index[lo:hi] for b, lo, hi in parts]),
                    source=torch.cat([b.source[lo:hi] for b, lo, hi in parts]),
                    label=torch.cat([b.label[lo:hi] for b, lo, hi in parts]), meta=dict(parts[-1][0].meta),
                    **_stage_key(parts[0][0]))
        if self.L.pin_memory and out.device.type == "cpu" and torch.cuda.is_available():
            out = out.pin_memory()
        return out

    def _cat(self, pieces: List[torch.Tensor]) -> torch.Tensor:
        """The pieces (``[n_i, C, H, W]``) stacked, on the CPU into a recycled buffer of the
        loader's :class:`~loaders.shm.BufferPool` in the first piece's memory layout (a fresh
        224 px batch costs ~9x the copy itself in page faults here)."""
        first = pieces[0]
        if first.device.type != "cpu" or first.dim() != 4:
            return torch.cat(pieces)
        if any(p.shape[1:] != first.shape[1:] or p.dtype != first.dtype for p in pieces):
            raise RuntimeError(f"views of shapes {sorted({tuple(p.shape[1:]) for p in pieces})}")
        n, (c, h, w) = sum(p.shape[0] for p in pieces), first.shape[1:]
        if self.L._pool is None:
            from .shm import BufferPool
            self.L._pool = BufferPool()
        if not first.is_contiguous() and first.is_contiguous(memory_format=torch.channels_last):
            out = self.L._pool.empty((n, h, w, c), first.dtype).permute(0, 3, 1, 2)
        else:
            out = self.L._pool.empty((n, c, h, w), first.dtype)
        a = 0
        for p in pieces:
            out[a:a + p.shape[0]].copy_(p)
            a += p.shape[0]
        return out
