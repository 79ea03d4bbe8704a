"""File lists (CSV or Parquet) read column-wise into compact arrays: 100M rows, no Python object per row.

A list of ``n`` image paths (optionally with integer labels) becomes a :class:`PathList`:

* ``blob``    ``uint8 [B]``     every path's UTF-8 bytes, concatenated;
* ``offsets`` ``int64 [n + 1]`` path ``i`` is ``blob[offsets[i]:offsets[i + 1]]``;
* ``labels``  ``int64 [n]``     ``-1`` where a row has no label.

Path ``i`` is decoded only when sample ``i`` is read. Lists of at least :data:`MEMORY_MAX_BYTES`
(or any list when ``cache_dir`` is given) are written once to a cache entry (three raw arrays and
a ``meta.json``, keyed by the list's real path, size, mtime and the column options) and opened
with ``np.memmap``: DataLoader workers map the same pages (forked or unpickled: a pickled
:class:`PathList` holds the entry's folder, not the arrays), so ``W`` workers cost one copy in
the page cache. Default cache folder: ``$FASTSSL_CACHE_DIR/lists``, else
``$XDG_CACHE_HOME/fastssl/lists`` (``~/.cache/fastssl/lists``); an unwritable folder falls back
to in-memory arrays. A changed list (new size or mtime) gets a new entry; old ones are not removed.

Readers (``pyarrow``, extra ``lists``; imported only here, when a list is read):

* **CSV**: ``pyarrow.csv.open_csv`` streams the file in blocks into the cache files, so memory
  stays bounded by the block size whatever the row count. The result equals the ``csv`` module
  reading of :class:`~loaders.sources.CSVSource` (header names and paths stripped of
  whitespace, rows of blank cells skipped, empty label cells ``-1``). Whenever a block holds
  anything that reading treats specially (whitespace around a path, an empty path, a label that
  is not plain ``[-]digits``, ragged rows, a parse error) the list is re-read with the ``csv``
  module (same compact arrays, slower), which also produces the errors naming file and line.
  Without ``pyarrow`` that reader is used for every CSV.
* **Parquet**: the path column (string or binary) and an optional integer label column (floats
  are accepted when every value is integral or NaN, as pandas writes an int column with gaps),
  read row group by row group. Paths are taken as stored; a null or empty path is an error naming
  the file and row (0-based); null labels are ``-1``.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

from .errors import ConfigError, DataError

__all__ = ["PathList", "read_list", "default_cache_dir", "MEMORY_MAX_BYTES", "LIST_KINDS"]

#: lists smaller than this (file bytes) stay in memory unless ``cache_dir`` is given
MEMORY_MAX_BYTES = 1 << 20
LIST_KINDS = ("csv", "parquet")
#: bump when the cache layout or the reading rules change (old entries are then ignored)
_FORMAT_VERSION = 1
_CSV_BLOCK = 4 << 20          # pyarrow CSV block (bytes): bounds memory while streaming (readahead)
_PY_CHUNK = 1 << 16           # rows per chunk of the csv-module reader
# bytes that may start / end a path str.strip() would change: ASCII whitespace (<= 0x20) and the
# lead / final bytes of the UTF-8 encodings of Unicode whitespace (U+0085, U+00A0, U+1680,
# U+2000-U+200A, U+2028/9, U+202F, U+205F, U+3000); such rows are checked in Python
_LEAD_WS = np.zeros(256, bool)
_LEAD_WS[:0x21] = True
_LEAD_WS[[0xC2, 0xE1, 0xE2, 0xE3]] = True
_TAIL_WS = np.zeros(256, bool)
_TAIL_WS[:0x21] = True
_TAIL_WS[[*range(0x80, 0x8B), 0x85, 0x9F, 0xA0, 0xA8, 0xA9, 0xAF]] = True


class _Irregular(Exception):
    """The fast CSV reader met something only the csv-module reader handles exactly."""


def default_cache_dir() -> Path:
    """``$FASTSSL_CACHE_DIR/lists``, else ``$XDG_CACHE_HOME/fastssl/lists`` (``~/.cache/...``)."""
    if os.environ.get("FASTSSL_CACHE_DIR"):
        return Path(os.environ["FASTSSL_CACHE_DIR"]) / "lists"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastssl" / "lists"


class PathList:
    """``n`` paths + labels as compact arrays (module docstring); memory-mapped from ``directory``
    when it is set (then pickling carries the folder name only and each process maps the files)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray, *,
                 directory: Optional[str] = None):
        self.directory = directory
        self.n = len(offsets) - 1
        self._arrays: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = (blob, offsets, labels)

    @classmethod
    def open(cls, directory: str) -> "PathList":
        """Map a cache entry written by :func:`read_list` (DataError if it is incomplete)."""
        arrays = _map_entry(directory)
        return cls(*arrays, directory=directory)

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.directory is not None:
            state["_arrays"] = None  # re-mapped lazily in the process that reads
        return state

    @property
    def arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(blob uint8 [B], offsets int64 [n+1], labels int64 [n])``."""
        if self._arrays is None:
            self._arrays = _map_entry(self.directory)
        return self._arrays

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:
        blob, offsets, _ = self.arrays
        return os.fsdecode(blob[offsets[i]:offsets[i + 1]].tobytes())

    @property
    def labels(self) -> np.ndarray:
        return self.arrays[2]


# --------------------------------------------------------------------------------------------
# cache entries
# --------------------------------------------------------------------------------------------

_FILES = ("blob.u8", "offsets.i64", "labels.i64")


def _map_entry(directory: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        meta = json.loads((Path(directory) / "meta.json").read_text())
        n, nbytes = int(meta["n"]), int(meta["nbytes"])
        blob = np.memmap(os.path.join(directory, _FILES[0]), dtype=np.uint8, mode="r", shape=(nbytes,))
        offsets = np.memmap(os.path.join(directory, _FILES[1]), dtype=np.int64, mode="r", shape=(n + 1,))
        # copy-on-write: callers may treat labels as an ordinary writable array; pages stay shared
        labels = np.memmap(os.path.join(directory, _FILES[2]), dtype=np.int64, mode="c", shape=(n,))
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"file-list cache '{directory}' is incomplete or corrupt ({e}); delete it to rebuild") from e
    return np.asarray(blob), np.asarray(offsets), np.asarray(labels)


class _Sink:
    """Appends chunks of (path bytes, path lengths, labels) to three binary streams."""

    def __init__(self, directory: Optional[str]):
        self.directory = directory
        if directory is None:
            self.files = [io.BytesIO() for _ in _FILES]
        else:
            self.files = [open(os.path.join(directory, f), "wb") for f in _FILES]
        self.files[1].write(np.zeros(1, np.int64).tobytes())
        self.n = 0
        self.nbytes = 0

    def add(self, data, lengths: np.ndarray, labels: np.ndarray) -> None:
        offsets = np.cumsum(lengths, dtype=np.int64)
        offsets += self.nbytes
        self.files[0].write(data)
        self.files[1].write(offsets.tobytes())
        self.files[2].write(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        self.n += len(lengths)
        self.nbytes = int(offsets[-1]) if len(offsets) else self.nbytes

    def finish(self) -> Optional[PathList]:
        """The in-memory :class:`PathList`, or None once the files are closed (file sink)."""
        if self.directory is not None:
            for f in self.files:
                f.close()
            return None
        blob, offsets, labels = (f.getvalue() for f in self.files)
        return PathList(np.frombuffer(blob, np.uint8), np.frombuffer(offsets, np.int64),
                        np.frombuffer(labels, np.int64).copy())

    def abort(self) -> None:
        for f in self.files:
            f.close()


def _cache_key(path: str, kind: str, path_column: str, label_column: Optional[str]) -> str:
    st = os.stat(path)
    ident = [_FORMAT_VERSION, os.path.realpath(path), st.st_size, st.st_mtime_ns, kind, path_column, label_column]
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:20]


def _writable_dir(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK | os.X_OK)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def read_list(path: str, *, kind: str, path_column: str = "path", label_column: Optional[str] = None,
              cache_dir=None) -> PathList:
    """Read the ``kind`` (``csv`` / ``parquet``) list at ``path`` into a :class:`PathList`.

    Raises :class:`DataError` naming the file (and line/row/column) for unreadable or bad lists.
    """
    if kind not in LIST_KINDS:
        raise ConfigError(f"file list '{path}': kind {kind!r} is not one of {', '.join(LIST_KINDS)}")
    what = "CSV file" if kind == "csv" else "Parquet file"
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{what} '{path}' cannot be opened: {e}") from e
    if cache_dir is None and size < MEMORY_MAX_BYTES:
        return _build(path, kind, path_column, label_column, None)
    root = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if not _writable_dir(root):
        return _build(path, kind, path_column, label_column, None)
    entry = root / f"{Path(path).stem[:40]}-{_cache_key(path, kind, path_column, label_column)}"
    if (entry / "meta.json").is_file():
        return PathList.open(str(entry))
    with _locked(root / (entry.name + ".lock")):
        if not (entry / "meta.json").is_file():  # another process may have built it meanwhile
            _build_entry(path, kind, path_column, label_column, entry)
    return PathList.open(str(entry))


class _locked:
    """An exclusive ``flock`` on ``path`` (best effort: skipped where the filesystem refuses)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


