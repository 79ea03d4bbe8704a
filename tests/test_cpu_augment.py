"""WorkerAugment: the full recipe in the loader workers equals the engine's, op by op and whole.

* each OpenCV op equals torchvision's functional op on the same parameters (float images);
* whole views equal ``Augment(batch, key=step_for(key), crop=False)`` (same parameters, float32
  rounding apart), for both implementations; ``output="uint8"`` is within one final rounding;
* results depend only on (seed, batch key): not on the number of DataLoader workers;
* ops the OpenCV executor lacks (solarize, RandAugment) are left to ``finish`` (the device) with
  ``output="uint8"``: the worker's view is uint8 before them, the finished view the engine's.
"""
import dataclasses

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from loaders import Batch, ConfigError
from loaders.augment import Augment, ViewSpec
from loaders.augment import functional as AF
from loaders.augment import sampler as S
from loaders.base import ArraySource
from loaders.cpu_augment import WorkerAugment, cv2_view, normalize_uint8, step_for
from loaders.mixture import Mixture

cv2 = pytest.importorskip("cv2")
from loaders import cpu_augment as CA  # noqa: E402


def smooth(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)
    return (up * 255).round().to(torch.uint8)


def noise(n, size, seed=1):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def as_batch(views):
    n = views[0].shape[0]
    z = torch.zeros(n, dtype=torch.long)
    return Batch(views=list(views), index=torch.arange(n), source=z, label=z)


def hwc255(img_chw01):
    """float [3,H,W] in [0,1] -> float32 HWC in [0,255] (the cv2 path's layout)."""
    return np.ascontiguousarray((img_chw01 * 255).permute(1, 2, 0).numpy().astype(np.float32))


def chw01(x):
    return torch.from_numpy(x).permute(2, 0, 1) / 255


OPS = [
    ("brightness", CA._brightness, TF.adjust_brightness, [0.0, 0.3, 1.0, 1.7]),
    ("contrast", CA._contrast, TF.adjust_contrast, [0.0, 0.4, 1.0, 1.8]),
    ("saturation", CA._saturation, TF.adjust_saturation, [0.0, 0.5, 1.0, 1.8]),
    ("hue", CA._hue, TF.adjust_hue, [-0.5, -0.2, -0.01, 0.0, 0.13, 0.5]),
]


@pytest.mark.parametrize("name,ours,theirs,factors", OPS, ids=[o[0] for o in OPS])
def test_cv2_colour_ops_match_torchvision(name, ours, theirs, factors):
    for img8 in (smooth(2, 24), noise(2, 24)):
        for im in img8.float() / 255:
            for f in factors:
                out = chw01(ours(cv2, hwc255(im), f))
                ref = theirs(im, f)
                assert (out - ref).abs().max() < 2e-5, (name, f)


