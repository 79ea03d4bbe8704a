"""torch vs DALI vs FFCV vs resident on the same mixture: same order, same crop boxes (the
resident backend does not crop: same order, full images), same view statistics."""
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
pytest.importorskip("ffcv", reason="FFCV is an optional extra")

from loaders.augment import Augment  # noqa: E402
from loaders.base import ArraySource  # noqa: E402
from loaders.beton import BetonSource, to_beton  # noqa: E402
from loaders.dali_backend import DaliLoader  # noqa: E402
from loaders.ffcv_backend import FFCVLoader  # noqa: E402
from loaders.mixture import Mixture  # noqa: E402
from loaders.resident_backend import ResidentLoader  # noqa: E402
from loaders.synthetic import SyntheticSource  # noqa: E402
from loaders.torch_backend import TorchLoader  # noqa: E402

N = 1024  # samples compared per backend


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    real = SyntheticSource(n=96, size=24, seed=0, name="real")
    gen = SyntheticSource(n=64, size=24, seed=1, variant="generated", name="gen")
    arrays = [ArraySource(s.images, s.labels(), name=s.name) for s in (real, gen)]
    betons = [BetonSource(to_beton(s, d / f"{s.name}.beton", fmt="raw", num_workers=1, progress=False))
              for s in (real, gen)]
    mix = Mixture([96, 64], dups=[2, 1], budget=N, seed=11)
    return {"arrays": arrays, "betons": betons, "mix": mix}


def _run(loader):
    return list(loader)


def _loaders(data, crops):
    kw = dict(batch_size=256, crops=crops, seed=4)
    return {
        "torch": TorchLoader(data["arrays"], data["mix"], num_workers=0, **kw),
        "dali": DaliLoader(data["arrays"], data["mix"], num_workers=0, **kw),
        "ffcv": FFCVLoader(data["betons"], data["mix"], num_workers=2, **kw),
    }


def test_same_order_and_same_crops(data):
    """Every backend reads the plan's order and cuts the same boxes (drawn from (seed, rank,
    position)): pixels differ only by each library's resampling filter."""
    crops = Augment.from_preset("symmetric_adainf").crop_specs
    out = {k: _run(v) for k, v in _loaders(data, crops).items()}
    ref = out["torch"]
    for name in ("dali", "ffcv"):
        assert len(out[name]) == len(ref) == N // 256
        for a, b in zip(out[name], ref):
            torch.testing.assert_close(a.index, b.index)
            torch.testing.assert_close(a.source, b.source)
            torch.testing.assert_close(a.label, b.label)
            for u, v in zip(a.views, b.views):
                diff = (u.float() - v.float()).abs().mean().item()
                assert diff < 6, (name, diff)  # a misplaced box gives tens of grey levels
    # crop-area statistics: the fraction of near-background pixels tracks the crop area; it
    # must agree between backends (same boxes), and the per-view means must differ from a
    # resize of the whole image (the boxes are really random-resized crops)
    for name in ("dali", "ffcv"):
        for v in range(2):
            x = torch.cat([b.views[v] for b in out[name]]).float()
            y = torch.cat([b.views[v] for b in ref]).float()
            torch.testing.assert_close(x.mean((0, 2, 3)), y.mean((0, 2, 3)), atol=2.0, rtol=0)
            torch.testing.assert_close(x.std((0, 2, 3)), y.std((0, 2, 3)), atol=2.0, rtol=0)


def test_resident_same_order_and_full_images(data):
    """The resident backend reads the same plan: same index/source/label as the cropping
    backends, and its one view is the source's full image."""
    crops = Augment.from_preset("symmetric_adainf").crop_specs
    ref = _run(_loaders(data, crops)["torch"])
    got = _run(ResidentLoader(data["arrays"], data["mix"], batch_size=256, seed=4, progress=False))
    assert len(got) == len(ref) == N // 256
    images = torch.cat([torch.from_numpy(a.images) for a in data["arrays"]]).permute(0, 3, 1, 2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.index, b.index)
        torch.testing.assert_close(a.source, b.source)
        torch.testing.assert_close(a.label, b.label)
        assert len(a.views) == 1 and torch.equal(a.views[0], images[a.index])


@pytest.mark.parametrize("preset", ["symmetric", "asymmetric_adainf"])
def test_full_recipe_distribution_agrees(data, preset):
    """torch + engine, FFCV + engine, resident + engine (cropping on the device) and the DALI
    graph: per-channel mean/std of the float views agree within tolerance; and since every place
    draws its parameters from the batch key (one sampler), the DALI graph's views equal the torch
    backend's crops + the engine pixel by pixel, up to resampling (mean |diff| < 0.06 in
    normalised units)."""
    aug = Augment.from_preset(preset)
    crops = aug.crop_specs
    ls = _loaders(data, crops)
    eng = {k: [aug(b, key=b.key, crop=False) for b in ls[k]] for k in ("torch", "ffcv")}
    res = ResidentLoader(data["arrays"], data["mix"], batch_size=256, seed=4, progress=False)
    eng["resident"] = [aug(b, step=i, crop=True) for i, b in enumerate(res)]
    dali = _run(DaliLoader(data["arrays"], data["mix"], batch_size=256, augment=aug, seed=4, num_workers=0))
    stats = {}
    for name, batches in {**eng, "dali": dali}.items():
        for v in range(aug.num_views):
            x = torch.cat([b.views[v] for b in batches])
            assert x.dtype == torch.float32 and x.shape == (N, 3, 32, 32)
            stats[name, v] = (x.mean((0, 2, 3)), x.std((0, 2, 3)))
    for bt, bd in zip(eng["torch"], dali):
        assert bt.key == bd.key and torch.equal(bt.index, bd.index)
        for v in range(aug.num_views):
            assert (bt.views[v] - bd.views[v]).abs().mean() < 0.06, (v, bt.key)
    for v in range(aug.num_views):
        m0, s0 = stats["torch", v]
        for name in ("ffcv", "dali", "resident"):
            m, s = stats[name, v]
            assert (m - m0).abs().max() < 0.15, (name, v, m, m0)
            assert (s - s0).abs().max() < 0.15, (name, v, s, s0)
