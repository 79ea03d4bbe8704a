"""The loop: host-sync budget, the recipe hook contract, the non-finite stop.

Host syncs are counted, not timed (on the CPU they cost nothing): ``tests/synccount.py``
patches the calls that read tensor values on the host. The data loader's own host-side work
(decoding into uint8 batches) is not the loop's and is excluded; the augmentation engine's CPU
path selects samples with ``nonzero`` by design (free on the CPU; its CUDA path uses
``torch.where`` instead) and is excluded with it.
"""
import pytest
import torch
from synccount import count_host_syncs, suspend

import fastssl.loop as loop_mod
from fastssl.config import load_config
from fastssl.metrics_log import read_metrics
from fastssl.recipes import RECIPES, Recipe, register_recipe
from fastssl.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, *overrides):
    base = {
        "name": "loop",
        "data": {"sources": [{"name": "real", "type": "synthetic", "n": 32, "size": 16},
                             {"name": "gen", "type": "synthetic", "n": 32, "size": 16, "variant": "generated"}],
                 "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": "bcl", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 8, "checkpoint_every": 4},
        "eval": {"enabled": False},
        "recipes": [{"name": "bcl"}],
        "log": {"out": str(tmp_path / "run"), "every": 4, "progress": False, "tensorboard": False,
                "plot": False},
    }
    return load_config(None, list(overrides), base=base)


def test_host_syncs_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    """Steps that neither log nor checkpoint read nothing on the host (loss, probe counts,
    per-source sums, BCL's table, the non-finite flag all stay on the device)."""
    per_step, current = [], {}
    micro, end, nxt = loop_mod.Loop._micro, loop_mod.Loop._end_of_step, loop_mod.Loop._next

    def counted_next(self, step):
        with suspend():
            return nxt(self, step)

    def counted_micro(self, step, m):
        with count_host_syncs() as c:
            micro(self, step, m)
        current.update(c)

    def counted_end(self, done, lr):
        with count_host_syncs() as c:
            end(self, done, lr)
        per_step.append((done, sum(current.values()) + sum(c.values()), {**current, **c}))
        current.clear()

    monkeypatch.setattr(loop_mod.Loop, "_next", counted_next)
    monkeypatch.setattr(loop_mod.Loop, "_micro", counted_micro)
    monkeypatch.setattr(loop_mod.Loop, "_end_of_step", counted_end)
    train(_cfg(tmp_path))
    assert [s for s, _, _ in per_step] == list(range(1, 9))
    for step, n, detail in per_step:
        if step % 4:  # neither a log nor a checkpoint step
            assert n == 0, f"step {step}: {detail}"
    # a log + checkpoint step: one read of the meters, the BCL metrics, one finite check, the
    # checkpoint's device->host copies
    budget = {"tolist": 1, "__float__": 4, "__int__": 1, "masked_select": 0}
    for step, n, detail in per_step:
        if step % 4 == 0:
            for k, most in budget.items():
                assert detail.get(k, 0) <= most, f"step {step}: {detail}"


class _Spy(Recipe):
    """Records every hook call with the shapes it received."""

    needs_losses = True

    def __init__(self, flip: bool = False):
        self.flip = flip
        self.calls = []
        _Spy.last = self

    def setup(self, ctx):
        super().setup(ctx)
        self.calls.append(("setup", ctx.num_samples, ctx.epoch_length, ctx.images_per_step, ctx.total_steps))
        self.count = torch.zeros((), device=ctx.device)

    def strength(self, index):
        self.calls.append(("strength", tuple(index.shape)))
        return None

    def rewrite_views(self, views, batch):
        self.calls.append(("rewrite", len(views), tuple(views[0].shape)))
        return [v.flip(-1) for v in views] if self.flip else views

    def after_step(self, step, index, loss):
        self.calls.append(("after", step, tuple(index.shape), tuple(loss.shape)))
        self.count += 1

    def end_epoch(self, epoch):
        self.calls.append(("epoch", epoch))

    def state_dict(self):
        return {"count": self.count.clone()}

    def metrics(self):
        return {"spy/steps": self.count}


@pytest.fixture
def spy():
    register_recipe("spy")(_Spy)
    yield _Spy
    RECIPES.pop("spy")


def test_recipe_hooks_are_called_at_their_points(tmp_path, spy):
    cfg = _cfg(tmp_path, "recipes=[{name: spy}]", "augment.preset=symmetric", "train.steps=5",
               "log.every=1")
    train(cfg)
    calls = spy.last.calls
    assert calls[0] == ("setup", 64, 64, 16, 5)
    kinds = [c[0] for c in calls[1:]]
    assert kinds.count("strength") == 5 and kinds.count("rewrite") == 5 and kinds.count("after") == 5
    assert ("rewrite", 2, (16, 3, 16, 16)) in calls
    assert [c for c in calls if c[0] == "after"] == [("after", s, (16,), (16,)) for s in range(1, 6)]
    assert [c for c in calls if c[0] == "epoch"] == [("epoch", 1)]   # 64 samples = 4 steps
    # the epoch ends after step 4's after_step and before step 5's strength
    i_epoch = calls.index(("epoch", 1))
    assert calls[i_epoch - 1][:2] == ("after", 4) and calls[i_epoch + 1][0] == "strength"
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["spy/steps"] for r in recs] == [1, 2, 3, 4, 5]
    ck = torch.load(tmp_path / "run" / "checkpoints" / "step_00000005.pt", weights_only=False)
    assert ck["recipes"]["spy"]["count"] == 5


def test_rewritten_views_reach_the_method(tmp_path, spy, monkeypatch):
    seen = []
    from fastssl.methods.simclr import SimCLR
    fwd = SimCLR.forward
    monkeypatch.setattr(SimCLR, "forward", lambda self, views: seen.append(views[0].clone()) or fwd(self, views))
    train(_cfg(tmp_path, "recipes=[{name: spy}]", "augment.preset=symmetric", "train.steps=1"))
    plain = seen.pop()
    train(_cfg(tmp_path, "recipes=[{name: spy, flip: true}]", "augment.preset=symmetric", "train.steps=1"),
          force=True)
    torch.testing.assert_close(seen.pop(), plain.flip(-1))


def test_unknown_recipe_and_key_name_the_closest():
    from fastssl.recipes import build_recipes
    from loaders.errors import ConfigError
    with pytest.raises(ConfigError, match="bcl"):
        build_recipes([{"name": "bcll"}])
    with pytest.raises(ConfigError, match="beta"):
        build_recipes([{"name": "bcl", "betta": 0.9}])


def test_bcl_logs_strength_and_needs_per_sample_losses(tmp_path):
    train(_cfg(tmp_path, "train.steps=6", "log.every=1", "log.tensorboard=true"))
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # 64 samples, 16 per step: strengths are set when epoch 1 ends, after step 4
    assert all(r["bcl/strength_mean"] == 0 for r in recs[:3])
    assert 0 < recs[-1]["bcl/strength_mean"] < 1
    assert recs[-1]["bcl/strength_p10"] <= recs[-1]["bcl/strength_p50"] <= recs[-1]["bcl/strength_p90"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"histograms": 0})
    ea.Reload()
    assert "bcl/strength" in ea.Tags()["histograms"]
    from loaders.errors import ConfigError
    with pytest.raises(ConfigError, match="per-sample losses"):
        train(_cfg(tmp_path, "method={name: barlow, proj_hidden_dim: 32, proj_output_dim: 16}",
                   "train.steps=2"), force=True)
