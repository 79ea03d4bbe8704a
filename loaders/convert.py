"""Converters: any source to WebDataset shards (with index), to an RGB ``.npz`` or to an image folder.

All outputs are written atomically (a temporary name, renamed when complete). Images are
stored as RGB: the research converter this replaces read files with OpenCV and stored BGR
by mistake; here decoding goes through :func:`loaders.base.decode_image` (PIL, RGB).

Converters own their output. A directory output (shards, folder) gets a ``MANIFEST.json``
listing every file the conversion writes, the source (type, name, length, first and last
sample) and the settings. It is written ahead: a file is listed (as ``pending``) before it is
created, and the shards converter rewrites it after each finished shard, so an interrupted run
leaves only files its manifest names; the final manifest (``"complete": true``) is written
last. ``existing`` says what to do with an output that is already there:

* ``"refuse"`` (the default for directories): a non-empty directory is an error naming
  ``--overwrite`` and ``--resume``;
* ``"overwrite"``: delete what the earlier conversion's manifest lists, then convert; files no
  manifest lists are never deleted: the conversion is refused, naming them;
* ``"resume"``: continue the conversion the manifest describes (same source and settings, else
  refused): the shards converter keeps the finished shards and restarts at the first sample
  of the next one (keys and shard numbers continue, so the shards are byte-identical to an
  uninterrupted run); the folder converter writes the files still missing; a complete
  conversion is left as it is.

A single-file output (``.npz``) is replaced atomically, so it can never mix two conversions;
:func:`source_to_npz` overwrites by default, the command line refuses an existing file
unless ``--overwrite`` (``--resume`` redoes it).
"""
from __future__ import annotations

import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .base import Source, decode_image
from .errors import DataError, SampleError, check_on_error
from .shards import MANIFEST_FORMAT, MANIFEST_NAME, ShardWriter, atomic_write, read_manifest, write_manifest

__all__ = ["FORMATS", "EXISTING", "sniff_format", "encode_image", "resize_image", "to_shards", "source_to_npz",
           "folder_to_npz", "to_folder", "claim_output_dir", "check_output_file"]

