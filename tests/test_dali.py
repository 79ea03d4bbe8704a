"""DALI backend (CPU pipelines, device_id=None): plan-driven reading of shards/arrays, ops, errors."""
import io
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is an optional extra (pip install 'fastssl[dali]')")

from loaders.base import ArraySource  # noqa: E402
from loaders.convert import to_shards  # noqa: E402
from loaders.crop import CropSpec  # noqa: E402
from loaders.dali_backend import DaliLoader, ViewRecipe, recipes_from_augment  # noqa: E402
from loaders.errors import ConfigError, SampleError  # noqa: E402
from loaders.mixture import Mixture  # noqa: E402
from loaders.shards import ShardSource  # noqa: E402
from loaders.synthetic import SyntheticSource  # noqa: E402


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


def _pair(recipe, src, n=32):
    """(uint8 crops, recipe output un-normalised to 0..255) for the same crops."""
    mix = Mixture([len(src)], budget=n, seed=0)
    plain = next(iter(DaliLoader([src], mix, batch_size=n, crops=[recipe.crop], num_workers=0)))
    aug = next(iter(DaliLoader([src], mix, batch_size=n, augment=[recipe], num_workers=0)))
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(recipe.std).view(1, 3, 1, 1) * 255
    return plain.views[0].float(), aug.views[0] * std + mean


def test_graph_ops_solarize_gray_flip(shard_sources):
    src = shard_sources["arrays"]
    crop = CropSpec(12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    base = dict(crop=crop, flip=0.0, jitter=0.0, gray=0.0, blur=0.0, solarize=0.0)
    x, y = _pair(ViewRecipe(**{**base, "solarize": 1.0}), src)
    torch.testing.assert_close(y, torch.where(x >= 128, 255 - x, x), atol=1e-3, rtol=0)
    x, y = _pair(ViewRecipe(**{**base, "gray": 1.0}), src)
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert (y - luma).abs().max() <= 1.5  # one grey level of rounding
    x, y = _pair(ViewRecipe(**{**base, "flip": 1.0}), src)
    torch.testing.assert_close(y, x.flip(-1), atol=1e-3, rtol=0)
    x, y = _pair(ViewRecipe(**{**base, "blur": 1.0, "blur_sigma": (1.5, 1.5)}), src)
    assert y.std() < x.std() and (y - x).abs().mean() > 1  # blurred everywhere
    x, y = _pair(ViewRecipe(**{**base, "jitter": 1.0, "brightness": 0.5}), src)
    ratio = (y.mean((1, 2, 3)) / x.mean((1, 2, 3)))
    assert ratio.min() > 0.45 and ratio.max() < 1.55 and ratio.std() > 0.05  # per-sample factors


def test_presets_map_to_recipes_and_randaugment_is_refused():
    sym = recipes_from_augment("symmetric")
    assert len(sym) == 2 and sym[0].crop.size == 32 and sym[0].jitter == 0.8 and sym[0].brightness == 0.8
    assert sym[0].blur == 0.5 and sym[0].blur_kernel == 5 and sym[0].mean == (0.4914, 0.4822, 0.4465)
    asym = recipes_from_augment("asymmetric")
    assert [r.solarize for r in asym] == [0.0, 0.2]
    with pytest.raises(ConfigError, match="RandAugment"):
        recipes_from_augment("bcl")


def test_full_recipe_mode_float_views(shard_sources):
    src = shard_sources["ours"]
    mix = Mixture([len(src)], budget=64, seed=0)
    batch = next(iter(DaliLoader([src], mix, batch_size=64, augment="asymmetric", num_workers=2)))
    assert len(batch.views) == 2
    for v in batch.views:
        assert v.dtype == torch.float32 and v.shape == (64, 3, 32, 32)
        assert -3 < float(v.mean()) < 3 and 0.3 < float(v.std()) < 3


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
