"""What the README has users run, each command in a fresh process: ``fastssl pretrain`` and
``fastssl eval`` over every source type, with training and eval sources of different types.

A fresh process matters: source types register when their module is imported, so a type that
works after some other test imported its module can still be unknown to a plain
``python -m fastssl``. The tiny run is pretrained once per module; the data sets are 40 + 20
images of 16 px (CIFAR's are 32 px), 10 classes.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from datafiles import FORMATS, labelled_images, write_npz, write_shards, write_split

REPO = Path(__file__).resolve().parents[1]
KNN = re.compile(r"kNN top-1: (\d+(?:\.\d+)?)%")
LINEAR = re.compile(r"linear-probe top-1: (\d+(?:\.\d+)?)%")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run(args, cwd, timeout=300):
    """``args`` in a fresh Python process (cwd ``cwd``, one thread): the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _fastssl(*args, cwd):
    return _run(["-m", "fastssl", *args], cwd)


def _assert_ok(res):
    assert res.returncode == 0, (f"{' '.join(res.args[1:])} exited {res.returncode}\n"
                                 f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-6000:]}")


def _percent(pattern, out):
    m = pattern.search(out)
    assert m, f"no '{pattern.pattern}' in the output:\n{out}"
    value = float(m.group(1))
    assert 0.0 <= value <= 100.0, m.group(0)
    return value


def _config(path, *, sources, eval_train, eval_test, **eval_extra):
    """A run of seconds (like tests/test_cli.py's): ResNet-18 at width 4 on 16 px views, 2 steps."""
    cfg = {
        "data": {"sources": sources, "batch_size": 16, "num_workers": 0},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 2},
        "eval": {"train": eval_train, "test": eval_test, "knn_k": 5, "linear_epochs": 2, **eval_extra},
        "log": {"progress": False, "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------ source registry
def test_build_source_registers_builtin_types_in_a_fresh_process(tmp_path):
    """``loaders.base.build_source`` alone (no other import) builds every built-in type, and an
    unknown type's error (and a missing type's) lists them all."""
    code = textwrap.dedent("""
        from loaders.base import build_source
        from loaders.errors import ConfigError
        src = build_source({"type": "synthetic", "n": 4, "size": 8})
        assert len(src) == 4 and src.decode(0)[0].shape == (8, 8, 3)
        print("built", type(src).__name__)
        for cfg in ({"type": "nosuchtype"}, {"n": 4}):
            try:
                build_source(cfg)
            except ConfigError as e:
                print("error:", e)
            else:
                raise SystemExit(f"{cfg} was accepted")
        from loaders.base import SOURCE_MODULES
        from loaders.pipeline import SOURCE_MODULES as from_pipeline  # still importable from there
        assert from_pipeline is SOURCE_MODULES
    """)
    res = _run(["-c", code], tmp_path, timeout=120)
    _assert_ok(res)
    lines = res.stdout.splitlines()
    assert lines[0] == "built SyntheticSource", res.stdout
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 2, res.stdout
    assert "unknown key 'nosuchtype' in source types" in errors[0] and "has no 'type'" in errors[1]
    for err in errors:
        for kind in FORMATS:
            assert kind in err, f"'{kind}' is not listed: {err}"


def test_missing_dependency_of_one_source_module_spares_the_others(tmp_path):
    """A source module whose dependency is missing: asking for its type raises that
    ModuleNotFoundError; other types build and an unknown type's error lists the rest."""
    code = textwrap.dedent("""
        import importlib.abc, sys

        class NoShardsDependency(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "loaders.shards":
                    raise ModuleNotFoundError("No module named 'shards_dependency'", name="shards_dependency")

        sys.meta_path.insert(0, NoShardsDependency())
        from loaders.base import build_source
        from loaders.errors import ConfigError
        try:
            build_source({"type": "nosuchtype"})
        except ConfigError as e:
            print("error:", e)
        assert len(build_source({"type": "synthetic", "n": 4, "size": 8})) == 4
        try:
            build_source({"type": "shards", "path": "."})
        except ModuleNotFoundError as e:
            print("missing:", e.name)
    """)
    res = _run(["-c", code], tmp_path, timeout=120)
    _assert_ok(res)
    error = next(ln for ln in res.stdout.splitlines() if ln.startswith("error:"))
    for kind in FORMATS:
        assert (kind in error) == (kind != "shards"), error
    assert "missing: shards_dependency" in res.stdout.splitlines(), res.stdout


# ------------------------------------------------------------------------ pretrain once, eval many
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """``fastssl pretrain CFG --out RUN`` of a tiny synthetic run (eval sources synthetic too)."""
    d = tmp_path_factory.mktemp("demo")
    syn_train, syn_test = write_split("synthetic", d, n_train=30, n_test=20)
    cfg = _config(d / "demo.yaml", sources=[{"name": "syn", "type": "synthetic", "n": 32, "size": 16}],
                  eval_train=syn_train, eval_test=syn_test)
    run = d / "run"
    res = _fastssl("pretrain", cfg, "--out", run, cwd=d)
    _assert_ok(res)
    assert (run / "backbone.pt").is_file() and (run / "config.yaml").is_file()
    return run


def test_eval_run_dir_without_data(run_dir):
    """The README's ``fastssl eval runs/demo``: the run's own (synthetic) eval sources."""
    res = _fastssl("eval", run_dir, cwd=run_dir.parent)
    _assert_ok(res)
    _percent(KNN, res.stdout)
    _percent(LINEAR, res.stdout)


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_with_data_of_every_source_type(run_dir, tmp_path, fmt):
    """``fastssl eval RUN --data DATA.yaml --no-linear`` on a labelled train/test set of ``fmt``."""
    if fmt == "beton":
        pytest.importorskip("ffcv", reason="FFCV is an optional extra (pip install 'fastssl[ffcv]')")
    train_cfg, test_cfg = write_split(fmt, tmp_path / fmt)
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"train": train_cfg, "test": test_cfg}))
    res = _fastssl("eval", run_dir, "--data", data, "--no-linear", cwd=tmp_path)
    _assert_ok(res)
    _percent(KNN, res.stdout)
    assert not LINEAR.search(res.stdout), res.stdout


def test_pretrain_with_eval_sources_of_other_types(tmp_path):
    """Training on shards + npz, evaluating on CIFAR (train) and an image folder (test)."""
    images, labels = labelled_images(32, 16, seed=2)
    sources = [{"name": "shards", **write_shards(tmp_path / "shards", images[:16], labels[:16])},
               {"name": "npz", **write_npz(tmp_path / "train.npz", images[16:], labels[16:])}]
    cifar_train, _ = write_split("cifar", tmp_path / "cifar")
    _, folder_test = write_split("folder", tmp_path / "folder")
    cfg = _config(tmp_path / "mixed.yaml", sources=sources, eval_train=cifar_train, eval_test=folder_test,
                  image_size=16)
    run = tmp_path / "run"
    res = _fastssl("pretrain", cfg, "--out", run, cwd=tmp_path)
    _assert_ok(res)
    assert "kNN top-1" in res.stdout, res.stdout
    ev = json.loads((run / "eval.json").read_text())
    assert 0.0 <= ev["eval/knn_top1"] <= 1.0 and ev["eval/chance"] == pytest.approx(0.1)
