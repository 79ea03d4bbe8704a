"""The data stream (loaders/stream.py): where augmentation runs, batch stages, the one cursor,
and ``augment.where`` through ``fastssl pretrain``."""
import pickle
import warnings

import pytest
import torch

from loaders.augment import Augment
from loaders.batch import Batch
from loaders.errors import ConfigError
from loaders.stream import Stream, check_backend_options, device_augment, resolve_where

pytestmark = pytest.mark.usefixtures("one_thread")


def data_cfg(**kw):
    cfg = {"sources": [{"name": "syn", "type": "synthetic", "n": 96, "size": 24}], "batch_size": 16,
           "num_workers": 0, "seed": 3, "image_size": 16, "budget": 96}
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def aug():
    return Augment.from_preset("symmetric", size=16)


def test_where_resolution():
    assert resolve_where("auto", backend="torch", device="cpu") == ("workers", "")
    assert resolve_where("auto", backend="torch", device="cuda:0") == ("device", "")
    assert resolve_where("auto", backend="resident", device="cpu") == ("device", "")
    assert resolve_where("auto", backend="torch", device="cpu", per_sample_strength=True) == ("device", "")
    assert resolve_where("workers", backend="torch", device="cuda") == ("workers", "")
    where, note = resolve_where("workers", backend="torch", device="cpu", per_sample_strength=True)
    assert where == "device" and "per-sample augmentation strength" in note
    # the workers leave every strength-dependent op (RandAugment) to the device: no fallback
    on_dev = dict(per_sample_strength=True, strength_on_device=True)
    assert resolve_where("workers", backend="torch", device="cpu", **on_dev) == ("workers", "")
    assert resolve_where("auto", backend="torch", device="cpu", **on_dev) == ("workers", "")
    where, note = resolve_where("dali", backend="dali", device="cpu", **on_dev)
    assert where == "device" and "per-sample augmentation strength" in note
    with pytest.raises(ConfigError, match="augment.where=workers .* data.backend is 'resident'"):
        resolve_where("workers", backend="resident", device="cpu")
    with pytest.raises(ConfigError, match="augment.where=dali .* data.backend is 'torch'"):
        resolve_where("dali", backend="torch", device="cpu")
    with pytest.raises(ConfigError, match="augment.where must be one of"):
        resolve_where("gpu", backend="torch", device="cpu")


def test_hand_set_augmentation_hooks_are_refused():
    with pytest.raises(ConfigError, match=r"backend_options.worker_augment: set augment.where=workers"):
        check_backend_options(data_cfg(backend_options={"worker_augment": "symmetric"}))
    with pytest.raises(ConfigError, match=r"backend_options.augment: set augment.where=dali"):
        check_backend_options(data_cfg(backend="dali", backend_options={"augment": "symmetric"}))
    check_backend_options(data_cfg(backend_options={"prefetch_factor": 2}))


def test_stages_and_no_second_pass(aug):
    dev = Stream(data_cfg(), aug, where="device")
    assert dev.where == "device" and dev.crops_in_decode and len(dev) == 6
    first = next(iter(dev))
    assert first.stage == "augmented" and first.key is not None
    assert all(v.dtype == torch.float32 and v.shape == (16, 3, 16, 16) for v in first.views)
    with pytest.raises(ValueError, match="already 'augmented'"):
        device_augment(aug, first, key=0)
    u8 = first.with_views([torch.zeros(16, 3, 16, 16, dtype=torch.uint8)] * 2, stage="augmented-uint8")
    with pytest.raises(ValueError, match="augmented"):
        device_augment(aug, u8, key=0)
    with pytest.raises(ValueError, match="stage"):
        Batch(views=first.views, index=first.index, source=first.source, label=first.label, stage="done")
    # a backend that left the default stage is labelled by what the stream asked of it
    raw = Batch(views=[torch.zeros(2, 3, 16, 16, dtype=torch.uint8)], index=torch.arange(2),
                source=torch.zeros(2, dtype=torch.long), label=torch.zeros(2, dtype=torch.long))
    assert dev.stage_of(raw) == "cropped"
    wk = Stream(data_cfg(), aug, where="workers")
    assert wk.stage_of(raw) == "augmented-uint8" and wk.hook is not None
    # the accelerator-side normalise of uint8 worker output is the hook's own
    img = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(wk._normalize(img), wk.hook.finish([img])[0], rtol=1e-6, atol=1e-6)
    # ... and of a float [0, 1] view (after ops left to the device)
    torch.testing.assert_close(wk._normalize(img.float() / 255), wk.hook.finish([img])[0], rtol=1e-5, atol=1e-5)


