"""Kill-and-resume for every registered method and for BCL: a run SIGKILLed after a checkpoint
and resumed trains on exactly the same samples with the same losses (to 1e-6, CPU,
deterministic algorithms) as an uninterrupted run, and ends with the same weights.

The runs are short but cross the schedules that live in the method's state: DINO's frozen last
layer and teacher-temperature warm-up, SwAV's frozen prototypes and the EMA momentum (the
checkpoint falls inside the freeze window, the resumed run leaves it), MoCo's queue and BCL's
per-sample strengths (set at the epoch ends of the resumed part).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tiny_vae import write_tiny_vae

from fastssl.methods import METHODS

STEPS, EVERY = 8, 3
SMALL = {  # tiny heads so that a step takes milliseconds
    "simclr": {"proj_hidden_dim": 32, "proj_output_dim": 16},
    "mocov2": {"proj_hidden_dim": 32, "proj_output_dim": 16, "queue_size": 48},
    "byol": {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32},
    "barlow": {"proj_hidden_dim": 32, "proj_output_dim": 16},
    "vicreg": {"proj_hidden_dim": 32, "proj_output_dim": 16},
    "mocov3": {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "freeze_last_layer": 0.5,
             "teacher_temp_warmup": 0.75},
    "swav": {"proj_hidden_dim": 32, "proj_output_dim": 16, "n_prototypes": 16, "freeze_prototypes": 0.5},
    "simsiam": {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 8},
    "sdclr": {"proj_hidden_dim": 32, "proj_output_dim": 16},
    "vae": {"image_size": 16, "channels": 8},            # latent: the backbone's 32 dims
    "idaa": {"proj_hidden_dim": 32, "proj_output_dim": 16},  # + vae_path: a tiny VAE in tmp_path
    "imle": {"gen_width": 4, "code_dim": 4, "num_samples": 4},   # generator bottleneck: the backbone's 32
}
MULTI_CROP = {"dino": "dino_multicrop", "swav": "swav_multicrop", "vae": "vae", "imle": "imle"}  # vae, imle: 1 view
CASES = sorted(METHODS) + ["simclr+bcl", "sdclr+bcl", "simclr+isicle"]   # BCL-I, BCL-D, ISICLE


def test_every_method_is_covered():
    assert set(SMALL) == set(METHODS), "add the new method to SMALL with tiny heads"


def _config(tmp_path, case):
    name = case.split("+")[0]
    cfg = {
        "name": "resume",
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 48, "size": 16},
                             {"name": "gen", "type": "synthetic", "n": 16, "size": 16, "variant": "generated"}],
                 "batch_size": 16, "num_workers": 1, "seed": 3},
        "augment": {"preset": MULTI_CROP.get(name, "symmetric"), "size": 16},
        "method": {"name": name, **SMALL[name]},
        "model": {"width": 4},
        "optim": {"warmup_steps": 2},
        "train": {"steps": STEPS, "checkpoint_every": EVERY, "deterministic": True, "seed": 1},
        "eval": {"enabled": False},
        "log": {"every": 2, "progress": False, "indices": True, "tensorboard": False, "plot": False},
    }
    if name == "idaa":
        cfg["method"]["vae_path"] = str(write_tiny_vae(tmp_path / "vae.pt", image_size=16))
    if case.endswith("+bcl"):  # 64 samples, 16 per step: an epoch every 4 steps
        cfg["recipes"] = [{"name": "bcl", "beta": 0.97}]
        cfg["augment"]["preset"] = "bcl_d" if name == "sdclr" else "bcl"
    if case.endswith("+isicle"):  # a generator whose samples depend on the code (the counter-seeded draws)
        from fastssl.models.generator import ConditionalGenerator
        torch.manual_seed(0)
        gen = ConditionalGenerator(width=4, feat_dim=8, code_dim=4)
        torch.nn.init.normal_(gen.out.weight, std=0.1)   # zero-initialised, it would be the identity
        torch.save(gen.state_dict(), tmp_path / "gen.pt")
        cfg["recipes"] = [{"name": "isicle", "weights": str(tmp_path / "gen.pt"), "p": 0.5,
                           "corrupt": ["grayscale", "half_grayscale", "pixel_mask"]}]
        cfg["augment"]["preset"] = "isicle"
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(cfg, out, *extra):
    return [sys.executable, "-m", "fastssl", "pretrain", str(cfg), "--out", str(out), *extra]


def _env():
    # same thread count in every run: float reductions then add up in the same order
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _records(run):
    return [json.loads(line) for line in (run / "indices_rank0.jsonl").read_text().splitlines()]


def _kill_after_first_checkpoint(proc, run):
    first = run / "checkpoints" / f"step_{EVERY:08d}.pt"
    deadline = time.time() + 240
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "run B wrote no checkpoint in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "backbone.pt").exists(), "run B finished before it was killed"


@pytest.mark.parametrize("case", CASES)
def test_sigkill_and_resume_reproduces_uninterrupted_run(tmp_path, case):
    cfg = _config(tmp_path, case)
    a, b = tmp_path / "A", tmp_path / "B"
    # the uninterrupted run A and run B side by side; B is killed after its first checkpoint
    run_a = subprocess.Popen(_cmd(cfg, a), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_b = subprocess.Popen(_cmd(cfg, b), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_after_first_checkpoint(run_b, b)
    assert max(r["step"] for r in _records(b)) < STEPS
    _, err = run_a.communicate(timeout=300)
    assert run_a.returncode == 0, err.decode()[-2000:]
    res = subprocess.run(_cmd(cfg, b, "--resume", "auto"), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed at step" in res.stderr

    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in ra] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))   # killed run's extra steps dropped
    for x, y in zip(ra, rb):
        assert x["index"] == y["index"], f"step {x['step']}: different samples"
        assert abs(x["loss"] - y["loss"]) <= 1e-6, f"step {x['step']}: loss {x['loss']} vs {y['loss']}"
    ids = [i for r in ra[:4] for i in r["index"]]   # one pass over the 64 samples
    assert sorted(ids) == list(range(64))
    _same_end_state(a, b, case)


def _same_end_state(a, b, case):
    wa = torch.load(a / "backbone.pt", weights_only=True)
    wb = torch.load(b / "backbone.pt", weights_only=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    ca = torch.load(a / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=False)
    cb = torch.load(b / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=False)
    for k, v in ca["model"].items():   # every method buffer and schedule state (queues, centre, progress)
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, cb["model"][k], rtol=0, atol=1e-6, msg=k)
        else:
            assert v == cb["model"][k], k
    if case.endswith("+bcl"):
        sa, sb = ca["recipes"]["bcl"], cb["recipes"]["bcl"]
        assert torch.equal(sa["seen"], sb["seen"]) and sa["seen"].all()
        torch.testing.assert_close(sa["w"], sb["w"], rtol=0, atol=1e-6)
        assert sa["w"].std() > 0
    if case.endswith("+isicle"):
        assert ca["recipes"]["isicle"] == cb["recipes"]["isicle"] == {"calls": STEPS}
    # the log records (all but the wall-clock rate) are the same too
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for x, y in zip(ma, mb):
        for k in x:
            if k != "images_per_sec":
                assert x[k] == pytest.approx(y[k], abs=1e-6), (x["step"], k)
