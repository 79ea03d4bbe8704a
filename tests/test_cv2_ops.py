"""The worker-augment kernels (loaders.augment.cv2_ops, loaders.augment.fused_colour) against
torchvision's float ops on the same parameters, in levels of 255.

* the fused numba colour chain is torchvision's chain rounded once: within 0.5 level (+ float32
  noise) for every op, order, clamp and hue shift; any image size; strided input;
* the OpenCV chain (no numba) stays within its documented bounds, and the switch selects it;
* the uint8 recipe end to end (WorkerAugment, precision="uint8") is closer to the engine with
  the fused chain than the OpenCV chain's bounds.
"""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

cv2 = pytest.importorskip("cv2")
from loaders.augment import cv2_ops as K  # noqa: E402

_TV = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}

CHAINS = [
    [(0, 0.3)], [(0, 1.7)], [(1, 0.4)], [(1, 1.8)], [(2, 0.0)], [(2, 1.8)], [(4, 1.0)],
    [(3, -0.5)], [(3, -0.2)], [(3, -0.001)], [(3, 0.13)], [(3, 0.5)],
    # clamps binding before contrast (its mean is of the clamped image), hue between affine runs
    [(0, 1.8), (1, 0.5), (2, 1.6), (3, 0.3)], [(2, 1.8), (0, 1.5), (1, 1.7), (4, 1.0)],
    [(1, 0.6), (0, 0.9), (3, 0.1), (2, 1.4)], [(3, -0.35), (1, 1.6), (0, 0.2), (2, 0.7), (4, 1.0)],
    [(2, 0.3), (3, 0.2), (0, 1.9), (1, 0.1)],
]


def images(size=(29, 37)):
    g = torch.Generator().manual_seed(0)
    low = torch.rand(3, 3, 4, 4, generator=g)
    smooth = (torch.nn.functional.interpolate(low, size=size, mode="bicubic").clamp(0, 1) * 255).round()
    noise = torch.randint(0, 256, (3, 3, *size), generator=g).float()
    sat = (torch.rand(3, 3, *size, generator=g) > 0.5).float() * 255      # saturated colours, ties
    return [np.ascontiguousarray(im.permute(1, 2, 0).numpy().astype(np.uint8))
            for im in torch.cat([smooth, noise, sat])]


def tv_chain(x, chain):
    im = torch.from_numpy(x).permute(2, 0, 1).float() / 255
    for k, f in chain:
        im = TF.rgb_to_grayscale(im, num_output_channels=3) if k == 4 else _TV[k](im, f)
    return im.permute(1, 2, 0).numpy() * 255


@pytest.fixture
def fused():
    if K._fused_import() is None:
        pytest.skip("numba not installed")
    from loaders.augment import fused_colour
    before, K._USE_FUSED[0] = K._USE_FUSED[0], True
    yield fused_colour
    K._USE_FUSED[0] = before


@pytest.fixture
def opencv_chain():
    before, K._USE_FUSED[0] = K._USE_FUSED[0], False
    yield
    K._USE_FUSED[0] = before


@pytest.mark.parametrize("chain", CHAINS, ids=str)
def test_fused_chain_is_torchvision_rounded_once(fused, chain):
    for x in images():
        out = K._affine_chain_u8(cv2, x, chain)
        assert out.dtype == np.uint8 and out.shape == x.shape
        d = np.abs(out - tv_chain(x, chain))
        assert d.max() <= 0.5 + 2e-3, (chain, d.max())


def test_fused_chain_sizes_layouts_and_identity(fused):
    chain = [(0, 1.4), (3, 0.27), (1, 0.8), (2, 1.2)]
    for size in ((1, 1), (16, 32), (23, 23), (224, 224)):    # below, at and past the tile size
        x = images(size)[3]
        assert np.abs(fused.colour_chain_u8(x, chain) - tv_chain(x, chain)).max() <= 0.5 + 2e-3
    x = images()[1]
    strided = x[:, ::-1]                                        # a flipped (negative-stride) view
    assert np.array_equal(fused.colour_chain_u8(strided, chain),
                          fused.colour_chain_u8(np.ascontiguousarray(strided), chain))
    assert fused.colour_chain_u8(x, []) is x
    assert fused.colour_chain_u8(x, [(3, 0.0), (3, 1.0)]) is x  # whole turns: no hue stage at all
    assert np.array_equal(fused.colour_chain_u8(x, [(0, 1.0), (2, 1.0)]), x)