#: output formats of :func:`to_shards` -> PIL format name (png is the lossless one)
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
#: what a converter does with an output that already exists (see the module docstring)
EXISTING = ("refuse", "overwrite", "resume")
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

    ``size`` int: the shorter side becomes ``size`` and the longer one ``int(size * long / short)``
    (truncated, exactly as ``torchvision.transforms.Resize(size)`` computes it; the pixels equal
    ``Resize(size, interpolation=BICUBIC)`` on the PIL image) if ``shorter_side``, else the output
    is ``size x size``; ``(h, w)``: exactly that.
    """
    from PIL import Image
    h, w = image.shape[:2]
    if isinstance(size, (tuple, list)):
        oh, ow = int(size[0]), int(size[1])
    elif shorter_side:
        s = int(size)
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        ow, oh = (s, new_long) if w <= h else (new_long, s)
    else:
        oh = ow = int(size)
    if (oh, ow) == (h, w):
        return image
    return np.asarray(Image.fromarray(image, "RGB").resize((ow, oh), Image.BICUBIC), dtype=np.uint8)


def _ordered_map(fn: Callable[[int], object], indices: range, workers: int) -> Iterator:
    """``fn(i)`` for ``i`` in ``indices``, in order; with ``workers > 1`` computed by threads (PIL
    releases the GIL while decoding/encoding, so threads scale without pickling images)."""
    if workers <= 1:
        for i in indices:
            yield fn(i)
        return
    with ThreadPoolExecutor(workers) as ex:
        for start in range(0, len(indices), _BLOCK):
            yield from ex.map(fn, indices[start:start + _BLOCK])


def _check_on_error(on_error: str) -> None:
    check_on_error(on_error, "convert")


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, initial=initial)


# --------------------------------------------------------------------------------------------
# output ownership (MANIFEST.json)
# --------------------------------------------------------------------------------------------

def _source_record(source: Source) -> Dict:
    n = len(source)
    return {"type": source.type_name, "name": source.name, "samples": n,
            "first": source.describe(0) if n else None, "last": source.describe(n - 1) if n else None}


def _new_manifest(kind: str, source: Source, settings: Dict) -> Dict:
    return {"format": MANIFEST_FORMAT, "version": 1, "kind": kind, "complete": False,
            "source": _source_record(source), "settings": json.loads(json.dumps(settings)),
            "files": [], "pending": [], "dirs": [], "samples": 0, "skipped": 0}


def _entries(out: Path) -> Tuple[List[str], List[str]]:
    """Files and directories under ``out``, as sorted relative POSIX paths."""
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = Path(dirpath).relative_to(out)
        dirs += [(rel / d).as_posix() for d in dirnames]
        files += [(rel / f).as_posix() for f in filenames]
    return sorted(files), sorted(dirs)


def _names(items: List[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f", ... ({len(items)} in all)" if len(items) > k else "")


def _refusal(out: Path, m: Optional[Dict], files: List[str], dirs: List[str]) -> str:
    if m is None:
        return (f"output directory '{out}' is not empty ({_names(files + [d + '/' for d in dirs])}) and holds no "
                f"fastssl {MANIFEST_NAME}; choose an empty --out (files no converter wrote are never deleted)")
    src = m.get("source", {})
    if m.get("complete"):
        return (f"output directory '{out}' already holds a conversion ({m.get('samples')} samples of "
                f"'{src.get('name')}', {MANIFEST_NAME}); pass --overwrite to replace it or --resume to keep it")
    return (f"output directory '{out}' holds an unfinished conversion of '{src.get('name')}' ({m.get('samples')} "
            f"of {src.get('samples')} samples, {MANIFEST_NAME}); pass --resume to continue it or --overwrite to "
            "start over")


def _claimed(m: Optional[Dict]) -> Tuple[set, set]:
    if m is None:
        return set(), set()
    files = {str(f) for f in list(m.get("files", [])) + list(m.get("pending", []))} | {MANIFEST_NAME}
    return files, {str(d) for d in m.get("dirs", [])}


def _check_resumable(out: Path, m: Dict, kind: str, source: Source, settings: Dict) -> None:
    where = out / MANIFEST_NAME
    if m.get("kind") != kind:
        raise DataError(f"cannot resume: '{where}' describes a '{m.get('kind')}' conversion, not '{kind}'; "
                        "pass --overwrite to replace it")
    for what, old, new in (("source", m.get("source", {}), _source_record(source)),
                           ("settings", m.get("settings", {}), json.loads(json.dumps(settings)))):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                raise DataError(f"cannot resume: '{where}' was written with {what} {k}={old.get(k)!r}, this run "
                                f"has {new.get(k)!r}; resume with the same source and settings or pass --overwrite")


def claim_output_dir(out, kind: str, source: Source, settings: Dict, existing: str = "refuse", *,
                     drop_pending: bool = True) -> Optional[Dict]:
    """Make directory ``out`` ready for a ``kind`` conversion of ``source`` (see the module docstring).

    Returns the manifest to resume from, or ``None`` to start afresh (``out`` then exists and
    is empty). Raises :class:`DataError` (one line, naming ``out``) when ``existing`` forbids it.
    On resume, temporaries (``*.tmp``) are deleted, and so are the manifest's pending files when
    ``drop_pending`` (a converter whose files are whole once they exist keeps them).
    """
    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {', '.join(EXISTING)}, got '{existing}'")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files, dirs = _entries(out)
    if not files and not dirs:
        return None
    m = read_manifest(out, strict=False)  # another tool's MANIFEST.json is just another file not ours
    if existing == "refuse":
        raise DataError(_refusal(out, m, files, dirs))
    claimed, claimed_dirs = _claimed(m)
    stray = [f for f in files if f not in claimed and not (f.endswith(".tmp") and f[:-4] in claimed)]
    stray += [d + "/" for d in dirs if d not in claimed_dirs]
    if stray:
        raise DataError(f"output directory '{out}' holds {len(stray)} file(s) no fastssl {MANIFEST_NAME} lists "
                        f"({_names(stray)}); they are never deleted: remove them or choose another --out")
    if existing == "resume":
        _check_resumable(out, m, kind, source, settings)
        keep = {str(f) for f in m.get("files", []) + ([] if drop_pending else m.get("pending", []))}
        for f in files:  # what was in flight: temporaries, pending files
            if f not in keep and f != MANIFEST_NAME:
                os.unlink(out / f)
        return m
    for f in files:  # overwrite: everything listed (checked above), the manifest last
        if f != MANIFEST_NAME:
            os.unlink(out / f)
    for d in sorted(dirs, key=len, reverse=True):
        os.rmdir(out / d)
    if MANIFEST_NAME in files:
        os.unlink(out / MANIFEST_NAME)
    return None


class _ShardRun:
    """The manifest side of :func:`to_shards`: where to start, and the manifest after each shard."""

    def __init__(self, out: Path, source: Source, settings: Dict, existing: str):
        self.out = out
        m = claim_output_dir(out, "shards", source, settings, existing)
        self.m = m if m is not None else dict(_new_manifest("shards", source, settings), shards=[])
        shards = self.m.setdefault("shards", [])
        for s in shards:  # a resumed conversion keeps these: they must be as they were written
            p = out / s["file"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                raise DataError(f"cannot resume: shard '{p}' listed in {out / MANIFEST_NAME} is missing or changed; "
                                "pass --overwrite to start over")
        self.start = shards[-1]["next_index"] if shards else 0
        self.skipped = self.skipped_written = int(self.m.get("skipped", 0))
        self.index = self.start - 1

    def paths(self) -> List[Path]:
        return [self.out / s["file"] for s in self.m["shards"]]

    def opening(self, final: Path) -> None:
        self.m["pending"] = [final.name, final.name + ".idx"]
        write_manifest(self.out, self.m)

    def committed(self, final: Path, samples: int) -> None:
        self.m["shards"].append({"file": final.name, "samples": samples, "bytes": final.stat().st_size,
                                 "next_index": self.index + 1})
        self.m["files"] += [final.name, final.name + ".idx"]
        self.m["pending"] = []
        self.m["samples"] += samples
        self.m["skipped"] = self.skipped_written
        write_manifest(self.out, self.m)

    def finish(self) -> None:
        self.m["skipped"] = self.skipped
        self.m["complete"] = True
        write_manifest(self.out, self.m)  # last: the conversion is complete


# --------------------------------------------------------------------------------------------
# converters
# --------------------------------------------------------------------------------------------

def _shard_sample_fn(source: Source, fmt: str, quality: int, resize: Optional[int], on_error: str):
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
    return convert


def to_shards(source: Source, out_dir, *, samples_per_shard: int = 10000, fmt: str = "jpg", quality: int = 95,
              resize: Optional[int] = None, prefix: str = "shard", progress: bool = True,
              on_error: str = "raise", workers: int = 1, existing: str = "refuse") -> List[Path]:
    """Write every sample of ``source`` into WebDataset shards (+ index) under ``out_dir``.

    ``fmt``: jpg, png (lossless) or webp. Encoded samples already in ``fmt`` are copied byte
    for byte when no ``resize`` is asked (no generation loss, and ~50x faster than
    decode + encode). ``resize``: shorter side in pixels (as ``torchvision.transforms.Resize``).
    Labels are the source's. ``on_error="skip"`` leaves out samples that cannot be read or
    decoded (counted on stderr). ``existing``: ``refuse``, ``overwrite`` or ``resume`` a
    non-empty ``out_dir`` (see the module docstring). Returns all the conversion's shard paths.
    An ``out_dir`` URL (``s3://...``): converted locally, then uploaded (:func:`loaders.remote.to_remote_shards`).
    """
    if isinstance(out_dir, str) and "://" in out_dir:
        from .remote import to_remote_shards
        return to_remote_shards(to_shards, source, out_dir, existing=existing, samples_per_shard=samples_per_shard,
                                fmt=fmt, quality=quality, resize=resize, prefix=prefix, progress=progress,
                                on_error=on_error, workers=workers)
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in FORMATS:
        raise ValueError(f"to_shards: fmt must be one of {', '.join(FORMATS)}, got '{fmt}'")
    _check_on_error(on_error)
    settings = {"samples_per_shard": int(samples_per_shard), "format": fmt, "quality": int(quality),
                "resize": None if resize is None else int(resize), "prefix": prefix, "on_error": on_error}
    run = _ShardRun(Path(out_dir), source, settings, existing)
    if run.m["complete"]:
        return run.paths()
    convert = _shard_sample_fn(source, fmt, quality, resize, on_error)
    n = len(source)
    with ShardWriter(out_dir, prefix=prefix, samples_per_shard=samples_per_shard, start_shard=len(run.m["shards"]),
                     start_count=run.m["samples"], on_open=run.opening, on_commit=run.committed) as writer, \
            _progress(n, f"shards <- {source.name}", progress, initial=run.start) as bar:
        for i, (data, label) in enumerate(_ordered_map(convert, range(run.start, n), workers), start=run.start):
            if isinstance(data, SampleError):
                run.skipped += 1
            else:
                run.index, run.skipped_written = i, run.skipped
                writer.write(data, ext=fmt, label=label)
            bar.update(1)
    if run.skipped:
        print(f"to_shards: skipped {run.skipped} unreadable samples of '{source.name}'", file=sys.stderr)
    if not run.m["shards"]:
        raise DataError(f"to_shards: no sample of '{source.name}' could be written")
    run.finish()
    return run.paths()


def check_output_file(out_path: Path, existing: str) -> None:
    """Refuse (:class:`DataError`) a single-file output that exists when ``existing`` is ``"refuse"``,
    and a directory in its place always."""
    out_path = Path(out_path)
    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {', '.join(EXISTING)}, got '{existing}'")
    if out_path.is_dir():
        raise DataError(f"output '{out_path}' is a directory; give a file path")
    if out_path.exists() and existing == "refuse":
        raise DataError(f"output file '{out_path}' already exists; pass --overwrite to replace it "
                        "(or --resume to redo it)")


def source_to_npz(source: Source, out_path, *, size: Optional[int] = None, label: Optional[int] = None,
                  progress: bool = True, on_error: str = "raise", workers: int = 1,
                  existing: str = "overwrite") -> Path:
    """Decode every sample of ``source`` into an uncompressed ``.npz``: ``image`` uint8 [N,H,W,3]
    RGB and ``label`` int64 [N].

    ``size``: resize every image to ``size x size`` (bicubic); without it all images must
    share one size. ``label``: store this label for every image (e.g. ``-1`` for generated
    images) instead of the source's. The file is uncompressed so :class:`NPZSource`
    memory-maps it. It is replaced atomically; ``existing="refuse"`` refuses an existing file
    (``"overwrite"`` and ``"resume"`` both write it anew).
    """
    _check_on_error(on_error)
    out_path = Path(out_path)
    if out_path.suffix != ".npz":
        raise ValueError(f"source_to_npz: output '{out_path}' must end with .npz")
    check_output_file(out_path, existing)
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
        for i, img in enumerate(_ordered_map(load, range(n), workers)):
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
                  progress: bool = True, on_error: str = "raise", workers: int = 1,
                  existing: str = "overwrite") -> Path:
    """Image folder (class subfolders, or a flat folder of unlabelled images) to an RGB ``.npz``.

    See :func:`source_to_npz` for ``size``, ``label`` and ``existing``.
    """
    from .sources import ImageFolderSource
    return source_to_npz(ImageFolderSource(root=root), out_path, size=size, label=label, progress=progress,
                         on_error=on_error, workers=workers, existing=existing)


def _folder_names(source: Source, fmt: str) -> List[str]:
    labels = np.asarray(source.labels())
    unlabelled = bool((labels < 0).all())
    if not unlabelled and (labels < 0).any():
        raise DataError(f"to_folder: source '{source.name}' mixes labelled and unlabelled (-1) samples; "
                        "an image folder cannot hold both")
    if unlabelled:
        return [f"{i:08d}.{fmt}" for i in range(len(labels))]
    return [f"{int(lab):03d}/{i:08d}.{fmt}" for i, lab in enumerate(labels)]


def to_folder(source: Source, out_dir, *, fmt: str = "png", quality: int = 95, progress: bool = True,
              existing: str = "refuse") -> Path:
    """Write ``source`` as an image folder readable by :class:`ImageFolderSource`.

    Labelled sources go to ``out_dir/{label:03d}/{i:08d}.{fmt}`` (zero-padded numbers, so the
    folder source's sorted class order gives back the same labels); a source whose labels are
    all ``-1`` goes flat into ``out_dir``. Each file is written atomically; ``MANIFEST.json``
    lists them all before the first is written. ``existing``: see the module docstring.
    """
    if fmt == "jpeg":
        fmt = "jpg"
    names = _folder_names(source, fmt)
    out_dir = Path(out_dir)
    settings = {"format": fmt, "quality": int(quality)}
    m = claim_output_dir(out_dir, "folder", source, settings, existing, drop_pending=False)
    resumed = m is not None
    if m is None:
        m = _new_manifest("folder", source, settings)
        m["pending"], m["dirs"] = names, sorted({n.rpartition("/")[0] for n in names} - {""})
        write_manifest(out_dir, m)  # ahead of every file it names
    elif m["complete"]:
        return out_dir
    for d in m["dirs"]:
        (out_dir / d).mkdir(exist_ok=True)
    with _progress(len(source), f"folder <- {source.name}", progress) as bar:
        for i, name in enumerate(names):
            path = out_dir / name
            if not (resumed and path.exists()):  # files are written atomically: one that exists is whole
                data, _ = source.read(i)
                if not (isinstance(data, (bytes, bytearray)) and sniff_format(data) == fmt):
                    data = encode_image(decode_image(data, path=source.describe(i), index=i), fmt, quality=quality)
                atomic_write(path, lambda f: f.write(data), tmp=path.with_name(path.name + ".tmp"))
            bar.update(1)
    m["files"], m["pending"], m["samples"], m["complete"] = names, [], len(names), True
    write_manifest(out_dir, m)  # last: the conversion is complete
    return out_dir
