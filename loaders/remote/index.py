"""Finding or building the ``.tar.idx`` index of every remote shard.

A shard's ``X.tar.idx`` is fetched beside it and used when its size and fingerprint (first and
last 64 KiB, two ranged reads batched for all shards) match the object. Otherwise the shard is
downloaded once and indexed, and the index is uploaded beside it; when that is refused
(read-only bucket) it is kept in ``cache_dir/index/`` or, without a cache, in
``$XDG_CACHE_HOME/fastssl/index`` (``~/.cache/...``), keyed by URL, size and ETag. A local copy is
tried first, for objects that have an ETag (without one the remote index is verified instead).

An index is the dict :func:`loaders.shards.build_index` makes: per sample (shape ``(n,)``)
``key``/``ext`` (bytes ``S*``), ``offset`` (int64, the data's byte offset in the tar), ``size`` and
``label`` (int64), ``tag`` (uint32, CRC-32 of the tar header); scalars (int64) ``version``,
``tar_size``, ``tar_mtime_ns``, ``checked_ns``; ``fingerprint`` (uint8, shape ``(16,)``).
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from .cache import ShardCache
from .stats import note_once

if TYPE_CHECKING:
    from .reader import RemoteShards

__all__ = ["load_indexes"]

_BLOCK = 512
_FP_SPAN = 64 * 1024
_INDEX_VERSION = 2


def load_indexes(shards: "RemoteShards") -> List[Dict[str, np.ndarray]]:
    """The index of every shard of ``shards``, in order (fetched, read locally or built)."""
    return _Indexer(shards).run()


def _index_dir(cache: Optional[ShardCache]) -> Path:
    """Where indexes that cannot be written beside their shards are kept."""
    if cache is not None:
        return cache.root / "index"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastssl" / "index"



def _fp_ranges(size: int) -> List[Tuple[int, int]]:
    """The byte ranges :func:`loaders.shards.fingerprint` hashes."""
    out = [(0, min(size, _FP_SPAN))]
    if size > _FP_SPAN:
        out.append((max(_FP_SPAN, size - _FP_SPAN), size))
    return out


def _fingerprint(size: int, parts: Sequence[bytes]) -> bytes:
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


def _well_formed(index: Dict[str, np.ndarray], size: int) -> bool:
    from ..shards import index_well_formed
    return index_well_formed(index, size)


def _parse_index(data) -> Optional[Dict[str, np.ndarray]]:
    if not isinstance(data, (bytes, bytearray)):
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001  (torn or foreign: rebuilt)
        return None


def _save_local_index(path: Path, index: Dict[str, np.ndarray]) -> None:
    from ..shards import _save_index
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_index(path, index)


class _Indexer:
    """Finds or builds the index of every shard of a :class:`RemoteShards` (see the module docstring)."""

    def __init__(self, shards: "RemoteShards"):
        self.r = shards
        self.store = shards.store
        self.idir = _index_dir(shards.cache)

    def run(self) -> List[Dict[str, np.ndarray]]:
        r = self.r
        out: List[Optional[Dict]] = [None] * len(r.urls)
        for k, key in enumerate(r.keys):  # a local copy keyed by URL, size and ETag (without one: verified)
            if r.versions[k].endswith(":"):
                continue
            ix = _parse_index(_read_bytes(self.idir / f"{key}.idx"))
            if ix is not None and _well_formed(ix, r.sizes[k]):
                out[k] = ix
        self._fetch([k for k in range(len(out)) if out[k] is None], out)
        for k in range(len(out)):
            if out[k] is None:
                out[k] = self._build(k)
        return out

    def _fetch(self, todo: List[int], out: list) -> None:
        """Remote ``.idx`` files of shards ``todo`` whose size and fingerprint match (two batched requests)."""
        if not todo:
            return
        st, r = self.store, self.r
        paths = [st.strip(r.urls[k] + ".idx") for k in todo]
        got = st.call(r.urls[todo[0]] + ".idx", st.fs.cat, paths, on_error="return", what="index",
                      requests=len(paths))
        if not isinstance(got, dict):
            got = {paths[0]: got}
        cand = {k: _parse_index(got.get(p)) for k, p in zip(todo, paths)}
        cand = {k: ix for k, ix in cand.items() if ix is not None and _well_formed(ix, r.sizes[k])}
        if not cand:
            return
        ranges = [(k, a, b) for k in cand for a, b in _fp_ranges(r.sizes[k])]
        parts = st.call(r.urls[todo[0]], st.fs.cat_ranges, [st.strip(r.urls[k]) for k, _, _ in ranges],
                        [a for _, a, _ in ranges], [b for _, _, b in ranges], what="fingerprint",
                        requests=len(ranges))
        by: Dict[int, list] = {}
        for (k, _, _), p in zip(ranges, parts):
            by.setdefault(k, []).append(p)
        for k, ix in cand.items():
            ps = by[k]
            if all(isinstance(p, bytes) for p in ps) and \
                    ix["fingerprint"].tobytes() == _fingerprint(r.sizes[k], ps):
                out[k] = ix
                if r.cache is not None:
                    _save_local_index(self.idir / f"{r.keys[k]}.idx", ix)

    def _build(self, k: int) -> Dict[str, np.ndarray]:
        """Download shard ``k`` once (into the cache when there is one), index it, store the index."""
        from ..shards import build_index
        r = self.r
        url = r.urls[k]
        note_once(("build", url.rsplit("/", 1)[0]), f"note: building missing or stale shard indexes under "
                   f"'{url.rsplit('/', 1)[0]}' (one download per shard)")
        if r.cache is not None:
            path = r.cache.lookup(r.keys[k]) or r.cache.fill(r.keys[k], r.downloader(k, DataError))
        else:
            path = None
        if path is not None:
            index = build_index(path)
        else:
            with tempfile.NamedTemporaryFile(suffix=".tar") as f:
                r.downloader(k, DataError)(f)
                f.flush()
                index = build_index(f.name)
        if int(index["tar_size"]) != r.sizes[k]:
            raise DataError(f"{url}: the object changed while it was indexed ({r.sizes[k]} -> "
                            f"{int(index['tar_size'])} bytes); open the source again")
        self._store(k, index)
        return index

    def _store(self, k: int, index: Dict[str, np.ndarray]) -> None:
        r, st = self.r, self.store
        buf = io.BytesIO()
        np.savez(buf, **index)
        try:
            st.call(r.urls[k] + ".idx", st.fs.pipe_file, st.strip(r.urls[k] + ".idx"), buf.getvalue(),
                    what="index upload")
            if r.cache is None:
                return
        except DataError as e:
            note_once(("idx-write", r.urls[k].rsplit("/", 1)[0]),
                       f"note: cannot write shard indexes beside '{r.urls[k]}' ({str(e)[:160]}); keeping them in "
                       f"'{self.idir}'")
        try:
            _save_local_index(self.idir / f"{r.keys[k]}.idx", index)
        except OSError as e:
            note_once(("idx-local", str(self.idir)), f"note: cannot write shard indexes to '{self.idir}' ({e}); "
                       "they are rebuilt on every open")


def _read_bytes(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except OSError:
        return None

