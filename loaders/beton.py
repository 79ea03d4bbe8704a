"""FFCV ``.beton`` files: a converter from any :class:`~loaders.base.Source` and a random-access source.

A ``.beton`` (FFCV's file format) is a header, a table of per-sample metadata (one structured
row per sample: for an ``RGBImageField`` the storage ``mode`` (0 = JPEG, 1 = raw HWC), the
``width``/``height`` and a ``data_ptr`` byte offset; integer fields inline), the encoded
sample data in pages, and an allocation table mapping each ``data_ptr`` to its byte size.

* :func:`to_beton` writes a source with FFCV's own ``DatasetWriter`` (``RGBImageField``
  ``image``, ``IntField`` ``label`` and ``IntField`` ``index`` = the sample's index within the
  source), so files written here are read by FFCV's ``Loader`` and vice versa.
* :class:`BetonFile` is the low-level view (metadata arrays + a lazy read-only memory map)
  shared by :class:`BetonSource` and the FFCV backend (``loaders.ffcv_backend``).
* :class:`BetonSource` (``type: beton``) returns sample ``i`` as its JPEG bytes (any decoder can
  read them: PIL, DALI, turbojpeg) or, for raw-mode samples, as a ``uint8 [H, W, 3]`` array; so
  ``.beton`` files join mixtures and feed the torch and DALI backends too. It reads ``.beton``
  files written by FFCV's ``DatasetWriter`` with any field names: the first ``RGBImageField`` is
  the image, the ``IntField`` named ``label`` (else the first ``IntField``) the label.

FFCV is an optional dependency (``pip install 'fastssl[ffcv]'``); it is imported only here and
in ``loaders.ffcv_backend``, inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .base import Source, register_source
from .errors import ConfigError, DataError, SampleError, check_on_error

__all__ = ["to_beton", "BetonFile", "BetonSource", "require_ffcv", "add_beton_command", "run_beton"]

#: FFCV's ``RGBImageField`` storage modes (``ffcv.fields.rgb_image.IMAGE_MODES``)
MODE_JPG, MODE_RAW = 0, 1
_EXTRA_HINT = "install the extra: pip install 'fastssl[ffcv]' (FFCV also needs the system packages " \
              "pkg-config, libturbojpeg0-dev and libopencv-dev to build)"


def require_ffcv():
    """Import and return the ``ffcv`` package, or raise ImportError naming the extra to install."""
    try:
        import ffcv  # noqa: F401  (heavy: numba, opencv; imported only when used)
        import ffcv.fields  # noqa: F401
        import ffcv.reader  # noqa: F401
    except ImportError as e:
        raise ImportError(f"FFCV is not available ({e}); {_EXTRA_HINT}") from e
    return ffcv


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

class _WriterView:
    """Indexable wrapper FFCV's DatasetWriter workers call: ``(image HWC uint8, label, index)``.

    A sample that cannot be decoded is written as a 1x1 placeholder with ``index = -1`` (FFCV's
    writer hangs when a worker raises, so errors are marked and handled after writing).
    """

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            image, label = self.source.decode(int(i))
        except SampleError:
            return np.zeros((1, 1, 3), np.uint8), -1, -1
        return np.ascontiguousarray(image), int(label), int(i)


@contextlib.contextmanager
def _quiet_ffcv_writer(progress: bool):
    """FFCV's writer always shows a tqdm bar; silence it when ``progress=False``."""
    if progress:
        yield
        return
    import functools

    import ffcv.writer as fw
    from tqdm import tqdm
    saved = fw.tqdm
    fw.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        fw.tqdm = saved


