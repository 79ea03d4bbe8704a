"""File-backed sources: image folders, CSV lists of paths, ``.npz`` arrays and CIFAR on disk.

Every source here is random-access (``len``, ``read(i)``, ``labels()``, ``describe(i)``) and
cheap to pickle: file lists are held as one bytes blob plus an offset table (not a list of
Python strings), large arrays are memory-mapped or loaded lazily in the process that reads
them, and no file handle survives pickling. Registered types: ``folder``, ``csv``, ``parquet``,
``npz``, ``cifar`` (see :func:`loaders.base.build_source`; CSV/Parquet lists: :mod:`loaders.lists`).

The ``folder`` source lists samples in ``torchvision.datasets.ImageFolder``'s order, with its
class indices: classes are the sorted sub-folder names, and within a class the sub-folders are
visited in the order of their sorted full paths (``sorted(os.walk(...))``), files sorted by name
in each. Changed: earlier versions walked nested sub-folders depth-first, which differs when a
sibling's name holds a character that sorts before ``/`` (``a/x/1.png`` came before
``a-b/2.png``; now after it, as in torchvision), so the sample indices of such folder sources
(and plans or resume states recorded with them) changed. One deliberate difference remains:
names starting with ``.`` (``.ipynb_checkpoints/``, macOS ``._x.jpg`` files) are skipped, where
torchvision counts such a folder as a class and lists such files.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .base import InMemorySource, Sample, Source, register_source
from .errors import DataError, SampleError

__all__ = [
    "IMAGE_EXTENSIONS", "PathTable", "ImageFolderSource", "CSVSource", "ParquetSource", "NPZSource",
    "CIFARSource",
    "npz_member_info", "memmap_npz_member",
]

#: file extensions (lower case) read as images by the folder source
IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class PathTable:
    """An immutable list of file paths stored as one ``bytes`` blob and ``int64 [n+1]`` offsets.

    Pickling 1M Python strings into every DataLoader worker is slow and memory-hungry; one blob
    pickles in a single copy and indexing decodes only the path asked for.
    """

    def __init__(self, paths: Iterable[str]):
        encoded = [os.fsencode(p) for p in paths]
        self._blob = b"".join(encoded)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(e) for e in encoded], out=self._offsets[1:])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._blob[self._offsets[i]:self._offsets[i + 1]])


def _readable_bytes(path: str, *, index: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise SampleError(f"image file '{path}' (sample {index}) does not exist", path=path, index=index) from e
    except OSError as e:
        raise SampleError(f"image file '{path}' (sample {index}) cannot be read: {e}", path=path, index=index) from e


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------

def _list_images(directory: str, extensions: Sequence[str]) -> List[str]:
    """All image files under ``directory`` (recursive, symlinks followed) as relative paths, in
    torchvision's ``make_dataset`` order: folders by sorted full path, then files by name."""
    walked = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        walked.append((dirpath, filenames))
    walked.sort(key=lambda entry: entry[0])  # "c/a-b" < "c/a/x": '-' sorts before '/'
    out = []
    for dirpath, filenames in walked:
        rel = os.path.relpath(dirpath, directory)
        for fn in sorted(filenames):
            if not fn.startswith(".") and fn.lower().endswith(tuple(extensions)):
                out.append(fn if rel == "." else os.path.join(rel, fn))
    return out


