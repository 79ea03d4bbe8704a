"""Whole-shard cache on local disk (``cache_dir``, ``cache_max_gb``, default 50), shared by processes.

The first read of a shard in any process downloads it once (one streaming GET) into
``cache_dir/shards/<key>.tar``, ``key`` made from the URL, size and ETag
(:func:`loaders.remote.resolve.cache_key`), so a changed object is a new entry; every later read,
in any worker or rank on this machine, is a local ``pread``. Several processes: a download holds
an ``flock`` on the entry's ``.lock`` file; another process that finds it held does not wait, it
serves its reads by ranged requests meanwhile. Files are written to a temporary name and renamed
whole. Eviction (after each download) removes least recently used entries (mtime, touched when a
process first opens an entry) until the total is under the limit; a reader holding an evicted
file open keeps reading it (POSIX unlink), one that finds it gone falls back to ranged reads.
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError
from .stats import count

__all__ = ["ShardCache"]


class ShardCache:
    """Whole shards under ``directory/shards``, at most ``max_bytes`` (LRU by mtime); see the module
    docstring for the multi-process rules."""

    def __init__(self, directory, max_gb: float = 50.0):
        if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not max_gb > 0:
            raise ConfigError(f"shards source: cache_max_gb must be a number > 0, got {max_gb!r}")
        self.root = Path(os.path.expanduser(str(directory)))
        self.dir = self.root / "shards"
        self.max_bytes = int(max_gb * 2 ** 30)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.tar"

    def lookup(self, key: str) -> Optional[Path]:
        p = self.path(key)
        try:
            os.utime(p)  # recently used
        except OSError:
            return None
        return p

    def fill(self, key: str, download: Callable[[io.BufferedWriter], None]) -> Optional[Path]:
        """Download into the entry unless it is there; ``None`` when another process is downloading it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        with open(self.dir / f"{key}.lock", "a+b") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return None
                raise
            if p.exists():
                return p
            from ..shards import atomic_write  # (shards imports this package)
            atomic_write(p, download)   # a temporary name in the cache folder, then os.replace
        count(downloads=1)
        self.evict(keep=p)
        return p

    def evict(self, keep: Optional[Path] = None) -> None:
        entries = []
        for e in os.scandir(self.dir):
            if e.name.endswith(".tar"):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime_ns, st.st_size, e.path))
        total = sum(s for _, s, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if keep is not None and path == str(keep):
                continue
            try:
                os.unlink(path)  # readers holding it open keep reading (POSIX)
                total -= size
            except FileNotFoundError:
                pass  # another process evicted it first

