"""One rank of the 2-process CPU training test (run by tests/test_distributed_train.py via
torchrun). Trains a few steps with the real trainer, then writes this rank's parameter
checksum and the sample ids it trained on to OUT/rank{r}.json."""
import json
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    from fastssl.config import load_config
    from fastssl.trainer import train

    base = {
        "name": "dist",
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}],
                 "batch_size": 8, "num_workers": 0, "seed": 0},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1, "name": "sgd", "lr": 0.5},
        "train": {"steps": 3, "device": "cpu"},
        "eval": {"enabled": False},
        "log": {"every": 1, "progress": False, "indices": True, "tensorboard": False, "plot": False},
    }
    cfg = load_config(None, [], base=base)
    res = train(cfg, out=str(Path(out) / "run"))
    rank = torch.distributed.get_rank()
    # parameters only: BatchNorm running statistics are per rank between DDP's buffer broadcasts
    params = {k: v.detach().double() for k, v in res.method.named_parameters()}
    checksum = sum(float(v.sum()) + 1e-3 * float((v * v).sum()) for v in params.values())
    records = [json.loads(line) for line in
               (Path(out) / "run" / f"indices_rank{rank}.jsonl").read_text().splitlines()]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": torch.distributed.get_world_size(), "checksum": checksum,
        "first_param": params[next(iter(params))].flatten()[:8].tolist(),
        "indices": [r["index"] for r in records], "losses": [r["loss"] for r in records],
    }))


if __name__ == "__main__":
    main(sys.argv[1])