@register_source("folder")
class ImageFolderSource(Source):
    """torchvision-style image folder: ``root/<class>/**/<image>``.

    Class subfolders sorted by name get labels ``0..C-1`` (``classes[label]`` is the folder
    name); samples come in ``torchvision.datasets.ImageFolder``'s order (module docstring). A
    folder holding images directly and no class subfolders is read as unlabelled (label ``-1``;
    e.g. a folder of generated images). ``read(i)`` returns the file's encoded bytes; any
    PIL-readable format decodes.
    """

    config_keys = ("root", "name", "extensions")

    def __init__(self, *, root, name: Optional[str] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = str(root)
        self.name = name or os.path.basename(os.path.normpath(self.root)) or "folder"
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not os.path.isdir(self.root):
            raise DataError(f"image folder '{self.root}' does not exist or is not a directory")
        entries = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        paths: List[str] = []
        labels: List[np.ndarray] = []
        if entries:
            self.classes = entries
            for c, cls in enumerate(entries):
                files = _list_images(os.path.join(self.root, cls), exts)
                paths.extend(os.path.join(cls, f) for f in files)
                labels.append(np.full(len(files), c, dtype=np.int64))
        else:
            self.classes = []
            files = [f for f in _list_images(self.root, exts)]
            paths.extend(files)
            labels.append(np.full(len(files), -1, dtype=np.int64))
        if not paths:
            raise DataError(f"image folder '{self.root}' contains no images with extensions {', '.join(exts)}")
        self._paths = PathTable(paths)
        self._labels = np.concatenate(labels)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self._paths[self._check_index(i)])

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        return _readable_bytes(self.path(i), index=i), int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def describe(self, i: int) -> str:
        return self.path(i)


# --------------------------------------------------------------------------------------------
# CSV / Parquet lists of paths
# --------------------------------------------------------------------------------------------

class _ListSource(Source):
    """A file list (:mod:`loaders.lists`): image paths in column ``path_column``, optional integer
    labels in ``label_column``.

    Paths are taken relative to ``root`` when it is given (DiversitySSL's YFCC/ImageNet
    lists), else as written. Rows without a label (empty cell, or no ``label_column``) get
    ``-1``. A missing image is reported when it is read (:class:`SampleError` naming it), so a
    100M-row list is not ``stat``-ed up front. The list is held as compact arrays (one path
    blob + ``int64`` offsets + ``int64`` labels), memory-mapped from a cache entry for lists of
    1 MiB or more or when ``cache_dir`` is given (:func:`loaders.lists.read_list`), so pickling
    the source into workers copies no per-row data.
    """

    config_keys = ("path", "path_column", "root", "label_column", "name", "cache_dir")
    list_kind = "csv"

    def __init__(self, *, path, path_column: str = "path", root=None, label_column: Optional[str] = None,
                 name: Optional[str] = None, cache_dir=None):
        from .lists import read_list
        self.path = str(path)
        self.root = None if root is None else str(root)
        self.name = name or Path(self.path).stem
        self._paths = read_list(self.path, kind=self.list_kind, path_column=path_column,
                                label_column=label_column, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self._paths)

    def image_path(self, i: int) -> str:
        p = self._paths[self._check_index(i)]
        return p if self.root is None else os.path.join(self.root, p)

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        return _readable_bytes(self.image_path(i), index=i), int(self._paths.labels[i])

    def labels(self) -> np.ndarray:
        return self._paths.labels

    def describe(self, i: int) -> str:
        return self.image_path(i)


@register_source("csv")
class CSVSource(_ListSource):
    """A CSV file listing image paths, a header row naming the columns (see :class:`_ListSource`).

    Read as Python's ``csv`` module reads it (header names and paths stripped of whitespace,
    rows of blank cells skipped), through ``pyarrow`` when installed.
    """

    list_kind = "csv"


@register_source("parquet")
class ParquetSource(_ListSource):
    """A Parquet file listing image paths (string column ``path_column``, taken as stored) and
    optional integer labels (null: ``-1``); see :class:`_ListSource`. Needs ``pyarrow`` (extra
    ``lists``).
    """

    list_kind = "parquet"


# --------------------------------------------------------------------------------------------
# .npz arrays (memory-mapped when stored uncompressed)
# --------------------------------------------------------------------------------------------