def test_workers_and_device_give_the_same_views_for_the_same_key(aug):
    """float precision in the workers: the engine's result, rounded once to uint8."""
    dev = list(Stream(data_cfg(), aug, where="device"))
    wk = list(Stream(data_cfg(), aug, where="workers", worker_precision="float"))
    assert len(dev) == len(wk) == 6
    scale = max(aug.std) * 255.0
    for a, b in zip(dev, wk):
        assert a.key == b.key and torch.equal(a.index, b.index) and b.stage == "augmented"
        for va, vb in zip(a.views, b.views):
            diff = (va - vb).abs() * scale  # in levels of 255
            assert diff.mean() < 0.3 and diff.max() < 1.0


def test_state_dict_resumes_exactly(aug):
    full = [(b.index.clone(), [v.clone() for v in b.views]) for b in Stream(data_cfg(), aug, where="workers")]
    s = Stream(data_cfg(), aug, where="workers")
    it = iter(s)
    for _ in range(2):
        next(it)
    state = s.state_dict()
    del it
    resumed = Stream(data_cfg(), aug, where="workers")
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for (idx, views), b in zip(full[2:], rest):
        assert torch.equal(idx, b.index)
        for va, vb in zip(views, b.views):
            torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_per_sample_strength_stays_in_the_workers_when_randaugment_is_left_to_the_device(aug):
    notes = []
    s = Stream(data_cfg(), aug, where="workers", strength_fn=lambda b: None, note=notes.append)
    assert s.where == "workers" and s.hook is not None and notes == []   # no strength-dependent op


def _levels(a, b, aug):
    return (a - b).abs() * (max(aug.std) * 255.0)


def _workers_and_device(aug, strength_fn=None):
    dev = list(Stream(data_cfg(), aug, where="device", strength_fn=strength_fn))
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = Stream(data_cfg(), aug, where="workers", worker_precision="float", strength_fn=strength_fn,
                   note=notes.append)
        said = [str(w.message) for w in caught if "WorkerAugment" in str(w.message)]
        wk = list(s)
    # said once, when built; not again per batch, nor by the workers (they get the hook with the flag set)
    assert len([w for w in caught if "WorkerAugment" in str(w.message)]) == len(said)
    assert pickle.loads(pickle.dumps(s.hook))._warned
    assert s.where == "workers" and notes == [] and len(dev) == len(wk) == 6
    for a, b in zip(dev, wk):
        assert a.key == b.key and torch.equal(a.index, b.index) and b.stage == "augmented"
    return s, dev, wk, said


def test_solarize_runs_on_the_device_for_that_view_only():
    """asymmetric: view 1 solarizes (the OpenCV executor lacks it): the workers do the rest, the
    stream solarizes on the device with the engine's draw; equal to where=device on the same keys
    (float worker precision: one rounding before the threshold, so a pixel next to 128 may flip
    to its mirror image, 1 level away)."""
    aug = Augment.from_preset("asymmetric", size=16)
    s, dev, wk, said = _workers_and_device(aug)
    assert s.hook.pending_ops() == ((), ("solarize",))
    assert len(said) == 1 and "view 1: solarize" in said[0] and "run on the device" in said[0]
    for a, b in zip(dev, wk):
        for va, vb in zip(a.views, b.views):
            diff = _levels(va, vb, aug)
            assert diff.mean() < 0.3 and diff.max() < 1.6


