"""Two CPU processes (torchrun, gloo) train with the real trainer: gradients are averaged
(identical parameters on both ranks) and each rank trains on its own disjoint samples."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_train_worker.py")


def test_two_rank_training(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    # gradients synchronised: the same parameters on both ranks after 3 steps ...
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9, abs=1e-9)
    assert r0["first_param"] == pytest.approx(r1["first_param"], abs=1e-7)
    # ... although each rank computed its loss on different images
    assert r0["losses"] != r1["losses"]
    # disjoint data: 3 steps x 8 per rank = 48 distinct samples of the 64 (less than one pass)
    i0 = [i for b in r0["indices"] for i in b]
    i1 = [i for b in r1["indices"] for i in b]
    assert len(i0) == len(i1) == 24
    assert not set(i0) & set(i1)
    assert len(set(i0) | set(i1)) == 48
    # the run directory was written once (rank 0), with a checkpoint holding world_size 2
    import torch
    ck = torch.load(tmp_path / "run" / "checkpoints" / "step_00000003.pt", weights_only=False)
    assert ck["world_size"] == 2


@pytest.mark.parametrize("launcher", [
    ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
     "--mixed_precision", "no", "--dynamo_backend", "no"],
], ids=["torchrun", "accelerate"])
def test_readme_launch_commands_start_two_processes_on_cpu(tmp_path, launcher):
    """The README's two-process commands on a CPU-only machine (``accelerate launch --cpu``
    would start one process: accelerate's CPU flag selects its single-process launcher)."""
    import yaml
    cfg = {"defaults": ["data/demo.yaml", "method/simclr.yaml"], "name": "two",
           "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}], "batch_size": 8,
                    "num_workers": 0},
           "augment": {"preset": "symmetric", "size": 16}, "model": {"width": 4},
           "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
           "optim": {"warmup_steps": 1}, "train": {"steps": 2}, "eval": {"enabled": False},
           "log": {"progress": False, "tensorboard": False, "plot": False}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, "-m", "fastssl", "pretrain", str(path), "--out", str(tmp_path / "run")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "on 2 process(es)" in res.stderr
    import torch
    ck = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert ck["world_size"] == 2
