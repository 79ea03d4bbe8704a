"""DALI backend (CPU pipelines, device_id=None): plan-driven reading of shards/arrays, the in-graph
recipe against the engine (same sampler draw), keys, device ids, errors."""
import io
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is an optional extra (pip install 'fastssl[dali]')")

from loaders.augment import Augment, ViewSpec  # noqa: E402
from loaders.augment import functional as AF  # noqa: E402
from loaders.augment.sampler import batch_key  # noqa: E402
from loaders.base import ArraySource  # noqa: E402
from loaders.batch import Batch  # noqa: E402
from loaders.convert import to_shards  # noqa: E402
from loaders.crop import CropSpec  # noqa: E402
from loaders.dali_backend import DaliLoader, local_device_id  # noqa: E402
from loaders.errors import ConfigError, SampleError  # noqa: E402
from loaders.mixture import Mixture  # noqa: E402
from loaders.shards import ShardSource  # noqa: E402
from loaders.synthetic import SyntheticSource  # noqa: E402
from loaders.torch_backend import TorchLoader  # noqa: E402


def _jpeg(a):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali")
    real = SyntheticSource(n=40, size=12, seed=0, name="real")
    ours = ShardSource(path=to_shards(real, d / "ours", samples_per_shard=16, fmt="jpg", progress=False))
    # shards written by the upstream library (webdataset.ShardWriter), indexed on first open
    import webdataset as wds
    gen = SyntheticSource(n=24, size=12, seed=1, variant="generated", name="gen")
    (d / "up").mkdir()
    with wds.ShardWriter(str(d / "up" / "up-%04d.tar"), maxcount=10, verbose=0) as w:
        for i in range(len(gen)):
            w.write({"__key__": f"s{i:05d}", "jpg": _jpeg(gen.images[i]), "cls": str(int(gen.labels()[i]))})
    up = ShardSource(path=d / "up")
    arrays = SyntheticSource(n=16, size=12, seed=2, name="arr")  # raw arrays ride the PPM path
    return {"real": real, "gen": gen, "ours": ours, "up": up, "arrays": arrays}


def test_mixture_ratios_order_and_resume_over_shards(shard_sources):
    s = shard_sources
    sources = [s["ours"], s["up"], s["arrays"]]
    weights = [0.6, 0.25, 0.15]
    mix = Mixture([len(x) for x in sources], weights=weights, budget=20480, seed=5)
    crops = [CropSpec(8), CropSpec(8, scale=(0.3, 1.0))]
    loader = DaliLoader(sources, mix, batch_size=1024, crops=crops, num_workers=2, seed=1)
    assert len(loader) == 20
    src, idx, lab = [], [], []
    for batch in loader:
        assert [tuple(v.shape) for v in batch.views] == [(1024, 3, 8, 8)] * 2
        assert batch.views[0].dtype == torch.uint8
        src.append(batch.source.numpy())
        idx.append(batch.index.numpy())
        lab.append(batch.label.numpy())
    src = np.concatenate(src)
    frac = np.bincount(src, minlength=3) / len(src)
    assert len(src) == 20480
    np.testing.assert_allclose(frac, weights, atol=0.01)
    a, j = mix.lookup(np.arange(20480))
    np.testing.assert_array_equal(np.concatenate(idx), mix.global_ids(a, j))
    labels = np.concatenate([s["real"].labels(), s["gen"].labels(), s["arrays"].labels()])
    np.testing.assert_array_equal(np.concatenate(lab), labels[np.concatenate(idx)])
    assert loader.state_dict()["plan"]["samples"] == 20480 and len(loader) == 0

    # resume mid-run: the next batch (order and pixels) is the uninterrupted run's
    small = Mixture([len(x) for x in sources], weights=weights, budget=640, seed=5)
    a = DaliLoader(sources, small, batch_size=64, crops=crops, num_workers=0, seed=1)
    it = iter(a)
    for _ in range(4):
        next(it)
    state = a.state_dict()
    expected = next(it)
    b = DaliLoader(sources, small, batch_size=64, crops=crops, num_workers=2, seed=1)
    b.load_state_dict(state)
    got = next(iter(b))
    torch.testing.assert_close(got.index, expected.index)
    for u, v in zip(got.views, expected.views):
        torch.testing.assert_close(u, v)
    # the same seed gives the same pixels; another seed other crops
    c = next(iter(DaliLoader(sources, small, batch_size=64, crops=crops, num_workers=0, seed=2)))
    first = next(iter(DaliLoader(sources, small, batch_size=64, crops=crops, num_workers=0, seed=1)))
    torch.testing.assert_close(first.index, c.index)
    assert not torch.equal(first.views[0], c.views[0])