def test_randaugment_with_per_sample_strength_runs_on_the_device():
    """bcl: RandAugment (k=1) driven by a per-sample strength: where=workers stays in the workers,
    RandAugment and its strength run on the device; equal to where=device. RandAugment's own
    thresholds (posterize, solarize, equalize) turn the workers' one rounding into a jump on a few
    pixels, so the bound is on the mean and the share of pixels off by > 1 level (without the
    strength the mean is 10-30 levels and ~20-50% of the pixels are off)."""
    aug = Augment.from_preset("bcl", size=16)
    s, dev, wk, said = _workers_and_device(aug, strength_fn=lambda b: (b.index % 5).float() / 4)
    assert s.hook.pending_ops() == (("randaugment",), ("randaugment",))
    assert len(said) == 1 and "randaugment" in said[0] and "run on the device" in said[0]
    for a, b in zip(dev, wk):
        for va, vb in zip(a.views, b.views):
            diff = _levels(va, vb, aug)
            assert diff.mean() < 0.35 and (diff > 1).float().mean() < 0.05


def _tiny(tmp_path, *overrides):
    from fastssl.config import load_config
    base = {
        "name": "tiny-stream",
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 48, "size": 16}],
                 "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 3, "checkpoint_every": 2, "probe": False},
        "eval": {"enabled": False},
        "log": {"out": str(tmp_path / "run"), "every": 1, "progress": False, "tensorboard": False,
                "plot": False},
    }
    return load_config(None, list(overrides), base=base)


def test_pretrain_with_augment_where_workers(tmp_path):
    from fastssl.build import build_training
    from fastssl.checkpoint import load_checkpoint
    from fastssl.trainer import train

    cfg = _tiny(tmp_path, "augment.where=workers")
    res = train(cfg)
    assert res.step == 3
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000003.pt")
    assert ck["loader"]["plan"]["samples"] == 48
    assert build_training(cfg).stream.where == "workers"
    with pytest.raises(ConfigError, match=r"backend_options.worker_augment: set augment.where=workers"):
        build_training(_tiny(tmp_path, "data.backend_options={worker_augment: symmetric}"))
    with pytest.raises(ConfigError, match="'augment.where': expected auto | device | workers | dali"):
        _tiny(tmp_path, "augment.where=gpu")


def test_bench_measures_places_side_by_side_through_the_stream(tmp_path):
    """bench e2e --where workers,device and bench loader's worker-augment path both iterate the
    stream (final float views)."""
    import json

    from benchmarks.bench_e2e import run
    from benchmarks.bench_loader import through_stream
    from benchmarks.data import make_bench_data

    data = make_bench_data("cifar", n=32, root=tmp_path / "bench", samples_per_shard=16, progress=False)
    path = run(width=4, n=32, batch_size=8, num_workers=1, repeats=1, window_s=0.05, warmup=1, device="cpu",
               cache=tmp_path / "bench", out_dir=tmp_path, command="fastssl bench e2e --where workers,device",
               progress=False, wheres=["workers", "device"])
    rec = json.loads(path.read_text())
    r = rec["results"]
    assert r["loader-only/torch/shards"]["values"] and r["loader-only/torch/shards@device"]["values"]
    assert r["real/torch/shards@device"]["values"]
    assert rec["config"]["where"] == {"torch/shards": "workers", "torch/shards@device": "device"}
    aug = Augment.from_preset("symmetric", size=data.out_size)
    batch, n = next(through_stream(data.source_config("shards"), where="workers", augment=aug, batch_size=8,
                                   num_workers=0, image_size=data.out_size, options={"decoder": "cv2"}))
    assert n == 8 and batch.stage == "augmented" and batch.views[0].dtype == torch.float32


def test_resident_batches_carry_their_key_and_are_augmented_once(aug):
    """The resident backend hands whole images (stage raw) with a key; the stream crops and
    augments them on the device with exactly that key."""
    from loaders.pipeline import build_loader

    cfg = data_cfg(backend="resident", crop_in_decode=False, backend_options={"progress": False})
    s = Stream(cfg, aug, where="auto")
    assert s.where == "device" and not s.crops_in_decode
    got = next(iter(s))
    raw = next(iter(build_loader(cfg)))
    assert raw.stage == "raw" and raw.key == got.key and raw.key is not None
    ref = device_augment(aug, raw, key=raw.key)
    for a, b in zip(got.views, ref.views):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