def test_cv2_grayscale_and_blur_match_torchvision():
    im = noise(1, 20)[0].float() / 255
    gray = chw01(CA._grayscale(cv2, hwc255(im)))
    assert (gray - TF.rgb_to_grayscale(im, num_output_channels=3)).abs().max() < 2e-5
    for k, sigma in ((5, 0.3), (5, 1.7), (23, 0.1), (23, 1.1), (23, 2.0)):
        taps = CA._blur_taps(torch.tensor([sigma]), k)[0]
        # the cut keeps ceil(4 sigma) px each side, at most the kernel's half-width
        assert len(taps) == 2 * min(k // 2, int(np.ceil(4 * sigma))) + 1
        out = chw01(CA._blur(cv2, hwc255(im), taps))
        ref = TF.gaussian_blur(im, [k, k], [sigma, sigma])
        assert (out - ref).abs().max() < 2e-4, (k, sigma)


@pytest.mark.parametrize("preset,size", [("symmetric", 32), ("imagenet_simclr", 64)])
@pytest.mark.parametrize("impl", ["cv2", "torch"])
def test_views_equal_the_engine(preset, size, impl):
    aug = Augment.from_preset(preset, size=size)
    hook = WorkerAugment(aug, impl=impl)
    assert [hook.impl_for(s) for s in aug.specs] == [impl] * 2
    views = [smooth(12, size), noise(12, size)]
    key = (0, 0, 96)
    out = hook(views, key)
    ref = aug(as_batch(views), key=step_for(key), crop=False).views
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        tol = 0.0 if impl == "torch" else 2e-4   # normalised units (x / std): float32 rounding only
        assert (o - r).abs().max() <= tol
    # the recipe really ran (views differ from a plain normalise of the input)
    plain = AF.normalize(AF.to_float(views[0]), aug.mean, aug.std)
    assert (out[0] - plain).abs().amax(dim=(1, 2, 3)).gt(0.05).float().mean() > 0.5


def test_uint8_output_is_one_rounding_of_the_float_output():
    aug = Augment.from_preset("imagenet_simclr", size=48)
    views = [smooth(6, 48), noise(6, 48)]
    f = WorkerAugment(aug, impl="cv2")(views, (1, 0, 0))
    for impl in ("cv2", "torch"):
        hook = WorkerAugment(aug, impl=impl, output="uint8")
        u8 = hook(views, (1, 0, 0))
        assert all(v.dtype == torch.uint8 for v in u8)
        done = hook.finish(as_batch(u8))
        assert isinstance(done, Batch)
        half_step = 0.5 / 255 / min(aug.std)
        for a, b in zip(done.views, f):
            assert (a - b).abs().max() <= half_step + 2e-4
    x = noise(2, 8)
    assert torch.allclose(normalize_uint8(x, aug.mean, aug.std), AF.normalize(AF.to_float(x), aug.mean, aug.std),
                          atol=1e-5)


def test_determinism_from_the_key_and_engine_fallback():
    aug = Augment.from_preset("symmetric")
    hook = WorkerAugment(aug, impl="cv2")
    views = [noise(8, 32), noise(8, 32, seed=2)]
    a, b, c = hook(views, (0, 0, 8)), hook(views, (0, 0, 8)), hook(views, (0, 0, 16))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # ops the cv2 path lacks (solarize) run on the engine, with the same parameters
    spec = ViewSpec(size=32, flip=0.5, jitter_p=0.8, brightness=0.4, solarize=0.5)
    aug2 = Augment([spec], mean=(0.5,) * 3, std=(0.25,) * 3, seed=4)
    hook2 = WorkerAugment(aug2, impl="cv2")
    assert hook2.impl_for(spec) == "torch"
    out = hook2([views[0]], (4, 0, 0))[0]
    assert torch.equal(out, aug2(as_batch([views[0]]), key=step_for((4, 0, 0)), crop=False).views[0])
    # auto: OpenCV from CV2_MIN_SIZE px
    assert WorkerAugment(aug).impl_for(aug.specs[0]) == ("cv2" if aug.specs[0].size >= CA.CV2_MIN_SIZE else "torch")
    big = Augment.from_preset("imagenet_simclr")
    assert WorkerAugment(big).impl_for(big.specs[0]) == "cv2"


def test_bad_arguments():
    aug = Augment.from_preset("symmetric")
    with pytest.raises(ConfigError, match="impl"):
        WorkerAugment(aug, impl="numba")
    with pytest.raises(ConfigError, match="output"):
        WorkerAugment(aug, output="half")
    with pytest.raises(ConfigError, match="threads"):
        WorkerAugment(aug, threads=0)
    with pytest.raises(ValueError, match="2 views got 1"):
        WorkerAugment(aug)([noise(2, 32)], (0, 0, 0))
    with pytest.raises(ValueError, match="uint8"):
        WorkerAugment(aug)([noise(2, 32).float()] * 2, (0, 0, 0))
    with pytest.raises(ValueError, match="crops"):
        cv2_view(noise(2, 30), aug.specs[0], S.draw(aug, 2, key=0)[0], mean=aug.mean, std=aug.std)


def test_in_the_torch_loader_independent_of_workers():
    from loaders.torch_backend import TorchLoader
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (24, 40, 40, 3), dtype=np.uint8)
    src = ArraySource(imgs, np.arange(24), name="arr")
    hook = WorkerAugment.from_preset("imagenet_simclr", size=32, impl="cv2")
    runs = []
    for workers in (0, 2):
        loader = TorchLoader([src], Mixture([24], budget=24, seed=0), batch_size=8, crops=hook.crop_specs,
                             num_workers=workers, seed=3, worker_augment=hook)
        runs.append([b.views for b in loader])
    assert len(runs[0]) == 3
    for v0, v2 in zip(*runs):
        assert all(x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) for x in v0)
        assert all(torch.equal(x, y) for x, y in zip(v0, v2))
    assert not torch.equal(runs[0][0][0], runs[0][1][0])


