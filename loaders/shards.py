"""WebDataset tar shards with a random-access offset index, and an atomic shard writer.

A shard is a plain tar file of samples ``{key}.{jpg|jpeg|png|webp}`` + ``{key}.cls`` (ASCII
integer label), readable by ``tar``, ``webdataset.WebDataset`` and DALI's webdataset reader.
Beside each shard ``X.tar`` lives ``X.tar.idx``: an uncompressed ``.npz`` holding, per sample,
the key, the image member's extension, its data offset and size in the tar, its label and a
*tag* of its tar header (CRC-32 of the header's name and size fields), plus what the index was
built from: the tar's size, its ``st_mtime_ns``, when that was looked at (``checked_ns``) and a
*fingerprint*, BLAKE2b-128 of the tar's first and last 64 KiB. With it, sample ``i`` is one
``pread`` of exactly its header and bytes: no sequential scan, so the mixture can visit
samples in any order.

An index is used only when the tar's size, mtime and fingerprint all still match; otherwise
the tar's headers are scanned again and the index is rewritten (atomically). Checking costs,
per shard and open, one ``stat`` and two 64 KiB reads hashed in ~0.1 ms, whatever the shard's
size (a 1 GB shard is not read). A shard rewritten in place (relabelled, re-encoded) usually
keeps its size (tars are padded to 10 KiB), and a rewrite in the same clock tick as the index
keeps its mtime too, so, as git does for its index, an index built less than 3 s after its
tar's mtime is *racy*: never trusted, it is verified by a header scan (the rebuilt index is
no longer racy). :class:`ShardWriter` dates its shards' mtime 6 s back, so its own indexes are
not racy. Not caught when opening: a rewrite whose mtime was set back to the old value on
purpose (``touch -r``, ``cp -p`` of a modified copy) that changes nothing in the first or last
64 KiB. A copy that does not keep mtimes (plain ``cp``) costs one header scan per shard.

Reads check too: the tag of the header read with each sample must match the index's, so a shard
changed after its index was loaded raises :class:`DataError` naming the shard and the member
found there, never returns another sample's bytes. Reads are safe from many threads (DALI's
reader pool) and in forked DataLoader workers: see :class:`_OpenFiles`.

Shards written by other tools (``webdataset.ShardWriter``, GNU ``tar -cf``) get their index on
first open; it is written beside the shard when the directory is writable, else kept in memory
(rebuilt on every open; said once per directory). A directory written by a converter
(:mod:`loaders.convert`) holds a ``MANIFEST.json``; the ``shards`` source then reads exactly
the shards it lists, in its order (other ``.tar`` files there are named once and ignored) and
refuses an unfinished conversion.

Shards may also live in object storage: a ``path`` that is an ``s3://``, ``gs://``, ``https://``...
URL (or a list of them) is read through :mod:`loaders.remote` (byte ranges through the index,
batched per chunk, an optional local cache; keys ``storage_options``, ``cache_dir``,
``cache_max_gb``, ``retries``, ``timeout_s``).
"""
from __future__ import annotations

import glob as _glob
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import Sample, Source, register_source
from .errors import DataError, SampleError

__all__ = [
    "IMAGE_EXTS", "INDEX_SUFFIX", "MANIFEST_NAME", "atomic_write", "ShardSource", "ShardWriter", "build_index",
    "load_index", "index_path", "resolve_shards", "split_key", "read_manifest", "write_manifest", "fingerprint",
]

#: member extensions read as the sample's image, in order of preference
IMAGE_EXTS: Tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".idx"
#: a converter's record of the files it wrote (see :mod:`loaders.convert`)
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "fastssl-converter-manifest"
_INDEX_VERSION = 2
_BLOCK = 512
#: bytes hashed at each end of a tar for its fingerprint
_FP_SPAN = 64 * 1024
#: an index built less than this long after its tar's mtime is not trusted (see the module docstring)
_RACY_NS = 3_000_000_000
#: idle shard descriptors kept open per process (least recently used are closed beyond this)
_MAX_OPEN = 64
#: per-sample arrays of an index
_PER_SAMPLE = ("key", "ext", "offset", "size", "label", "tag")

