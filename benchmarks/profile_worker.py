"""Where a worker-augment sample's time goes: per-op profile of the CPU full-recipe path.

One process, one thread (as one DataLoader worker): ``n`` synthetic JPEGs of ``--stored`` px
are decoded (the torch backend's cv2 decoder: simplejpeg), cropped and resized to ``--size`` px views
(``TorchLoader._crop_views_cv2``'s resize rule), augmented by :class:`WorkerAugment`
(``output="uint8"``, ``precision`` as the loader bench uses) and normalised by ``finish``
(the main process's share). Kernel calls are timed by wrapping the kernels of
:mod:`loaders.augment.cv2_ops` (and their re-exports in :mod:`loaders.cpu_augment`); times
are microseconds of this thread's CPU time (``time.thread_time``: robust to other load on a
shared machine) per *sample* (``views`` views), the median of ``--repeats`` passes.

    python -m benchmarks.profile_worker --size 224 --stored 256 --repeats 5 [--kernels opencv,chain,fused] [--record]

``--record`` writes ``benchmarks/results/profile-worker-*.json`` (benchmarks.common).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Dict, List, Sequence

import numpy as np

_TIMED = ("_hue_u8", "_transform_u8", "_blur", "_affine_chain_u8", "_colour_view_u8", "normalize_uint8",
          "_brightness", "_contrast", "_saturation", "_hue", "_grayscale")


class _Timers:
    def __init__(self):
        self.t: Dict[str, float] = defaultdict(float)

    def wrap(self, name, fn):
        def timed(*a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] += time.thread_time() - t0
        timed.__wrapped__ = fn
        return timed


def _patch(timers: _Timers):
    """Wrap the kernels where they are looked up (cv2_ops globals and cpu_augment's names)."""
    from loaders import cpu_augment as CA
    from loaders.augment import cv2_ops as K
    undo = []
    for mod in (K, CA):
        for name in _TIMED:
            fn = getattr(mod, name, None)
            if fn is None or hasattr(fn, "__wrapped__"):
                continue
            undo.append((mod, name, fn))
            setattr(mod, name, timers.wrap(name, fn))
    import cv2
    for name in ("flip", "split", "merge"):      # the executor's own OpenCV calls
        fn = getattr(cv2, name)
        undo.append((cv2, name, fn))
        setattr(cv2, name, timers.wrap(f"cv2.{name}", fn))
    if hasattr(CA, "_JITTER_OPS"):   # the float path looks ops up in this tuple
        undo.append((CA, "_JITTER_OPS", CA._JITTER_OPS))
        CA._JITTER_OPS = tuple(getattr(CA, f.__name__) for f in CA._JITTER_OPS)
    return undo


def _unpatch(undo):
    for mod, name, fn in reversed(undo):
        setattr(mod, name, fn)


def _data(n: int, stored: int, seed: int = 0) -> List[bytes]:
    from benchmarks.data import encode_jpegs, synthetic_images
    images, _, _ = synthetic_images(n, stored, seed=seed)
    return encode_jpegs(images)


def _decode(cv2, blob: bytes) -> np.ndarray:
    """The torch backend's decoder="cv2" JPEG path: simplejpeg straight to RGB where installed."""
    try:
        import simplejpeg
        return simplejpeg.decode_jpeg(blob, colorspace="RGB")
    except ImportError:
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _one_pass(blobs, hook, batch: int, seed: int, timers: _Timers) -> Dict[str, float]:
    import cv2
    import torch

    from loaders.cpu_augment import step_for
    from loaders.crop import rrc_params
    specs = hook.crop_specs
    rng = np.random.default_rng(seed)
    t = defaultdict(float)
    for first in range(0, len(blobs), batch):
        chunk = blobs[first:first + batch]
        t0 = time.thread_time()
        imgs = [_decode(cv2, b) for b in chunk]
        t1 = time.thread_time()
        hw = np.asarray([im.shape[:2] for im in imgs]).reshape(-1, 2)
        views = []
        for spec in specs:
            S = spec.size
            out = np.empty((len(imgs), S, S, 3), np.uint8)
            for i, (top, left, h, w) in enumerate(rrc_params(rng, hw[:, 0], hw[:, 1], scale=spec.scale,
                                                             ratio=spec.ratio).tolist()):
                interp = cv2.INTER_AREA if max(h, w) >= 2 * S else cv2.INTER_CUBIC
                cv2.resize(imgs[i][top:top + h, left:left + w], (S, S), dst=out[i], interpolation=interp)
            views.append(torch.from_numpy(out).permute(0, 3, 1, 2))
        t2 = time.thread_time()
        res = hook(views, (seed, 0, first))
        t3 = time.thread_time()
        hook.finish(res, key=step_for((seed, 0, first)))  # the key: for ops left to the device
        t4 = time.thread_time()
        t["decode"] += t1 - t0
        t["crop_resize"] += t2 - t1
        t["augment (worker, total)"] += t3 - t2
        t["finish (main, total)"] += t4 - t3
    return t


_STAGES = ("decode", "crop_resize", "augment (worker, total)", "finish (main, total)")


def profile(*, size: int = 224, stored: int = 256, n: int = 128, batch: int = 64, repeats: int = 5,
            preset: str = "symmetric", precision: str = "uint8", seed: int = 0,
            kernels: Sequence[str] = ("opencv", "fused")) -> Dict[str, Dict]:
    """Per-op microseconds per sample, ``{"<kernels>/<op>": {"values": [...], "median": m}}``:
    each kernel set (``"opencv"``: the OpenCV colour chain and normalisation; ``"fused"``: the
    numba kernels where installed; ``"chain"``: the numba chain with OpenCV's flip and split, i.e.
    without the one-pass view) measured in interleaved rounds on the same images."""
    import cv2
    import torch

    from loaders.augment import cv2_ops
    from loaders.cpu_augment import WorkerAugment
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    hook = WorkerAugment.from_preset(preset, size=size, output="uint8", precision=precision, impl="cv2")
    blobs = _data(n, stored, seed)
    timers = _Timers()
    undo = _patch(timers)
    runs = defaultdict(list)
    before = cv2_ops._USE_FUSED[0], cv2_ops._USE_FUSED_VIEW[0]
    try:
        for r in range(-1, repeats):                      # round -1: warm-up (compiles, caches)
            for kind in kernels:
                cv2_ops._USE_FUSED[0] = kind in ("fused", "chain")
                cv2_ops._USE_FUSED_VIEW[0] = kind != "chain"
                timers.t.clear()
                t = _one_pass(blobs if r >= 0 else blobs[:batch], hook, batch, seed + r + 1, timers)
                t.update(timers.t)
                t["sum of stages"] = sum(t[k] for k in _STAGES)
                for k, v in t.items():
                    if r >= 0:
                        runs[f"{kind}/{k}"].append(v * 1e6 / len(blobs))
    finally:
        cv2_ops._USE_FUSED[0], cv2_ops._USE_FUSED_VIEW[0] = before
        _unpatch(undo)
    return {k: {"values": v, "median": statistics.median(v)} for k, v in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--stored", type=int, default=256)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="symmetric")
    ap.add_argument("--precision", default="uint8", choices=("uint8", "float"))
    ap.add_argument("--kernels", default="opencv,fused", help="kernel sets to compare: opencv,chain,fused")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/profile-worker-*.json")
    a = ap.parse_args(argv)
    kernels = [k for k in a.kernels.split(",") if k]
    res = profile(size=a.size, stored=a.stored, n=a.n, batch=a.batch, repeats=a.repeats, preset=a.preset,
                  precision=a.precision, kernels=kernels)
    first = {k.split("/", 1)[1]: v["median"] for k, v in res.items() if k.startswith(kernels[0] + "/")}
    ops = sorted({k.split("/", 1)[1] for k in res}, key=lambda o: -first.get(o, 0.0))
    print(f"us per sample, thread CPU time, median of {a.repeats} interleaved rounds; {a.size} px, {a.precision}")
    print(f"{'op':28s}" + "".join(f"{k:>10s}" for k in kernels) + ("   speedup" if len(kernels) == 2 else ""))
    for o in ops:
        vals = [res.get(f"{k}/{o}", {"median": 0.0})["median"] for k in kernels]
        sp = f"   {vals[0] / vals[1]:6.2f}x" if len(vals) == 2 and vals[1] > 0 else ""
        print(f"{o:28s}" + "".join(f"{v:10.1f}" for v in vals) + sp)
    if a.record:
        import sys

        from benchmarks.common import write_record
        cmd = "python -m benchmarks.profile_worker " + " ".join(sys.argv[1:])
        path = write_record("profile-worker", command=cmd, config=vars(a), results=res,
                            notes="us per sample (thread CPU time) per op; opencv = OpenCV colour chain and "
                                  "normalisation, fused = numba kernels (loaders.augment.fused_*), chain = the numba "
                                  "chain with OpenCV flip/split (no one-pass view)")
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
