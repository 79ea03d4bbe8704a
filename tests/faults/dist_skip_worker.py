"""One rank of the 2-process skip test (run by tests/faults/test_dist_skips.py via torchrun):
trains a few steps with the real trainer on an image folder holding corrupt files, with
``on_error: skip``, and writes this rank's step count, last metrics and trained sample ids to
OUT/rank{r}.json."""
import json
import sys
from pathlib import Path

import torch


def main(out: str, root: str) -> None:
    from fastssl.config import load_config
    from fastssl.trainer import train

    base = {
        "name": "skips",
        "data": {"sources": [{"name": "pngs", "type": "folder", "root": root}], "batch_size": 8,
                 "num_workers": 0, "seed": 0, "on_error": "skip", "max_skip_fraction": 0.5},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1, "name": "sgd", "lr": 0.5},
        "train": {"steps": 4, "device": "cpu", "num_classes": 2},
        "eval": {"enabled": False},
        "log": {"every": 1, "progress": False, "indices": True, "tensorboard": False, "plot": False},
    }
    cfg = load_config(None, [], base=base)
    res = train(cfg, out=str(Path(out) / "run"))
    rank = torch.distributed.get_rank()
    records = [json.loads(line) for line in
               (Path(out) / "run" / f"indices_rank{rank}.jsonl").read_text().splitlines()]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": torch.distributed.get_world_size(), "step": res.step,
        "metrics": {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))},
        "steps": [r["step"] for r in records], "indices": [r["index"] for r in records],
        "losses": [r["loss"] for r in records],
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