PathLike = Union[str, os.PathLike]

_noted: set = set()


def _note_once(what: str, message: str) -> None:
    """Print ``message`` to stderr the first time ``what`` comes up in this process."""
    if what not in _noted:
        _noted.add(what)
        print(message, file=sys.stderr)


def index_path(tar_path: PathLike) -> Path:
    return Path(str(tar_path) + INDEX_SUFFIX)


def split_key(member: str) -> Tuple[str, str]:
    """WebDataset's sample grouping: ``"dir/abc.seg.png" -> ("dir/abc", "seg.png")``.

    The key is the path up to the first dot of the file name; the extension (lower case) is
    the rest. A name without a dot has extension ``""``.
    """
    head, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def atomic_write(path: Path, write_fn, *, tmp: Optional[Path] = None) -> None:
    """Write ``path`` via a temporary file in the same directory and ``os.replace``.

    ``tmp``: the temporary file's name (default: a fresh unique name); converters pass
    ``path + ".tmp"`` so that what a crash leaves is a name their manifest accounts for.
    """
    path = Path(path)
    if tmp is None:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are data meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# index
# --------------------------------------------------------------------------------------------

def fingerprint(fd: int, size: int) -> bytes:
    """BLAKE2b-128 of a file's size and its first and last 64 KiB (the whole file when smaller)."""
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    h.update(os.pread(fd, min(size, _FP_SPAN), 0))
    if size > _FP_SPAN:
        tail = max(_FP_SPAN, size - _FP_SPAN)
        h.update(os.pread(fd, size - tail, tail))
    return h.digest()


def _header_tag(header: bytes) -> int:
    """CRC-32 of a tar header's name (bytes 0-99) and size (124-135) fields."""
    return zlib.crc32(header[124:136], zlib.crc32(header[0:100]))


def _header_name(header: bytes) -> str:
    return header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def _header_tags(fd: int, offsets: Sequence[int]) -> List[int]:
    """Tags of the headers just before each data offset (the member's own header)."""
    return [_header_tag(os.pread(fd, _BLOCK, int(off) - _BLOCK)) for off in offsets]


def _save_index(path: Path, index: Dict[str, np.ndarray], *, tmp: Optional[Path] = None) -> None:
    atomic_write(path, lambda f: np.savez(f, **index), tmp=tmp)


def _make_index(keys: Sequence[str], exts: Sequence[str], offsets, sizes, labels, tags, *, st: os.stat_result,
                fp: bytes, checked_ns: int) -> Dict[str, np.ndarray]:
    return {
        "version": np.int64(_INDEX_VERSION),
        "tar_size": np.int64(st.st_size),
        "tar_mtime_ns": np.int64(st.st_mtime_ns),
        "checked_ns": np.int64(checked_ns),
        "fingerprint": np.frombuffer(fp, dtype=np.uint8).copy(),
        # fixed-width byte strings: compact, pickle-free, loadable with allow_pickle=False
        "key": np.array([k.encode("utf-8") for k in keys], dtype=bytes) if len(keys) else np.zeros(0, "S1"),
        "ext": np.array([e.encode("ascii") for e in exts], dtype=bytes) if len(exts) else np.zeros(0, "S1"),
        "offset": np.asarray(offsets, dtype=np.int64),
        "size": np.asarray(sizes, dtype=np.int64),
        "label": np.asarray(labels, dtype=np.int64),
        "tag": np.asarray(tags, dtype=np.uint32),
    }


def _scan(f, tar_path: str, file_size: int):
    """Members of the tar open as ``f``: ``({key: {ext: (offset, size)}}, {key: label}, end offset)``."""
    samples: "OrderedDict[str, Dict[str, Tuple[int, int]]]" = OrderedDict()
    labels: Dict[str, int] = {}
    with tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            if m.offset_data + m.size > file_size:
                raise DataError(f"shard '{tar_path}' is truncated: member '{m.name}' needs bytes up to "
                                f"{m.offset_data + m.size}, the file has {file_size}")
            key, ext = split_key(m.name)
            samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
            if ext == "cls":
                text = tf.extractfile(m).read().decode("utf-8", "replace").strip()
                try:
                    labels[key] = int(text)
                except ValueError as e:
                    raise DataError(f"shard '{tar_path}': '{m.name}' holds '{text[:20]}', "
                                    f"not an integer label") from e
        return samples, labels, tf.offset