def test_channels_last_input_reads_in_place_with_the_same_result():
    aug = Augment.from_preset("imagenet_simclr", size=40)
    views = [noise(5, 40), smooth(5, 40)]
    cl = [v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for v in views]   # channels-last memory
    assert not cl[0].is_contiguous()
    hook = WorkerAugment(aug, impl="cv2")
    for a, b in zip(hook(views, (2, 0, 10)), hook(cl, (2, 0, 10))):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ precision="uint8"
_TV = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}


def _tv_chain(im01, chain):
    for k, f in chain:
        im01 = TF.rgb_to_grayscale(im01, num_output_channels=3) if k == 4 else _TV[k](im01, f)
    return im01


@pytest.mark.parametrize("chain,max_tol,mean_tol", [
    ([(0, 0.3)], 0.51, 0.3), ([(0, 1.7)], 0.51, 0.3), ([(1, 0.4)], 0.51, 0.3), ([(1, 1.8)], 0.51, 0.3),
    ([(2, 0.5)], 0.7, 0.3), ([(2, 1.8)], 0.7, 0.3), ([(4, 1.0)], 0.6, 0.3),
    # fused runs: clamps where torchvision's are (factor > 1), one rounding per applied run
    ([(0, 1.5), (2, 0.5), (1, 0.7), (4, 1.0)], 1.0, 0.35), ([(2, 0.3), (1, 0.5), (0, 0.8)], 0.7, 0.3),
    # hue: OpenCV's 8-bit HSV (H in 1/256 turn, as PIL's HSV in torchvision's PIL path)
    ([(3, -0.2)], 12.0, 1.0), ([(3, 0.13)], 12.0, 1.0), ([(1, 0.6), (0, 0.9), (3, 0.1), (2, 1.4)], 12.0, 1.2),
], ids=lambda c: str(c))
def test_uint8_affine_chain_matches_torchvision(chain, max_tol, mean_tol):
    """Each uint8 op (and fused runs of them) against torchvision's float ops on the same
    parameters, in levels of 255: affine runs within one rounding, hue within its 8-bit H."""
    for img8 in (smooth(4, 24), noise(4, 24)):
        for im in img8:
            x = np.ascontiguousarray(im.permute(1, 2, 0).numpy())
            out = torch.from_numpy(CA._affine_chain_u8(cv2, x, chain)).permute(2, 0, 1).float()
            d = (out - _tv_chain(im.float() / 255, chain) * 255).abs()
            assert d.max() <= max_tol and d.mean() <= mean_tol, (chain, d.max(), d.mean())
    for sigma in (0.3, 1.1, 2.0):   # uint8 blur: cut at 3 sigma, renormalised
        t = CA._blur_taps(torch.tensor([sigma]), 23, CA.TAIL_SIGMAS_U8, renormalize=True)[0]
        assert len(t) == 2 * int(np.ceil(3 * sigma)) + 1 and abs(float(t.sum()) - 1) < 1e-6
    x = np.ascontiguousarray(noise(1, 8)[0].permute(1, 2, 0).numpy())
    assert CA._hue_u8(cv2, x, 0.001) is x     # rounds to a zero shift: the identity, no HSV round trip