def _build_entry(path: str, kind: str, path_column: str, label_column: Optional[str], entry: Path) -> None:
    """Write the entry into a temporary folder next to it, then rename it into place."""
    tmp = tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache folder from other users
        _build(path, kind, path_column, label_column, tmp)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(path: str, kind: str, path_column: str, label_column: Optional[str],
           directory: Optional[str]) -> Optional[PathList]:
    """Read the list into a sink (``directory``: files + meta.json; None: memory)."""
    if kind == "parquet":
        sink = _Sink(directory)
        try:
            _read_parquet(path, path_column, label_column, sink)
        except BaseException:
            sink.abort()
            raise
    else:
        sink = _read_csv(path, path_column, label_column, directory)
    out = sink.finish()
    if directory is not None:
        meta = {"n": sink.n, "nbytes": sink.nbytes, "list": os.path.realpath(path), "kind": kind,
                "path_column": path_column, "label_column": label_column, "version": _FORMAT_VERSION}
        (Path(directory) / "meta.json").write_text(json.dumps(meta))
    return out


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------

def _read_csv(path: str, path_column: str, label_column: Optional[str], directory: Optional[str]) -> _Sink:
    """Fast (pyarrow) reading when it applies, else the csv-module reading; returns the sink."""
    header = _csv_header(path)
    for key, col in (("path_column", path_column), ("label_column", label_column)):
        if col is not None and col not in header:
            raise DataError(f"CSV file '{path}' has no column '{col}' ({key}); columns: {', '.join(header)}")
    sink = _Sink(directory)
    try:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise _Irregular from None
        _csv_arrow(path, header, path_column, label_column, sink)
        if sink.n == 0:
            raise _Irregular
        return sink
    except _Irregular:
        sink.abort()
    except BaseException:
        sink.abort()
        raise
    sink = _Sink(directory)
    try:
        _csv_python(path, header, path_column, label_column, sink)
    except BaseException:
        sink.abort()
        raise
    return sink


