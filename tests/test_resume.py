"""Kill-and-resume: a run SIGKILLed after a checkpoint and resumed trains on exactly the same
samples with the same losses as an uninterrupted run (CPU, deterministic algorithms)."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
import yaml

STEPS, EVERY = 12, 4


def _config(tmp_path):
    cfg = {
        "name": "resume",
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 96, "size": 16}],
                 "batch_size": 16, "num_workers": 1, "seed": 3},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 2},
        "train": {"steps": STEPS, "checkpoint_every": EVERY, "deterministic": True, "seed": 1},
        "eval": {"enabled": False},
        "log": {"every": 1, "progress": False, "indices": True, "tensorboard": False, "plot": False},
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(cfg, out, *extra):
    return [sys.executable, "-m", "fastssl", "pretrain", str(cfg), "--out", str(out), *extra]


def _env():
    # same thread count in every run: float reductions then add up in the same order
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _records(run):
    return [json.loads(line) for line in (run / "indices_rank0.jsonl").read_text().splitlines()]


def test_sigkill_and_resume_reproduces_uninterrupted_run(tmp_path):
    cfg = _config(tmp_path)
    a, b = tmp_path / "A", tmp_path / "B"
    # run B first and kill it as soon as its first checkpoint is on disk
    proc = subprocess.Popen(_cmd(cfg, b), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = b / "checkpoints" / f"step_{EVERY:08d}.pt"
    deadline = time.time() + 240
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "run B wrote no checkpoint in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (b / "backbone.pt").exists(), "run B finished before it was killed"
    killed_at = max(r["step"] for r in _records(b))
    assert killed_at < STEPS

    # the uninterrupted run A, then B resumed from its latest checkpoint
    subprocess.run(_cmd(cfg, a), env=_env(), check=True, stdout=subprocess.DEVNULL)
    res = subprocess.run(_cmd(cfg, b, "--resume", "auto"), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed at step" in res.stderr

    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in ra] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))   # killed run's extra steps dropped
    for x, y in zip(ra, rb):
        assert x["index"] == y["index"], f"step {x['step']}: different samples"
        assert abs(x["loss"] - y["loss"]) <= 1e-6, f"step {x['step']}: loss {x['loss']} vs {y['loss']}"
    # every sample id appears once per pass over the 96 samples (6 steps of 16)
    ids = [i for r in ra[:6] for i in r["index"]]
    assert sorted(ids) == list(range(96))
    wa = torch.load(a / "backbone.pt", weights_only=True)
    wb = torch.load(b / "backbone.pt", weights_only=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
