"""fastssl study diversity / inflation and fastssl report: same images per budget, the rounding
rule, exact unique counts, nested subsets, the real share, the plots' lines, the Fréchet distance."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fastssl.cli import main
from fastssl.config import from_dict
from fastssl.metrics_log import read_metrics
from fastssl.studies.diversity import check_nested, fraction_for, steps_for_budget
from fastssl.studies.frechet import frechet_distance
from loaders.errors import ConfigError
from loaders.mixture import Mixture
from loaders.pipeline import build_sources_and_mixture

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, sources):
    cfg = {
        "data": {"sources": sources, "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": "symmetric_adainf", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 5, "checkpoint_every": 0, "num_threads": 1},
        "eval": {"train": {"type": "synthetic", "n": 40, "size": 16},
                 "test": {"type": "synthetic", "n": 20, "size": 16, "split": "test"},
                 "knn_k": 10, "linear_epochs": 2, "random_init_baseline": False},
        "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False, "indices": True},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _points(out):
    return sorted(p for p in Path(out).iterdir() if (p / "point.json").is_file())


def _point_mixture(pdir):
    cfg = from_dict(yaml.safe_load((pdir / "config.yaml").read_text()))
    return build_sources_and_mixture(cfg.data)[1]


# ------------------------------------------------------------------------------ rules
def test_budget_rounds_to_the_nearest_step_halves_up():
    assert steps_for_budget(200, 16) == 13      # 12.5 -> 13
    assert steps_for_budget(199, 16) == 12      # 12.44 -> 12
    assert steps_for_budget(8, 16) == 1         # half a step -> 1
    for c in range(8, 3000):
        s = steps_for_budget(c, 16)
        assert abs(s * 16 - c) <= 8 and (s * 16 - c != -8)   # a tie goes up
    with pytest.raises(ConfigError, match="--budget 7: under half a step of 16 images"):
        steps_for_budget(7, 16)


def test_unique_counts_become_fractions_the_mixture_maps_to_exactly_n():
    rng = np.random.default_rng(0)
    for n in (7, 64, 1000, 1_281_167, 15_000_000):
        for count in {1, n, *rng.integers(1, n, size=30).tolist()}:
            f = fraction_for(int(count), n)
            assert int(Mixture([n], fractions=[f]).unique[0]) == count, (n, count, f)
    with pytest.raises(ConfigError, match="--unique 65: must be between 1 and the source's 64"):
        fraction_for(65, 64)


def test_seeded_subsets_nest_across_fractions():
    for seed in (0, 7):
        subsets = []
        for f in (0.003, 0.01, 0.1, 0.37, 0.5, 1.0):
            m = Mixture([1000, 300], dups=[1, 2], fractions=[f, 0.5], seed=seed)
            subsets.append((int(m.unique[0]), m.subset(0)))
        res = check_nested(subsets)
        assert res["nested"] and res["checked_pairs"] == 5
    # the check does find a pair that is not nested
    bad = check_nested([(2, np.array([0, 5])), (3, np.array([0, 1, 2]))])
    assert not bad["nested"] and bad["counterexample"] == {"small": 2, "large": 3, "missing": 1}


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 1.0
    linalg = pytest.importorskip("scipy.linalg")
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * np.trace(linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


# ------------------------------------------------------------------------------ diversity
def test_diversity_study_same_images_exact_counts_nested_and_plot(tmp_path):
    cfg = _cfg(tmp_path, [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}])
    out = tmp_path / "div"
    rc = main(["study", "diversity", str(cfg), "--budget", "200", "100", "--unique", "8,24,64", "--out", str(out),
               "--launcher", "inline", "--frechet", "--frechet-samples", "32"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    seen = {}
    for pdir in _points(out):
        st = json.loads((pdir / "point.json").read_text())["study"]
        images = read_metrics(pdir / "metrics.jsonl")[-1]["images_seen"]
        assert images == st["C_eff"] == st["steps"] * 16                    # exact, from metrics.jsonl
        assert abs(st["C_eff"] - st["C"]) <= 8                               # the stated rounding
        assert st["N"] * st["E"] == pytest.approx(st["C_eff"])
        seen.setdefault(st["C"], set()).add(images)
        m = _point_mixture(pdir)
        assert int(m.unique[0]) == st["N"]
        ids = {i for ln in (pdir / "indices_rank0.jsonl").read_text().splitlines() for i in json.loads(ln)["index"]}
        subset = set(m.subset(0).tolist())
        assert ids <= subset and (st["E"] < 1 or ids == subset)              # trained only on its N samples
        assert np.isfinite(st["frechet"]) and st["frechet"] >= 0
    assert seen == {200: {208}, 100: {96}}                                   # 12.5 -> 13 steps, 6.25 -> 6
    subsets = [(int(_point_mixture(p).unique[0]), _point_mixture(p).subset(0)) for p in _points(out)[:3]]
    assert check_nested(subsets)["nested"]
    meta = json.loads((out / "sweep.json").read_text())["study"]
    assert meta["nested"]["nested"] and "halves rounded up" in meta["rounding"]
    (plot,) = rep["plots"]
    assert plot["file"] == "accuracy_vs_N.png" and (out / plot["file"]).stat().st_size > 1000
    assert [p["lines"] for p in plot["panels"]] == [2, 2]                     # one line per budget
    assert sorted(plot["panels"][0]["labels"]) == ["C=208", "C=96"]
    for r in rep["rows"]:
        ev = json.loads((out / r["point"] / "eval.json").read_text())
        assert r["eval/knn_top1"] == ev["eval/knn_top1"] and r["eval/linear_top1"] == ev["eval/linear_top1"]
    md = (out / "report.md").read_text()
    assert "| p000_C208_N8 | done |" in md and "accuracy_vs_N.png" in md


def test_diversity_study_refuses_bad_input(tmp_path, capsys):
    cfg = _cfg(tmp_path, [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}])
    for args, needle in ((["--budget", "100", "--unique", "8,100"], "--unique 100"),
                         (["--budget", "100", "--unique", "8", "--fractions", "0.5"], "exactly one of"),
                         (["--budget", "100", "101", "--unique", "8"], "--budget: two values"),
                         (["--budget", "100", "--unique", "8", "--source", "web"], "--source 'web'")):
        assert main(["study", "diversity", str(cfg), *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ inflation
def test_inflation_study_real_share_and_plot_per_preset(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, [{"name": "real", "type": "synthetic", "n": 32, "size": 16, "dup": 1},
                          {"name": "generated", "type": "synthetic", "n": 64, "size": 16, "variant": "generated",
                           "dup": 1}])
    out = tmp_path / "inf"
    rc = main(["study", "inflation", str(cfg), "--dup", "1,3", "--preset", "symmetric,symmetric_adainf",
               "--steps", "3", "--out", str(out), "--launcher", "inline"])
    assert rc == 0
    rows = {r["point"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert len(rows) == 4
    for pdir in _points(out):
        r, m = rows[pdir.name], _point_mixture(pdir)
        assert r["real_share"] == pytest.approx(r["dup"] * 32 / (r["dup"] * 32 + 64))
        assert r["real_share"] == pytest.approx(m.counts_per_epoch[0] / m.epoch_length)
        assert r["images_seen"] == 3 * 16 and r["state"] == "done"
    plot = json.loads((out / "report.json").read_text())["plots"][0]
    assert plot["file"] == "accuracy_vs_dup.png" and [p["lines"] for p in plot["panels"]] == [2, 2]
    # without matplotlib: the tables are written, the plots skipped with a note
    from fastssl.studies.report import write_report
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (out / "accuracy_vs_dup.png").unlink()
    doc = write_report(out, quiet=True)
    assert doc["plots"] == [] and any("matplotlib is not installed" in n for n in doc["notes"])
    assert not (out / "accuracy_vs_dup.png").exists() and "| p000_symmetric_dup1 |" in (out / "report.md").read_text()