def _csv_header(path: str) -> list:
    """The header row, names stripped (DataError: empty file / not UTF-8)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as e:
        raise DataError(f"CSV file '{path}' is not UTF-8 text: {e}") from e
    except (OSError, csv.Error) as e:
        raise DataError(f"CSV file '{path}' cannot be read: {e}") from e
    if not header:
        raise DataError(f"CSV file '{path}' is empty (no header row)")
    return [h.strip() for h in header]


def _csv_arrow(path: str, header: list, path_column: str, label_column: Optional[str], sink: _Sink) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if len(set(header)) != len(header):
        raise _Irregular  # duplicate names: the csv reading takes the first; keep that rule there
    raw = _raw_header(path)
    if raw is None or [h.strip() for h in raw] != header:
        raise _Irregular
    pname = raw[header.index(path_column)]
    lname = None if label_column is None else raw[header.index(label_column)]
    cols = [pname] + ([lname] if lname is not None else [])
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in cols}, include_columns=cols,
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK),
                                convert_options=convert)
        for batch in reader:
            paths = batch.column(0)
            data, lengths = _string_parts(paths)
            _check_paths(data, lengths, paths)
            labels = (np.full(len(lengths), -1, np.int64) if lname is None
                      else _csv_labels(batch.column(1)))
            sink.add(data, lengths, labels)
    except (pa.ArrowException, ValueError, OSError):
        raise _Irregular from None


def _raw_header(path: str) -> Optional[list]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), None)


def _string_parts(arr) -> Tuple[np.ndarray, np.ndarray]:
    """A pyarrow (large_)string/binary array without nulls -> (its bytes uint8 [B], lengths int64 [n])."""
    import pyarrow as pa
    if arr.null_count:
        raise ValueError("null path")
    wide = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int64 if wide else np.int32)[arr.offset:arr.offset + len(arr) + 1]
    if len(arr) == 0 or bufs[2] is None:
        return np.zeros(0, np.uint8), np.diff(offs).astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8)[offs[0]:offs[-1]]
    return data, np.diff(offs).astype(np.int64)


def _check_paths(data: np.ndarray, lengths: np.ndarray, arr) -> None:
    """_Irregular when a path is empty or str.strip() would change it (vectorised pre-check)."""
    if len(lengths) == 0:
        return
    if not lengths.all():
        raise _Irregular
    ends = np.cumsum(lengths)
    suspects = np.flatnonzero(_LEAD_WS[data[ends - lengths]] | _TAIL_WS[data[ends - 1]])
    for i in suspects.tolist():
        s = arr[i].as_py()
        if s != s.strip():
            raise _Irregular


def _csv_labels(arr) -> np.ndarray:
    """A string label column -> int64 (empty: -1); _Irregular unless every cell is '' or [-]digits."""
    import pyarrow as pa
    import pyarrow.compute as pc
    data, lengths = _string_parts(arr)
    digit = (data >= 48) & (data <= 57)
    minus = data == 45
    if not (digit | minus).all():
        raise _Irregular
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    if int(minus.sum()) != int(minus[starts].sum()) or (lengths[lengths > 0][minus[starts]] == 1).any():
        raise _Irregular  # '-' only as a sign, followed by digits
    nums = pc.cast(pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr), pa.int64())
    return nums.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _csv_python(path: str, header: list, path_column: str, label_column: Optional[str], sink: _Sink) -> None:
    """The csv-module reading (CSVSource's original rules and errors), in chunks of rows."""
    pcol = header.index(path_column)
    lcol = None if label_column is None else header.index(label_column)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            next(rows, None)
            for paths, labels in _python_chunks(path, rows, pcol, lcol, path_column, label_column):
                enc = [os.fsencode(p) for p in paths]
                sink.add(b"".join(enc), np.fromiter(map(len, enc), np.int64, len(enc)), np.asarray(labels, np.int64))
    except UnicodeDecodeError as e:
        raise DataError(f"CSV file '{path}' is not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise DataError(f"CSV file '{path}' cannot be parsed: {e}") from e
    if sink.n == 0:
        raise DataError(f"CSV file '{path}' lists no images (header only)")


def _python_chunks(path, rows, pcol: int, lcol: Optional[int], path_column: str,
                   label_column: Optional[str]) -> Iterator[Tuple[list, list]]:
    paths, labels = [], []
    for row_no, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= pcol or not row[pcol].strip():
            raise DataError(f"CSV file '{path}' line {row_no}: empty '{path_column}'")
        paths.append(row[pcol].strip())
        if lcol is None or len(row) <= lcol or not row[lcol].strip():
            labels.append(-1)
        else:
            try:
                labels.append(int(row[lcol]))
            except ValueError as e:
                raise DataError(f"CSV file '{path}' line {row_no}: label '{row[lcol]}' in column "
                                f"'{label_column}' is not an integer") from e
        if len(paths) == _PY_CHUNK:
            yield paths, labels
            paths, labels = [], []
    if paths:
        yield paths, labels


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------

def _read_parquet(path: str, path_column: str, label_column: Optional[str], sink: _Sink) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"Parquet file '{path}': reading Parquet lists needs pyarrow "
                          f"(pip install 'fastssl[lists]'): {e}") from e
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"Parquet file '{path}' cannot be read as Parquet: {e}") from e
    names = pf.schema_arrow.names
    for key, col in (("path_column", path_column), ("label_column", label_column)):
        if col is not None and col not in names:
            raise DataError(f"Parquet file '{path}' has no column '{col}' ({key}); columns: {', '.join(names)}")
    cols = [path_column] + ([label_column] if label_column is not None else [])
    row0 = 0
    try:
        for batch in pf.iter_batches(batch_size=1 << 18, columns=cols):
            data, lengths = _parquet_paths(path, path_column, batch.column(path_column), row0)
            labels = (np.full(len(lengths), -1, np.int64) if label_column is None
                      else _parquet_labels(path, label_column, batch.column(label_column), row0))
            sink.add(data, lengths, labels)
            row0 += len(lengths)
    except pa.ArrowException as e:
        raise DataError(f"Parquet file '{path}' cannot be read (rows from {row0}): {e}") from e
    if sink.n == 0:
        raise DataError(f"Parquet file '{path}' lists no images (no rows)")