def npz_member_info(path: str, key: str) -> Optional[Tuple[Tuple[int, ...], np.dtype, bool, Optional[int]]]:
    """Inspect array ``key`` of an ``.npz`` without loading it.

    Returns ``(shape, dtype, fortran_order, data_offset)`` where ``data_offset`` is the byte
    offset of the raw array data inside the ``.npz`` file when the member is stored
    uncompressed (so it can be memory-mapped), else ``None``. Returns ``None`` if there is no
    such key. Raises :class:`DataError` for a file that is not a valid ``.npz``.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f".npz file '{path}' cannot be opened as a zip archive: {e}") from e
    with zf:
        try:
            info = zf.getinfo(key + ".npy")
        except KeyError:
            return None
        try:
            with zf.open(info) as m:
                version = np.lib.format.read_magic(m)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(m)
                header_len = m.tell()
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f".npz file '{path}': member '{key}' is not a valid .npy array: {e}") from e
    if info.compress_type != zipfile.ZIP_STORED:
        return tuple(shape), np.dtype(dtype), bool(fortran), None
    # The local file header (30 fixed bytes + name + extra field) precedes the member's data;
    # its extra field may differ from the central directory's (zip64), so read it here.
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise DataError(f".npz file '{path}': bad local header for member '{key}' (truncated file?)")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len + header_len
    return tuple(shape), np.dtype(dtype), bool(fortran), start


def memmap_npz_member(path: str, key: str) -> np.ndarray:
    """Read-only memory map of the uncompressed array ``key`` inside the ``.npz`` at ``path``."""
    meta = npz_member_info(path, key)
    if meta is None or meta[3] is None:
        raise DataError(f".npz file '{path}': member '{key}' is missing or compressed; cannot memory-map it")
    shape, dtype, fortran, offset = meta
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) < need:
        raise DataError(f".npz file '{path}' is truncated: '{key}' needs {need} bytes, "
                        f"file has {os.path.getsize(path)}")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@register_source("npz")
class NPZSource(Source):
    """``.npz`` with ``image_key`` = ``uint8 [N, H, W, 3]`` RGB and optional ``label_key`` = int ``[N]``.

    This is AdaInf's generated-image file (1M CIFAR-sized images, labels all ``-1``). A
    stored (uncompressed, ``np.savez``) file is memory-mapped: workers share the OS page
    cache instead of each holding a copy. A compressed file (``np.savez_compressed``) is
    loaded once per process on first read. Without a label array all labels are ``-1``.
    """

    config_keys = ("path", "name", "image_key", "label_key")

    def __init__(self, *, path, name: Optional[str] = None, image_key: str = "image", label_key: str = "label"):
        self.path = str(path)
        self.name = name or Path(self.path).stem
        self.image_key = image_key
        if not os.path.isfile(self.path):
            raise DataError(f".npz file '{self.path}' does not exist")
        meta = npz_member_info(self.path, image_key)
        if meta is None:
            with zipfile.ZipFile(self.path) as zf:
                keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            raise DataError(f".npz file '{self.path}' has no key '{image_key}' (keys: {', '.join(keys) or 'none'})")
        shape, dtype, _, offset = meta
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise DataError(f".npz file '{self.path}': '{image_key}' must be uint8 [N,H,W,3] RGB, "
                            f"got {dtype} {list(shape)}")
        if shape[0] == 0:
            raise DataError(f".npz file '{self.path}': '{image_key}' holds no images")
        self._n = int(shape[0])
        self.shape = tuple(int(s) for s in shape[1:])
        self.memmapped = offset is not None
        if npz_member_info(self.path, label_key) is None:
            self._labels = np.full(self._n, -1, dtype=np.int64)
        else:
            with np.load(self.path, allow_pickle=False) as z:
                lab = z[label_key]
            if lab.shape != (self._n,) or not np.issubdtype(lab.dtype, np.integer):
                raise DataError(f".npz file '{self.path}': '{label_key}' must be integers of shape [{self._n}] "
                                f"(one per image), got {lab.dtype} {list(lab.shape)}")
            self._labels = lab.astype(np.int64)
        self._images: Optional[np.ndarray] = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None  # re-opened (mapped or loaded) lazily in each process
        return state

    @property
    def images(self) -> np.ndarray:
        """``uint8 [N, H, W, 3]``: a read-only memory map, or the loaded array if compressed."""
        if self._images is None:
            if self.memmapped:
                self._images = memmap_npz_member(self.path, self.image_key)
            else:
                try:
                    with np.load(self.path, allow_pickle=False) as z:
                        self._images = z[self.image_key]
                except (OSError, ValueError, zipfile.BadZipFile) as e:
                    raise DataError(f".npz file '{self.path}': cannot load '{self.image_key}': {e}") from e
        return self._images

    def __len__(self) -> int:
        return self._n

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        # np.array copies the one image out of the map, so callers never hold the mapping
        return np.array(self.images[i]), int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def describe(self, i: int) -> str:
        return f"{self.path}:{self.image_key}[{i}]"


# --------------------------------------------------------------------------------------------
# CIFAR-10/100, torchvision's python pickle format (never downloads)
# --------------------------------------------------------------------------------------------

_CIFAR_LAYOUTS = {
    # directory: (train files, test files, label key)
    "cifar-10-batches-py": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar-100-python": (["train"], ["test"], b"fine_labels"),
}


def _load_cifar_file(path: str, label_key: bytes) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"CIFAR file '{path}' cannot be read: {e}") from e
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise DataError(f"CIFAR file '{path}' lacks b'data' or {label_key!r}")
    data = np.asarray(d[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR file '{path}': b'data' must be uint8 [N,3072], got {data.dtype} {list(data.shape)}")
    labels = np.asarray(d[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR file '{path}': {data.shape[0]} images but {labels.shape[0]} labels")
    # rows are planar RGB (1024 R, 1024 G, 1024 B): to [N, 32, 32, 3]
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


@register_source("cifar")
class CIFARSource(InMemorySource):
    """CIFAR-10 or CIFAR-100 in torchvision's on-disk python format.

    ``root`` is the directory holding ``cifar-10-batches-py``/``cifar-100-python`` or that
    directory itself. Images are ``uint8 [32, 32, 3]`` RGB arrays; CIFAR-100 uses fine labels.
    The pixel arrays (150 MB for CIFAR-10) are loaded lazily once per process, not pickled.
    """

    config_keys = ("root", "train", "name")

    def __init__(self, *, root, train: bool = True, name: Optional[str] = None):
        root = str(root)
        self.train = bool(train)
        found = None
        for d in _CIFAR_LAYOUTS:
            for cand in (os.path.join(root, d), root):
                if os.path.basename(os.path.normpath(cand)) == d and os.path.isdir(cand):
                    found = (cand, d)
                    break
            if found:
                break
        if found is None:
            raise DataError(f"CIFAR root '{root}' holds neither {' nor '.join(_CIFAR_LAYOUTS)} "
                            "(fastssl never downloads; place torchvision's python files there)")
        self.dir, kind = found
        train_files, test_files, self._label_key = _CIFAR_LAYOUTS[kind]
        self.files = [os.path.join(self.dir, f) for f in (train_files if self.train else test_files)]
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise DataError(f"CIFAR directory '{self.dir}' is missing {', '.join(missing)}")
        family = "cifar10" if kind.startswith("cifar-10-") else "cifar100"
        self.name = name or f"{family}-{'train' if self.train else 'test'}"
        self._images: Optional[np.ndarray] = None
        self._load()
        self._labels = self._lbl

    def _load(self) -> None:
        parts = [_load_cifar_file(f, self._label_key) for f in self.files]
        self._images = np.concatenate([p[0] for p in parts])
        self._lbl = np.concatenate([p[1] for p in parts])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None
        state.pop("_lbl", None)
        return state

    @property
    def images(self) -> np.ndarray:
        """``uint8 [N, 32, 32, 3]`` RGB."""
        if self._images is None:
            self._load()
        return self._images

    def describe(self, i: int) -> str:
        return f"{self.dir}:{'train' if self.train else 'test'}[{i}]"
