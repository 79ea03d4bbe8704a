"""``fastssl bench loader --sets inet,yfcc``: the GPU-feeding path on large JPEGs, with and without
reduced-scale decode (:mod:`loaders.decode`), next to the full-resolution decode-only ceiling and
FFCV's own crop+flip loader on the same images.

Sets (made by the benchmark, cached under ``.cache/bench/feed-<name>-<n>-q<quality>-s<seed>/``):

* ``inet``: ImageNet-sized JPEGs, 500 x 375 (w x h), read into 224 px views;
* ``yfcc``: YFCC-sized JPEGs, 1024 x 768, read into 224 px views.

Images are the ``synthetic`` source's shapes (smooth gradients, hard edges) upsampled to the set's
size plus fine texture (blurred noise), so they compress like photos (quality 90: ~75 kB at
500 x 375, 3.3 bits/px; ~210 kB at 1024 x 768, 2.2 bits/px) and are written as an ImageFolder
(``folder/0/<i>.jpg``, what the torch backend reads) and as FFCV ``.beton`` files of the same
pixels (FFCV's writer re-encodes them at the same quality): one image field for our FFCV backend,
one field per view for FFCV's own Loader (one pipeline per field).

Variants, each ``V`` = 2 views of 224 px, random-resized-crop (scale 0.08-1) + flip, uint8 out,
on the same worker count, measured side by side in interleaved rounds
(:func:`benchmarks.bench_loader.measure_rounds`):

* ``ceiling-decode``: simplejpeg full-resolution decode of the in-memory JPEGs, nothing else
  (:func:`benchmarks.baselines.decode_only`);
* ``torch-reduced``: the torch backend, ``decoder="cv2"``, ``flip=True``, reading the folder, with
  reduced-scale and region decode (the defaults: each JPEG decoded at the smallest scale its views
  allow, only the rows and columns they cover); ``torch-scaled``: reduced scale, whole images
  (``region_decode: false``); ``torch-full``: full decode (``reduced_decode: false``);
* ``ffcv-reduced`` / ``ffcv-full``: our FFCV backend on the one-field ``.beton``;
* ``baseline-ffcv``: FFCV's Loader, ``RandomResizedCropRGBImageDecoder`` + flip per view.

Targets (the median over rounds of each round's ratio, variants of a round run back to back):
``yfcc``: torch-reduced > 1.0x the ceiling;
``inet``: torch-reduced >= 0.9x the ceiling.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .bench_loader import Variant, measure_rounds
from .common import summarize, write_record
from .data import CACHE, JpegFolder

__all__ = ["FEED_SETS", "FEED_TARGETS", "FeedSet", "make_feed_set", "natural_image", "build_feed_variants",
           "run_feed", "feed_targets"]

#: name -> (height, width, view side)
FEED_SETS = {"inet": (375, 500, 224), "yfcc": (768, 1024, 224)}
#: name -> minimum ratio torch-reduced / ceiling-decode
FEED_TARGETS = {"inet": 0.9, "yfcc": 1.0}
DEFAULT_N = {"inet": 512, "yfcc": 256}


def natural_image(i: int, h: int, w: int, *, seed: int = 0, texture: float = 12.0) -> np.ndarray:
    """``uint8 [h, w, 3]`` image ``i``: a synthetic shape image upsampled (PIL bicubic) to ``h x w``
    plus fine texture (noise of std ``texture`` levels, blurred by a 5-tap Gaussian, sigma 0.8).
    Deterministic in ``(i, seed)``. No OpenCV here: its thread pool, once used in a process, can
    deadlock the DataLoader workers forked from it (they call ``cv2.setNumThreads``)."""
    from PIL import Image

    from loaders.synthetic import synthetic_arrays
    side = max(h, w)
    base = synthetic_arrays(1, min(512, side), seed=seed * 1_000_003 + i)[0][0]
    up = np.asarray(Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC))[:h, :w]
    noise = np.random.default_rng([seed, i]).normal(0, texture, (h, w)).astype(np.float32)
    taps = np.exp(-0.5 * (np.arange(-2, 3) / 0.8) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):  # separable blur (wrapping at the borders)
        noise = sum(t * np.roll(noise, k - 2, axis=axis) for k, t in enumerate(taps))
    return np.clip(up + noise[..., None], 0, 255).astype(np.uint8)


@dataclass
class FeedSet(JpegFolder):
    """One large-JPEG set on disk: ``n`` JPEGs of ``height x width``, views of ``out`` px."""

    name: str
    root: Path
    n: int
    height: int
    width: int
    out: int
    quality: int
    seed: int

    def beton(self, *, fields: int = 1) -> Path:
        """FFCV ``.beton`` of the same images (JPEG, this set's quality, no resizing): ``fields``
        image fields ``image0..`` (each holds the image) and ``label``. Written on first use."""
        path = self.root / f"data-{fields}f.beton"
        if path.exists():
            return path
        from ffcv.fields import IntField, RGBImageField  # optional dependency
        from ffcv.writer import DatasetWriter
        from torch.utils.data import Dataset
        fs = self

        class _Images(Dataset):
            def __len__(self):
                return fs.n

            def __getitem__(self, i):
                img = natural_image(i, fs.height, fs.width, seed=fs.seed)
                return (*([img] * fields), 0)

        tmp = path.with_suffix(".beton.tmp")
        spec = {f"image{v}": RGBImageField(write_mode="jpg", jpeg_quality=self.quality,
                                           max_resolution=max(self.height, self.width)) for v in range(fields)}
        spec["label"] = IntField()
        DatasetWriter(str(tmp), spec, num_workers=1).from_indexed_dataset(_Images(), chunksize=64)
        tmp.replace(path)
        return path


def make_feed_set(name: str, *, n: Optional[int] = None, quality: int = 90, seed: int = 0,
                  root: Optional[Path] = None) -> FeedSet:
    """Make (or reuse: a ``manifest.json`` marks a complete set) feed set ``name`` (``inet``|``yfcc``)."""
    if name not in FEED_SETS:
        raise ValueError(f"unknown feed set '{name}' (one of {sorted(FEED_SETS)})")
    n = int(n or DEFAULT_N[name])
    if n <= 0:
        raise ValueError(f"feed set size must be positive, got n={n}")
    h, w, out = FEED_SETS[name]
    dest = Path(root or CACHE) / f"feed-{name}-{n}-q{quality}-s{seed}"
    fs = FeedSet(name, dest, n, h, w, out, quality, seed)
    if (dest / "manifest.json").exists():
        return fs
    if dest.exists():
        shutil.rmtree(dest)  # an interrupted earlier run
    (fs.folder / "0").mkdir(parents=True)
    from .data import encode_jpegs
    for i in range(n):
        (fs.folder / "0" / f"{i}.jpg").write_bytes(encode_jpegs(natural_image(i, h, w, seed=seed)[None],
                                                                quality=quality)[0])
    (dest / "manifest.json").write_text(json.dumps({"name": name, "n": n, "height": h, "width": w, "out": out,
                                                    "quality": quality, "seed": seed}))
    return fs


# ----------------------------------------------------------------------------- variants
def _crops(out: int, views: int):
    from loaders.crop import CropSpec
    return [CropSpec(out, scale=(0.08, 1.0), interpolation="bilinear") for _ in range(views)]


def _loader_feed(data_cfg: Dict, crops) -> Iterator[Tuple[object, int]]:
    """Endless ``(batch, n)`` from ``loaders.pipeline.build_loader(data_cfg, crops=crops)``."""
    from loaders.pipeline import build_loader
    loader = build_loader(data_cfg, crops=crops)
    it = iter(loader)
    try:
        for batch in it:
            yield batch, len(batch)
    finally:
        if hasattr(it, "close"):
            it.close()
        del it, loader


def _data_cfg(source: Dict, backend: str, options: Dict, *, batch_size: int, workers: int, seed: int) -> Dict:
    return {"sources": [source], "seed": seed, "backend": backend, "batch_size": batch_size,
            "num_workers": workers, "on_error": "raise", "crop_in_decode": True, "pin_memory": False,
            "backend_options": options}


def build_feed_variants(fs: FeedSet, *, views: int, batch_size: int, workers: int, seed: int = 0,
                        ffcv: bool = True) -> Tuple[List[Variant], Dict[str, str]]:
    """The feed comparison on one set: (variants, skipped key -> why)."""
    from . import baselines as B
    tag = f"{fs.name}-{fs.width}x{fs.height}"
    crops = _crops(fs.out, views)
    folder = {"type": "folder", "root": str(fs.folder), "name": f"{fs.name}-folder"}
    blobs = fs.jpeg_bytes()
    out: List[Variant] = [Variant(f"{tag}/ceiling-decode", "ceiling", lambda: B.decode_only(
        blobs, workers=workers, per_worker=max(64, batch_size), decoder="simplejpeg"))]
    for name, opts in (("reduced", {}), ("scaled", {"region_decode": False}), ("full", {"reduced_decode": False})):
        cfg = _data_cfg(folder, "torch", {"decoder": "cv2", "flip": True, **opts},
                        batch_size=batch_size, workers=workers, seed=seed)
        out.append(Variant(f"{tag}/torch-{name}/folder", "ours", lambda cfg=cfg: _loader_feed(cfg, crops)))
    skipped: Dict[str, str] = {}
    if not ffcv:
        return out, skipped
    try:
        one, per_view = fs.beton(fields=1), fs.beton(fields=views)
    except ImportError as e:
        skipped[f"{tag}/ffcv"] = f"ffcv not installed ({e})"
        return out, skipped
    beton = {"type": "beton", "path": str(one), "name": f"{fs.name}-beton"}
    for name, reduced in (("reduced", True), ("full", False)):
        cfg = _data_cfg(beton, "ffcv", {"flip": True, "reduced_decode": reduced}, batch_size=batch_size,
                        workers=workers, seed=seed)
        out.append(Variant(f"{tag}/ffcv-{name}/beton", "ours", lambda cfg=cfg: _loader_feed(cfg, crops)))
    out.append(Variant(f"{tag}/baseline-ffcv", "baseline", lambda: B.ffcv_crop_flip(
        str(per_view), size=fs.out, batch_size=batch_size, num_workers=workers, views=views, seed=seed)))
    return out, skipped


def feed_targets(results: Dict[str, Dict], fs: FeedSet) -> Dict[str, Dict]:
    """torch-reduced over the ceiling (the set's target), plus the informative ratios.

    Paired per round: round ``i``'s rate over the ceiling's rate in the same round (the variants
    of a round run back to back, so drift of this shared machine between rounds cancels);
    ``ratio`` is the median of those, ``round_ratios`` lists them, ``ratio_of_medians`` is kept
    beside it."""
    tag = f"{fs.name}-{fs.width}x{fs.height}"
    ceil_key = f"{tag}/ceiling-decode"
    ceil = results.get(ceil_key, {}).get("values") or []
    out = {}
    if not ceil:
        return out
    need = FEED_TARGETS[fs.name]
    for k, v in results.items():
        vals = v.get("values") or []
        if not k.startswith(tag + "/") or k == ceil_key or not vals:
            continue
        rounds = [a / b for a, b in zip(vals, ceil) if b]
        r = statistics.median(rounds)
        entry = {"kind": "ratio", "ratio": r, "round_ratios": rounds, "rounds": len(rounds),
                 "ratio_of_medians": statistics.median(vals) / statistics.median(ceil),
                 "numerator": k, "denominator": ceil_key}
        if k == f"{tag}/torch-reduced/folder":
            entry.update(kind="target", target=need, met=bool(r > need if need == 1.0 else r >= need))
        out[f"{tag}/ratio/{k.split('/', 1)[1]} vs ceiling-decode"] = entry
    return out


def run_feed(*, sets: Sequence[str], n: Optional[int] = None, views: int = 2, batch_size: int = 64,
             workers: Optional[int] = None, repeats: int = 3, window_s: float = 3.0, warmup: int = 3,
             cache=None, out_dir=None, command: Optional[str] = None, progress: bool = True, seed: int = 0,
             ffcv: bool = True) -> Path:
    """Measure the feed comparison on each of ``sets`` (``inet``, ``yfcc``); write one record
    ``loader-feed-<time>.json`` and return its path."""
    workers = workers or len(os.sched_getaffinity(0))
    results: Dict[str, Dict] = {}
    skipped: Dict[str, str] = {}
    meta = {}
    for s in sets:
        fs = make_feed_set(s, n=n, seed=seed, root=cache)
        mb = sum(p.stat().st_size for p in fs.files()) / 1e6
        meta[s] = {"n": fs.n, "height": fs.height, "width": fs.width, "view_px": fs.out, "quality": fs.quality,
                   "jpeg_mb": round(mb, 2), "mean_kb": round(1000 * mb / fs.n, 1)}
        variants, sk = build_feed_variants(fs, views=views, batch_size=batch_size, workers=workers, seed=seed,
                                           ffcv=ffcv)
        skipped.update(sk)
        res = measure_rounds(variants, repeats=repeats, seconds=window_s, warmup=warmup, progress=progress)
        for v in res.values():
            if v.get("values"):
                v.update(summarize(v["values"]))
        results.update(res)
        results.update(feed_targets(res, fs))
    config = {"sets": meta, "views": views, "batch_size": batch_size, "num_workers": workers, "repeats": repeats,
              "window_s": window_s, "warmup_batches": warmup, "seed": seed, "skipped": skipped,
              "crop": "random-resized-crop scale (0.08, 1), bilinear, + flip; uint8 views",
              "unit": "samples/s; each sample delivers `views` views",
              "targets": {s: f"torch-reduced {'>' if FEED_TARGETS[s] == 1.0 else '>='} {FEED_TARGETS[s]}x "
                             f"ceiling-decode" for s in sets}}
    from .bench_loader import _results
    return write_record("loader-feed", config=config, results=results, command=command,
                        directory=out_dir or _results())