def build_index(tar_path: PathLike) -> Dict[str, np.ndarray]:
    """Scan a tar shard's headers and return its index (see the module docstring).

    Samples are ordered by the first appearance of their key; a sample without an image
    member is left out; a missing ``.cls`` gives label ``-1``. Raises :class:`DataError`
    naming the shard if it is not a tar, is truncated, or has a non-integer ``.cls``.
    """
    tar_path = str(tar_path)
    checked_ns = time.time_ns()  # before the stat: a write after it is newer than the index (or racy)
    try:
        f = open(tar_path, "rb")
    except OSError as e:
        raise DataError(f"shard '{tar_path}' cannot be read: {e}") from e
    with f:
        fd = f.fileno()
        try:
            st = os.fstat(fd)
            fp = fingerprint(fd, st.st_size)
            samples, labels, end = _scan(f, tar_path, st.st_size)
            # tarfile stops silently at a truncated or garbled header; a complete archive has a
            # zero block (end-of-archive marker) right after its last member.
            marker = os.pread(fd, _BLOCK, end)
        except tarfile.TarError as e:
            raise DataError(f"shard '{tar_path}' is not a readable tar file: {e}") from e
        except OSError as e:
            raise DataError(f"shard '{tar_path}' cannot be read: {e}") from e
        if len(marker) < _BLOCK or marker.count(0) != _BLOCK:
            raise DataError(f"shard '{tar_path}' is truncated or corrupt: no end-of-archive marker after byte "
                            f"{end} (file size {st.st_size})")
        keys, exts, offs, sizes, labs = [], [], [], [], []
        for key, members in samples.items():
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                continue
            keys.append(key)
            exts.append(ext)
            offs.append(members[ext][0])
            sizes.append(members[ext][1])
            labs.append(labels.get(key, -1))
        tags = _header_tags(fd, offs)
    return _make_index(keys, exts, offs, sizes, labs, tags, st=st, fp=fp, checked_ns=checked_ns)


