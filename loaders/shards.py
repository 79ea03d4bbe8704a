"""WebDataset tar shards with a random-access offset index, and an atomic shard writer.

A shard is a plain tar file of samples ``{key}.{jpg|jpeg|png|webp}`` + ``{key}.cls`` (ASCII
integer label), readable by ``tar``, ``webdataset.WebDataset`` and DALI's webdataset reader.
Beside each shard ``X.tar`` lives ``X.tar.idx``: an uncompressed ``.npz`` holding, per sample,
the key, the image member's extension, its data offset and size in the tar, and the label,
plus the tar's size (a stale index, whose tar changed size, is rebuilt). With it, sample ``i``
is one ``pread`` of exactly its bytes: no sequential scan, so the mixture can visit samples in
any order.

Shards written by other tools (``webdataset.ShardWriter``, GNU ``tar -cf``) get their index on
first open, by scanning the tar headers; it is written atomically beside the shard when the
directory is writable, else kept in memory.
"""
from __future__ import annotations

import glob as _glob
import io
import os
import tarfile
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import Sample, Source, register_source
from .errors import DataError, SampleError

__all__ = [
    "IMAGE_EXTS", "INDEX_SUFFIX", "atomic_write", "ShardSource", "ShardWriter", "build_index", "load_index",
    "index_path", "resolve_shards", "split_key",
]

#: member extensions read as the sample's image, in order of preference
IMAGE_EXTS: Tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".idx"
_INDEX_VERSION = 1
_BLOCK = 512
#: open shard files kept per process (least recently used are closed beyond this)
_MAX_OPEN = 64

PathLike = Union[str, os.PathLike]


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


def atomic_write(path: Path, write_fn) -> None:
    """Write ``path`` via a temporary file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
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


def _save_index(path: Path, index: Dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **index))


def _make_index(keys: Sequence[str], exts: Sequence[str], offsets, sizes, labels,
                tar_size: int) -> Dict[str, np.ndarray]:
    return {
        "version": np.int64(_INDEX_VERSION),
        "tar_size": np.int64(tar_size),
        # fixed-width byte strings: compact, pickle-free, loadable with allow_pickle=False
        "key": np.array([k.encode("utf-8") for k in keys], dtype=bytes) if len(keys) else np.zeros(0, "S1"),
        "ext": np.array([e.encode("ascii") for e in exts], dtype=bytes) if len(exts) else np.zeros(0, "S1"),
        "offset": np.asarray(offsets, dtype=np.int64),
        "size": np.asarray(sizes, dtype=np.int64),
        "label": np.asarray(labels, dtype=np.int64),
    }


def build_index(tar_path: PathLike) -> Dict[str, np.ndarray]:
    """Scan a tar shard's headers and return its index (see the module docstring).

    Samples are ordered by the first appearance of their key; a sample without an image
    member is left out; a missing ``.cls`` gives label ``-1``. Raises :class:`DataError`
    naming the shard if it is not a tar, is truncated, or has a non-integer ``.cls``.
    """
    tar_path = str(tar_path)
    try:
        file_size = os.path.getsize(tar_path)
    except OSError as e:
        raise DataError(f"shard '{tar_path}' cannot be read: {e}") from e
    samples: "OrderedDict[str, Dict[str, Tuple[int, int]]]" = OrderedDict()
    labels: Dict[str, int] = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > file_size:
                    raise DataError(f"shard '{tar_path}' is truncated: member '{m.name}' needs bytes up to "
                                    f"{m.offset_data + m.size}, the file has {file_size}")
                key, ext = split_key(m.name)
                entry = samples.setdefault(key, {})
                entry[ext] = (m.offset_data, m.size)
                if ext == "cls":
                    text = tf.extractfile(m).read().decode("utf-8", "replace").strip()
                    try:
                        labels[key] = int(text)
                    except ValueError as e:
                        raise DataError(f"shard '{tar_path}': '{m.name}' holds '{text[:20]}', "
                                        f"not an integer label") from e
            end = tf.offset
    except tarfile.TarError as e:
        raise DataError(f"shard '{tar_path}' is not a readable tar file: {e}") from e
    except OSError as e:
        raise DataError(f"shard '{tar_path}' cannot be read: {e}") from e
    # tarfile stops silently at a truncated or garbled header; a complete archive has a zero
    # block (end-of-archive marker) right after its last member.
    with open(tar_path, "rb") as f:
        f.seek(end)
        marker = f.read(_BLOCK)
    if len(marker) < _BLOCK or marker.count(0) != _BLOCK:
        raise DataError(f"shard '{tar_path}' is truncated or corrupt: no end-of-archive marker after byte {end} "
                        f"(file size {file_size})")
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
    return _make_index(keys, exts, offs, sizes, labs, file_size)


def load_index(tar_path: PathLike, *, write: bool = True) -> Dict[str, np.ndarray]:
    """The shard's index: read from ``X.tar.idx`` if present and current, else built by scanning
    (and, if ``write``, saved atomically beside the shard when the directory is writable)."""
    tar_path = Path(tar_path)
    ipath = index_path(tar_path)
    try:
        tar_size = tar_path.stat().st_size
    except OSError as e:
        raise DataError(f"shard '{tar_path}' cannot be read: {e}") from e
    if ipath.is_file():
        try:
            with np.load(ipath, allow_pickle=False) as z:
                index = {k: z[k] for k in z.files}
            if int(index["version"]) == _INDEX_VERSION and int(index["tar_size"]) == tar_size:
                return index
        except (OSError, ValueError, KeyError) as e:  # unreadable index: rebuild it below
            del e
    index = build_index(tar_path)
    if write:
        try:
            _save_index(ipath, index)
        except OSError:
            pass  # read-only directory: keep the index in memory only
    return index


def resolve_shards(path: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Shard files from a directory (its ``*.tar``), a glob pattern, one file, or a list of these.

    Temporary ``*.tar.tmp`` files of an unfinished writer never match.
    """
    if isinstance(path, (list, tuple)):
        out: List[Path] = []
        for p in path:
            out.extend(resolve_shards(p))
        return out
    p = str(path)
    if os.path.isdir(p):
        return sorted(Path(x) for x in _glob.glob(os.path.join(_glob.escape(p), "*.tar")))
    if os.path.isfile(p):
        return [Path(p)]
    if _glob.has_magic(p):
        return sorted(Path(x) for x in _glob.glob(p) if x.endswith(".tar"))
    raise DataError(f"shards path '{p}' does not exist")