def to_beton(source: Source, path: Union[str, os.PathLike], *, fmt: str = "jpg",
             max_resolution: Optional[int] = None, quality: int = 90,
             num_workers: Optional[int] = None, on_error: str = "raise",
             progress: bool = True) -> Path:
    """Write every sample of ``source`` to the FFCV file ``path`` and return its path.

    Fields: ``image`` (``RGBImageField``: ``fmt="jpg"`` stores JPEG of ``quality``, ``"raw"``
    stores uncompressed HWC bytes; ``max_resolution`` caps the longer side in pixels, resizing
    with area interpolation), ``label`` (int64, ``-1`` unknown) and ``index`` (the sample's index
    in ``source``). ``num_workers`` writer processes (default: all cores, at most 8).

    Samples that cannot be decoded: ``on_error="raise"`` removes the file and raises
    :class:`SampleError` naming the first one; ``"skip"`` keeps them as marked placeholders
    (``index = -1``) that :class:`BetonSource` reports as unreadable (skipped by loaders
    running with ``on_error: skip``).
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if fmt not in ("jpg", "raw"):
        raise ConfigError(f"to_beton: fmt must be 'jpg' or 'raw', got {fmt!r}")
    check_on_error(on_error, "to_beton")
    if not 1 <= int(quality) <= 100:
        raise ConfigError(f"to_beton: quality must be in 1..100, got {quality}")
    if len(source) == 0:
        raise DataError(f"to_beton: source '{source.name}' is empty")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workers = int(num_workers) if num_workers else min(8, os.cpu_count() or 1)
    fields = {
        "image": RGBImageField(write_mode=fmt, max_resolution=max_resolution, jpeg_quality=int(quality)),
        "label": IntField(),
        "index": IntField(),
    }
    # written under a temporary name and moved into place whole: an interrupted conversion never
    # leaves a .beton that looks complete
    tmp = path.with_name(path.name + ".tmp")
    writer = DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
    with _quiet_ffcv_writer(progress):
        writer.from_indexed_dataset(_WriterView(source), chunksize=max(1, min(100, len(source) // workers or 1)))

    bad = np.flatnonzero(BetonFile(tmp).sample_index < 0)
    if len(bad) and on_error == "raise":
        tmp.unlink()
        try:  # re-read the first bad sample here to report its own error message
            source.decode(int(bad[0]))
        except SampleError as e:
            raise SampleError(f"to_beton({path}): {len(bad)} sample(s) of source '{source.name}' cannot be "
                              f"decoded; first: {e}", path=e.path, index=e.index) from e
        raise SampleError(f"to_beton({path}): {len(bad)} sample(s) of source '{source.name}' cannot be decoded "
                          f"(first: {int(bad[0])})", path=str(path), index=int(bad[0]))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

class BetonFile:
    """Metadata of one ``.beton`` file as flat numpy arrays, plus a lazily opened memory map.

    Attributes (all ``[N]``): ``mode`` (uint8, 0 JPEG / 1 raw), ``height``, ``width`` (int64,
    pixels), ``data_ptr`` (uint64 byte offset of the image's data), ``data_size`` (uint64 bytes),
    ``labels`` (int64, ``-1`` if the file has no label field), ``sample_index`` (int64: the
    ``index`` field when present, else ``arange(N)``; ``-1`` marks a sample the writer could not
    decode). Pickles without the memory map (re-opened per process).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        require_ffcv()
        from ffcv.fields import IntField, RGBImageField
        from ffcv.reader import Reader

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"beton file {self.path} does not exist")
        try:
            reader = Reader(str(self.path))
        except (AssertionError, ValueError, IndexError, OSError) as e:  # FFCV asserts on a bad header
            raise DataError(f"{self.path} is not a readable .beton file ({type(e).__name__}: {e})") from e
        names = reader.field_names
        handlers = [reader.handlers[n] for n in names]
        images = [k for k, h in enumerate(handlers) if isinstance(h, RGBImageField)]
        if not images:
            raise DataError(f"{self.path}: no RGBImageField among the fields {names}")
        ints = [k for k, h in enumerate(handlers) if isinstance(h, IntField)]
        meta = reader.metadata
        img = meta[f"f{images[0]}"]
        self.image_field = names[images[0]]
        self.num_samples = int(reader.num_samples)
        self.mode = np.ascontiguousarray(img["mode"], dtype=np.uint8)
        self.height = img["height"].astype(np.int64)
        self.width = img["width"].astype(np.int64)
        self.data_ptr = np.ascontiguousarray(img["data_ptr"], dtype=np.uint64)
        label_k = next((k for k in ints if names[k] == "label"), ints[0] if ints else None)
        self.labels = (meta[f"f{label_k}"].astype(np.int64) if label_k is not None
                       else np.full(self.num_samples, -1, np.int64))
        index_k = next((k for k in ints if names[k] == "index"), None)
        self.sample_index = (meta[f"f{index_k}"].astype(np.int64) if index_k is not None
                             else np.arange(self.num_samples, dtype=np.int64))
        # byte size of each image: look its data_ptr up in the allocation table (sorted by ptr)
        table = np.sort(reader.alloc_table, order="ptr")
        pos = np.searchsorted(table["ptr"], self.data_ptr)
        pos = np.minimum(pos, len(table) - 1)
        found = table["ptr"][pos] == self.data_ptr
        if not found.all():
            bad = int(np.flatnonzero(~found)[0])
            raise DataError(f"{self.path}: sample {bad} points at byte {int(self.data_ptr[bad])}, "
                            f"which is not in the allocation table (truncated or corrupt file?)")
        self.data_size = np.ascontiguousarray(table["size"][pos], dtype=np.uint64)
        raw_need = (self.height * self.width * 3).astype(np.uint64)
        short = (self.mode == MODE_RAW) & (self.data_size < raw_need)
        if short.any():
            raise DataError(f"{self.path}: raw sample {int(np.flatnonzero(short)[0])} has fewer bytes than "
                            f"its height x width x 3")
        end = int((self.data_ptr + self.data_size).max()) if self.num_samples else 0
        if end > self.path.stat().st_size:
            raise DataError(f"{self.path}: data ends at byte {end} but the file has {self.path.stat().st_size} "
                            f"bytes (truncated?)")
        self._mmap = None

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mmap"] = None
        return state

    @property
    def mmap(self) -> np.ndarray:
        """The whole file as a read-only ``uint8`` memory map (opened once per process)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def data(self, i: int) -> np.ndarray:
        """The stored bytes of sample ``i``'s image (a zero-copy ``uint8`` view)."""
        start = int(self.data_ptr[i])
        raw = self.mode[i] == MODE_RAW
        size = int(self.height[i] * self.width[i] * 3) if raw else int(self.data_size[i])
        return self.mmap[start:start + size]