def _parquet_paths(path: str, column: str, arr, row0: int) -> Tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    t = arr.type
    if pa.types.is_string_view(t) or pa.types.is_binary_view(t):
        arr = arr.cast(pa.large_binary())
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
              or pa.types.is_large_binary(t)):
        raise DataError(f"Parquet file '{path}': column '{column}' must hold strings (paths), got {t}")
    if arr.null_count:
        i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"Parquet file '{path}' row {row0 + i}: '{column}' is null")
    data, lengths = _string_parts(arr)
    if len(lengths) and not lengths.all():
        raise DataError(f"Parquet file '{path}' row {row0 + int(np.flatnonzero(lengths == 0)[0])}: empty '{column}'")
    return data, lengths


def _parquet_labels(path: str, column: str, arr, row0: int) -> np.ndarray:
    import pyarrow as pa
    t = arr.type
    if pa.types.is_integer(t):
        return arr.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if pa.types.is_floating(t):  # pandas' int column with gaps: integral values or NaN/null
        v = arr.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isnan(v) & (v != np.round(v))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"Parquet file '{path}' row {row0 + i}: label {float(v[i])!r} in column '{column}' "
                            "is not an integer")
        return np.where(np.isnan(v), -1, v).astype(np.int64)
    raise DataError(f"Parquet file '{path}': label column '{column}' must hold integers, got {t}")
