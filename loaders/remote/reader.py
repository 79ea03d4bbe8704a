"""The remote half of :class:`loaders.shards.ShardSource`: shards at URLs read by byte ranges.

The source keeps the per-sample index arrays and checks; :class:`RemoteShards` resolves the URLs
(:mod:`.resolve`), loads the indexes (:mod:`.index`) and fetches bytes. Sample ``i`` is one byte
range ``[offset - 512, offset + size)`` (its tar header and its bytes; the header's tag is checked
by the source). When a loader reads a chunk, the source first gets :meth:`RemoteShards.prefetch`
for all its samples (``loaders.base.prefetch_calls``, called by ``TimedReader``): per shard, the
samples' ranges (int64 arrays ``shard``, ``starts``, ``lengths``, shape ``(n,)``) are sorted and
merged into runs (:func:`merge_ranges`: neighbours less than 64 KiB apart, runs up to 16 MiB), and
all runs of the chunk go out in one ``fs.cat_ranges`` call (concurrent requests on async
filesystems such as s3fs). The bytes wait in a per-thread buffer that the following ``read``
calls take from; a sample not prefetched is one ranged request. With a ``cache_dir``, shards are
read from the local shard cache (:mod:`.cache`) instead. Without ``cache_dir`` nothing is written
locally except indexes that cannot be written remotely.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import ConfigError, SampleError
from .cache import ShardCache
from .fs import RemoteStore, check_no_secrets, is_url, protocol_of
from .index import load_indexes as _load_indexes
from .resolve import cache_key, object_infos, resolve_urls, version_of
from .stats import count

__all__ = ["RemoteShards", "open_shards", "merge_ranges", "MERGE_GAP", "MAX_RUN"]

#: ranges closer than this are fetched as one run
MERGE_GAP = 64 * 1024
#: longest merged run
MAX_RUN = 16 * 1024 * 1024


def merge_ranges(starts: np.ndarray, ends: np.ndarray, gap: int = MERGE_GAP,
                 max_run: int = MAX_RUN) -> List[Tuple[int, int]]:
    """Sorted byte ranges ``[start, end)`` merged into runs: neighbours less than ``gap`` apart,
    each run at most ``max_run`` bytes (a single longer range stays one run)."""
    order = np.argsort(starts, kind="stable")
    runs: List[Tuple[int, int]] = []
    for a, b in zip(starts[order].tolist(), ends[order].tolist()):
        if runs and a - runs[-1][1] < gap and max(b, runs[-1][1]) - runs[-1][0] <= max_run:
            runs[-1] = (runs[-1][0], max(b, runs[-1][1]))
        else:
            runs.append((a, b))
    return runs


class RemoteShards:
    """Shards at URLs: resolved, indexed, read by byte ranges (with prefetch) or from the cache.

    ``path``: URL, directory/glob URL or list (one protocol). Built in the main process; pickled
    into workers without its filesystem, descriptors or buffers (made again per process).
    """

    def __init__(self, path, *, storage_options: Optional[Mapping] = None, cache_dir=None,
                 cache_max_gb: float = 50.0, retries: int = 3, timeout_s: float = 30.0):
        urls = list(path) if isinstance(path, (list, tuple)) else [path]
        protocols = sorted({protocol_of(str(u)) for u in urls})
        if len(protocols) != 1:
            raise ConfigError(f"shards source: one protocol per source, got {', '.join(protocols)} in {urls}")
        self.store = RemoteStore(protocols[0], storage_options, retries=retries, timeout_s=timeout_s)
        self.cache = ShardCache(cache_dir, cache_max_gb) if cache_dir is not None else None
        self.urls, infos = resolve_urls(self.store, path)
        infos_l = object_infos(self.store, self.urls, infos)
        self.sizes = [int(i["size"]) for i in infos_l]
        self.versions = [version_of(i) for i in infos_l]
        self.keys = [cache_key(u, v) for u, v in zip(self.urls, self.versions)]
        self._reset()

    def load_indexes(self) -> List[Dict[str, np.ndarray]]:
        return _load_indexes(self)

    def _reset(self) -> None:
        from ..shards import _MAX_OPEN, _OpenFiles
        self._local: Dict[int, Path] = {}
        self._files = _OpenFiles(_MAX_OPEN)
        self._tls = threading.local()
        self._pid = os.getpid()

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("_local", "_files", "_tls"):
            d.pop(k, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._reset()

    def reset(self, *, inherited: bool = False) -> None:
        """In a forked child: drop the parent's descriptors and buffers."""
        if inherited and "_files" in self.__dict__:
            self._files.drop_after_fork()
        self._reset()

    def close(self) -> None:
        if "_files" in self.__dict__:
            self._files.close_all()

    def downloader(self, s: int, error) -> Callable:
        """``download(f)``: shard ``s``'s bytes into the open binary file ``f`` (retried whole)."""
        url, st = self.urls[s], self.store

        def once(f):
            f.seek(0)
            f.truncate()
            _copy(st.fs, st.strip(url), f)
            if f.tell() != self.sizes[s]:
                raise IOError(f"got {f.tell()} of {self.sizes[s]} bytes")
            count(bytes=self.sizes[s])

        def download(f):
            st.call(url, once, f, error=error, what="download", bounded=False)
        return download

    def _cached(self, s: int) -> Optional[Path]:
        """Shard ``s``'s local copy (downloaded now if it is not cached and nobody else is at it)."""
        if self.cache is None:
            return None
        p = self._local.get(s)
        if p is None:
            p = self.cache.lookup(self.keys[s]) or self.cache.fill(self.keys[s], self.downloader(s, SampleError))
            if p is not None:
                self._local[s] = p
        return p

    def _pread(self, s: int, path: Path, off: int, n: int) -> Optional[bytes]:
        try:
            ent = self._files.acquire(s, path)
        except SampleError:  # evicted by another process meanwhile
            self._local.pop(s, None)
            return None
        try:
            data = os.pread(ent[0], n, off)
        finally:
            self._files.release(ent)
        count(cache_reads=1)
        return data

    def read(self, s: int, off: int, n: int) -> bytes:
        """Bytes ``[off, off + n)`` of shard ``s``: prefetched, cached, or one ranged request."""
        if self._pid != os.getpid():
            self.reset(inherited=True)
        buf = getattr(self._tls, "buf", None)
        if buf:
            data = buf.pop((s, off, n), None)
            if data is not None:
                return data
        path = self._cached(s)
        if path is not None:
            data = self._pread(s, path, off, n)
            if data is not None:
                return data
        url, st = self.urls[s], self.store
        data = st.call(url, st.fs.cat_file, st.strip(url), start=off, end=off + n, error=SampleError,
                       what=f"bytes [{off}, {off + n})")
        count(bytes=len(data))
        return data

    def prefetch(self, shard: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Fetch the ranges ``[starts, starts + lengths)`` of shards ``shard`` for this thread's next
        reads: cached shards are filled (one download each), the others' ranges are merged into
        runs fetched in one ``cat_ranges`` call. Failures are left to the reads (which name them)."""
        if self._pid != os.getpid():
            self.reset(inherited=True)
        self._tls.buf = None
        jobs = []  # (shard, run start, run end, [(start, length)])
        for s in np.unique(shard).tolist():
            try:
                if self._cached(s) is not None:
                    continue
            except SampleError:
                continue
            sel = shard == s
            a, n = starts[sel], lengths[sel]
            for lo, hi in merge_ranges(a, a + n):
                inside = (a >= lo) & (a + n <= hi)
                jobs.append((s, lo, hi, list(zip(a[inside].tolist(), n[inside].tolist()))))
        if not jobs:
            return
        st = self.store
        try:
            got = st.call(self.urls[jobs[0][0]], st.fs.cat_ranges, [st.strip(self.urls[j[0]]) for j in jobs],
                          [j[1] for j in jobs], [j[2] for j in jobs], error=SampleError, what="prefetch",
                          requests=len(jobs))
        except SampleError:
            return
        buf = {}
        for (s, lo, hi, members), data in zip(jobs, got):
            if not isinstance(data, bytes) or len(data) != hi - lo:
                continue
            count(bytes=len(data))
            for a, n in members:
                buf[(s, a, n)] = data[a - lo:a - lo + n]
        self._tls.buf = buf


def _copy(fs, path: str, f, block: int = 8 * 2 ** 20) -> None:
    """Stream object ``path`` into file ``f`` in ``block``-sized reads."""
    with fs.open(path, "rb", block_size=block, cache_type="none") as r:
        while True:
            b = r.read(block)
            if not b:
                return
            f.write(b)


def open_shards(path, options: Mapping) -> Optional[RemoteShards]:
    """:class:`RemoteShards` for URL ``path`` with the source's remote ``options``; ``None`` for
    local paths (which take no remote options). Secret-looking keys are a ConfigError."""
    check_no_secrets(options, "shards source")
    items = list(path) if isinstance(path, (list, tuple)) else [path]
    urls = [is_url(p) for p in items]
    if any(urls) and not all(urls):
        raise ConfigError(f"shards source: 'path' mixes URLs and local paths ({', '.join(map(str, items[:4]))}); "
                          f"use one source each")
    if not any(urls):
        if options:
            raise ConfigError(f"shards source: {', '.join(sorted(options))} only apply to URLs "
                              f"(s3://, gs://, https://...), not to '{path}'")
        return None
    return RemoteShards(path, **options)
