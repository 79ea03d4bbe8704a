"""Shared contracts: Batch layout, config key checking, the crop-parameter sampler."""
import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from loaders import ArraySource, Batch, ConfigError, DataError, build_source, check_keys
from loaders.crop import CropSpec, rrc_params


def _batch(n=4, views=2, size=8):
    return Batch(views=[torch.zeros(n, 3, size, size, dtype=torch.uint8) for _ in range(views)],
                 index=torch.arange(n), source=torch.zeros(n, dtype=torch.long),
                 label=torch.full((n,), -1))


def test_batch_validates_shapes():
    b = _batch()
    assert len(b) == 4 and b.device.type == "cpu"
    with pytest.raises(ValueError, match="expected \\[4,3,H,W\\]"):
        Batch(views=[torch.zeros(3, 3, 8, 8)], index=torch.arange(4), source=torch.zeros(4), label=torch.zeros(4))
    with pytest.raises(ValueError, match="label"):
        Batch(views=[torch.zeros(4, 3, 8, 8)], index=torch.arange(4), source=torch.zeros(4), label=torch.zeros(3))
    moved = b.to("cpu")
    assert moved.views[0].dtype == torch.uint8 and torch.equal(moved.index, b.index)


def test_check_keys_names_closest():
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'.*did you mean 'batch_size'"):
        check_keys({"batch_sise": 1}, ["batch_size", "seed"], "data")
    check_keys({"seed": 1}, ["batch_size", "seed"], "data")


def test_build_source_rejects_unknown_type_and_key():
    imgs = np.zeros((2, 4, 4, 3), np.uint8)
    src = build_source({"type": "array", "images": imgs, "labels": [0, 1]})
    assert len(src) == 2 and src.read(1)[1] == 1
    with pytest.raises(ConfigError, match="did you mean 'array'"):
        build_source({"type": "arrray", "images": imgs})
    with pytest.raises(ConfigError, match="unknown key 'label'"):
        build_source({"type": "array", "images": imgs, "label": [0, 1]})
    with pytest.raises(DataError, match="empty"):
        ArraySource(np.zeros((0, 4, 4, 3), np.uint8))


def test_cropspec_validates():
    with pytest.raises(ValueError):
        CropSpec(size=0)
    with pytest.raises(ValueError):
        CropSpec(size=32, scale=(0.5, 0.1))
    with pytest.raises(ValueError):
        CropSpec(size=32, interpolation="lanczos")


@pytest.mark.parametrize("hw,scale", [((32, 32), (0.08, 1.0)), ((60, 200), (0.2, 1.0))])
def test_rrc_params_match_torchvision_distribution(hw, scale):
    """KS tests: area fractions and aspect ratios against torchvision's own get_params."""
    H, W = hw
    n = 4000
    rng = np.random.default_rng(0)
    p = rrc_params(rng, np.full(n, H), np.full(n, W), scale=scale)
    top, left, h, w = p.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    torch.manual_seed(0)
    img = torch.zeros(3, H, W)
    ref = np.array([RandomResizedCrop.get_params(img, scale=list(scale), ratio=[3 / 4, 4 / 3]) for _ in range(n)])
    ours_area = h * w / (H * W)
    ref_area = ref[:, 2] * ref[:, 3] / (H * W)
    assert stats.ks_2samp(ours_area, ref_area).pvalue > 1e-3
    assert stats.ks_2samp(w / h, ref[:, 3] / ref[:, 2]).pvalue > 1e-3
    # positions are uniform over the valid range, as in torchvision
    rel_top = top / np.maximum(H - h, 1)
    ref_top = ref[:, 0] / np.maximum(H - ref[:, 2], 1)
    assert stats.ks_2samp(rel_top, ref_top).pvalue > 1e-3


def test_rrc_params_fallback_is_torchvision_center_crop():
    # an extreme aspect image where no attempt can fit the ratio range at scale ~1
    rng = np.random.default_rng(1)
    p = rrc_params(rng, [10], [400], scale=(0.99, 1.0))
    torch.manual_seed(0)
    ref = RandomResizedCrop.get_params(torch.zeros(3, 10, 400), scale=[0.99, 1.0], ratio=[3 / 4, 4 / 3])
    assert tuple(p[0]) == tuple(ref)


def test_rrc_params_deterministic():
    a = rrc_params(np.random.default_rng(5), [32] * 10, [32] * 10)
    b = rrc_params(np.random.default_rng(5), [32] * 10, [32] * 10)
    assert np.array_equal(a, b)
    assert len({tuple(r) for r in a}) > 1
