"""Benchmark data: the same images in every on-disk format the loaders read.

Two standard sets (both made from the ``synthetic`` source, so no download is needed):

* ``cifar``: 32 px JPEGs (CIFAR-like), read into 32 px views;
* ``imagenet``: 256 px JPEGs, read into 224 px views (the ImageNet recipe's sizes).

Each set is written once under ``.cache/bench/<name>-<n>-q<quality>/`` (gitignored) as

* ``folder/<label>/<index>.jpg``  -- ImageFolder layout (what the torchvision baseline reads);
* ``shards/``                      -- WebDataset tar shards + index (``loaders.convert.to_shards``);
* ``images.npz``                   -- decoded ``uint8 [N, H, W, 3]`` + ``int64 [N]`` labels;
* ``data.beton``                   -- FFCV file (only when ``ffcv`` is installed, made on demand);

and reused by later runs (a ``manifest.json`` written last marks a complete set).
"""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

__all__ = ["CACHE", "BenchData", "make_bench_data", "synthetic_images", "encode_jpegs", "SETS"]

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"

#: name -> (stored image side in px, output view side in px)
SETS = {"cifar": (32, 32), "imagenet": (256, 224)}


def synthetic_images(n: int, size: int, *, seed: int = 0):
    """``uint8 [n, size, size, 3]`` images and ``int64 [n]`` labels from the synthetic source.

    Falls back to smooth random colour fields (low-frequency noise, bilinearly upsampled: these
    compress like photos, unlike white noise) when ``loaders.synthetic`` is not available.
    """
    try:
        from loaders.synthetic import SyntheticSource
    except ImportError:
        SyntheticSource = None
    if SyntheticSource is not None:
        src = SyntheticSource(n=n, size=size, seed=seed)
        return np.ascontiguousarray(src.images), np.asarray(src.labels(), dtype=np.int64), "loaders.synthetic"
    import torch
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g) * 255
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    img = img.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    labels = torch.randint(0, 10, (n,), generator=g).numpy().astype(np.int64)
    return img, labels, "smooth-noise fallback"


def encode_jpegs(images: np.ndarray, *, quality: int = 90) -> List[bytes]:
    """JPEG-encode ``uint8 [N, H, W, 3]`` images with PIL (baseline 4:2:0, as most data sets)."""
    from PIL import Image
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class JpegFolder:
    """The folder copy of a bench set (``root/folder/<class>/<index>.jpg``; ``root``: the set's folder)."""

    @property
    def folder(self) -> Path:
        return self.root / "folder"

    def files(self) -> List[Path]:
        """The JPEG files of the folder copy, in index order."""
        return sorted(self.folder.glob("*/*.jpg"), key=lambda p: int(p.stem))

    def jpeg_bytes(self) -> List[bytes]:
        """All encoded images in memory (for the decode-only ceiling and per-stage timing)."""
        return [p.read_bytes() for p in self.files()]


@dataclass
class BenchData(JpegFolder):
    """One benchmark set on disk. ``size`` is the stored side, ``out_size`` the view side."""

    name: str
    root: Path
    n: int
    size: int
    out_size: int
    quality: int
    generator: str = ""
    formats: Dict[str, str] = field(default_factory=dict)   # format -> path ("" when missing)
    missing: Dict[str, str] = field(default_factory=dict)   # format -> why it is missing

    def source_config(self, fmt: str) -> Dict:
        """The ``build_source`` config reading this set in format ``fmt`` (shards|npz|folder)."""
        if fmt not in self.formats:
            raise ValueError(f"bench set {self.name}: no format '{fmt}' "
                             f"(have {sorted(self.formats)}; missing: {self.missing})")
        path = self.formats[fmt]
        if fmt == "folder":
            return {"type": "folder", "root": path, "name": f"{self.name}-folder"}
        if fmt == "npz":
            return {"type": "npz", "path": path, "name": f"{self.name}-npz"}
        if fmt == "shards":
            return {"type": "shards", "path": path, "name": f"{self.name}-shards"}
        raise ValueError(f"unknown bench format '{fmt}'")

    def build_source(self, fmt: str):
        """The :class:`loaders.base.Source` reading this set in format ``fmt``."""
        cfg = self.source_config(fmt)
        import importlib

        from loaders.base import build_source
        from loaders.pipeline import SOURCE_MODULES  # registers the built-in source types on import
        importlib.import_module(SOURCE_MODULES[cfg["type"]])
        return build_source(cfg)

    def beton(self, *, views: int = 2) -> Path:
        """The FFCV ``.beton`` copy (JPEG, written on first use). Needs ``ffcv``.

        FFCV 1.0 maps one pipeline to one field, so a ``views``-view loader needs the image stored
        in ``views`` fields ``image0``, ``image1``, ... (each view decodes with its own crop).
        """
        path = self.root / f"data-{views}v.beton"
        if path.exists():
            return path
        from ffcv.fields import IntField, RGBImageField  # optional dependency
        from ffcv.writer import DatasetWriter
        from torch.utils.data import Dataset

        images = np.load(self.formats["npz"])["image"]
        labels = np.load(self.formats["npz"])["label"]

        class _Arr(Dataset):
            def __len__(self):
                return len(images)

            def __getitem__(self, i):
                return (*([images[i]] * views), int(labels[i]))

        tmp = path.with_suffix(".beton.tmp")
        fields = {f"image{v}": RGBImageField(write_mode="jpg", jpeg_quality=self.quality,
                                             max_resolution=self.size) for v in range(views)}
        fields["label"] = IntField()
        writer = DatasetWriter(str(tmp), fields, num_workers=1)
        writer.from_indexed_dataset(_Arr(), chunksize=256)
        tmp.replace(path)
        return path


