"""Two "nodes" on one machine: two ``torchrun --nnodes 2 --nproc_per_node 1`` launches (node rank
0 and 1, gloo, CPU) train with the real trainer. Both processes have LOCAL_RANK 0, so a data slice
taken from the local rank would give both the same samples: the test checks that each process
trained on exactly its GLOBAL rank's slice of the plan, that the slices are disjoint and together
cover the plan (one pass over the 64 images), and that the parameters stayed synchronised."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loaders.mixture import Plan
from loaders.pipeline import build_sources_and_mixture

WORKER = Path(__file__).with_name("multinode_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_global_rank_slices_and_synced_params(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(WORKER), str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    nodes = [json.loads((tmp_path / f"node{r}.json").read_text()) for r in (0, 1)]
    for r, n in enumerate(nodes):
        # global rank/world from torch.distributed and Accelerate; the device index is the local rank
        assert (n["env_rank"], n["dist_rank"], n["process_index"], n["world"]) == (r, r, r, 2)
        assert n["env_local_rank"] == n["local_process_index"] == 0 and n["device"] in ("cpu", "cpu:0")
    # each process read exactly its global rank's slice of the plan, in order
    _, mixture = build_sources_and_mixture(nodes[0]["data"])
    got = [[i for step in n["indices"] for i in step] for n in nodes]
    for r in (0, 1):
        plan = Plan(mixture, batch_size=8, rank=r, world_size=2)
        want = np.concatenate([plan.batch(b)[2] for b in range(len(plan))]).tolist()
        assert got[r] == want and len(want) == 32
    assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(64))
    # gradients were averaged across the nodes: identical parameters
    assert nodes[0]["checksum"] == pytest.approx(nodes[1]["checksum"], rel=1e-9, abs=1e-9)
    assert nodes[0]["first_param"] == pytest.approx(nodes[1]["first_param"], abs=1e-7)


def test_run_dir_not_shared_by_every_node_is_one_clear_error(tmp_path):
    """Rank 1 on another node without the shared filesystem: every rank raises the same error."""
    import types

    import torch

    from fastssl.trainer import check_shared_run_dir
    from loaders.errors import ConfigError

    (tmp_path / "config.yaml").write_text("name: x\n")
    seen_by = {"all": [1.0, 1.0], "rank 0 only": [1.0, 0.0]}
    for case, flags in seen_by.items():
        acc = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                                    gather=lambda t, _f=flags: torch.tensor(_f))
        if case == "all":
            check_shared_run_dir(tmp_path, acc)
        else:
            with pytest.raises(ConfigError, match=r"run directory '.*' is not visible to rank\(s\) \[1\]: "
                                                  r"a multi-node run needs log.out / --out on a filesystem shared"):
                check_shared_run_dir(tmp_path, acc)
    # one process: nothing to check, even without the directory
    check_shared_run_dir(tmp_path / "absent", types.SimpleNamespace(num_processes=1))
