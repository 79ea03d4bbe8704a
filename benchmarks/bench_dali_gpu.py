"""DALI on the GPU: nvJPEG decode + the in-graph recipe vs the engine on the device, through the stream.

Run on a CUDA machine (the GPU suite's part, or by hand)::

    python -m benchmarks.bench_dali_gpu --device cuda            # 224 px, batch 256, 3 repeats
    python -m benchmarks.bench_dali_gpu --device cpu --quick     # the CPU dry run (tests run it)

Data: ``--n`` synthetic images (:func:`benchmarks.data.synthetic_images`) at ``--image-size`` px,
JPEG-encoded into WebDataset shards in a temporary folder (not timed). Variants, each a
:class:`loaders.stream.Stream` over those shards with the ``--preset`` recipe at ``--size`` px,
yielding float32 normalised views on ``--device``:

* ``dali-graph``: ``backend: dali``, ``augment.where: dali``: decode (``device="mixed"`` on a
  GPU), crop and the whole recipe in the DALI graph;
* ``dali-crops+engine``: ``backend: dali``, ``where: device``: DALI decodes and crops (uint8),
  the batched engine augments on the device;
* ``torch+engine``: ``backend: torch`` (``--workers`` DataLoader workers), ``where: device``.

Rate: images/s over ``--batches`` batches after ``--warmup`` batches, ``--repeats`` times
(``torch.cuda.synchronize`` before each clock read). Parity: the first batch of the DALI graph vs
the engine applied on ``--device`` to DALI's uint8 crops of the same boxes and key (max |diff|,
normalised units; the CPU graph is exact to ~5e-6, tests/test_dali.py; on the GPU the arithmetic
is the same). The JSON record goes to ``--out`` (default ``benchmarks/results/``) as
``dali-gpu-<timestamp>.json``; its ``results`` hold the three rates and ``parity``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

VARIANTS = {"dali-graph": ("dali", "dali"), "dali-crops+engine": ("dali", "device"),
            "torch+engine": ("torch", "device")}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_dali_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (cuda:N) or cpu (the dry run)")
    p.add_argument("--quick", action="store_true", help="tiny set, 32 px, one repeat: a dry run")
    p.add_argument("--preset", default="symmetric_adainf", help="augmentation preset (configs/augment)")
    p.add_argument("--size", type=int, default=224, help="view size (the preset's views are scaled to it)")
    p.add_argument("--image-size", type=int, default=256, help="stored image side")
    p.add_argument("--n", type=int, default=2048, help="images in the set")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=10, help="timed batches per repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=8, help="torch workers / DALI reader threads")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--out", default=None, help="record folder (default benchmarks/results)")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.image_size, a.n, a.batch = 32, 48, 64, 16
        a.batches, a.warmup, a.repeats, a.workers = 2, 1, 1, 0
    return a


def write_shards(a: argparse.Namespace, root: Path) -> Path:
    """The benchmark set as JPEG WebDataset shards under ``root``."""
    from benchmarks.data import synthetic_images
    from loaders.base import ArraySource
    from loaders.convert import to_shards
    images, labels, _ = synthetic_images(a.n, a.image_size, seed=0)
    to_shards(ArraySource(images, labels, name="bench"), root / "shards", samples_per_shard=512, fmt="jpg",
              quality=90, progress=False)
    return root / "shards"


def data_config(a: argparse.Namespace, shards: Path, backend: str) -> Dict:
    return {"sources": [{"type": "shards", "path": str(shards), "name": "bench"}], "backend": backend,
            "batch_size": a.batch, "num_workers": a.workers, "seed": 0, "crop_in_decode": True}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(stream, device: torch.device, a: argparse.Namespace) -> List[float]:
    """Images/s per repeat of ``a.batches`` batches after ``a.warmup`` batches."""
    it = iter(stream)
    for _ in range(a.warmup):
        next(it)
    out = []
    for _ in range(a.repeats):
        _sync(device)
        t0, n = time.perf_counter(), 0
        for _ in range(a.batches):
            n += len(next(it))
        _sync(device)
        out.append(n / (time.perf_counter() - t0))
    return out


def parity(aug, shards: Path, device: torch.device, a: argparse.Namespace) -> float:
    """max |DALI graph - engine on DALI's crops| for the first batch (same boxes, same key)."""
    from loaders.dali_backend import DaliLoader
    from loaders.mixture import Mixture
    from loaders.shards import ShardSource
    src = ShardSource(path=shards)
    mix = Mixture([len(src)], budget=a.batch, seed=0)
    dev = (device.index or 0) if device.type == "cuda" else None
    kw = dict(batch_size=a.batch, augment=aug, num_workers=max(1, a.workers), device_id=dev)
    graph = next(iter(DaliLoader([src], mix, **kw)))
    crops = next(iter(DaliLoader([src], mix, graph=False, **kw)))
    ref = aug(crops.to(device), crop=False)
    return max(float((u.to(device) - v).abs().max()) for u, v in zip(graph.views, ref.views))


def main(argv: Optional[List[str]] = None) -> Path:
    from benchmarks.common import RESULTS, write_record
    from loaders.augment import Augment
    from loaders.dali_backend import require_dali
    from loaders.stream import Stream
    a = parse_args(argv)
    try:
        require_dali()
    except ImportError as e:
        raise SystemExit(f"bench_dali_gpu: {e}") from None
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_dali_gpu: --device cuda needs a CUDA GPU (use --device cpu --quick for the dry run)")
    aug = Augment.from_preset(a.preset, size=a.size)
    results: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dali-") as tmp:
        shards = write_shards(a, Path(tmp))
        for name in a.variants.split(","):
            backend, where = VARIANTS[name]
            stream = Stream(data_config(a, shards, backend), aug, where=where, device=device, note=lambda m: None)
            values = rate(stream, device, a)
            results[name] = {"values": values, "unit": "images/s", "where": stream.where}
            print(f"{name:>18}: {sum(values) / len(values):10.1f} images/s", flush=True)
            del stream
        diff = parity(aug, shards, device, a)
    results["parity"] = {"max_abs_diff": diff, "unit": "normalised"}
    print(f"{'parity':>18}: max |graph - engine| = {diff:.2e}", flush=True)
    config = {k: v for k, v in vars(a).items() if k != "out"}
    args = argv if argv is not None else sys.argv[1:]
    path = write_record("dali-gpu", config=config, results=results,
                        command="python -m benchmarks.bench_dali_gpu " + " ".join(args),
                        notes="DALI graph vs DALI crops + engine vs torch + engine, through loaders.stream.Stream",
                        directory=Path(a.out) if a.out else RESULTS)
    print(f"record: {path}")
    return path


if __name__ == "__main__":
    main()