def _read_index(ipath: Path) -> Optional[Dict[str, np.ndarray]]:
    """The saved index, or ``None`` when there is none or it cannot be read (torn, garbage)."""
    try:
        with np.load(ipath, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001  (a cache: BadZipFile, EOFError, ValueError, ... all mean "rebuild it")
        return None


def _is_current(index: Dict[str, np.ndarray], st: os.stat_result, fp: bytes) -> bool:
    """Whether ``index`` describes the tar with stat ``st`` and fingerprint ``fp`` (and is well formed)."""
    try:
        if int(index["version"]) != _INDEX_VERSION:
            return False
        mtime, size = int(index["tar_mtime_ns"]), int(index["tar_size"])
        if size != st.st_size or mtime != st.st_mtime_ns or mtime > int(index["checked_ns"]) - _RACY_NS:
            return False
        if index["fingerprint"].tobytes() != fp:
            return False
        return index_well_formed(index, size)
    except (KeyError, ValueError, TypeError, AttributeError):
        return False


def index_well_formed(index: Dict[str, np.ndarray], size: int) -> bool:
    """Whether ``index`` is a current-version index of a ``size``-byte tar whose per-sample arrays
    agree in length and whose members lie inside the tar (local and remote shards alike)."""
    try:
        if int(index["version"]) != _INDEX_VERSION or int(index["tar_size"]) != size:
            return False
        n = len(index["offset"])
        if any(np.ndim(index[k]) != 1 or len(index[k]) != n for k in _PER_SAMPLE):
            return False
        off, sz = index["offset"].astype(np.int64), index["size"].astype(np.int64)
        return bool(n == 0 or (off.min() >= _BLOCK and (off + sz).max() <= size and sz.min() >= 0))
    except (KeyError, ValueError, TypeError, AttributeError):
        return False


def load_index(tar_path: PathLike, *, write: bool = True) -> Dict[str, np.ndarray]:
    """The shard's index: read from ``X.tar.idx`` if it still describes the tar, else built by
    scanning (and, if ``write``, saved atomically beside the shard; when that fails the index is
    kept in memory and a note says so once per directory)."""
    tar_path = Path(tar_path)
    ipath = index_path(tar_path)
    try:
        with open(tar_path, "rb") as f:
            st = os.fstat(f.fileno())
            fp = fingerprint(f.fileno(), st.st_size)
    except OSError as e:
        raise DataError(f"shard '{tar_path}' cannot be read: {e}") from e
    index = _read_index(ipath)
    if index is not None and _is_current(index, st, fp):
        return index
    index = build_index(tar_path)
    if write:
        try:
            _save_index(ipath, index)
        except OSError as e:
            _note_once(("index", str(tar_path.parent)),
                       f"note: cannot write shard index '{ipath}' ({e.strerror or e}); indexes of shards in "
                       f"'{tar_path.parent}' are kept in memory and rebuilt on every open")
    return index


# --------------------------------------------------------------------------------------------
# manifests and shard lists
# --------------------------------------------------------------------------------------------

def read_manifest(directory: PathLike, *, strict: bool = True) -> Optional[Dict]:
    """The converter manifest of ``directory``; ``None`` when it has none. A ``MANIFEST.json``
    that is not a fastssl converter's (not JSON, no ``"format"`` marker) raises
    :class:`DataError` naming it if ``strict``, else counts as none."""
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"manifest '{path}' cannot be read: {e}") from e
    try:
        m = json.loads(text)
    except ValueError:
        m = None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        if strict:
            raise DataError(f"'{path}' is not a fastssl converter manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
        return None
    return m


def write_manifest(directory: PathLike, manifest: Dict) -> None:
    """Write ``directory/MANIFEST.json`` atomically (a crash leaves the old one or the new one)."""
    path = Path(directory) / MANIFEST_NAME
    data = json.dumps(manifest, indent=1).encode("utf-8")
    atomic_write(path, lambda f: f.write(data), tmp=path.with_name(MANIFEST_NAME + ".tmp"))


def _manifest_shards(directory: Path) -> Optional[List[Path]]:
    """The shards a converter manifest in ``directory`` lists (``None``: no shards manifest)."""
    m = read_manifest(directory, strict=False)  # another tool's MANIFEST.json: read the directory's *.tar
    if m is None or m.get("kind") != "shards":
        return None
    where = directory / MANIFEST_NAME
    if not m.get("complete"):
        raise DataError(f"shards directory '{directory}' holds an unfinished conversion ({len(m.get('shards', []))} "
                        f"shards so far, {where}); finish it with `fastssl data shards ... --resume` or name its "
                        ".tar files directly")
    try:
        paths = [directory / str(s["file"]) for s in m["shards"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"manifest '{where}' has no valid \"shards\" list ({e})") from e
    stray = sorted(set(Path(x) for x in _glob.glob(os.path.join(_glob.escape(str(directory)), "*.tar")))
                   - set(paths))
    if stray:
        names = ", ".join(p.name for p in stray[:5]) + (", ..." if len(stray) > 5 else "")
        _note_once(("stray", str(directory)),
                   f"note: shards directory '{directory}': reading the {len(paths)} shards its {MANIFEST_NAME} "
                   f"lists; ignoring {len(stray)} other .tar file(s): {names}")
    return paths


def resolve_shards(path: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Shard files from a directory (the shards its converter manifest lists, else its ``*.tar``),
    a glob pattern, one file, or a list of these.

    Temporary ``*.tar.tmp`` files of an unfinished writer never match.
    """
    if isinstance(path, (list, tuple)):
        out: List[Path] = []
        for p in path:
            out.extend(resolve_shards(p))
        return out
    p = str(path)
    if os.path.isdir(p):
        listed = _manifest_shards(Path(p))
        if listed is not None:
            return listed
        return sorted(Path(x) for x in _glob.glob(os.path.join(_glob.escape(p), "*.tar")))
    if os.path.isfile(p):
        return [Path(p)]
    if _glob.has_magic(p):
        return sorted(Path(x) for x in _glob.glob(p) if x.endswith(".tar"))
    raise DataError(f"shards path '{p}' does not exist")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class _OpenFiles:
    """One process's open shard descriptors, shared by all its threads.

    Readers :meth:`acquire` a shard's entry ``[fd, readers, retired]``, ``os.pread`` it (no
    shared file position) and :meth:`release` it. At most ``limit`` descriptors stay open
    (least recently used are retired first), and a retired descriptor is closed only when its
    last reader releases it, so no thread ever reads a descriptor another closed or, worse, a
    number the OS has given to another shard meanwhile. The lock guards only the table: opens
    and reads run outside it. Not shared across processes: see ``ShardSource`` (fork, pickling).
    """

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self._lock = threading.Lock()
        self._table: "OrderedDict[int, list]" = OrderedDict()

    def _get(self, s: int) -> Optional[list]:  # under the lock
        ent = self._table.get(s)
        if ent is not None:
            ent[1] += 1
            self._table.move_to_end(s)
        return ent

    def acquire(self, s: int, path: Path) -> list:
        with self._lock:
            ent = self._get(s)
        if ent is not None:
            return ent
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SampleError(f"shard '{path}' cannot be opened: {e}", path=str(path)) from e
        with self._lock:
            ent = self._get(s)  # another thread may have opened it meanwhile
            if ent is None:
                ent = self._table[s] = [fd, 1, False]
                fd = -1
                while len(self._table) > self.limit:
                    old = self._table.popitem(last=False)[1]
                    old[2] = True
                    if old[1] == 0:
                        _close(old[0])
        if fd >= 0:
            _close(fd)
        return ent

    def release(self, ent: list) -> None:
        with self._lock:
            ent[1] -= 1
            if ent[2] and ent[1] == 0:
                _close(ent[0])

    def close_all(self) -> None:
        with self._lock:
            for ent in self._table.values():
                ent[2] = True
                if ent[1] == 0:
                    _close(ent[0])
            self._table.clear()

    def drop_after_fork(self) -> None:
        """In a forked child: close the inherited copies without the lock (a parent thread may have
        held it at the fork; the child has one thread here)."""
        for ent in self._table.values():
            _close(ent[0])
        self._table = OrderedDict()


#: sources alive in this process, so a forked child drops their inherited descriptors at once
_LIVE: "weakref.WeakSet" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for src in list(_LIVE):
        src._reset_files(inherited=True)


os.register_at_fork(after_in_child=_after_fork_in_child)


#: ``type: shards`` keys for shards at URLs (:mod:`loaders.remote`); secret-looking keys are refused there
_REMOTE_KEYS = ("storage_options", "cache_dir", "cache_max_gb", "retries", "timeout_s")
_SECRET_KEYS = ("key", "secret", "token", "password")


def _open_remote(path, options: Dict):
    """A :class:`loaders.remote.RemoteShards` for URL ``path``, ``None`` for local paths."""
    from . import remote  # fsspec is imported only for URLs
    return remote.open_shards(path, options)


@register_source("shards")
class ShardSource(Source):
    """Random-access reader of WebDataset tar shards (see the module docstring).

    ``path``: directory (the shards its converter manifest lists, else all ``*.tar`` in it,
    sorted), glob pattern, ``.tar`` file, or a list; or the same as URLs (:mod:`loaders.remote`,
    which the other keys configure). ``read(i)`` returns the image member's
    encoded bytes and the label from ``.cls`` (``-1`` when absent). The per-sample index arrays
    are all that is pickled to workers; files are opened lazily per process, and reads are
    thread-safe.
    """

    config_keys = ("path", "name", *_REMOTE_KEYS, *_SECRET_KEYS)

    def __init__(self, *, path, name: Optional[str] = None, **remote):
        self._remote = _open_remote(path, remote)
        self.shards = resolve_shards(path) if self._remote is None else self._remote.urls
        shown = path if isinstance(path, (str, os.PathLike)) else ", ".join(map(str, path))
        if not self.shards:
            raise DataError(f"no .tar shards found at '{shown}'")
        self.name = name or (Path(str(path)).stem if isinstance(path, (str, os.PathLike)) else "shards")
        indexes = [load_index(s) for s in self.shards] if self._remote is None else self._remote.load_indexes()
        counts = np.array([len(ix["offset"]) for ix in indexes], dtype=np.int64)
        if counts.sum() == 0:
            raise DataError(f"shards at '{shown}' contain no images ({', '.join(IMAGE_EXTS)})")
        #: first global sample index of each shard, int64 [num_shards + 1]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offset = np.concatenate([ix["offset"] for ix in indexes])
        self._size = np.concatenate([ix["size"] for ix in indexes])
        self._labels = np.concatenate([ix["label"] for ix in indexes])
        self._keys = np.concatenate([ix["key"] for ix in indexes])
        self._exts = np.concatenate([ix["ext"] for ix in indexes])
        self._tags = np.concatenate([ix["tag"] for ix in indexes])
        self._reset_files()

    def _reset_files(self, *, inherited: bool = False) -> None:
        if self.__dict__.get("_remote") is not None:
            self._remote.reset(inherited=inherited)
        old = self.__dict__.get("_files")
        if inherited and old is not None:
            old.drop_after_fork()
        self._files = _OpenFiles(_MAX_OPEN)
        self._pid = os.getpid()
        _LIVE.add(self)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_files"]  # descriptors never cross processes
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_files()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right") - 1)

    def key(self, i: int) -> str:
        return self._keys[self._check_index(i)].decode("utf-8")

    def ext(self, i: int) -> str:
        return self._exts[self._check_index(i)].decode("ascii")

    def describe(self, i: int) -> str:
        return f"{self.shards[self.shard_of(i)]}:{self.key(i)}.{self.ext(i)}"

    def prefetch(self, indices) -> None:
        """Remote shards: fetch these samples' bytes for this thread's next reads (see :mod:`loaders.remote`)."""
        if self.__dict__.get("_remote") is not None and len(indices):
            i = np.asarray(indices, np.int64)
            self._remote.prefetch(np.searchsorted(self.starts, i, side="right") - 1, self._offset[i] - _BLOCK,
                                  self._size[i] + _BLOCK)

    def _read_at(self, s: int, off: int, n: int, i: int) -> bytes:
        if self.__dict__.get("_remote") is not None:
            return self._remote.read(s, off, n)
        if self._pid != os.getpid():  # forked without the at-fork hook (not expected): start afresh
            self._reset_files(inherited=True)
        files = self._files
        ent = files.acquire(s, self.shards[s])
        try:
            return os.pread(ent[0], n, off)
        except OSError as e:
            raise SampleError(f"{self.describe(i)}: read failed: {e}", path=str(self.shards[s]), index=i) from e
        finally:
            files.release(ent)

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        s = self.shard_of(i)
        off, size = int(self._offset[i]), int(self._size[i])
        # one pread of the member's header and its bytes: the header proves they are still this sample's
        data = self._read_at(s, off - _BLOCK, size + _BLOCK, i)
        if len(data) != size + _BLOCK:
            raise SampleError(f"shard '{self.shards[s]}' is truncated: sample '{self.key(i)}' needs bytes "
                              f"[{off}, {off + size}), got {max(0, len(data) - _BLOCK)}",
                              path=str(self.shards[s]), index=i)
        if _header_tag(data[:_BLOCK]) != int(self._tags[i]):
            raise DataError(f"shard '{self.shards[s]}' changed after its index was loaded: at byte {off - _BLOCK} "
                            f"it holds member '{_header_name(data[:_BLOCK])}', not '{self.key(i)}.{self.ext(i)}' of "
                            f"{size} bytes; open the source again (its index is then rebuilt)")
        return data[_BLOCK:], int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def close(self) -> None:
        if self.__dict__.get("_remote") is not None:
            self._remote.close()
        files = self.__dict__.get("_files")
        if files is not None:
            files.close_all()

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

class ShardWriter:
    """Write samples into WebDataset tar shards of ``samples_per_shard`` each, plus their index.

    Each shard is written to ``{prefix}-{n:06d}.tar.tmp`` and renamed to ``.tar`` only when
    complete, so a crash leaves a ``.tmp`` that readers ignore, never a short shard that
    looks complete. Members: ``{key}.{ext}`` (the encoded image) and ``{key}.cls`` (the label
    as ASCII, ``-1`` when unknown; written for every sample because DALI's reader wants every
    listed extension present). Keys count samples from ``start_count``, shards from
    ``start_shard`` (a resumed conversion continues both). Hooks for the converters' manifest:
    ``on_open(final_path)`` runs before a shard's first byte is written, ``on_commit(final_path,
    samples)`` after it and its index are in place. Finished shards are dated 6 s back (see
    the module docstring). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, out_dir: PathLike, *, prefix: str = "shard", samples_per_shard: int = 10000,
                 start_shard: int = 0, start_count: int = 0, on_open: Optional[Callable[[Path], None]] = None,
                 on_commit: Optional[Callable[[Path, int], None]] = None):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = int(samples_per_shard)
        self.paths: List[Path] = []
        self.count = int(start_count)
        self._shard_no = int(start_shard)
        self._on_open, self._on_commit = on_open, on_commit
        self._tar: Optional[tarfile.TarFile] = None
        self._file = None
        self._tmp: Optional[Path] = None
        self._rows: List[Tuple[str, str, int, int, int]] = []
        self._keys_seen: set = set()

    def _open(self) -> None:
        final = self.out_dir / f"{self.prefix}-{self._shard_no:06d}.tar"
        if self._on_open is not None:
            self._on_open(final)
        self._tmp = final.with_name(final.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self._rows = []
        self._keys_seen = set()

    def _add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # reproducible shards: same input, same bytes
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))
        # after addfile the tar position is just past the member's data, padded to 512 bytes
        return self._tar.offset - -(-len(data) // _BLOCK) * _BLOCK

    def write(self, data: bytes, *, ext: str = "jpg", label: int = -1, key: Optional[str] = None) -> None:
        """Append one encoded image (``ext``: jpg, jpeg, png or webp) with its label."""
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension must be one of {', '.join(IMAGE_EXTS)}, got '{ext}'")
        key = f"{self.count:09d}" if key is None else str(key)
        if "." in key.rpartition("/")[2] or not key:
            raise ValueError(f"sample key '{key}' must be non-empty and contain no '.' in its file name")
        if self._tar is None:
            self._open()
        if key in self._keys_seen:
            raise ValueError(f"sample key '{key}' written twice to shard '{self._tmp}'")
        self._keys_seen.add(key)
        off = self._add(f"{key}.{ext}", bytes(data))
        self._add(f"{key}.cls", str(int(label)).encode("ascii"))
        self._rows.append((key, ext, off, len(data), int(label)))
        self.count += 1
        if len(self._rows) >= self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks
        self._file.close()
        final = self._tmp.with_name(self._tmp.name[:-len(".tmp")])
        checked_ns = time.time_ns()
        os.utime(self._tmp, ns=(checked_ns, checked_ns - 2 * _RACY_NS))  # not racy: see the module docstring
        keys, exts, offs, sizes, labs = zip(*self._rows)
        with open(self._tmp, "rb") as f:
            st = os.fstat(f.fileno())
            fp = fingerprint(f.fileno(), st.st_size)
            tags = _header_tags(f.fileno(), offs)
        # rename is the commit point; the index follows (a missing index is rebuilt on open)
        os.replace(self._tmp, final)
        ipath = index_path(final)
        _save_index(ipath, _make_index(keys, exts, offs, sizes, labs, tags, st=st, fp=fp, checked_ns=checked_ns),
                    tmp=ipath.with_name(ipath.name + ".tmp"))
        self.paths.append(final)
        self._tar = self._file = self._tmp = None
        self._shard_no += 1
        if self._on_commit is not None:
            self._on_commit(final, len(keys))

    def close(self) -> List[Path]:
        """Finish the last shard; returns the shard paths this writer wrote."""
        if self._tar is not None and self._rows:
            self._finish()
        return self.paths

    def abort(self) -> None:
        """Drop the unfinished shard (its ``.tmp`` file); finished shards stay."""
        if self._tar is not None:
            self._file.close()
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tar = self._file = self._tmp = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
