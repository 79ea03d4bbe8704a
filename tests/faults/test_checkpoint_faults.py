"""Checkpoint faults: a torn newest checkpoint is passed over by name, a run killed during its
final evaluation finishes on ``--resume auto``, and a finished run answers "nothing to do"
with exit 0 (a preemption-retry loop terminates)."""
import json
import os
import signal
import subprocess
import sys
import time

import yaml

from fastssl.cli import main


def _cfg(tmp_path, **train):
    cfg = {
        "name": "faults",
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}],
                 "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 6, "checkpoint_every": 2, **train},
        "eval": {"train": {"type": "synthetic", "n": 200, "size": 16},
                 "test": {"type": "synthetic", "n": 100, "size": 16, "split": "test"},
                 "knn_k": 10, "linear_epochs": 2},
        "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False, "indices": True},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _steps(run):
    return [json.loads(x)["step"] for x in (run / "indices_rank0.jsonl").read_text().splitlines()]


def test_torn_newest_checkpoint_is_named_and_passed_over(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", str(_cfg(tmp_path, stop_after=4)), "--out", str(run), "eval.enabled=false"]) == 0
    newest = run / "checkpoints" / "step_00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])                    # an interrupted copy
    capsys.readouterr()
    assert main(["pretrain", str(_cfg(tmp_path)), "--out", str(run), "--resume", "auto",
                 "eval.enabled=false"]) == 0
    err = capsys.readouterr().err
    assert err.count("step_00000004.pt does not load") == 1 and "resumed at step 2" in err
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    # an explicit path that does not load: one line naming it, exit 2
    newest.write_bytes(data[:100])
    assert main(["pretrain", str(_cfg(tmp_path)), "--out", str(run), "--resume", str(newest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000004.pt does not load" in err[0]


def test_kill_during_final_evaluation_then_resume_auto_finishes(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastssl", "pretrain", str(cfg), "--out", str(run), "eval.linear_epochs=3000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "backbone.pt").exists():   # written right before the evaluation starts
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "eval.json").exists(), "the evaluation finished before the kill"
    res = subprocess.run([sys.executable, "-m", "fastssl", "pretrain", str(cfg), "--out", str(run),
                          "--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "final step: finishing it" in res.stderr and "kNN top-1" in res.stdout
    ev = json.loads((run / "eval.json").read_text())
    assert 0 <= ev["eval/knn_top1"] <= 1
    # the retry loop's next call: nothing to do, exit 0, nothing rewritten
    before = (run / "eval.json").stat().st_mtime_ns
    res = subprocess.run([sys.executable, "-m", "fastssl", "pretrain", str(cfg), "--out", str(run),
                          "--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "is complete" in res.stderr and "nothing to do" in res.stderr
    assert (run / "eval.json").stat().st_mtime_ns == before