@register_source("beton")
class BetonSource(Source):
    """Random-access reader of an FFCV ``.beton`` file (``type: beton``, key ``path``).

    ``read(i)`` returns JPEG bytes for JPEG-mode samples and a ``uint8 [H, W, 3]`` array for
    raw-mode ones, with the sample's label.
    """

    config_keys = ("path", "name")

    def __init__(self, path: Union[str, os.PathLike], *, name: Optional[str] = None):
        self.file = BetonFile(path)
        self.path = self.file.path
        self.name = name or self.path.stem
        if len(self.file) == 0:
            raise DataError(f"beton file {self.path} holds no samples")

    def __len__(self) -> int:
        return len(self.file)

    def read(self, i: int):
        i = self._check_index(i)
        f = self.file
        if f.sample_index[i] < 0:
            raise SampleError(f"{self.describe(i)}: the sample could not be decoded when the file was written",
                              path=str(self.path), index=i)
        buf = f.data(i)
        if f.mode[i] == MODE_RAW:
            return np.array(buf).reshape(int(f.height[i]), int(f.width[i]), 3), int(f.labels[i])
        return bytes(buf), int(f.labels[i])

    def labels(self) -> np.ndarray:
        return self.file.labels

    def describe(self, i: int) -> str:
        return f"{self.path}[{i}]"


# --------------------------------------------------------------------------------------------
# command line: `fastssl data beton --source SPEC --out OUT.beton`
# --------------------------------------------------------------------------------------------

def add_beton_command(p) -> None:
    """Arguments of ``fastssl data beton`` (any source -> one ``.beton`` file)."""
    p.add_argument("--source", required=True, help="type=folder,root=DIR style spec or a YAML file")
    p.add_argument("--out", required=True, help="output .beton path")
    p.add_argument("--format", default="jpg", choices=["jpg", "raw"],
                   help="jpg (quality --quality) or raw uncompressed pixels (default jpg)")
    p.add_argument("--max-resolution", type=int, default=None, help="cap the longer side (pixels)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: cores, at most 8)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="unreadable samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_beton(args) -> int:
    from .cli_data import load_source
    src = load_source(args.source)
    out = to_beton(src, args.out, fmt=args.format, max_resolution=args.max_resolution, quality=args.quality,
                   num_workers=args.workers, on_error=args.on_error, progress=not args.no_progress)
    print(f"wrote {out} ({len(BetonFile(out))} samples)")
    return 0


def _register_cli() -> None:
    try:  # the data CLI is another part of the package; keep .beton usable without it
        from .cli_data import DATA_COMMANDS, register_data_command
    except ImportError:
        return
    if "beton" not in DATA_COMMANDS:
        register_data_command("beton", add_beton_command, run_beton,
                              help="convert any source to an FFCV .beton file")


_register_cli()
