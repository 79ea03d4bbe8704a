"""fastssl sweep: the grid syntax, the manifest, failing points, kill-and-resume of the runner,
a crashed point, the submitit launchers and the report's numbers."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fastssl.cli import main
from fastssl.studies.grid import grid, split_values
from fastssl.studies.manifest import read_attempts
from loaders.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, steps=4, checkpoint_every=2):
    cfg = {
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}],
                 "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": steps, "checkpoint_every": checkpoint_every, "num_threads": 1},
        "eval": {"train": {"type": "synthetic", "n": 40, "size": 16},
                 "test": {"type": "synthetic", "n": 20, "size": 16, "split": "test"},
                 "knn_k": 10, "linear_epochs": 2},
        "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _manifest(d):
    return {p["name"]: p for p in json.loads((Path(d) / "sweep.json").read_text())["points"]}


def _sweep_cmd(*args):
    return [sys.executable, "-m", "fastssl", "sweep", *map(str, args)]


# ------------------------------------------------------------------------------ grid
def test_values_split_on_top_level_commas_only():
    assert split_values("1,2,3") == ["1", "2", "3"]
    assert split_values("[1,2],[3,4]") == ["[1,2]", "[3,4]"]
    assert split_values("{a: 1, b: 2},{a: 3}") == ["{a: 1, b: 2}", "{a: 3}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    for bad, needle in (("1,,2", "empty value"), ("1,", "empty value"), ("[1,2", "unclosed"), ("1]", "unbalanced")):
        with pytest.raises(ConfigError, match=needle):
            split_values(bad)


def test_grid_product_and_zip():
    assert grid(["a=1,2", "b=x,y"]) == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    assert grid(["a=1,2", "b=x,y"], zip_axes=True) == [["a=1", "b=x"], ["a=2", "b=y"]]
    assert grid(["model.width=[1,2],[3,4]"]) == [["model.width=[1,2]"], ["model.width=[3,4]"]]
    with pytest.raises(ConfigError, match="--zip needs axes of one length"):
        grid(["a=1,2", "b=x"], zip_axes=True)
    with pytest.raises(ConfigError, match="'a' is given twice"):
        grid(["a=1", "a=2"])


def test_help_and_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "sweep" in out and "study" in out and "report" in out
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "--launcher" in capsys.readouterr().out
    assert main(["sweep", str(_cfg(tmp_path)), "optim.lr=0.1,0.3", "--dry-run", "--out", str(tmp_path / "sw")]) == 0
    assert "p001_lr=0.3: optim.lr=0.3" in capsys.readouterr().out and not (tmp_path / "sw").exists()


# ------------------------------------------------------------------------------ serial sweep
def test_failing_points_are_marked_and_the_report_holds_eval_numbers(tmp_path, capsys):
    cfg, out = _cfg(tmp_path), tmp_path / "sw"
    # width=nope: ConfigError before start; warmup 100 > 4 steps: ConfigError inside the run
    rc = main(["sweep", str(cfg), "model.width=4,nope", "optim.warmup_steps=1,100", "--out", str(out), "--quiet"])
    assert rc == 1
    m = _manifest(out)
    states = {n: p["state"] for n, p in m.items()}
    assert states == {"p000_width=4_warmup_steps=1": "done", "p001_width=4_warmup_steps=100": "failed",
                      "p002_width=nope_warmup_steps=1": "failed", "p003_width=nope_warmup_steps=100": "failed"}
    assert "model.width" in m["p002_width=nope_warmup_steps=1"]["error"]
    assert "warm-up" in m["p001_width=4_warmup_steps=100"]["error"]
    assert all("\n" not in (p["error"] or "") for p in m.values())
    # the report's table holds exactly the numbers of eval.json
    done = out / "p000_width=4_warmup_steps=1"
    ev = json.loads((done / "eval.json").read_text())
    rows = {r["point"]: r for r in csv.DictReader(open(out / "report.csv"))}
    for key in ("eval/knn_top1", "eval/linear_top1", "eval/knn_top1_random_init"):
        assert float(rows[done.name][key]) == ev[key]
    assert int(rows[done.name]["images_seen"]) == 4 * 16
    rep = json.loads((out / "report.json").read_text())
    assert {r["point"]: r["state"] for r in rep["rows"]} == states
    assert "model.width" in rows["p002_width=nope_warmup_steps=1"]["error"]
    # the same command again: the done point is skipped (one attempt), the failed one reruns
    assert main(["sweep", str(cfg), "model.width=4,nope", "optim.warmup_steps=1,100", "--out", str(out),
                 "--quiet", "--no-report"]) == 1
    m2 = _manifest(out)
    assert m2[done.name]["attempts"] == 1 and m2["p001_width=4_warmup_steps=100"]["attempts"] == 2
    assert "1 done, 3 to run" in capsys.readouterr().err


def _wait_for(cond, proc, timeout=120):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, "the sweep ended before the condition"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def _wait_gone(pid, timeout=20):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still alive")


def test_killed_runner_resumes_the_interrupted_point_from_its_checkpoint(tmp_path):
    cfg, out = _cfg(tmp_path, steps=40, checkpoint_every=4), tmp_path / "sw"
    cmd = _sweep_cmd(cfg, "train.seed=0,1", "--out", out, "--quiet", "--no-report")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    _wait_for(lambda: glob.glob(str(out / "p001_seed=1" / "checkpoints" / "step_*.pt")), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m = _manifest(out)
    assert m["p000_seed=0"]["state"] == "done" and m["p001_seed=1"]["state"] == "running"
    _wait_gone(m["p001_seed=1"]["pid"])   # the point's process died with the runner
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    m = _manifest(out)
    assert m["p000_seed=0"]["attempts"] == 1 and m["p000_seed=0"]["state"] == "done"
    assert m["p001_seed=1"]["attempts"] == 2 and m["p001_seed=1"]["state"] == "done"
    starts = [e for e in read_attempts(out / "p001_seed=1") if e["event"] == "start"]
    assert starts[0]["resume_step"] is None and 4 <= starts[1]["resume_step"] < 40
    log = (out / "p001_seed=1" / "log.txt").read_text()
    assert f"resumed at step {starts[1]['resume_step']}" in log
    recs = [json.loads(ln) for ln in (out / "p001_seed=1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 41))   # every step once


def test_a_crashed_point_is_failed_and_the_sweep_goes_on(tmp_path):
    cfg, out = _cfg(tmp_path, steps=200, checkpoint_every=0), tmp_path / "sw"
    cmd = _sweep_cmd(cfg, "train.seed=0,1", "train.steps=200,3", "--zip", "--out", out, "--quiet", "--no-report")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    name = "p000_seed=0_steps=200"
    _wait_for(lambda: (out / name / "attempts.jsonl").is_file(), proc)
    pid = read_attempts(out / name)[0]["pid"]
    os.kill(pid, signal.SIGKILL)          # the point's process crashes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    m = _manifest(out)
    assert m[name]["state"] == "failed" and "signal SIGKILL" in m[name]["error"]
    assert m["p001_seed=1_steps=3"]["state"] == "done"


# ------------------------------------------------------------------------------ submitit launchers
def test_local_jobs_run_points_as_separate_processes(tmp_path):
    pytest.importorskip("submitit")
    cfg, out = _cfg(tmp_path), tmp_path / "sw"
    rc = main(["sweep", str(cfg), "train.seed=0,1", "--out", str(out), "--launcher", "local-jobs", "--parallel", "2",
               "--gpus-per-job", "0"])
    assert rc == 0
    m = _manifest(out)
    pids = [p["pid"] for p in m.values()]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert all(p["state"] == "done" and p["job_id"] for p in m.values())
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["rows"]) == 2 and all(r["state"] == "done" and r["eval/knn_top1"] is not None
                                         for r in rep["rows"])
    assert {int(r["pids"]) for r in rep["rows"]} == set(pids)


def test_slurm_settings_reach_the_sbatch_script(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from fastssl.studies.launchers import LaunchOptions, _slurm_executor
    from fastssl.studies.manifest import Manifest
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):   # stand-ins: the executor only looks them up
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    opts = LaunchOptions(launcher="slurm", slurm={"partition": "gpu", "time": 90, "gpus": 2, "cpus": 8,
                                                  "account": "lab", "array_parallelism": 3})
    ex = _slurm_executor(Manifest(tmp_path / "sw", {}), opts)
    text = ex._executor._make_submission_file_text("python -c pass", "uid")
    for needle in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--cpus-per-task=8", "--account=lab"):
        assert needle in text, text
