"""Converters: any source to WebDataset shards (with index) or to an RGB ``.npz``.

All outputs are written atomically (a temporary name, renamed when complete). Images are
stored as RGB: the research converter this replaces read files with OpenCV and stored BGR
by mistake; here decoding goes through :func:`loaders.base.decode_image` (PIL, RGB).
"""
from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np

from .base import Source, decode_image
from .errors import DataError, SampleError
from .shards import ShardWriter, atomic_write

__all__ = ["FORMATS", "sniff_format", "encode_image", "resize_image", "to_shards", "source_to_npz",
           "folder_to_npz", "to_folder"]

#: output formats of :func:`to_shards` -> PIL format name (png is the lossless one)
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
#: samples handed to the worker threads at a time (bounds memory, keeps output order)
_BLOCK = 256


def sniff_format(data: bytes) -> Optional[str]:
    """``"jpg"``, ``"png"`` or ``"webp"`` from the leading magic bytes, else ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def encode_image(image: np.ndarray, fmt: str = "jpg", *, quality: int = 95) -> bytes:
    """Encode ``uint8 [H, W, 3]`` RGB as ``fmt`` (jpg: ``quality`` 1-100, 4:2:0; png: lossless)."""
    from PIL import Image
    if fmt not in FORMATS:
        raise ValueError(f"image format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    buf = io.BytesIO()
    kw = {"quality": int(quality)} if fmt in ("jpg", "webp") else {"compress_level": 3}  # png: fast, still lossless
    Image.fromarray(image, "RGB").save(buf, FORMATS[fmt], **kw)
    return buf.getvalue()


def resize_image(image: np.ndarray, size: Union[int, Tuple[int, int]], *, shorter_side: bool = True) -> np.ndarray:
    """Resize ``uint8 [H, W, 3]`` with PIL bicubic.

    ``size`` int: the shorter side becomes ``size`` (aspect kept) if ``shorter_side``, else the
    output is ``size x size``; ``(h, w)``: exactly that.
    """
    from PIL import Image
    h, w = image.shape[:2]
    if isinstance(size, (tuple, list)):
        oh, ow = int(size[0]), int(size[1])
    elif shorter_side:
        s = int(size)
        oh, ow = (s, max(1, round(w * s / h))) if h <= w else (max(1, round(h * s / w)), s)
    else:
        oh = ow = int(size)
    if (oh, ow) == (h, w):
        return image
    return np.asarray(Image.fromarray(image, "RGB").resize((ow, oh), Image.BICUBIC), dtype=np.uint8)


def _ordered_map(fn: Callable[[int], object], n: int, workers: int) -> Iterator:
    """``fn(0), ..., fn(n-1)`` in order; with ``workers > 1`` computed by threads (PIL releases
    the GIL while decoding/encoding, so threads scale without pickling images)."""
    if workers <= 1:
        for i in range(n):
            yield fn(i)
        return
    with ThreadPoolExecutor(workers) as ex:
        for start in range(0, n, _BLOCK):
            yield from ex.map(fn, range(start, min(n, start + _BLOCK)))


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got '{on_error}'")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr)


def to_shards(source: Source, out_dir, *, samples_per_shard: int = 10000, fmt: str = "jpg", quality: int = 95,
              resize: Optional[int] = None, prefix: str = "shard", progress: bool = True,
              on_error: str = "raise", workers: int = 1) -> List[Path]:
    """Write every sample of ``source`` into WebDataset shards (+ index) under ``out_dir``.

    ``fmt``: jpg, png (lossless) or webp. Encoded samples already in ``fmt`` are copied byte
    for byte when no ``resize`` is asked (no generation loss, and ~50x faster than
    decode + encode). ``resize``: shorter side in pixels. Labels are the source's.
    ``on_error="skip"`` leaves out samples that cannot be read or decoded (counted on stderr).
    Returns the shard paths.
    """
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in FORMATS:
        raise ValueError(f"to_shards: fmt must be one of {', '.join(FORMATS)}, got '{fmt}'")
    _check_on_error(on_error)

    def convert(i: int):
        try:
            data, label = source.read(i)
            if isinstance(data, (bytes, bytearray)) and resize is None and sniff_format(data) == fmt:
                return bytes(data), label
            img = decode_image(data, path=source.describe(i), index=i)
            if resize is not None:
                img = resize_image(img, resize)
            return encode_image(img, fmt, quality=quality), label
        except SampleError as e:
            if on_error == "raise":
                raise
            return e, -1

    skipped = 0
    with ShardWriter(out_dir, prefix=prefix, samples_per_shard=samples_per_shard) as writer, \
            _progress(len(source), f"shards <- {source.name}", progress) as bar:
        for data, label in _ordered_map(convert, len(source), workers):
            if isinstance(data, SampleError):
                skipped += 1
            else:
                writer.write(data, ext=fmt, label=label)
            bar.update(1)
    if skipped:
        print(f"to_shards: skipped {skipped} unreadable samples of '{source.name}'", file=sys.stderr)
    if not writer.paths:
        raise DataError(f"to_shards: no sample of '{source.name}' could be written")
    return writer.paths


def source_to_npz(source: Source, out_path, *, size: Optional[int] = None, label: Optional[int] = None,
                  progress: bool = True, on_error: str = "raise", workers: int = 1) -> Path:
    """Decode every sample of ``source`` into an uncompressed ``.npz``: ``image`` uint8 [N,H,W,3]
    RGB and ``label`` int64 [N].

    ``size``: resize every image to ``size x size`` (bicubic); without it all images must
    share one size. ``label``: store this label for every image (e.g. ``-1`` for generated
    images) instead of the source's. The file is uncompressed so :class:`NPZSource`
    memory-maps it.
    """
    _check_on_error(on_error)
    out_path = Path(out_path)
    if out_path.suffix != ".npz":
        raise ValueError(f"source_to_npz: output '{out_path}' must end with .npz")
    n = len(source)

    def load(i: int):
        try:
            img = source.decode(i)[0]
            return resize_image(img, size, shorter_side=False) if size is not None else img
        except SampleError as e:
            if on_error == "raise":
                raise
            return e

    images: Optional[np.ndarray] = None
    keep = np.ones(n, dtype=bool)
    with _progress(n, f"npz <- {source.name}", progress) as bar:
        for i, img in enumerate(_ordered_map(load, n, workers)):
            bar.update(1)
            if isinstance(img, SampleError):
                keep[i] = False
                continue
            if images is None:
                images = np.empty((n,) + img.shape, dtype=np.uint8)
            elif img.shape != images.shape[1:]:
                raise DataError(f"source_to_npz: {source.describe(i)} is {img.shape[1]}x{img.shape[0]}, earlier "
                                f"images are {images.shape[2]}x{images.shape[1]}; pass size= to resize them all")
            images[i] = img
    if images is None:
        raise DataError(f"source_to_npz: no sample of '{source.name}' could be read")
    labels = source.labels() if label is None else np.full(n, int(label), dtype=np.int64)
    if not keep.all():
        print(f"source_to_npz: skipped {int((~keep).sum())} unreadable samples of '{source.name}'", file=sys.stderr)
        images, labels = images[keep], labels[keep]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda f: np.savez(f, image=images, label=np.asarray(labels, dtype=np.int64)))
    return out_path


def folder_to_npz(root, out_path, *, size: Optional[int] = None, label: Optional[int] = None,
                  progress: bool = True, on_error: str = "raise", workers: int = 1) -> Path:
    """Image folder (class subfolders, or a flat folder of unlabelled images) to an RGB ``.npz``.

    See :func:`source_to_npz` for ``size`` and ``label``.
    """
    from .sources import ImageFolderSource
    return source_to_npz(ImageFolderSource(root=root), out_path, size=size, label=label, progress=progress,
                         on_error=on_error, workers=workers)


def to_folder(source: Source, out_dir, *, fmt: str = "png", quality: int = 95, progress: bool = True) -> Path:
    """Write ``source`` as an image folder readable by :class:`ImageFolderSource`.

    Labelled sources go to ``out_dir/{label:03d}/{i:08d}.{fmt}`` (zero-padded numbers, so the
    folder source's sorted class order gives back the same labels); a source whose labels are
    all ``-1`` goes flat into ``out_dir``. Each file is written atomically.
    """
    if fmt == "jpeg":
        fmt = "jpg"
    labels = np.asarray(source.labels())
    unlabelled = bool((labels < 0).all())
    if not unlabelled and (labels < 0).any():
        raise DataError(f"to_folder: source '{source.name}' mixes labelled and unlabelled (-1) samples; "
                        "an image folder cannot hold both")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _progress(len(source), f"folder <- {source.name}", progress) as bar:
        for i in range(len(source)):
            data, label = source.read(i)
            if not (isinstance(data, (bytes, bytearray)) and sniff_format(data) == fmt):
                data = encode_image(decode_image(data, path=source.describe(i), index=i), fmt, quality=quality)
            d = out_dir if unlabelled else out_dir / f"{int(label):03d}"
            d.mkdir(exist_ok=True)
            atomic_write(d / f"{i:08d}.{fmt}", lambda f: f.write(data))
            bar.update(1)
    return out_dir
