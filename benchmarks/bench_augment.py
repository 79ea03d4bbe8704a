"""Augmentation throughput: this engine vs torchvision per sample vs kornia, side by side.

Measures images/sec (source images; each yields two augmented views) for the SimCLR
``symmetric`` two-view pipeline (RRC bicubic, flip, jitter 0.8/0.8/0.8/0.2 p 0.8, gray 0.2,
blur p 0.5, normalize) at each ``--sizes`` value, batch ``--batch``, on ``--device``:

* ``engine``: ``loaders.augment.Augment`` on the uint8 batch on the device;
* ``torchvision``: ``torchvision.transforms.v2`` applied to one image tensor at a time on the
  CPU with one intra-op thread (the common DataLoader-worker path), views stacked into a batch;
* ``kornia``: ``kornia.augmentation`` on the float batch on the device.

Inputs are 32x32 for the 32 px run and 256x256 for 224 px (a decoded ImageNet-like image),
random uint8, identical for the three. Every variant runs one warm-up and ``--repeats`` timed
repeats in the same process; the JSON record (``benchmarks/results/augment-*.json``) holds
every repeat, the medians, the machine and the versions, and a bar plot is saved next to it.

Run: ``python -m benchmarks.bench_augment --sizes 32 224 --batch 256 --repeats 3 --device cpu``
(or ``fastssl bench augment ...``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .common import RESULTS, time_repeats, write_record

__all__ = ["add_arguments", "add_subcommand", "from_args", "main", "run"]

PRESET = "symmetric"



def _median(v):
    return sorted(v)[len(v) // 2]

def _input_size(size: int) -> int:
    return size if size <= 64 else int(round(size * 256 / 224))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(images: torch.Tensor, size: int, device: torch.device) -> Callable[[], int]:
    from loaders import Batch
    from loaders.augment import Augment
    aug = Augment.from_preset(PRESET, size=size)
    n = images.shape[0]
    z = torch.zeros(n, dtype=torch.long, device=device)
    batch = Batch(views=[images.to(device)], index=torch.arange(n, device=device), source=z, label=z)
    state = {"step": 0}

    def fn() -> int:
        out = aug(batch, step=state["step"])
        state["step"] += 1
        _sync(device)
        assert len(out.views) == 2
        return n
    return fn


def _tv_pipeline(size: int):
    from torchvision.transforms import v2

    from loaders.augment import Augment
    spec = Augment.from_preset(PRESET, size=size)
    s, m = spec.specs[0], spec
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=s.scale, ratio=s.ratio, interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(s.flip),
        v2.RandomApply([v2.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue)], p=s.jitter_p),
        v2.RandomGrayscale(s.grayscale),
        v2.RandomApply([v2.GaussianBlur(s.kernel_size, sigma=s.blur_sigma)], p=s.blur_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(m.mean), list(m.std)),
    ])


def _torchvision(images: torch.Tensor, size: int) -> Callable[[], int]:
    tf = _tv_pipeline(size)
    cpu = images.cpu()

    def fn() -> int:
        # One intra-op thread, as in a DataLoader worker (torch sets 1 thread per worker): for
        # per-image ops thread hand-offs cost more than they save, so this is torchvision's best case.
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            v1 = torch.stack([tf(img) for img in cpu])
            v2_ = torch.stack([tf(img) for img in cpu])
        finally:
            torch.set_num_threads(prev)
        assert v1.shape == v2_.shape
        return cpu.shape[0]
    return fn


def _kornia(images: torch.Tensor, size: int, device: torch.device) -> Optional[Callable[[], int]]:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    from loaders.augment import Augment
    aug = Augment.from_preset(PRESET, size=size)
    s = aug.specs[0]
    k = s.kernel_size
    seq = torch.nn.Sequential(
        K.RandomResizedCrop((size, size), scale=s.scale, ratio=s.ratio, resample="BICUBIC"),
        K.RandomHorizontalFlip(p=s.flip),
        K.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue, p=s.jitter_p),
        K.RandomGrayscale(p=s.grayscale),
        K.RandomGaussianBlur((k, k), s.blur_sigma, p=s.blur_p),
        K.Normalize(mean=torch.tensor(aug.mean), std=torch.tensor(aug.std)),
    ).to(device)
    x8 = images.to(device)

    def fn() -> int:
        x = x8.float() / 255.0   # kornia needs float input; the conversion is part of its cost
        a, b = seq(x), seq(x)
        _sync(device)
        assert a.shape[-1] == size and b.shape[-1] == size
        return x8.shape[0]
    return fn


def run(*, sizes: List[int], batch: int, repeats: int, device: str, variants: List[str],
        threads: Optional[int] = None, command: Optional[str] = None, directory: Path = RESULTS,
        plot: bool = True) -> Path:
    """Measure and write the record (and a PNG next to it); returns the record's path."""
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    results: Dict[str, Dict] = {}
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        n_in = _input_size(size)
        images = torch.randint(0, 256, (batch, 3, n_in, n_in), generator=g, dtype=torch.uint8)
        makers = {
            "engine": lambda: _engine(images, size, dev),
            "torchvision": lambda: _torchvision(images, size),
            "kornia": lambda: _kornia(images, size, dev),
        }
        for name in variants:
            fn = makers[name]()
            if fn is None:
                print(f"[augment] {name}@{size}px: unavailable, skipped", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            vals = time_repeats(fn, repeats=repeats, warmup=1)
            key = f"{name}@{size}px"
            results[key] = {"values": vals, "unit": "images/s", "size": size, "input_size": n_in,
                            "variant": name,
                            "device": "cpu" if name == "torchvision" else str(dev)}
            print(f"[augment] {key}: median {sorted(vals)[len(vals) // 2]:.0f} images/s "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    ratios = {}
    for size in sizes:
        e = results.get(f"engine@{size}px")
        for other in ("torchvision", "kornia"):
            o = results.get(f"{other}@{size}px")
            if e and o:
                ratios[f"engine/{other}@{size}px"] = round(_median(e["values"]) / _median(o["values"]), 3)
    config = {"preset": PRESET, "sizes": sizes, "batch": batch, "repeats": repeats, "device": str(dev),
              "views": 2, "torch_threads": torch.get_num_threads(), "variants": variants, "ratios": ratios}
    notes = ("images/s counts source images (2 views each). torchvision runs per sample on the CPU "
             "(DataLoader-worker path); engine and kornia run batched on the device. "
             "Ratios are medians measured in the same run.")
    path = write_record("augment", config=config, results=results, command=command, notes=notes,
                        directory=directory)
    if plot:
        _plot(results, sizes, path.with_suffix(".png"), title=f"{PRESET} 2 views, batch {batch}, {dev}")
    return path


def _plot(results: Dict, sizes: List[int], out: Path, *, title: str) -> None:
    from .report import pyplot
    plt = pyplot()
    if plt is None:
        return
    names = ["engine", "torchvision", "kornia"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        labels, meds = [], []
        for n in names:
            r = results.get(f"{n}@{size}px")
            if r:
                labels.append(n)
                meds.append(sorted(r["values"])[len(r["values"]) // 2])
        bars = ax.bar(labels, meds, color=["#2a7", "#888", "#58c"][: len(labels)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(f"{size} px")
        ax.set_ylabel("images/s (median)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="output sizes (px)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=["engine", "torchvision", "kornia"],
                   choices=["engine", "torchvision", "kornia"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the record and plot")
    p.add_argument("--no-plot", action="store_true")


def from_args(args, command: Optional[str] = None) -> Path:
    return run(sizes=args.sizes, batch=args.batch, repeats=args.repeats, device=args.device,
               variants=args.variants, threads=args.threads, command=command,
               directory=Path(args.out), plot=not args.no_plot)


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``augment`` on a subparsers group (``fastssl bench augment``)."""
    p = subparsers.add_parser("augment", help="augmentation throughput: engine vs torchvision vs kornia")
    add_arguments(p)
    p.set_defaults(func=lambda args: (print(f"record: {from_args(args)}"), 0)[1])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_augment", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    path = from_args(args, command="python -m benchmarks.bench_augment " + " ".join(shlex.quote(a) for a in argv))
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
