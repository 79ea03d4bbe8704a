"""build_loader: the data config, its checks, and a 2-process torchrun run of the plan."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from loaders.crop import CropSpec
from loaders.errors import ConfigError
from loaders.mixture import Mixture
from loaders.pipeline import build_loader, build_sources_and_mixture
from loaders.torch_backend import TorchLoader

HERE = Path(__file__).resolve().parent


def _arrays(n, h=10, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _cfg(**over):
    cfg = {"sources": [{"name": "a", "type": "array", "images": _arrays(30), "weight": 3},
                       {"name": "b", "type": "array", "images": _arrays(20, seed=1), "weight": 1}],
           "budget": 80, "epoch_length": 40, "seed": 5, "batch_size": 8, "num_workers": 0}
    cfg.update(over)
    return cfg


def test_build_loader_follows_the_mixture():
    loader = build_loader(_cfg(), crops=[CropSpec(6), CropSpec(4)])
    assert isinstance(loader, TorchLoader) and len(loader) == 10
    assert [s.name for s in loader.sources] == ["a", "b"]
    mix = loader.mixture
    assert mix.names == ["a", "b"] and mix.counts_per_epoch.tolist() == [30, 10] and mix.total == 80
    ref = Mixture([30, 20], weights=[3, 1], epoch_length=40, budget=80, seed=5)
    assert mix.fingerprint() == ref.fingerprint()
    batches = list(loader)
    assert [tuple(v.shape) for v in batches[0].views] == [(8, 3, 6, 6), (8, 3, 4, 4)]
    idx = torch.cat([b.index for b in batches]).numpy()
    assert np.array_equal(idx, ref.global_ids(*ref.positions(0, 80)))


def test_crop_in_decode_off_gives_one_resized_view():
    loader = build_loader(_cfg(crop_in_decode=False, image_size=7), crops=[CropSpec(6), CropSpec(4)])
    batch = next(iter(loader))
    assert len(batch.views) == 1 and batch.views[0].shape == (8, 3, 7, 7)


def test_dup_and_fraction_keys():
    cfg = _cfg(epoch_length=None, budget=None)
    cfg["sources"][0].update(weight=None, dup=3, fraction=0.5)
    del cfg["sources"][0]["weight"], cfg["sources"][1]["weight"]
    _, mix = build_sources_and_mixture(cfg)
    assert mix.mode == "dups" and mix.unique.tolist() == [15, 20] and mix.counts_per_epoch.tolist() == [45, 20]


def test_yaml_example_with_synthetic_sources():
    cfg = yaml.safe_load("""
    sources:
      - {name: real, type: synthetic, n: 24, size: 16, dup: 2}
      - {name: gen, type: synthetic, n: 16, size: 16, variant: generated, fraction: 0.5}
    budget: 64
    seed: 0
    backend: torch
    batch_size: 16
    num_workers: 0
    on_error: raise
    image_size: 16
    crop_in_decode: true
    pin_memory: false
    """)
    loader = build_loader(cfg, crops=[CropSpec(8)])
    assert loader.mixture.counts_per_epoch.tolist() == [48, 8]
    batches = list(loader)
    assert len(batches) == 4
    src = torch.cat([b.source for b in batches])
    lab = torch.cat([b.label for b in batches])
    assert (lab[src == 1] == -1).all() and (lab[src == 0] >= 0).all()


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update(batchsize=4), r"unknown key 'batchsize' in data; did you mean 'batch_size'"),
    (lambda c: c["sources"][1].update(image=1), r"data.sources\[1\] \('b'\).*unknown key 'image'.*'images'"),
    (lambda c: c["sources"][0].update(type="arrray"), r"data.sources\[0\] \('a'\).*'arrray'.*did you mean 'array'"),
    (lambda c: c["sources"][0].update(dup=2), r"mix 'weight' \(\['a', 'b'\]\) and 'dup' \(\['a'\]\)"),
    (lambda c: c["sources"][1].update(weight=-1), r"source 'b': weight -1"),
    (lambda c: c["sources"][1].update(fraction=2), r"source 'b': fraction 2"),
    (lambda c: c.update(backend="dalli"), r"'dalli'.*did you mean 'dali'"),
    (lambda c: c.update(on_error="ignore"), r"on_error"),
    (lambda c: c.update(sources=[]), r"non-empty list"),
])
def test_config_errors_name_the_key(mutate, match):
    cfg = _cfg()
    mutate(cfg)
    with pytest.raises(ConfigError, match=match):
        build_loader(cfg)


@pytest.mark.timeout(240)
def test_torchrun_two_ranks_cover_the_plan_disjointly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_mixture_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sys.path.insert(0, str(HERE))
    try:
        from dist_mixture_worker import config
    finally:
        sys.path.remove(str(HERE))
    _, mix = build_sources_and_mixture(config())
    assert mix.total == mix.epoch_length == 80
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for r, got in enumerate(ranks):
        # rank r reads global positions r, r+2, r+4, ...: disjoint slices
        src, smp = mix.lookup(r + 2 * np.arange(40))
        assert np.array_equal(got["index"], mix.global_ids(src, smp))
        assert np.array_equal(got["source"], src)
    # together: the whole epoch, each real image twice and each generated image once
    union = np.sort(np.concatenate([g["index"] for g in ranks]))
    assert np.array_equal(union, np.sort(np.concatenate([np.repeat(np.arange(30), 2), 30 + np.arange(20)])))
