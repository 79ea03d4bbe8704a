"""Shards in object storage (loaders.remote) against a real S3-protocol server (moto, on loopback).

Checked against the same shards read from local disk: bytes, the loader's order and resume
(torch backend, with worker processes), a cache that serves a second epoch with no request
(counted by the server's own request log), named errors for a wrong bucket/key and for
credentials in the config, a server stopped mid-epoch (named error, or counted skips) and one
that never answers (bounded by the timeouts), missing indexes built and uploaded, and a
converter writing straight to s3://.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np
import pytest
from datafiles import labelled_images, write_shards

if os.environ.get("FASTSSL_REQUIRE_EXTRAS") != "1":
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")

from moto.server import ThreadedMotoServer  # noqa: E402

from loaders import remote  # noqa: E402
from loaders.base import build_source  # noqa: E402
from loaders.errors import ConfigError, DataError, SampleError  # noqa: E402
from loaders.pipeline import build_loader  # noqa: E402
from loaders.shards import ShardSource, index_path  # noqa: E402

N, PER_SHARD, SIZE = 40, 8, 16
BUCKET = "fastssl-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Requests(logging.Handler):
    """Counts the requests the moto server logs (werkzeug's access log), per method."""

    def __init__(self):
        super().__init__()
        self.lines: list = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def count(self, method: str = "") -> int:
        return sum(1 for m in self.lines if f'"{method}' in m)


class Server:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.moto.start()
        self.log = _Requests()
        logging.getLogger("werkzeug").addHandler(self.log)
        logging.getLogger("werkzeug").setLevel(logging.INFO)
        import s3fs
        self.fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True)
        if not self.fs.exists(BUCKET):  # moto's state is per process: shared by every server
            self.fs.mkdir(BUCKET)

    def options(self, **kw):
        return {"storage_options": {"endpoint_url": self.endpoint}, "retries": 1, "timeout_s": 5, **kw}

    def stop(self):
        logging.getLogger("werkzeug").removeHandler(self.log)
        self.moto.stop()


