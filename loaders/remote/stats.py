"""This process's remote activity counters (:data:`STATS`) and one-time notes on stderr.

``STATS`` is one dict shared by every module of :mod:`loaders.remote` (and read by
``fastssl bench remote`` and the tests): ``requests`` (HTTP-level: one per object or byte range
asked for, retries included), ``bytes`` fetched, ``cache_reads`` (reads served from the shard
cache), ``downloads`` (whole shards into the cache), ``retries``. Counts are Python ints.
"""
from __future__ import annotations

import sys
import threading
from typing import Dict

__all__ = ["STATS", "count", "reset_stats", "note_once"]

#: this process's remote activity: requests (HTTP-level: one per object or byte range asked for, retries
#: included), bytes fetched, reads served from the cache, shard downloads into the cache, retries
STATS: Dict[str, int] = {"requests": 0, "bytes": 0, "cache_reads": 0, "downloads": 0, "retries": 0}
_STATS_LOCK = threading.Lock()


def count(**kw: int) -> None:
    """Add ``kw``'s values to the :data:`STATS` entries of the same names (thread-safe)."""
    with _STATS_LOCK:
        for k, v in kw.items():
            STATS[k] += v


def reset_stats() -> Dict[str, int]:
    """Zero :data:`STATS`; returns the old counts."""
    with _STATS_LOCK:
        old = dict(STATS)
        for k in STATS:
            STATS[k] = 0
    return old


def note_once(what, message: str, _seen: set = set()) -> None:  # noqa: B006 (a per-process memo)
    """Print ``message`` to stderr the first time this process sees ``what``."""
    if what not in _seen:
        _seen.add(what)
        print(message, file=sys.stderr)
