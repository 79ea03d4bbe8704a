"""Smoke tests of the benchmark harness: tiny data, one repeat, valid records and reports."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import baselines as B
from benchmarks.bench_loader import Variant, measure_rounds, targets
from benchmarks.common import write_record
from benchmarks.data import make_bench_data

pytestmark = pytest.mark.timeout(120)

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
HAS_FFCV = importlib.util.find_spec("ffcv") is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_bench_data("cifar", n=32, root=tmp_path_factory.mktemp("bench"), samples_per_shard=16,
                           progress=False)


def _check_record(path: Path, *, name: str, command: str):
    rec = json.loads(Path(path).read_text())
    assert rec["name"] == name and rec["command"] == command
    m = rec["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["usable_cores"] >= 1 and "gpu" in m
    assert rec["versions"]["torch"] == torch.__version__.split("+")[0] or rec["versions"]["torch"]
    assert isinstance(rec["config"], dict) and rec["config"]
    measured = {k: v for k, v in rec["results"].items() if v.get("values")}
    assert measured, rec["results"]
    for k, v in measured.items():
        vals = v["values"]
        assert v["median"] == float(np.median(vals)) and v["min"] == min(vals) and v["max"] == max(vals), k
        assert all(x > 0 for x in vals), k
    assert Path(path).with_suffix(".png").stat().st_size > 1000
    return rec


def test_bench_data_formats_hold_the_same_images(data):
    from loaders.base import decode_image
    assert {"folder", "npz", "shards"} <= set(data.formats), data.missing
    files = data.files()
    assert len(files) == 32 and len(data.jpeg_bytes()) == 32
    npz = np.load(data.formats["npz"])
    assert npz["image"].shape == (32, 32, 32, 3) and npz["image"].dtype == np.uint8
    # npz holds exactly the decoded folder JPEGs
    np.testing.assert_array_equal(decode_image(files[5].read_bytes()), npz["image"][5])
    for fmt in ("folder", "npz", "shards"):
        src = data.build_source(fmt)
        assert len(src) == 32
        assert src.decode(3)[0].shape == (32, 32, 3)
    again = make_bench_data("cifar", n=32, root=data.root.parent, progress=False)  # cached: same set
    assert again.root == data.root and again.formats == data.formats


def test_torchvision_baseline_and_decode_ceiling(data):
    it = B.torchvision_simclr(str(data.folder), size=32, batch_size=8, num_workers=0, views=2)
    views, n = next(it)
    assert n == 8 and len(views) == 2
    assert all(v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])  # independent random views
    it.close()
    for decoder in ("pil", "auto"):
        dec = B.decode_only(data.jpeg_bytes(), workers=1, per_worker=40, decoder=decoder)
        assert next(dec) == (None, 40)
        dec.close()
        assert not B._SHARED_CHUNKS  # the chunk the forked workers shared is released
    two = B.decode_only(data.jpeg_bytes(), workers=2, per_worker=8, decoder="pil")
    assert [next(two) for _ in range(5)] == [(None, 8)] * 5  # one chunk per step, workers not in lockstep
    two.close()
    with pytest.raises(ValueError, match="unknown decoder"):
        next(B.decode_only(data.jpeg_bytes(), workers=1, per_worker=4, decoder="nope"))


@pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali not installed")
def test_dali_cpu_baseline(data):
    it = B.dali_cpu_simclr(str(data.folder), size=32, batch_size=8, num_threads=1, views=2)
    views, n = next(it)
    assert n == 8 and len(views) == 2
    arr = np.stack([np.asarray(t) for t in views[0]])
    assert arr.shape == (8, 3, 32, 32) and arr.dtype == np.float32
    it.close()


def test_measure_rounds_interleaves_and_records_failures():
    calls = []

    def fake(tag, n):
        def make():
            calls.append(tag)
            while True:
                yield None, n
        return make

    def broken():
        raise RuntimeError("backend exploded")
        yield  # pragma: no cover

    vs = [Variant("a", "ours", fake("a", 5)), Variant("b", "baseline", fake("b", 7)), Variant("c", "ours", broken)]
    res = measure_rounds(vs, repeats=2, seconds=0.01, warmup=1, progress=False)
    assert calls == ["a", "b", "a", "b"]  # rounds: A B (C fails) A B
    assert len(res["a"]["values"]) == 2 and len(res["b"]["values"]) == 2
    assert "backend exploded" in res["c"]["error"]


def test_targets_take_our_fastest_variant():
    res = {"32px/full/torch/npz": {"kind": "ours", "median": 9000.0},  # decoded pixels: never a numerator
           "32px/full/torch/folder": {"kind": "ours", "median": 700.0},
           "32px/full/torch/shards": {"kind": "ours", "median": 1400.0},
           "32px/full/baseline-torchvision": {"kind": "baseline", "median": 200.0},
           "32px/feed/torch/folder": {"kind": "ours", "median": 6000.0},
           "32px/feed/ceiling-decode": {"kind": "ceiling", "median": 10000.0}}
    t = targets(res, size_tag="32px")
    tv = t["32px/target/full recipe >= 7x torchvision"]
    assert tv["ratio"] == 7.0 and tv["met"] and tv["numerator"] == "32px/full/torch/shards"
    ceil = t["32px/target/GPU-feeding >= 0.7x decode-only ceiling (32 px)"]
    assert ceil["ratio"] == pytest.approx(0.6) and not ceil["met"]
    assert not any("DALI" in k or "FFCV" in k for k in t)  # no baseline measured: no ratio
    assert not targets(res, size_tag="224px")


def test_loader_bench_writes_a_valid_record(data, tmp_path):
    from benchmarks.bench_loader import run
    path = run(sets=["cifar"], n={"cifar": 32}, modes=("full", "feed"), backends=("torch",), formats=("shards",),
               baselines=("torchvision", "ceiling"), batch_size={"cifar": 8}, num_workers=1, repeats=1,
               window_s=0.05, warmup=1, stage_images=16, cache=data.root.parent, out_dir=tmp_path,
               command="fastssl bench loader --test", progress=False)
    rec = _check_record(path, name="loader", command="fastssl bench loader --test")
    r = rec["results"]
    for k in ("32px/full/torch/shards", "32px/full/torch-worker-augment/shards", "32px/feed/torch/shards",
              "32px/full/baseline-torchvision",
              "32px/feed/ceiling-decode", "32px/stage/shards/read", "32px/stage/shards/decode",
              "32px/stage/shards/crop", "32px/stage/shards/augment"):
        assert len(r[k]["values"]) == 1, (k, r.get(k))
    share = r["32px/stage/shards/chain_one_core"]["share"]
    assert abs(sum(share.values()) - 1) < 1e-9
    t = r["32px/target/full recipe >= 7x torchvision"]
    best = max(r[k]["median"] for k in ("32px/full/torch/shards", "32px/full/torch-worker-augment/shards"))
    assert t["ratio"] == pytest.approx(best / r["32px/full/baseline-torchvision"]["median"])
    assert rec["config"]["backends"] == {"torch": "ok"}


def test_e2e_bench_states_the_bound(data, tmp_path):
    from benchmarks.bench_e2e import run, verdict
    path = run(width=4, n=32, batch_size=8, num_workers=1, repeats=1, window_s=0.05, warmup=1, device="cpu",
               cache=data.root.parent, out_dir=tmp_path, command="fastssl bench e2e --test", progress=False)
    rec = _check_record(path, name="e2e", command="fastssl bench e2e --test")
    r = rec["results"]
    v = r["verdict"]
    assert v["real_over_model_only"] == pytest.approx(r["real/torch/shards"]["median"] / r["model-only"]["median"])
    assert v["bound"] in ("data-bound", "compute-bound")
    s = r["step-vs-plain"]
    assert s["model_only_over_plain_pytorch"] == pytest.approx(r["model-only"]["median"] / r["plain-pytorch"]["median"])
    assert rec["config"]["backend"] == "torch" and rec["config"]["channels_last_used"] is False
    assert verdict(95.0, 100.0)["bound"] == "compute-bound" and verdict(50.0, 100.0)["bound"] == "data-bound"


def test_e2e_bench_options_reach_the_step(data, tmp_path):
    """channels-last, bf16 autocast and a compiled backbone (aot_eager: no code generation on
    the CPU) run through the very step the trainer takes, and through the plain loop. Width 8:
    narrower ResNets keep channels-last off on CPU (see fastssl.build.apply_speed_options)."""
    import torch

    from benchmarks.bench_e2e import build_run, plain_pytorch
    scfg = data.source_config("shards")
    parts, acc, step = build_run(scfg, method="simclr", backbone="resnet18", width=8, cifar_stem=True,
                                 preset="symmetric", size=data.out_size, views=2, batch_size=8, num_workers=0,
                                 device="cpu", channels_last=True, mixed_precision="bf16")
    assert parts.channels_last
    conv = parts.method.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    views = [torch.randn(8, 3, data.out_size, data.out_size) for _ in range(2)]
    out, _, bad = step(views, torch.zeros(8, dtype=torch.long), progress=0.5)
    assert not bool(bad) and torch.isfinite(out.loss)
    loop = plain_pytorch(method="simclr", backbone="resnet18", width=8, cifar_stem=True, batch_size=8,
                         size=data.out_size, views=2, device="cpu", mixed_precision="bf16", channels_last=True)
    assert next(loop) == (None, 8)


def test_scaling_bench_sweeps_workers_and_batch(data, tmp_path):
    from benchmarks.bench_scaling import run, worker_counts
    assert worker_counts(1) == [1] and worker_counts(2) == [1, 2] and worker_counts(6) == [1, 2, 4, 6]
    path = run(n=32, workers=[0, 1], batch_size=8, batch_sizes=(8, 16), repeats=1, window_s=0.05, warmup=1,
               cache=data.root.parent, out_dir=tmp_path, command="fastssl bench scaling --test", progress=False)
    rec = _check_record(path, name="scaling", command="fastssl bench scaling --test")
    axes = sorted((v["axis"], v["x"]) for v in rec["results"].values())
    assert axes == [("batch", 8), ("batch", 16), ("workers", 0), ("workers", 1)]


def test_report_is_made_only_from_records(tmp_path):
    from benchmarks.report import END, START, load_records, readme_section, update_readme
    assert "No benchmark records" in readme_section([])
    p = write_record("loader", config={"x": 1}, command="fastssl bench loader --sets cifar", directory=tmp_path,
                     results={"32px/feed/torch/npz": {"values": [1000.0, 1200.0, 1100.0], "kind": "ours"},
                              "32px/target/t": {"kind": "target", "ratio": 2.5, "target": 7.0, "met": False}})
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nkeep me\n\n{START}\nold table\n{END}\n\ntail stays\n")
    text = update_readme(readme, load_records(tmp_path))
    assert text.startswith("# title\n\nkeep me\n\n" + START) and text.endswith(END + "\n\ntail stays\n")
    assert "old table" not in text
    assert f"[1,100]({p.name})" in text           # the median, linked to its record file
    assert "1,000..1,200" in text and "[2.50x]" in text and "(missed)" in text
    assert "fastssl bench loader --sets cifar" in text
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_records(tmp_path)


def test_cli_wiring(tmp_path):
    from benchmarks.cli import main
    from fastssl.cli import build_parser
    args = build_parser().parse_args(["bench", "loader", "--sets", "cifar", "--repeats", "1"])
    assert args.sets == ["cifar"] and args.repeats == 1 and callable(args.func)
    for cmd in ("e2e", "scaling", "data", "report", "augment"):
        assert callable(build_parser().parse_args(["bench", cmd]).func)
    write_record("e2e", config={}, results={"model-only": {"values": [5.0]}}, command="c", directory=tmp_path)
    assert main(["report", "--results", str(tmp_path), "--no-plots"]) == 0


def test_records_are_written_without_matplotlib(tmp_path, monkeypatch, capsys):
    """The lent GPU machine has no matplotlib: records still come out, the plot is skipped."""
    import sys

    from benchmarks.common import write_record
    from benchmarks.report import plot_record
    from fastssl.metrics_log import plot_metrics
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = write_record("e2e", config={}, results={"model-only": {"values": [5.0], "median": 5.0, "min": 5.0,
                                                                   "max": 5.0}}, command="c", directory=tmp_path)
    assert plot_record(path) is None and not path.with_suffix(".png").exists()
    assert "plot skipped: matplotlib is not installed" in capsys.readouterr().err
    assert plot_metrics([{"step": 1, "loss": 1.0}], tmp_path / "m.png") is None


def test_e2e_bench_with_a_recipe_and_a_baseline_method(data, tmp_path):
    """--set reaches the run's config (a recipe whose view rewrite is part of every step) and
    --baseline-method is measured in the same rounds, giving the per-step cost ratio."""
    from benchmarks.bench_e2e import run
    path = run(width=4, n=32, batch_size=8, num_workers=1, repeats=1, window_s=0.05, warmup=1, device="cpu",
               cache=data.root.parent, out_dir=tmp_path, command="fastssl bench e2e --test", progress=False,
               overrides=["recipes=[{name: isicle, generator: identity}]"], baseline_method="byol")
    rec = _check_record(path, name="e2e", command="fastssl bench e2e --test")
    r = rec["results"]
    assert "plain-pytorch" not in r and r["model-only/byol"]["values"]
    c = r["cost-vs-baseline"]
    assert c["step_cost_over_baseline"] == pytest.approx(r["model-only/byol"]["median"] / r["model-only"]["median"])
    assert rec["config"]["overrides"] == ["recipes=[{name: isicle, generator: identity}]"]