@register_source("shards")
class ShardSource(Source):
    """Random-access reader of WebDataset tar shards (see the module docstring).

    ``path``: directory (all ``*.tar`` in it, sorted), glob pattern, ``.tar`` file, or a list.
    ``read(i)`` returns the image member's encoded bytes and the label from ``.cls`` (``-1``
    when absent). The per-sample index arrays (``int64``) are all that is pickled to workers;
    files are opened lazily per process.
    """

    config_keys = ("path", "name")

    def __init__(self, *, path, name: Optional[str] = None):
        self.shards = resolve_shards(path)
        shown = path if isinstance(path, (str, os.PathLike)) else ", ".join(map(str, path))
        if not self.shards:
            raise DataError(f"no .tar shards found at '{shown}'")
        self.name = name or (Path(str(path)).stem if isinstance(path, (str, os.PathLike)) else "shards")
        indexes = [load_index(s) for s in self.shards]
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
        self._fds: "OrderedDict[int, int]" = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()  # handles never cross processes
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

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

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # forked after opening: reopen in this process
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(s)
        if fd is not None:
            self._fds.move_to_end(s)
            return fd
        try:
            fd = os.open(self.shards[s], os.O_RDONLY)
        except OSError as e:
            raise SampleError(f"shard '{self.shards[s]}' cannot be opened: {e}", path=str(self.shards[s])) from e
        self._fds[s] = fd
        if len(self._fds) > _MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        s = self.shard_of(i)
        off, size = int(self._offset[i]), int(self._size[i])
        # pread: one syscall, no shared file position, so threads may share the descriptor
        try:
            data = os.pread(self._fd(s), size, off)
        except OSError as e:
            raise SampleError(f"{self.describe(i)}: read failed: {e}", path=str(self.shards[s]), index=i) from e
        if len(data) != size:
            raise SampleError(f"shard '{self.shards[s]}' is truncated: sample '{self.key(i)}' needs bytes "
                              f"[{off}, {off + size}), got {len(data)}", path=str(self.shards[s]), index=i)
        return data, int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


class ShardWriter:
    """Write samples into WebDataset tar shards of ``samples_per_shard`` each, plus their index.

    Each shard is written to ``{prefix}-{n:06d}.tar.tmp`` and renamed to ``.tar`` only when
    complete, so a crash leaves a ``.tmp`` that readers ignore, never a short shard that
    looks complete. Members: ``{key}.{ext}`` (the encoded image) and ``{key}.cls`` (the label
    as ASCII, ``-1`` when unknown; written for every sample because DALI's reader wants every
    listed extension present). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, out_dir: PathLike, *, prefix: str = "shard", samples_per_shard: int = 10000,
                 start_shard: int = 0):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = int(samples_per_shard)
        self.paths: List[Path] = []
        self.count = 0
        self._shard_no = int(start_shard)
        self._tar: Optional[tarfile.TarFile] = None
        self._file = None
        self._tmp: Optional[Path] = None
        self._rows: List[Tuple[str, str, int, int, int]] = []
        self._keys_seen: set = set()

    def _open(self) -> None:
        final = self.out_dir / f"{self.prefix}-{self._shard_no:06d}.tar"
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
        tar_size = self._tmp.stat().st_size
        # rename is the commit point; the index follows (a missing index is rebuilt on open)
        os.replace(self._tmp, final)
        keys, exts, offs, sizes, labs = zip(*self._rows)
        _save_index(index_path(final), _make_index(keys, exts, offs, sizes, labs, tar_size))
        self.paths.append(final)
        self._tar = self._file = self._tmp = None
        self._shard_no += 1

    def close(self) -> List[Path]:
        """Finish the last shard; returns all shard paths written."""
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
