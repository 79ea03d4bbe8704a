"""Sampled parameters follow the torchvision transforms' distributions (KS / chi-square tests
with fixed seeds, so the outcome is deterministic), and seeding is a pure function of
(seed, step, view)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2

from loaders.augment import params as P
from loaders.augment.randaugment import OPS, RandAugmentSpec, apply_randaugment, sample_randaugment
from loaders.crop import rrc_params

N = 3000
ALPHA = 1e-3   # fixed seeds: a correct sampler passes these deterministically


def _tv_boxes(n, h, w, scale, ratio, seed):
    torch.manual_seed(seed)
    img = torch.empty(3, h, w)
    return np.array([v2.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize("h,w,scale", [(32, 32, (0.08, 1.0)), (24, 40, (0.2, 1.0))])
def test_crop_boxes_match_torchvision_and_rrc_params(h, w, scale):
    ratio = (3 / 4, 4 / 3)
    g = torch.Generator().manual_seed(0)
    ours = P.sample_crop_boxes(N, h, w, scale=scale, ratio=ratio, g=g).numpy()
    tv = _tv_boxes(N, h, w, scale, ratio, seed=1)
    ref = rrc_params(np.random.default_rng(2), np.full(N, h), np.full(N, w), scale=scale, ratio=ratio)
    for other in (tv, ref):
        def area(b):
            return b[:, 2] * b[:, 3] / (h * w)

        def logr(b):
            return np.log(b[:, 3] / b[:, 2])
        assert stats.ks_2samp(area(ours), area(other)).pvalue > ALPHA
        assert stats.ks_2samp(logr(ours), logr(other)).pvalue > ALPHA
        assert stats.ks_2samp(ours[:, 0] / h, other[:, 0] / h).pvalue > ALPHA
        assert stats.ks_2samp(ours[:, 1] / w, other[:, 1] / w).pvalue > ALPHA
    # boxes always lie inside the image
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= h).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= w).all()


def test_crop_fallback_is_central_crop():
    # scale > what fits at this ratio range: every attempt fails -> central crop
    g = torch.Generator().manual_seed(0)
    b = P.sample_crop_boxes(50, 10, 40, scale=(0.99, 1.0), ratio=(0.9, 1.1), g=g)
    exp = rrc_params(np.random.default_rng(0), [10], [40], scale=(0.99, 1.0), ratio=(0.9, 1.1))[0]
    assert (b.numpy() == exp).all()


def test_jitter_factors_match_torchvision():
    b, c, s, h = 0.8, 0.4, 0.6, 0.2
    g = torch.Generator().manual_seed(0)
    ours = P.sample_jitter(N, brightness=b, contrast=c, saturation=s, hue=h, p=0.8, g=g)
    cj = v2.ColorJitter(b, c, s, h)
    torch.manual_seed(3)
    tv = [cj.make_params([]) if hasattr(cj, "make_params") else cj._get_params([]) for _ in range(N)]
    keys = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    for k, key in enumerate(keys):
        ref = np.array([t[key] for t in tv])
        assert stats.ks_2samp(ours.factors[:, k].numpy(), ref).pvalue > ALPHA, key
    # the op order is a uniformly random permutation per sample (24 perms, chi-square)
    codes = (ours.order * torch.tensor([64, 16, 4, 1])).sum(1).numpy()
    _, counts = np.unique(codes, return_counts=True)
    assert len(counts) == 24
    assert stats.chisquare(counts).pvalue > ALPHA
    # RandomApply coin
    frac = ours.apply.float().mean().item()
    assert abs(frac - 0.8) < 4 * math.sqrt(0.8 * 0.2 / N)


def test_jitter_ranges_validate():
    assert P.jitter_ranges(1.5, 0.4, 0, 0.1)[0] == (0.0, 2.5)
    with pytest.raises(ValueError, match="hue"):
        P.jitter_ranges(0.4, 0.4, 0.4, 0.6)


def test_generator_is_function_of_seed_step_view():
    def draw(seed, step, view):
        return torch.rand(5, generator=P.make_generator("cpu", seed, step, view))
    assert torch.equal(draw(0, 7, 1), draw(0, 7, 1))
    outs = [draw(0, 7, 1), draw(1, 7, 1), draw(0, 8, 1), draw(0, 7, 0)]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.equal(outs[i], outs[j])
    assert P.mix_seed(1, 2) != P.mix_seed(2, 1)


def test_blur_sigma_uniform():
    g = torch.Generator().manual_seed(5)
    s = P.uniform(N, 0.1, 2.0, g).numpy()
    assert stats.kstest(s, stats.uniform(loc=0.1, scale=1.9).cdf).pvalue > ALPHA


def test_randaugment_strength_rules():
    n = 2000
    g = torch.Generator().manual_seed(0)
    w = torch.rand(n, generator=g)
    spec1 = RandAugmentSpec(num_ops=1, min_magnitude=10, max_magnitude=30)
    p1 = sample_randaugment(n, spec1, strength=w, g=g)
    # each op fires with probability w_i: mean of fire ~ mean(w); w = 0 never fires
    assert abs(p1.fire.float().mean().item() - w.mean().item()) < 0.04
    p0 = sample_randaugment(n, spec1, strength=torch.zeros(n), g=g)
    assert not p0.fire.any()
    pfull = sample_randaugment(n, spec1, strength=torch.ones(n), g=g)
    assert pfull.fire.all()
    # k = 1: magnitude m = 10 + 20 w, value = m/30 * (max - min) + min (brightness: 0.1..1.9)
    bi = OPS.index("brightness")
    sel = p1.op[:, 0] == bi
    m = 10 + 20 * w[sel]
    assert torch.allclose(p1.value[sel, 0], m / 30 * 1.8 + 0.1, atol=1e-5)
    # signed ops: |value| follows the range, both signs occur
    ri = OPS.index("rotate")
    sel = p1.op[:, 0] == ri
    assert torch.allclose(p1.value[sel, 0].abs(), (10 + 20 * w[sel]) / 30 * 60, atol=1e-4)
    assert (p1.value[sel, 0] > 0).any() and (p1.value[sel, 0] < 0).any()
    # ops uniform over the pool
    _, counts = np.unique(p1.op.numpy(), return_counts=True)
    assert len(counts) == len(OPS) and stats.chisquare(counts).pvalue > ALPHA
    # k = 2 (BCL-D): m = 5 + 25 * w * U(0, 1) -> m/(5 + 25 w) ... check the range and the mean
    spec2 = RandAugmentSpec(num_ops=2, min_magnitude=5, max_magnitude=30, scale_by_uniform=True)
    ones = torch.ones(n)
    p2 = sample_randaugment(n, spec2, strength=ones, g=g)
    sel = p2.op[:, 0] == bi
    m2 = (p2.value[sel, 0] - 0.1) / 1.8 * 30
    assert m2.min() >= 5 - 1e-4 and m2.max() <= 30 + 1e-4
    assert stats.kstest(((m2 - 5) / 25).numpy(), "uniform").pvalue > ALPHA
    # no strength and no fixed magnitude: off
    assert sample_randaugment(n, spec1, strength=None, g=g) is None


def test_randaugment_strength_zero_untouched_one_changed():
    g = torch.Generator().manual_seed(1)
    n = 60
    # images not spanning [0, 1] so autocontrast/equalize change them too
    img = 0.2 + 0.6 * torch.rand(n, 3, 16, 16, generator=g)
    spec = RandAugmentSpec(num_ops=1)
    w = torch.zeros(n)
    w[n // 2:] = 1.0
    prm = sample_randaugment(n, spec, strength=w, g=g)
    out = apply_randaugment(img.clone(), spec, prm)
    changed = (out != img).flatten(1).any(1)
    assert not changed[: n // 2].any()
    # at w = 1, m = 30: every op fires; posterize keeps 8 bits (a no-op, as in BCL) on
    # uint8-grid images, the others change the image
    img8 = torch.round(img * 255) / 255
    out8 = apply_randaugment(img8.clone(), spec, prm)
    changed8 = (out8 != img8).flatten(1).any(1)[n // 2:]
    posterize = prm.op[n // 2:, 0] == OPS.index("posterize")
    assert torch.equal(changed8, ~posterize)


def test_randaugment_per_sample_number_of_ops():
    n = 3000
    g = torch.Generator().manual_seed(2)
    spec = RandAugmentSpec.from_config({"num_ops": [1, 3], "magnitude": 9, "p": 1.0})
    assert spec.ops_range == (1, 3)
    prm = sample_randaugment(n, spec, strength=None, g=g)
    k = prm.fire.sum(1)
    assert prm.fire[:, 0].all()                              # at least lo ops
    assert ((prm.fire[:, 1:].int().diff(dim=1) <= 0).all())  # slots fill from the front
    _, counts = np.unique(k.numpy(), return_counts=True)
    assert len(counts) == 3 and stats.chisquare(counts).pvalue > ALPHA
    with pytest.raises(Exception, match="num_ops"):
        RandAugmentSpec.from_config({"num_ops": [3, 1]})