@pytest.fixture(scope="module")
def aws_env():
    mp = pytest.MonkeyPatch()
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        mp.delenv(k, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def server(aws_env):
    srv = Server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    images, labels = labelled_images(N, SIZE)
    out = tmp_path_factory.mktemp("shards") / "ds"
    write_shards(out, images, labels, samples_per_shard=PER_SHARD)
    return out


def _upload(srv: Server, local_dir, prefix: str, *, indexes: bool = True) -> str:
    for p in sorted(local_dir.iterdir()):
        if p.name.endswith(".idx") and not indexes:
            continue
        srv.fs.put_file(str(p), f"{BUCKET}/{prefix}/{p.name}")
    return f"s3://{BUCKET}/{prefix}/"


@pytest.fixture(scope="module")
def url(server, local):
    return _upload(server, local, "ds")


def _data_cfg(path, **source):
    return {"sources": [{"type": "shards", "path": path, "name": "ds", **source}], "batch_size": 8, "seed": 3,
            "budget": N, "num_workers": 0, "image_size": SIZE, "read_timeout_s": 20}


def _batches(loader, k=None):
    out = []
    for b in loader:
        out.append((b.index.numpy().copy(), b.label.numpy().copy(), b.views[0].numpy().copy()))
        if k is not None and len(out) == k:
            break
    return out


def _same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


# ------------------------------------------------------------------------------------------------

def test_bytes_identical_to_local(server, local, url):
    loc = ShardSource(path=str(local))
    rem = build_source({"type": "shards", "path": url, **server.options()})
    assert len(rem) == len(loc) == N and rem.shards[0].startswith(f"s3://{BUCKET}/ds/")
    np.testing.assert_array_equal(rem.labels(), loc.labels())
    order = np.random.default_rng(0).permutation(N)
    for i in order[:10]:  # one ranged request each
        assert rem.read(int(i)) == loc.read(int(i))
    rem.prefetch(order[10:].tolist())  # the rest: merged runs, one cat_ranges call
    before = server.log.count("GET")
    for i in order[10:]:
        assert rem.read(int(i)) == loc.read(int(i))
    assert server.log.count("GET") == before  # all served from the prefetch buffer
    assert rem.describe(3).startswith(f"s3://{BUCKET}/ds/shard-")


def _read_in_child(src, indices):
    return [src.read(i) for i in indices]


def test_forked_and_pickled_readers(server, local, url):
    """A source already used in this process reads in forked and in spawned-by-pickle processes
    (each makes its own filesystem client)."""
    import multiprocessing as mp
    import pickle
    src = build_source({"type": "shards", "path": url, **server.options()})
    loc = ShardSource(path=str(local))
    assert src.read(0) == loc.read(0)
    want = [loc.read(i) for i in range(0, N, 3)]
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(_read_in_child, (src, list(range(0, N, 3)))) == want
    assert _read_in_child(pickle.loads(pickle.dumps(src)), range(0, N, 3)) == want


def test_loader_order_and_resume_match_local(server, local, url):
    """Same batches (indices, labels, pixels) as from local disk, with 2 worker processes; a
    resumed loader continues exactly where the uninterrupted one goes on."""
    cfg_l, cfg_r = _data_cfg(str(local)), _data_cfg(url, **server.options())
    cfg_l["num_workers"] = cfg_r["num_workers"] = 2
    ref = _batches(build_loader(cfg_l))
    _same(_batches(build_loader(cfg_r)), ref)
    first = build_loader(_data_cfg(url, **server.options()))
    _same(_batches(first, 2), ref[:2])
    state = first.state_dict()
    resumed = build_loader(_data_cfg(url, **server.options()))
    resumed.load_state_dict(state)
    _same(_batches(resumed), ref[2:])


def test_cache_serves_second_epoch_without_requests(server, url, local, tmp_path):
    cache = tmp_path / "cache"
    cfg = _data_cfg(url, **server.options(cache_dir=str(cache)))
    ref = _batches(build_loader(_data_cfg(str(local))))
    loader = build_loader(cfg)
    _same(_batches(loader), ref)
    assert len(list((cache / "shards").glob("*.tar"))) == N // PER_SHARD  # whole shards, once each
    before = len(server.log.lines)
    again = build_loader(cfg)  # a new run: the cached index and shards, no request at all to read
    after_open = len(server.log.lines)
    _same(_batches(again), ref)
    assert len(server.log.lines) == after_open, server.log.lines[after_open:]
    assert after_open - before <= 3  # opening: the manifest (HEAD, GET) and one listing; indexes are cached


def _read_all(src):
    return [src.read(i) for i in range(N)]


def test_cache_shared_by_processes(server, url, local, tmp_path):
    """Two processes filling one cache at once: same bytes, each shard stored once, no temporaries."""
    import multiprocessing as mp
    src = build_source({"type": "shards", "path": url, **server.options(cache_dir=str(tmp_path))})
    with mp.get_context("fork").Pool(2) as pool:
        a, b = pool.map(_read_all, [src, src], chunksize=1)
    want = _read_all(ShardSource(path=str(local)))
    assert a == want and b == want
    names = sorted(p.name for p in (tmp_path / "shards").iterdir() if not p.name.endswith(".lock"))
    assert len(names) == N // PER_SHARD and all(n.endswith(".tar") for n in names)


def test_cache_evicts_least_recently_used(server, url, local, tmp_path):
    shard_bytes = os.path.getsize(next(local.glob("*.tar")))
    limit_gb = 2.5 * shard_bytes / 2 ** 30
    opts = server.options(cache_dir=str(tmp_path), cache_max_gb=limit_gb)
    src = build_source({"type": "shards", "path": url, **opts})
    loc = ShardSource(path=str(local))
    for i in range(N):
        assert src.read(i) == loc.read(i)
    kept = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(kept) == 2 and sum(p.stat().st_size for p in kept) <= 2.5 * shard_bytes
    assert any(p.name.endswith(src.shards[-1].rsplit("/", 1)[1]) for p in kept)  # the newest stays


def test_missing_index_is_built_once_and_uploaded(server, local):
    url = _upload(server, local, "noidx", indexes=False)
    loc = ShardSource(path=str(local))
    remote.reset_stats()
    src = build_source({"type": "shards", "path": url, **server.options()})
    assert remote.STATS["downloads"] == 0 and remote.STATS["bytes"] >= sum(
        os.path.getsize(p) for p in local.glob("*.tar"))
    assert all(server.fs.exists(u[len("s3://"):] + ".idx") for u in src.shards)
    for i in range(N):
        assert src.read(i) == loc.read(i)
    remote.reset_stats()
    build_source({"type": "shards", "path": url, **server.options()})  # now the uploaded indexes serve
    assert remote.STATS["bytes"] < os.path.getsize(next(local.glob("*.tar")))


def test_index_kept_locally_when_bucket_refuses_writes(server, local, tmp_path, monkeypatch):
    import s3fs
    url = _upload(server, local, "readonly", indexes=False)

    def refuse(self, *a, **k):
        raise PermissionError("AccessDenied")
    monkeypatch.setattr(s3fs.S3FileSystem, "pipe_file", refuse)
    src = build_source({"type": "shards", "path": url, **server.options(cache_dir=str(tmp_path))})
    assert not server.fs.exists(src.shards[0][len("s3://"):] + ".idx")
    assert len(list((tmp_path / "index").glob("*.idx"))) == N // PER_SHARD
    remote.reset_stats()
    src2 = build_source({"type": "shards", "path": url, **server.options(cache_dir=str(tmp_path))})
    assert remote.STATS["bytes"] == 0 and len(src2) == N


def test_wrong_bucket_or_key_is_a_named_error(server, url):
    with pytest.raises(DataError, match=r"s3://no-such-bucket-x/.*no such bucket or object"):
        build_source({"type": "shards", "path": "s3://no-such-bucket-x/a/shard-000000.tar", **server.options()})
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/ds/nope.tar.*no such bucket or object"):
        build_source({"type": "shards", "path": f"s3://{BUCKET}/ds/nope.tar", **server.options()})
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/empty"):
        build_source({"type": "shards", "path": f"s3://{BUCKET}/empty/", **server.options()})


@pytest.mark.parametrize("extra", [{"key": "AKIA..."}, {"secret": "x"},
                                   {"storage_options": {"secret": "x"}},
                                   {"storage_options": {"client_kwargs": {"aws_secret_access_key": "x"}}}])
def test_credentials_in_config_are_refused(extra):
    with pytest.raises(ConfigError, match="credential.*environment"):
        build_source({"type": "shards", "path": f"s3://{BUCKET}/ds/", **extra})


def test_remote_options_on_local_path_are_refused(local):
    with pytest.raises(ConfigError, match="only apply to URLs"):
        build_source({"type": "shards", "path": str(local), "cache_dir": "/tmp/x"})


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_server_stopped_mid_epoch(local, aws_env, on_error):
    """A named error (on_error: raise) or counted skips (skip), within a bounded time."""
    srv = Server()
    try:
        cfg = _data_cfg(_upload(srv, local, f"stop-{on_error}"), **srv.options(timeout_s=2))
        cfg["on_error"] = on_error
        loader = build_loader(cfg)
        it = iter(loader)
        next(it)
    finally:
        srv.stop()
    t0 = time.monotonic()
    if on_error == "raise":
        with pytest.raises(SampleError, match=rf"s3://{BUCKET}/stop-raise/shard-.*cannot connect"):
            list(it)
    else:
        assert list(it) == []  # every later sample failed: skipped and counted, no batch
        assert loader.skipped == N - 8 and all(f.startswith(f"s3://{BUCKET}/stop-skip/") for f in loader.skipped_files)
        assert "cannot connect" in loader.skip_reasons[-1]
    assert time.monotonic() - t0 < 30


def test_server_that_never_answers_times_out(server, url):
    """Accepts connections, never replies: each request is bounded by timeout_s, then a named error."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    conns = []
    threading.Thread(target=lambda: [conns.append(hole.accept()) for _ in range(16)], daemon=True).start()
    src = build_source({"type": "shards", "path": url, **server.options(timeout_s=0.5)})
    store = src._remote.store
    store.options["endpoint_url"] = f"http://127.0.0.1:{hole.getsockname()[1]}"
    store._fs = None  # the next request goes to the silent server
    t0 = time.monotonic()
    with pytest.raises(SampleError, match=rf"s3://{BUCKET}/ds/shard-.*timed out after 2 attempts"):
        src.read(0)
    assert time.monotonic() - t0 < 10
    hole.close()


def test_converter_writes_straight_to_s3(server, tmp_path, monkeypatch):
    from loaders.cli_data import main
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    spec = f"type=synthetic,n=20,size={SIZE}"
    args = ["shards", "--source", spec, "--samples-per-shard", "8", "--format", "png", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "loc")]) == 0
    assert main(args + ["--out", f"s3://{BUCKET}/conv"]) == 0
    names = sorted(p.rsplit("/", 1)[1] for p in server.fs.ls(f"{BUCKET}/conv"))
    assert names == sorted(p.name for p in (tmp_path / "loc").iterdir())
    for name in names:
        if name.endswith(".tar"):
            assert server.fs.cat_file(f"{BUCKET}/conv/{name}") == (tmp_path / "loc" / name).read_bytes()
    assert main(args + ["--out", f"s3://{BUCKET}/conv"]) == 2  # not empty: refused
    assert main(args + ["--out", f"s3://{BUCKET}/conv", "--overwrite"]) == 0
    rem = build_source({"type": "shards", "path": f"s3://{BUCKET}/conv", "retries": 1})
    loc = ShardSource(path=str(tmp_path / "loc"))
    assert len(rem) == len(loc) == 20 and all(rem.read(i) == loc.read(i) for i in range(20))
    assert not index_path(tmp_path / "loc" / "x.tar").exists()


def test_merge_ranges():
    starts = np.array([5000, 0, 1000, 200000, 3000])
    ends = starts + np.array([100, 500, 1000, 10, 1500])
    assert remote.merge_ranges(starts, ends, gap=1000) == [(0, 2000), (3000, 5100), (200000, 200010)]
    assert remote.merge_ranges(starts, ends, gap=1000, max_run=1500) == [(0, 500), (1000, 2000), (3000, 4500),
                                                                         (5000, 5100), (200000, 200010)]


def test_bench_remote_writes_a_record(aws_env, tmp_path):
    import argparse
    import json

    from benchmarks.bench_remote import from_args
    args = argparse.Namespace(n=48, size=16, per_shard=16, batch=16, repeats=1, out=str(tmp_path))
    rec = json.loads(from_args(args, "fastssl bench remote --n 48").read_text())
    res = rec["results"]
    assert set(res) == {"local", "remote/ranged", "remote/prefetch", "remote/cache-cold", "remote/cache-warm"}
    assert res["remote/ranged"]["requests_per_run"] == 48 and res["remote/prefetch"]["requests_per_run"] <= 9
    assert res["remote/cache-warm"]["requests_per_run"] == 0 and res["local"]["runs"] == 1
    assert rec["command"] == "fastssl bench remote --n 48" and "prefetch_over_ranged" in rec["config"]