@pytest.mark.parametrize("chain,max_tol,mean_tol", [
    ([(0, 1.7)], 0.51, 0.3), ([(1, 0.4)], 0.51, 0.3), ([(2, 1.8)], 0.7, 0.3), ([(4, 1.0)], 0.6, 0.3),
    ([(3, -0.2)], 12.0, 1.0), ([(1, 0.6), (0, 0.9), (3, 0.1), (2, 1.4)], 12.0, 1.2),
], ids=str)
def test_opencv_chain_without_numba(opencv_chain, chain, max_tol, mean_tol):
    assert K._fused_chain() is None
    for x in images()[:6]:
        d = np.abs(K._affine_chain_u8(cv2, x, chain) - tv_chain(x, chain))
        assert d.max() <= max_tol and d.mean() <= mean_tol, (chain, d.max(), d.mean())


def test_uint8_recipe_closer_to_the_engine_with_the_fused_chain(fused):
    from loaders import Batch
    from loaders.augment import Augment
    from loaders.cpu_augment import WorkerAugment, step_for
    aug = Augment.from_preset("symmetric", size=48)
    g = torch.Generator().manual_seed(5)
    views = [torch.randint(0, 256, (16, 3, 48, 48), generator=g, dtype=torch.uint8) for _ in range(2)]
    z = torch.zeros(16, dtype=torch.long)
    key = (0, 0, 32)
    ref = aug(Batch(views=list(views), index=z, source=z, label=z), step=step_for(key), crop=False).views
    std = torch.tensor(aug.std).reshape(1, 3, 1, 1)
    out = WorkerAugment(aug, impl="cv2", precision="uint8")(views, key)
    for o, r in zip(out, ref):
        d = ((o - r) * std * 255).abs()
        # blur rounds once more (and drops its tail beyond 3 sigma): still within one level
        assert d.mean() < 0.3 and d.max() <= 1.0, (d.mean(), d.max())       # OpenCV chain: 0.5, 12


@pytest.mark.parametrize("use_fused", [True, False], ids=["numba", "opencv"])
def test_normalize_uint8_matches_torchvision(use_fused):
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
    img = torch.randint(0, 256, (3, 3, 17, 19), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ref = TF.normalize(img.float() / 255, mean, std)
    before, K._USE_FUSED[0] = K._USE_FUSED[0], use_fused
    try:
        out = torch.full(img.shape, float("nan"))
        assert K.normalize_uint8(img, mean, std, out=out) is out
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)
        assert torch.allclose(K.normalize_uint8(img[:, :, ::2], mean, std), ref[:, :, ::2], atol=1e-5, rtol=0)
    finally:
        K._USE_FUSED[0] = before


def test_fused_uint8_recipe_in_loader_workers_is_deterministic(fused):
    """numba kernels in forked DataLoader workers: the same views as in the main process."""
    from loaders.base import ArraySource
    from loaders.cpu_augment import WorkerAugment
    from loaders.mixture import Mixture
    from loaders.torch_backend import TorchLoader
    imgs = np.random.default_rng(0).integers(0, 256, (16, 40, 40, 3), dtype=np.uint8)
    src = ArraySource(imgs, np.arange(16), name="arr")
    hook = WorkerAugment.from_preset("symmetric", size=32, impl="cv2", precision="uint8", output="uint8")
    runs = []
    for workers in (0, 2):
        loader = TorchLoader([src], Mixture([16], budget=16, seed=0), batch_size=8, crops=hook.crop_specs,
                             num_workers=workers, seed=3, worker_augment=hook, decoder="cv2")
        runs.append([hook.finish(b).views for b in loader])
    assert len(runs[0]) == 2
    for v0, v2 in zip(*runs):
        assert all(x.dtype == torch.float32 and torch.equal(x, y) for x, y in zip(v0, v2))
