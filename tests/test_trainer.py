"""Short CPU training runs: the run directory's files, the probe's label -1 handling in the
loop, BCL's momentum-loss table, and the stop on a non-finite loss."""
import json
import subprocess
import sys

import pytest
import torch

from fastssl.checkpoint import load_checkpoint
from fastssl.config import load_config
from fastssl.metrics_log import read_metrics
from fastssl.recipes.bcl import BCLTable
from fastssl.trainer import NonFiniteLoss, train
from loaders.errors import ConfigError


def tiny(tmp_path, *overrides, sources=None):
    """A run of a few seconds: 16 px synthetic images, ResNet-18 at width 4."""
    base = {
        "name": "tiny",
        "data": {"sources": sources or [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}],
                 "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 4, "checkpoint_every": 2},
        "eval": {"train": {"type": "synthetic", "n": 40, "size": 16},
                 "test": {"type": "synthetic", "n": 20, "size": 16, "split": "test"},
                 "knn_k": 10, "linear_epochs": 2},
        "log": {"out": str(tmp_path / "run"), "every": 1, "progress": False},
    }
    return load_config(None, list(overrides), base=base)


def test_short_run_writes_everything(tmp_path):
    res = train(tiny(tmp_path))
    run = tmp_path / "run"
    assert res.run_dir == run and res.step == 4
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert {"loss", "lr", "images_per_sec", "probe_acc"} <= set(r)
        assert r["images_seen"] == 16 * r["step"]
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("step,")
    assert (run / "metrics.png").stat().st_size > 1000
    assert any((run / "tb").iterdir())
    assert (run / "config.yaml").exists()
    ck = load_checkpoint(run / "checkpoints" / "step_00000004.pt")
    assert ck["step"] == 4 and {"model", "optimizer", "probe_optimizer", "loader", "rng", "config"} <= set(ck)
    assert ck["loader"]["plan"] is not None
    assert (run / "checkpoints" / "step_00000002.pt").exists()
    # backbone.pt is a plain state_dict that loads into a freshly built backbone
    from fastssl.models import build_backbone
    sd = torch.load(run / "backbone.pt", weights_only=True)
    fresh, _ = build_backbone("resnet18", cifar_stem=True, width=4)
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(sd, {k: v for k, v in res.method.backbone.state_dict().items()})
    ev = json.loads((run / "eval.json").read_text())
    assert 0 <= ev["eval/knn_top1"] <= 1 and ev["eval/chance"] == pytest.approx(0.1)
    assert "eval/knn_top1_random_init" in ev and "eval/linear_top1" in ev


