"""``fastssl bench remote``: reading the same shards from local disk and from an S3-protocol server.

Writes ``--n`` synthetic JPEG images (``--size`` px) into shards of ``--per-shard`` samples, serves
them from moto's S3 server on loopback (``moto[server]``), and reads every sample once per run in
a shuffled order, in chunks of ``--batch`` samples, the way a loader does
(:class:`loaders.plan_loader.TimedReader`, one thread). Variants (samples/sec, MB/s, and the
requests each run made, from :data:`loaders.remote.STATS`):

* ``local``: :class:`~loaders.shards.ShardSource` on the local directory (``pread``);
* ``remote/ranged``: one ranged GET per sample (no prefetch: the worst case);
* ``remote/prefetch``: per chunk, the samples' ranges merged into runs and fetched in one
  ``cat_ranges`` call (the default remote path without a cache);
* ``remote/cache-cold``: ``cache_dir`` empty at the start of each run (whole-shard downloads);
* ``remote/cache-warm``: the cache already filled (local ``pread`` of cached shards).

Loopback measures the client's overhead (request handling, s3fs/aiobotocore, moto's own cost),
not a network: on real object storage per-request latency is higher, which makes batching and
the cache matter more. Target (2-core CPU machine, defaults): ``remote/prefetch`` >= 5x
``remote/ranged``, and ``remote/cache-warm`` >= 0.5x ``local``.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np

__all__ = ["run", "add_arguments", "from_args"]


def _write_shards(root: Path, n: int, size: int, per_shard: int) -> Path:
    from loaders.convert import encode_image
    from loaders.shards import ShardWriter
    rng = np.random.default_rng(0)
    out = root / "local"
    with ShardWriter(out, samples_per_shard=per_shard) as w:
        for i in range(n):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            w.write(encode_image(img, "jpg", quality=90), ext="jpg", label=i % 10)
    return out


def _serve(local: Path):
    """A moto S3 server on a free loopback port holding ``local``'s files under ``s3://bench/ds/``."""
    import s3fs
    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # moto accepts any; never real ones
        os.environ[k] = "bench"
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    if not fs.exists("bench"):
        fs.mkdir("bench")
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"bench/ds/{p.name}")
    return server, endpoint


def _reader(src, order: np.ndarray, batch: int, prefetch: bool) -> Callable[[], int]:
    from loaders.plan_loader import TimedReader
    reader = TimedReader(None)
    if not prefetch:
        src.prefetch = lambda indices: None  # the instance's hint is a no-op: one request per sample

    def run() -> int:
        nbytes = 0
        for a in range(0, len(order), batch):
            for r in reader.read_all([(src, int(i)) for i in order[a:a + batch]]):
                if isinstance(r, BaseException):
                    raise r
                nbytes += len(r[0])
        run.nbytes = nbytes
        return len(order)
    return run


def _measure(name: str, make: Callable[[], Callable[[], int]], repeats: int, *, before=None) -> Dict:
    """``before`` (if given) runs before each run, and each run then gets a fresh source."""
    from loaders import remote
    values, mbs, requests = [], [], []
    fn = make()
    for r in range(repeats + 1):  # the first run warms up (imports, connections)
        if before is not None:
            before()
            fn = make()
        remote.reset_stats()
        t0 = time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t0
        if r:
            values.append(n / dt)
            mbs.append(fn.nbytes / dt / 1e6)
            requests.append(remote.STATS["requests"])
    print(f"{name:20s} {np.median(values):10.0f} samples/s {np.median(mbs):8.1f} MB/s "
          f"{int(np.median(requests)):6d} requests/run")
    return {"values": values, "unit": "samples/s", "mb_per_s": float(np.median(mbs)),
            "requests_per_run": int(np.median(requests))}


def run(*, n: int = 2048, size: int = 64, per_shard: int = 256, batch: int = 256, repeats: int = 3,
        seed: int = 0) -> Dict[str, Dict]:
    from loaders.base import build_source
    from loaders.shards import ShardSource
    tmp = Path(tempfile.mkdtemp(prefix="fastssl-bench-remote-"))
    server = None
    log = logging.getLogger("werkzeug")
    level = log.level
    log.setLevel(logging.WARNING)  # no access log line per request
    try:
        local = _write_shards(tmp, n, size, per_shard)
        server, endpoint = _serve(local)
        order = np.random.default_rng(seed).permutation(n)
        opts = {"storage_options": {"endpoint_url": endpoint}}
        url = "s3://bench/ds/"
        cache = tmp / "cache"

        def remote_src(**kw):
            return build_source({"type": "shards", "path": url, **opts, **kw})

        def clear_cache():
            shutil.rmtree(cache / "shards", ignore_errors=True)

        res = {"local": _measure("local", lambda: _reader(ShardSource(path=str(local)), order, batch, True), repeats)}
        res["remote/ranged"] = _measure("remote/ranged", lambda: _reader(remote_src(), order, batch, False), repeats)
        res["remote/prefetch"] = _measure("remote/prefetch", lambda: _reader(remote_src(), order, batch, True),
                                          repeats)
        res["remote/cache-cold"] = _measure(
            "remote/cache-cold", lambda: _reader(remote_src(cache_dir=str(cache)), order, batch, True), repeats,
            before=clear_cache)
        res["remote/cache-warm"] = _measure(
            "remote/cache-warm", lambda: _reader(remote_src(cache_dir=str(cache)), order, batch, True), repeats)
        return res
    finally:
        log.setLevel(level)
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=2048, help="samples (default 2048)")
    p.add_argument("--size", type=int, default=64, help="image side in px (JPEG q90; default 64)")
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--batch", type=int, default=256, help="samples per loader chunk (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant after one warm-up (default 3)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")


def from_args(args: argparse.Namespace, command: str) -> Path:
    from .common import RESULTS, write_record
    config = {k: getattr(args, k) for k in ("n", "size", "per_shard", "batch", "repeats")}
    res = run(**config)
    ratio = {
        "prefetch_over_ranged": float(np.median(res["remote/prefetch"]["values"]) /
                                      np.median(res["remote/ranged"]["values"])),
        "cache_warm_over_local": float(np.median(res["remote/cache-warm"]["values"]) /
                                       np.median(res["local"]["values"])),
    }
    print(f"prefetch/ranged {ratio['prefetch_over_ranged']:.1f}x, cache-warm/local "
          f"{ratio['cache_warm_over_local']:.2f}x (targets >= 5x, >= 0.5x)")
    return write_record("remote", config={**config, "server": "moto ThreadedMotoServer on 127.0.0.1", **ratio},
                        results=res, command=command, directory=Path(args.out) if args.out else RESULTS,
                        notes="shuffled reads of every sample per run, chunks through TimedReader (1 thread); "
                              "loopback S3 (moto): client overhead, no network latency")