@pytest.mark.parametrize("preset,size", [("symmetric", 32), ("imagenet_simclr", 64)])
def test_uint8_precision_views_close_to_the_engine(preset, size):
    aug = Augment.from_preset(preset, size=size)
    views = [smooth(24, size), noise(24, size)]
    key = (0, 0, 96)
    ref = aug(as_batch(views), key=step_for(key), crop=False).views
    hook = WorkerAugment(aug, impl="cv2", precision="uint8")
    out = hook(views, key)
    std = torch.tensor(aug.std).reshape(1, 3, 1, 1)
    for o, r in zip(out, ref):
        d = ((o - r) * std * 255).abs().flatten()          # levels of 255
        # bounds hold for any draw: over 8 keys and both presets the mean was 0.40-0.55, the p99
        # 2.7-5.0 and the worst single pixel (a big hue shift on a saturated colour) 9-21 levels
        assert d.mean() < 0.6 and torch.quantile(d[::5], 0.99) < 5.5 and d.max() <= 24, (d.mean(), d.max())
    assert all(torch.equal(a, b) for a, b in zip(out, hook(views, key)))          # deterministic
    u8 = WorkerAugment(aug, impl="cv2", precision="uint8", output="uint8")
    for a, b in zip(u8.finish(u8(views, key)), out):  # uint8 output: the same image, normalised later
        assert (a - b).abs().max() <= 2e-4
    with pytest.raises(ConfigError, match="precision"):
        WorkerAugment(aug, precision="half")


def test_lacking_ops_are_left_to_the_device_with_uint8_output():
    """output="uint8": a view with solarize comes back from the worker uint8 (0..255, not
    normalised, before solarize: the engine's result of the view without it, rounded once);
    finish() solarizes with the engine's draw for the batch key, then normalises."""
    solar = ViewSpec(size=32, flip=0.5, jitter_p=0.8, brightness=0.4, solarize=0.5)
    plain = ViewSpec(size=32, flip=0.5, grayscale=0.5)
    aug = Augment([plain, solar], mean=(0.5,) * 3, std=(0.25,) * 3, seed=4)
    hook = WorkerAugment(aug, impl="cv2", output="uint8", precision="float")
    assert CA.tail_ops(solar) == ("solarize",) and CA.tail_ops(plain) == ()
    assert hook.pending_ops() == ((), ("solarize",)) and hook.pending_ops(1) == ("solarize",)
    assert WorkerAugment(aug, impl="cv2").pending_ops() == ((), ())      # float output: whole view in the worker
    views = [noise(8, 32), noise(8, 32, seed=2)]
    key = step_for((4, 0, 0))
    with pytest.warns(UserWarning, match=r"lacks view 1: solarize: those ops run on the device"):
        out = hook(views, (4, 0, 0))
    assert all(o.dtype == torch.uint8 for o in out)
    params = S.draw(aug, 8, key=key)
    head = aug.view(views[1], ViewSpec(size=32, flip=0.5, jitter_p=0.8, brightness=0.4), params[1])
    head255 = (head * 0.25 + 0.5) * 255
    assert (out[1].float() - head255).abs().max() <= 0.5 + 1e-3     # not normalised, not solarized
    ref = aug(as_batch(views), key=key, crop=False)
    done = hook.finish(dataclasses.replace(as_batch(out), key=key))
    for a, b in zip(done.views, ref.views):
        d = (a - b).abs() * 0.25 * 255
        assert d.mean() < 0.3 and d.max() < 1.6   # one rounding (a pixel at 128 may flip to its mirror)
    assert not torch.equal(done.views[1], hook.finish(dataclasses.replace(as_batch(out), key=key + 1)).views[1])
    with pytest.raises(ValueError, match="batch key"):
        hook.finish(as_batch(out))
    # strength-dependent ops: RandAugment is always left to the device
    bcl = Augment.from_preset("bcl")
    assert CA.strength_on_device(bcl) and WorkerAugment(bcl, output="uint8").pending_ops()[0] == ("randaugment",)