def test_resize_and_as_is_views(shard_sources):
    arr = shard_sources["arrays"]
    mix = Mixture([len(arr)], budget=16, seed=0)
    as_is = next(iter(DaliLoader([arr], mix, batch_size=8, num_workers=0)))
    expect = torch.from_numpy(arr.images[as_is.index.numpy()]).permute(0, 3, 1, 2)
    torch.testing.assert_close(as_is.views[0], expect)  # raw arrays skip the decoder: exact
    small = next(iter(DaliLoader([arr], mix, batch_size=8, resize=6, num_workers=0)))
    assert small.views[0].shape == (8, 3, 6, 6)


# ------------------------------------------------------------------------------------------------
# the in-graph recipe applies the sampler's parameters with the engine's semantics
# ------------------------------------------------------------------------------------------------

def _graph_and_crops(aug, sources, n, **kw):
    """(DALI graph output, DALI uint8 crops of the same boxes) for the first batch of ``n``."""
    mix = Mixture([len(s) for s in sources], budget=n, seed=0)
    graph = next(iter(DaliLoader(sources, mix, batch_size=n, augment=aug, num_workers=0, **kw)))
    crops = next(iter(DaliLoader(sources, mix, batch_size=n, augment=aug, graph=False, num_workers=0, **kw)))
    return graph, crops


def _unnormalise(aug, x):
    return x * torch.tensor(aug.std).view(1, 3, 1, 1) + torch.tensor(aug.mean).view(1, 3, 1, 1)


#: graph vs engine on the same uint8 crops: float32 rounding only (normalised units; measured <= 5e-6)
PARITY_ATOL = 1e-4
#: graph vs engine cropping the full images itself: mean |difference| (normalised units, ~4 grey
#: levels; measured 0.015-0.028: DALI's vs torch's antialiased resize and the crop's uint8 rounding)
RESAMPLE_ATOL = 0.06