def test_generated_source_is_ignored_by_probe_and_logged_per_source(tmp_path):
    sources = [{"name": "real", "type": "synthetic", "n": 32, "size": 16},
               {"name": "gen", "type": "synthetic", "n": 32, "size": 16, "variant": "generated"}]
    cfg = tiny(tmp_path, "train.steps=3", "eval.enabled=false", "log.indices=true", sources=sources)
    train(cfg)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all("loss/real" in r and "loss/gen" in r for r in recs)
    # indices of generated samples are >= 32 (mixture offsets); the probe saw only real ones
    idx = [json.loads(line) for line in (tmp_path / "run" / "indices_rank0.jsonl").read_text().splitlines()]
    assert len(idx) == 3 and all(len(r["index"]) == 16 for r in idx)
    assert any(i >= 32 for r in idx for i in r["index"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    # SGD at lr 1e30 from step 0: step 1 trains on finite values and is checkpointed, then the
    # weights overflow and the next loss is NaN/inf
    cfg = tiny(tmp_path, "optim.name=sgd", "optim.lr=1e30", "optim.warmup_steps=0",
               "train.checkpoint_every=1", "train.steps=6", "eval.enabled=false")
    with pytest.raises(NonFiniteLoss) as e:
        train(cfg)
    msg = str(e.value)
    assert "non-finite loss" in msg and "at step 2" in msg
    good = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    assert str(good) in msg
    ck = load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in ck["model"].values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())
    assert not (tmp_path / "run" / "checkpoints" / "step_00000002.pt").exists()
    assert not (tmp_path / "run" / "backbone.pt").exists()


def test_cli_non_finite_exit_code(tmp_path, capsys):
    from fastssl.cli import EXIT_DIVERGED, main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("defaults: []\n")
    import yaml

    from fastssl.config import to_dict
    d = to_dict(tiny(tmp_path, "optim.name=sgd", "optim.lr=1e30", "optim.warmup_steps=0",
                     "train.checkpoint_every=1", "train.steps=6", "eval.enabled=false"))
    cfg.write_text(yaml.safe_dump(d))
    assert main(["pretrain", str(cfg)]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step_00000001.pt" in err


def test_bcl_table_follows_reference_formula():
    t = BCLTable(5, beta=0.97)
    t.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))   # first sight: m = l
    torch.testing.assert_close(t.m[:3], torch.tensor([1.0, 2.0, 3.0]))
    t.update(torch.tensor([0, 3]), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(t.m[:4], torch.tensor([0.97 * 1 + 0.03 * 2, 2.0, 3.0, 4.0]))
    assert torch.all(t.strength(torch.arange(5)) == 0)                 # w starts at 0
    t.end_epoch()
    m = t.m[:4]
    w = (m - m.mean()) / m.std()
    w = (w / w.abs().max()) / 2 + 0.5
    torch.testing.assert_close(t.w[:4], w)
    assert t.w[4] == 0 and t.w.min() >= 0 and t.w.max() <= 1
    state = t.state_dict()
    t2 = BCLTable(5)
    t2.load_state_dict(state)
    assert torch.equal(t2.m, t.m) and torch.equal(t2.w, t.w)


def test_bcl_run_updates_table(tmp_path):
    # 64 samples, 16 per step: an epoch every 4 steps; strengths are set after step 4
    cfg = tiny(tmp_path, "train.steps=5", "recipes=[{name: bcl, beta: 0.97}]", "eval.enabled=false",
               "augment.preset=bcl", "augment.size=16")
    train(cfg)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000005.pt")
    assert ck["recipes"]["bcl"]["seen"].all()
    w = ck["recipes"]["bcl"]["w"]
    assert w.min() >= 0 and w.max() <= 1 and w.std() > 0


def test_used_run_directory_needs_resume_or_force(tmp_path):
    train(tiny(tmp_path, "train.steps=4", "eval.enabled=false"))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run.*--resume auto.*--force"):
        train(tiny(tmp_path, "train.steps=2", "eval.enabled=false"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before          # nothing touched
    assert (tmp_path / "run" / "checkpoints" / "step_00000004.pt").exists()
    train(tiny(tmp_path, "train.steps=2", "eval.enabled=false"), force=True)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000002.pt"]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "run" / "backbone.json").read_text().count('"step": 4')


def test_cli_force_flag(tmp_path, capsys):
    from fastssl.cli import EXIT_USAGE, main
    cfg = _write(tmp_path, tiny(tmp_path, "train.steps=1", "eval.enabled=false"))
    assert main(["pretrain", str(cfg)]) == 0
    assert main(["pretrain", str(cfg)]) == EXIT_USAGE
    assert "already holds a run" in capsys.readouterr().err
    assert main(["pretrain", str(cfg), "--force"]) == 0


def _write(tmp_path, cfg):
    import yaml

    from fastssl.config import to_dict
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def test_warmup_longer_than_the_run_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"warm-up \(5 steps, optim.warmup_steps\).*run \(4 steps\)"):
        train(tiny(tmp_path, "optim.warmup_steps=5"))
    # the method's published default (1000 steps) against a short run names the key to set
    with pytest.raises(ConfigError, match=r"1000 steps, the default of method 'simclr'; set optim.warmup_steps"):
        train(tiny(tmp_path, "optim.warmup_steps=null"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, needle", [
    ("data.batch_size=8", "data.batch_size (checkpoint 16, now 8)"),
    ("data.sources.0.n=48", "data.sources[0].n (checkpoint 64, now 48)"),
    ("method.temperature=0.5", "method.temperature"),
    ("method={name: byol, proj_hidden_dim: 32, proj_output_dim: 16, pred_hidden_dim: 8}", "method.name"),
])
def test_resume_with_other_settings_is_refused(tmp_path, change, needle):
    train(tiny(tmp_path, "train.steps=4", "train.stop_after=2", "eval.enabled=false"))
    with pytest.raises(ConfigError, match="cannot resume from") as e:
        train(tiny(tmp_path, "train.steps=4", "eval.enabled=false", "train.resume=auto", change))
    assert needle in str(e.value)


def test_keep_checkpoints(tmp_path):
    train(tiny(tmp_path, "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=3",
               "eval.enabled=false"))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000003.pt", "step_00000004.pt", "step_00000005.pt"]
    train(tiny(tmp_path, "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=0",
               "eval.enabled=false"), force=True)
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*.pt"))) == 5


def test_tensorboard_keeps_every_point_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(tiny(tmp_path, "train.steps=6", "train.stop_after=5", "eval.enabled=false"))   # checkpoint at 4
    ck = tmp_path / "run" / "checkpoints"
    (ck / "step_00000005.pt").unlink(missing_ok=True)   # as if killed after logging step 5
    train(tiny(tmp_path, "train.steps=6", "eval.enabled=false", "train.resume=auto"))
    ea = EventAccumulator(str(tmp_path / "run" / "tb"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("loss")]
    assert steps == [1, 2, 3, 4, 5, 6], steps


def test_method_logs_learning_rate_and_per_source_loss_for_non_simclr(tmp_path):
    sources = [{"name": "real", "type": "synthetic", "n": 32, "size": 16},
               {"name": "gen", "type": "synthetic", "n": 32, "size": 16, "variant": "generated"}]
    cfg = tiny(tmp_path, "train.steps=2", "eval.enabled=false",
               "method={name: byol, proj_hidden_dim: 32, proj_output_dim: 16, pred_hidden_dim: 8}",
               sources=sources)
    train(cfg)
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert {"loss/real", "loss/gen", "lr", "method/tau", "method/byol"} <= set(rec)


def test_method_without_per_sample_loss_says_so_once(tmp_path, capsys):
    sources = [{"name": "real", "type": "synthetic", "n": 32, "size": 16},
               {"name": "gen", "type": "synthetic", "n": 32, "size": 16, "variant": "generated"}]
    train(tiny(tmp_path, "train.steps=3", "eval.enabled=false",
               "method={name: vicreg, proj_hidden_dim: 32, proj_output_dim: 16}", sources=sources))
    err = capsys.readouterr().err
    assert err.count("per-source loss unavailable for method 'vicreg'") == 1
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert "loss/real" not in rec and {"method/invariance", "method/variance", "method/covariance"} <= set(rec)


def test_labels_outside_num_classes_are_refused_at_setup(tmp_path):
    with pytest.raises(ConfigError, match="label 9, outside \\[-1, 5\\).*train.num_classes"):
        train(tiny(tmp_path, "train.num_classes=5"))
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_follows_a_resume(tmp_path):
    pytest.importorskip("wandb")
    train(tiny(tmp_path, "train.steps=4", "train.stop_after=2", "eval.enabled=false", "log.wandb=offline"))
    run_id = (tmp_path / "run" / "wandb" / "run_id").read_text().strip()
    train(tiny(tmp_path, "train.steps=4", "eval.enabled=false", "log.wandb=offline", "train.resume=auto"))
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and all(p.name.endswith(run_id) for p in runs)
    assert (tmp_path / "run" / "wandb" / "run_id").read_text().strip() == run_id
    assert any(p.suffix == ".wandb" for r in runs for p in r.iterdir())


def test_channels_last_and_compiled_backbone_train_and_export_plain_keys(tmp_path):
    res = train(tiny(tmp_path, "train.steps=2", "eval.enabled=false", "train.channels_last=true",
                     "train.compile=true", "train.compile_backend=aot_eager", "model.width=8"))
    conv = res.method.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    sd = torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in sd)           # compile in place: the same keys
    from fastssl.models import build_backbone
    fresh, _ = build_backbone("resnet18", cifar_stem=True, width=8)
    fresh.load_state_dict(sd, strict=True)


def test_channels_last_stays_off_on_cpu_for_a_backbone_torch_gets_wrong(tmp_path, capsys):
    """Width 4: layer2's strided 1x1 shortcut has 4 input channels, whose channels-last CPU weight
    gradient torch computes wrongly (and corrupts the heap with); the run stays contiguous."""
    res = train(tiny(tmp_path, "train.steps=2", "eval.enabled=false", "train.channels_last=true"))
    assert "train.channels_last kept off" in capsys.readouterr().err
    assert res.method.backbone.conv1.weight.is_contiguous()


def test_the_torch_fault_the_channels_last_guard_avoids_is_narrow():
    """The guard's rule against torch itself, in a child process (the faulty kernel can corrupt
    the heap): with >= 8 input channels the channels-last weight gradient equals the contiguous
    one, so wider backbones keep channels-last on CPU."""
    code = (
        "import torch\n"
        "cl = torch.channels_last\n"
        "for cin in (8, 16, 64):\n"
        "    g = torch.randn(16, 16, 8, 8); x = torch.randn(16, cin, 16, 16); w = torch.randn(16, cin, 1, 1)\n"
        "    args = ([0], [2, 2], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])\n"
        "    a = torch.ops.aten.convolution_backward(g.contiguous(memory_format=cl), x.contiguous(memory_format=cl),"
        " w.contiguous(memory_format=cl), *args)[1]\n"
        "    b = torch.ops.aten.convolution_backward(g, x, w, *args)[1]\n"
        "    assert torch.allclose(a, b, rtol=1e-4, atol=1e-3), cin\n"
        "print('same')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "same" in r.stdout, r.stderr[-500:]


def test_resident_backend_trains_on_the_same_samples_as_torch(tmp_path):
    """data.backend=resident through the trainer: whole images from the device tensor, cropped by
    the engine; the same plan, so the same sample ids per step as the torch backend."""
    runs = {}
    for backend in ("torch", "resident"):
        out = tmp_path / backend
        train(tiny(tmp_path, "train.steps=3", "eval.enabled=false", "log.indices=true", f"data.backend={backend}",
                   f"log.out={out}"))
        runs[backend] = [json.loads(x)["index"] for x in (out / "indices_rank0.jsonl").read_text().splitlines()]
    assert runs["torch"] == runs["resident"] and len(runs["resident"]) == 3
