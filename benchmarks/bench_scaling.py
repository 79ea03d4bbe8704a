"""``fastssl bench scaling``: our loader's samples/sec as the number of DataLoader workers grows
(1, 2, ... up to the usable cores) at a fixed batch size, and as the batch size grows at all cores.

Each point is a (mode, backend, format) series measured with the interleaved rounds of
:func:`benchmarks.bench_loader.measure_rounds`; the record's PNG has one panel per axis.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

from .bench_loader import DEFAULT_PRESETS, Variant, _augment, _csv, measure_rounds, ours
from .common import summarize, write_record
from .data import make_bench_data

__all__ = ["run", "worker_counts", "add_arguments", "from_args"]


def worker_counts(cores: int) -> List[int]:
    """1, 2, 4, ... doubling, always ending at ``cores``."""
    out, w = [], 1
    while w < cores:
        out.append(w)
        w *= 2
    return out + [cores]


def run(*, dataset: str = "cifar", n: int = 4096, fmt: str = "shards", modes: Sequence[str] = ("feed",),
        backend: str = "torch", workers: Optional[Sequence[int]] = None, batch_size: int = 256,
        batch_sizes: Sequence[int] = (32, 64, 128, 256, 512), views: int = 2, preset: Optional[str] = None,
        repeats: int = 3, window_s: float = 2.0, warmup: int = 3, cache=None, out_dir=None,
        command: Optional[str] = None, progress: bool = True, seed: int = 0):
    """Measure both sweeps; write a ``scaling`` record (+ PNG) and return its path."""
    from .report import plot_record
    cores = len(os.sched_getaffinity(0))
    workers = list(workers or worker_counts(cores))
    data = make_bench_data(dataset, n=n, root=cache, progress=progress)
    if fmt not in data.formats:
        fmt = "folder"
    preset = preset or DEFAULT_PRESETS[dataset]
    aug, crops = _augment(preset, data.out_size, views)
    scfg = data.source_config(fmt)
    variants, meta = [], {}

    def add(key, axis, x, series, w, bs, mode):
        variants.append(Variant(key, "ours", lambda: ours(scfg, backend=backend, mode=mode, crops=crops, augment=aug,
                                                          batch_size=bs, num_workers=w, image_size=data.out_size,
                                                          seed=seed)))
        meta[key] = {"axis": axis, "x": x, "series": series, "num_workers": w, "batch_size": bs}

    for mode in modes:
        series = f"{backend}/{mode}/{fmt}"
        for w in workers:
            add(f"workers={w}/bs={batch_size}/{series}", "workers", w, series, w, batch_size, mode)
        for bs in batch_sizes:
            if bs > data.n:
                continue
            add(f"bs={bs}/workers={workers[-1]}/{series}", "batch", bs, series, workers[-1], bs, mode)
    res = measure_rounds(variants, repeats=repeats, seconds=window_s, warmup=warmup, progress=progress)
    for k, v in res.items():
        v.update(meta[k])
        if v.get("values"):
            v.update(summarize(v["values"]))
    config = {"dataset": dataset, "n": n, "view_px": data.out_size, "format": fmt, "modes": list(modes),
              "backend": backend, "workers": workers, "batch_size": batch_size, "batch_sizes": list(batch_sizes),
              "views": views, "preset": preset, "repeats": repeats, "window_s": window_s, "warmup_batches": warmup,
              "usable_cores": cores, "generator": data.generator, "seed": seed,
              "unit": "samples/s (each sample = `views` views)"}
    from .common import RESULTS
    path = write_record("scaling", config=config, results=res, command=command, directory=out_dir or RESULTS)
    plot_record(path)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--format", default="shards")
    p.add_argument("--modes", type=_csv, default=["feed"], help="feed (uint8 views) and/or full (with Augment)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--workers", type=lambda s: [int(x) for x in _csv(s)], default=None,
                   help="comma list (default 1, 2, 4, ... up to the usable cores)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the workers sweep")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in _csv(s)], default=[32, 64, 128, 256, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--preset", default=None, help="default: symmetric, at the set's size")
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default=None)


def from_args(args, command: str):
    return run(dataset=args.dataset, n=args.n, fmt=args.format, modes=args.modes, backend=args.backend,
               workers=args.workers, batch_size=args.batch_size, batch_sizes=args.batch_sizes, repeats=args.repeats,
               window_s=args.window, warmup=args.warmup, preset=args.preset, cache=args.cache, out_dir=args.out,
               command=command)