def test_graph_matches_engine_op_by_op(shard_sources):
    """One view per op (hue: torchvision's HSV rotation, implemented in DALI arithmetic): the graph's
    views equal the engine applied to the same crops with the same key, to float rounding."""
    base = dict(size=12, scale=(0.3, 1.0), flip=0.0)
    cases = {"flip": dict(flip=1.0), "brightness": dict(jitter_p=1.0, brightness=0.8),
             "contrast": dict(jitter_p=1.0, contrast=0.8), "saturation": dict(jitter_p=1.0, saturation=0.8),
             "hue": dict(jitter_p=1.0, hue=0.5), "gray": dict(grayscale=1.0),
             "blur": dict(blur_p=1.0, blur_sigma=(0.5, 2.0)), "solarize": dict(solarize=1.0)}
    aug = Augment([ViewSpec(**{**base, **kw}) for kw in cases.values()], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    graph, crops = _graph_and_crops(aug, [shard_sources["arrays"]], 16)
    assert graph.stage == "augmented" and crops.stage == "cropped" and graph.key == crops.key is not None
    ref = aug(crops, crop=False)
    for v, name in enumerate(cases):
        assert graph.views[v].dtype == torch.float32 and graph.views[v].shape == (16, 3, 12, 12)
        torch.testing.assert_close(graph.views[v], ref.views[v], atol=PARITY_ATOL, rtol=0, msg=name)
        plain = AF.normalize(AF.to_float(crops.views[v]), aug.mean, aug.std)
        assert (graph.views[v] - plain).abs().amax((1, 2, 3)).median() > 0.02, name  # the op ran


@pytest.mark.parametrize("preset", ["symmetric", "asymmetric"])
def test_presets_in_graph_match_engine(shard_sources, preset):
    """Whole presets on JPEG shards: equal to the engine on the same crops and key; against the
    engine cropping the full images itself (torch's resampling instead of DALI's) the mean
    difference stays within the resampling tolerance."""
    aug = Augment.from_preset(preset)
    graph, crops = _graph_and_crops(aug, [shard_sources["ours"]], 32)
    ref = aug(crops, crop=False)
    for u, v in zip(graph.views, ref.views):
        torch.testing.assert_close(u, v, atol=PARITY_ATOL, rtol=0)
    arrays = shard_sources["arrays"]
    graph, _ = _graph_and_crops(aug, [arrays], 16)
    full = torch.from_numpy(arrays.images[graph.index.numpy()]).permute(0, 3, 1, 2).contiguous()
    eng = aug(Batch(views=[full], index=graph.index, source=graph.source, label=graph.label), key=graph.key)
    for u, v in zip(graph.views, eng.views):
        diff = (u - v).abs().mean().item()
        assert diff < RESAMPLE_ATOL, diff  # DALI vs torch antialiased resize (+ uint8 rounding of the crop)


def test_jitter_runs_in_each_samples_order_and_contrast_pivots_on_the_mean(shard_sources):
    """Per-sample jitter order is honoured (order matters here: clamping), and contrast blends with
    the image's mean luma (not mid-grey): checked against the formulas on the drawn parameters."""
    spec = dict(size=12, flip=0.0, jitter_p=1.0)
    aug = Augment([ViewSpec(**spec, contrast=0.9),
                   ViewSpec(**spec, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.3)],
                  mean=(0.0,) * 3, std=(1.0,) * 3)
    graph, crops = _graph_and_crops(aug, [shard_sources["arrays"]], 32)
    p = aug.draw(len(crops), key=crops.key)
    # view 0: contrast only, around each image's mean luma
    x = AF.to_float(crops.views[0])
    f = p[0].jitter_factors[:, 1].view(-1, 1, 1, 1)
    mean = AF.rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(graph.views[0], (f * x + (1 - f) * mean).clamp(0, 1), atol=1e-5, rtol=0)
    mid_grey = (f * x + (1 - f) * 0.5).clamp(0, 1)
    assert (graph.views[0] - mid_grey).abs().amax((1, 2, 3)).max() > 0.05
    # view 1: all four ops, each sample in its drawn order vs one fixed order
    x = AF.to_float(crops.views[1])
    order, fac = p[1].jitter_order, p[1].jitter_factors
    funcs = (AF.adjust_brightness, AF.adjust_contrast, AF.adjust_saturation, AF.adjust_hue)

    def run(i, seq):
        y = x[i:i + 1]
        for k in seq:
            y = funcs[k](y, fac[i:i + 1, k])
        return y

    own = torch.cat([run(i, order[i].tolist()) for i in range(len(x))])
    fixed = torch.cat([run(i, range(4)) for i in range(len(x))])
    torch.testing.assert_close(graph.views[1], own, atol=1e-5, rtol=0)
    assert len(set(map(tuple, order.tolist()))) > 8  # many different orders in one batch
    assert (graph.views[1] - fixed).abs().amax((1, 2, 3)).max() > 0.05  # a fixed order would differ


def test_key_and_boxes_are_the_torch_backends(shard_sources):
    """Batch keys are the sampler's batch_key(seed, rank, first item); the crop boxes (uint8 mode,
    graph=False mode and the graph itself) are those the torch backend cuts."""
    arrays = [shard_sources["arrays"]]
    aug = Augment.from_preset("symmetric", size=8)
    mix = Mixture([16], budget=64, seed=3)
    kw = dict(batch_size=8, seed=7, rank=1, world_size=2, num_workers=0)
    dali = list(DaliLoader(arrays, mix, crops=aug.crop_specs, **kw))
    cut = list(DaliLoader(arrays, mix, augment=aug, graph=False, **kw))
    ref = list(TorchLoader(arrays, mix, crops=aug.crop_specs, **kw))
    assert len(dali) == len(cut) == len(ref) == 4
    for b, (d, c, t) in enumerate(zip(dali, cut, ref)):
        assert d.key == c.key == batch_key(7, 1, 8 * b)
        assert getattr(t, "key", None) in (None, d.key)
        torch.testing.assert_close(d.index, t.index)
        for u, v, w in zip(d.views, c.views, t.views):
            assert torch.equal(u, v)
            assert (u.float() - w.float()).abs().mean() < 6  # same boxes; resampling filters differ


def test_local_device_id_from_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device_id() is None  # CPU pipeline without CUDA
    src = ArraySource(np.zeros((4, 8, 8, 3), np.uint8))
    assert DaliLoader([src], Mixture([4], budget=4), batch_size=4, device_id="auto").device_id is None
    with pytest.raises(ConfigError, match="device_id"):
        DaliLoader([src], Mixture([4], budget=4), batch_size=4, device_id="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert local_device_id() == 1
    monkeypatch.setenv("LOCAL_RANK", "6")  # one visible device per process: the current one
    assert local_device_id() == 3
    monkeypatch.delenv("LOCAL_RANK")
    assert local_device_id() == 3


def test_randaugment_views_fall_back_to_the_engine_and_say_so_once(shard_sources):
    aug = Augment.from_preset("bcl", size=8)
    src = shard_sources["arrays"]
    mix = Mixture([len(src)], budget=32, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = DaliLoader([src], mix, batch_size=8, augment=aug, num_workers=0)
        batches = list(loader)
    said = [w for w in caught if "randaugment" in str(w.message)]
    assert len(said) == 1 and "view 0" in str(said[0].message)
    assert len(batches) == 4
    for b in batches:
        assert b.stage == "cropped" and b.key is not None
        assert [(v.dtype, tuple(v.shape)) for v in b.views] == [(torch.uint8, (8, 3, 8, 8))] * aug.num_views
    out = aug(batches[0], crop=False, strength=torch.full((8,), 0.5))
    assert out.stage == "augmented" and out.views[0].dtype == torch.float32
    with pytest.raises(ConfigError, match="preset name or an Augment"):
        DaliLoader([src], mix, batch_size=8, augment=3)


class Flaky(ArraySource):
    def __init__(self, images, bad):
        super().__init__(images, np.arange(len(images)) % 3, name="flaky")
        self.bad = set(bad)

    def read(self, i):
        if i in self.bad:
            raise SampleError(f"flaky.tar:{i}: truncated", path="flaky.tar", index=i)
        return super().read(i)


def test_on_error_skip_counts_and_raise_names_the_sample():
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    src = Flaky(images, bad=[2, 9])
    mix = Mixture([16], budget=16, seed=0)
    # skipped samples are replaced by the next ones of the plan: whole batches, only the plan's
    # end (16 draws, 14 readable) is short, and only without drop_last
    loader = DaliLoader([src], mix, batch_size=8, crops=[CropSpec(4)], num_workers=0, on_error="skip",
                        drop_last=False, max_skip_fraction=0.5)
    out = list(loader)
    assert loader.skipped == 2 and [len(b) for b in out] == [8, 6]
    assert [(b.stage, b.key) for b in out] == [("cropped", batch_key(0, 0, 0)), ("cropped", batch_key(0, 0, 8))]
    assert not ({2, 9} & set(torch.cat([b.index for b in out]).tolist()))
    with pytest.raises(SampleError, match=r"flaky.tar:(2|9)"):
        list(DaliLoader([src], mix, batch_size=8, crops=[CropSpec(4)], num_workers=0))


def test_missing_dali_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    src = ArraySource(np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ImportError, match=r"fastssl\[dali\]"):
        DaliLoader([src], Mixture([4], budget=4), batch_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG decode, GPU graph)")
def test_gpu_pipeline_matches_cpu(shard_sources):
    src = shard_sources["ours"]
    mix = Mixture([len(src)], budget=32, seed=0)
    crops = [CropSpec(8)]
    cpu = next(iter(DaliLoader([src], mix, batch_size=32, crops=crops, num_workers=0)))
    gpu = next(iter(DaliLoader([src], mix, batch_size=32, crops=crops, num_workers=0, device_id=0)))
    assert gpu.views[0].is_cuda
    torch.testing.assert_close(gpu.index, cpu.index)
    diff = (gpu.views[0].cpu().float() - cpu.views[0].float()).abs().mean()
    assert diff < 4, diff  # nvJPEG and GPU resampling differ from the CPU path by rounding only


def test_bench_dali_gpu_dry_run(tmp_path):
    """The prepared GPU benchmark's CPU dry run: every variant through the stream, a record, parity."""
    import json

    from benchmarks.bench_dali_gpu import VARIANTS, main
    path = main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    rec = json.loads(path.read_text())
    assert set(rec["results"]) == {*VARIANTS, "parity"}
    assert all(rec["results"][k]["median"] > 0 for k in VARIANTS)
    assert rec["results"]["dali-graph"]["where"] == "dali"
    assert rec["results"]["parity"]["max_abs_diff"] < PARITY_ATOL
