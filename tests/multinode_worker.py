"""One process of the 2-"node" CPU training test (tests/test_multinode.py): each node is its own
``torchrun --nnodes 2 --node_rank N --nproc_per_node 1``, so both processes have ``LOCAL_RANK`` 0
and ``RANK`` 0 / 1. Trains one pass over 64 synthetic images with the real trainer, then writes
this process's ranks, parameter checksum and the sample ids it trained on to OUT/node{RANK}.json."""
import json
import os
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    from accelerate.state import PartialState

    from fastssl.config import load_config
    from fastssl.trainer import train

    base = {
        "name": "multinode",
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}], "budget": 64,
                 "batch_size": 8, "num_workers": 0, "seed": 5},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1, "name": "sgd", "lr": 0.5},
        "train": {"device": "cpu"},
        "eval": {"enabled": False},
        "log": {"every": 1, "progress": False, "indices": True, "tensorboard": False, "plot": False},
    }
    cfg = load_config(None, [], base=base)
    res = train(cfg, out=str(Path(out) / "run"))
    state = PartialState()
    rank = torch.distributed.get_rank()
    params = {k: v.detach().double() for k, v in res.method.named_parameters()}
    checksum = sum(float(v.sum()) + 1e-3 * float((v * v).sum()) for v in params.values())
    records = [json.loads(line) for line in
               (Path(out) / "run" / f"indices_rank{rank}.jsonl").read_text().splitlines()]
    (Path(out) / f"node{os.environ['RANK']}.json").write_text(json.dumps({
        "env_rank": int(os.environ["RANK"]), "env_local_rank": int(os.environ["LOCAL_RANK"]),
        "dist_rank": rank, "world": torch.distributed.get_world_size(),
        "process_index": state.process_index, "local_process_index": state.local_process_index,
        "device": str(state.device), "checksum": checksum,
        "first_param": params[next(iter(params))].flatten()[:8].tolist(),
        "indices": [r["index"] for r in records], "data": dict(cfg.data),
    }, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