def make_bench_data(name: str = "cifar", *, n: int = 4096, quality: int = 90, seed: int = 0,
                    samples_per_shard: int = 1024, root: Optional[Path] = None,
                    progress: bool = True) -> BenchData:
    """Make (or reuse) benchmark set ``name`` (``cifar``: 32 px, ``imagenet``: 256 px) of ``n`` images.

    Writes the folder, npz and shard copies of the same JPEG-quality images; formats whose writer
    is not available (e.g. ``loaders.convert`` not installed yet) are listed in ``missing``.
    """
    if name not in SETS:
        raise ValueError(f"unknown bench set '{name}' (one of {sorted(SETS)})")
    if n <= 0:
        raise ValueError(f"bench set size must be positive, got n={n}")
    size, out_size = SETS[name]
    base = Path(root) if root is not None else CACHE
    dest = base / f"{name}-{n}-q{quality}-s{seed}"
    manifest = dest / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        data = BenchData(**{k: m[k] for k in ("name", "n", "size", "out_size", "quality", "generator",
                                               "formats", "missing")}, root=dest)
        if "shards" not in data.formats and _to_shards() is not None:
            _write_shards(data, samples_per_shard, progress)   # converter landed since: add it
            _write_manifest(data)
        return data
    if dest.exists():
        shutil.rmtree(dest)  # an interrupted earlier run
    dest.mkdir(parents=True)
    images, labels, generator = synthetic_images(n, size, seed=seed)
    data = BenchData(name=name, root=dest, n=n, size=size, out_size=out_size, quality=quality,
                     generator=generator)
    # folder: the same JPEG bytes the shards hold (decode cost is identical across formats)
    blobs = encode_jpegs(images, quality=quality)
    for i, (b, y) in enumerate(zip(blobs, labels)):
        d = data.folder / str(int(y) if y >= 0 else 0)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.jpg").write_bytes(b)
    data.formats["folder"] = str(data.folder)
    # npz: decoded JPEGs (so every format holds the same pixels)
    from loaders.base import decode_image
    dec = np.stack([decode_image(b) for b in blobs])
    np.savez(dest / "images.npz", image=dec, label=labels)
    data.formats["npz"] = str(dest / "images.npz")
    if _to_shards() is not None:
        _write_shards(data, samples_per_shard, progress)
    else:
        data.missing["shards"] = "loaders.convert.to_shards is not available"
    _write_manifest(data)
    return data


def _to_shards():
    try:
        from loaders.convert import to_shards
    except ImportError:
        return None
    return to_shards


def _write_shards(data: BenchData, samples_per_shard: int, progress: bool) -> None:
    from loaders.base import ArraySource
    z = np.load(data.formats["npz"])
    src = ArraySource(z["image"], z["label"], name=f"{data.name}-bench")
    out = data.root / "shards"
    try:
        _to_shards()(src, out, samples_per_shard=samples_per_shard, fmt="jpg", quality=data.quality,
                     progress=progress)
    except Exception as e:  # a converter still in development: record why, keep the other formats
        data.missing["shards"] = f"to_shards failed: {type(e).__name__}: {e}"
        return
    data.formats["shards"] = str(out)
    data.missing.pop("shards", None)


def _write_manifest(data: BenchData) -> None:
    m = {k: getattr(data, k) for k in ("name", "n", "size", "out_size", "quality", "generator",
                                       "formats", "missing")}
    (data.root / "manifest.json").write_text(json.dumps(m, indent=2))
