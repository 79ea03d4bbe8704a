"""Launched by tests/test_pipeline.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank builds the loader of ``CONFIG`` with its rank/world size from ``torch.distributed``
and writes the global indices (``Batch.index``) and sources it received, in order, to
``OUT_DIR/rank{r}.npz``. The test checks the ranks' slices against the plan.
"""
import sys

import numpy as np
import torch
import torch.distributed as dist

from loaders.crop import CropSpec
from loaders.pipeline import build_loader


def config() -> dict:
    """Two small in-memory sources (AdaInf-style dup) and a budget of one epoch."""
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, (20, 10, 14, 3), dtype=np.uint8)
    return {
        "sources": [{"name": "real", "type": "array", "images": real, "labels": np.arange(30) % 10, "dup": 2},
                    {"name": "gen", "type": "array", "images": gen}],
        "budget": 80, "seed": 3, "batch_size": 5, "num_workers": 1,
    }


CROPS = [CropSpec(8), CropSpec(8, scale=(0.2, 1.0), interpolation="bicubic")]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = build_loader(config(), crops=CROPS, rank=rank, world_size=world)
    index, source = [], []
    for batch in loader:
        index.append(batch.index)
        source.append(batch.source)
    # every rank sees the same number of batches (no rank waits on a collective forever)
    n = torch.tensor([len(index)])
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    if int(n) != len(index):
        raise RuntimeError(f"rank {rank} has {len(index)} batches, another has {int(n)}")
    np.savez(f"{out_dir}/rank{rank}.npz", index=torch.cat(index).numpy(), source=torch.cat(source).numpy())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
