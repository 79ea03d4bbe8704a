"""A few training steps of every method on CUDA through the real trainer (bf16 autocast,
channels-last), and the loop's steps without a host sync (CUDA's sync debug mode raises on
any synchronising call between log steps)."""
import pytest
import torch
from tiny_vae import write_tiny_vae

from fastssl.config import load_config
from fastssl.methods import METHODS
from fastssl.metrics_log import read_metrics
from fastssl.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = {
    "simclr": {"proj_hidden_dim": 64, "proj_output_dim": 32},
    "mocov2": {"proj_hidden_dim": 64, "proj_output_dim": 32, "queue_size": 256},
    "byol": {"proj_hidden_dim": 64, "proj_output_dim": 32, "pred_hidden_dim": 64},
    "barlow": {"proj_hidden_dim": 64, "proj_output_dim": 32},
    "vicreg": {"proj_hidden_dim": 64, "proj_output_dim": 32},
    "mocov3": {"proj_hidden_dim": 64, "proj_output_dim": 32, "pred_hidden_dim": 64},
    "dino": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32},
    "swav": {"proj_hidden_dim": 64, "proj_output_dim": 32, "n_prototypes": 32},
    "simsiam": {"proj_hidden_dim": 64, "proj_output_dim": 32, "pred_hidden_dim": 16},
    "sdclr": {"proj_hidden_dim": 64, "proj_output_dim": 32},
    "vae": {"channels": 16},                                  # 32 px, latent: the backbone's 128 dims
    "idaa": {"proj_hidden_dim": 64, "proj_output_dim": 32},   # + vae_path: a tiny 32 px VAE
    "imle": {"gen_width": 16, "code_dim": 16, "num_samples": 4},   # generator bottleneck: the backbone's 128
}
MULTI_CROP = {"dino": "dino_multicrop", "swav": "swav_multicrop", "vae": "vae", "imle": "imle"}  # vae, imle: 1 view


def _cfg(tmp_path, name, *overrides):
    vae = {"vae_path": str(write_tiny_vae(tmp_path / "vae.pt", image_size=32))} if name == "idaa" else {}
    base = {
        "name": f"cuda-{name}",
        "data": {"sources": [{"name": "real", "type": "synthetic", "n": 256, "size": 32},
                             {"name": "gen", "type": "synthetic", "n": 256, "size": 32, "variant": "generated"}],
                 "batch_size": 64, "num_workers": 2, "seed": 0},
        "augment": {"preset": MULTI_CROP.get(name, "symmetric"), "size": 32},
        "method": {"name": name, **SMALL[name], **vae},
        "model": {"width": 16},
        "optim": {"warmup_steps": 2},
        "train": {"steps": 6, "mixed_precision": "bf16", "checkpoint_every": 3},
        "eval": {"enabled": False},
        "log": {"out": str(tmp_path / name), "every": 3, "progress": False, "tensorboard": False, "plot": False},
    }
    return load_config(None, list(overrides), base=base)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_method_trains_on_cuda(tmp_path, name):
    assert set(SMALL) == set(METHODS)
    res = train(_cfg(tmp_path, name))
    assert next(res.method.parameters()).is_cuda
    conv = next(m for m in res.method.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    recs = read_metrics(tmp_path / name / "metrics.jsonl")
    assert [r["step"] for r in recs] == [3, 6]
    assert all(isinstance(r["loss"], float) for r in recs)


def test_steps_between_log_steps_do_not_sync(tmp_path, monkeypatch):
    """CUDA's sync debug mode turns any synchronising call into an error, inside the model step
    and bookkeeping of steps that neither log nor checkpoint (the data path is excluded: its
    host-to-device copy of the next batch is asynchronous but the loader's own work is not
    the loop's)."""
    import fastssl.loop as loop_mod

    micro, end = loop_mod.Loop._micro, loop_mod.Loop._end_of_step
    quiet = {"on": False}

    def checked_micro(self, step, m):
        nxt = self._next
        views, batch = nxt(step)
        self._next = lambda s: (views, batch)
        try:
            if quiet["on"]:
                torch.cuda.set_sync_debug_mode("error")
            micro(self, step, m)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            del self._next

    def checked_end(self, done, lr):
        quiet["on"] = (done + 1) % 5 != 0 and done + 1 < 10   # the next step neither logs nor checkpoints
        end(self, done, lr)

    monkeypatch.setattr(loop_mod.Loop, "_micro", checked_micro)
    monkeypatch.setattr(loop_mod.Loop, "_end_of_step", checked_end)
    cfg = _cfg(tmp_path, "simclr", "train.steps=10", "train.checkpoint_every=5", "log.every=5",
               "recipes=[{name: bcl}]", "augment.preset=bcl")
    train(cfg)
