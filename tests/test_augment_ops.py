"""Each batched op equals torchvision's functional op on the same parameters.

Float inputs: agreement to float32 rounding (<= 1e-4 on the [0, 1] scale). uint8 inputs:
max abs difference <= 2 (of 255) on smooth images, since torchvision rounds or truncates to
uint8 inside the op while this engine stays in float. Documented exception: torchvision's
native CPU uint8 *bicubic* resize clamps between its two separable passes, so on noise images
it differs by up to ~20 from its own float result; uint8 bicubic is therefore compared on
smooth images only (the float comparison is exact).
"""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from loaders.augment import functional as AF
from loaders.augment import randaugment as RA

B = 6


def smooth_images(n=B, h=32, w=32, seed=0):
    """uint8 [n,3,h,w] with smooth gradients and blobs (natural-image-like, no noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h).reshape(1, 1, h, 1)
    x = torch.linspace(0, 1, w).reshape(1, 1, 1, w)
    a = torch.rand(n, 3, 1, 1, generator=g)
    b = torch.rand(n, 3, 1, 1, generator=g)
    c = torch.rand(n, 3, 1, 1, generator=g) * 6
    img = 0.5 + 0.3 * torch.sin(c * x + 3 * a) * torch.cos(c * y + 3 * b) + 0.15 * (x - y)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def noise_images(n=B, h=32, w=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def per_sample(fn, imgs, *params):
    return torch.stack([fn(imgs[i], *[p[i] for p in params]) for i in range(imgs.shape[0])])


def f(u8):
    return u8.float() / 255


def as_u8(x):
    return (x * 255).round().clamp(0, 255)


BOXES = torch.tensor([[0, 0, 32, 32], [3, 5, 10, 17], [10, 1, 22, 30], [1, 2, 16, 10],
                      [0, 0, 32, 20], [20, 20, 12, 12]])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("size", [32, 20])
def test_resized_crop_matches_torchvision(mode, antialias, size):
    img = noise_images()
    interp = InterpolationMode[mode.upper()]
    out = AF.resized_crop(f(img), BOXES, size, mode=mode, antialias=antialias, clamp=False)
    ref = torch.stack([TF.resized_crop(f(img[i]), *BOXES[i].tolist(), [size, size], interpolation=interp,
                                       antialias=antialias) for i in range(B)])
    assert out.shape == (B, 3, size, size)
    assert (out - ref).abs().max() < 1e-4
    # uint8 in, uint8 torchvision reference (smooth images; see module docstring)
    sm = smooth_images()
    out8 = AF.resized_crop(sm, BOXES, size, mode=mode, antialias=antialias)
    ref8 = torch.stack([TF.resized_crop(sm[i], *BOXES[i].tolist(), [size, size], interpolation=interp,
                                        antialias=antialias) for i in range(B)])
    assert (as_u8(out8) - ref8.float()).abs().max() <= 2


def test_resized_crop_downscale_224():
    img = noise_images(n=2, h=64, w=72)
    boxes = torch.tensor([[0, 0, 64, 72], [5, 9, 50, 41]])
    out = AF.resized_crop(f(img), boxes, 24, mode="bilinear", antialias=True)
    ref = torch.stack([TF.resized_crop(f(img[i]), *boxes[i].tolist(), [24, 24], antialias=True) for i in range(2)])
    assert (out - ref).abs().max() < 1e-4


def test_hflip_only_masked():
    img = f(noise_images())
    mask = torch.tensor([True, False, True, False, False, True])
    out = AF.hflip(img, mask)
    for i in range(B):
        ref = TF.horizontal_flip(img[i]) if mask[i] else img[i]
        assert torch.equal(out[i], ref)


@pytest.mark.parametrize("name,factors", [
    ("brightness", [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
    ("contrast", [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
    ("saturation", [0.0, 0.2, 0.9, 1.0, 1.5, 1.8]),
    ("hue", [-0.5, -0.2, -0.01, 0.0, 0.15, 0.5]),
])
def test_color_ops_match_torchvision(name, factors):
    ours = getattr(AF, f"adjust_{name}")
    theirs = getattr(TF, f"adjust_{name}")
    fac = torch.tensor(factors)
    for img8, tol8 in ((noise_images(), 2), (smooth_images(), 2)):
        out = ours(f(img8), fac)
        ref = per_sample(lambda im, v: theirs(im, float(v)), f(img8), fac)
        assert (out - ref).abs().max() < 1e-4, name
        ref8 = per_sample(lambda im, v: theirs(im, float(v)), img8, fac)
        assert (as_u8(out) - ref8.float()).abs().max() <= tol8, name


def test_grayscale_and_solarize_and_normalize():
    img = f(noise_images())
    mask = torch.tensor([True, True, False, False, True, False])
    g = AF.grayscale(img, mask)
    for i in range(B):
        ref = TF.rgb_to_grayscale(img[i], num_output_channels=3) if mask[i] else img[i]
        assert (g[i] - ref).abs().max() < 1e-6
    s = AF.solarize(img, 128 / 255, mask)
    for i in range(B):
        ref = TF.solarize(img[i], 128 / 255) if mask[i] else img[i]
        assert torch.equal(s[i], ref)
    s8 = TF.solarize(noise_images(), 128)
    assert torch.equal(as_u8(AF.solarize(f(noise_images()), 128 / 255)), s8.float())
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    n = AF.normalize(img, mean, std)
    assert (n - TF.normalize(img, list(mean), list(std))).abs().max() < 1e-5


@pytest.mark.parametrize("k", [3, 5, 23])
def test_gaussian_blur_matches_torchvision(k):
    img = f(smooth_images(h=32, w=40))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.3, 2.0, 0.77])
    out = AF.gaussian_blur(img, sigma, k)
    ref = per_sample(lambda im, s: TF.gaussian_blur(im, [k, k], [float(s), float(s)]), img, sigma)
    assert (out - ref).abs().max() < 1e-5
    ref8 = per_sample(lambda im, s: TF.gaussian_blur(im, [k, k], [float(s), float(s)]),
                      smooth_images(h=32, w=40), sigma)
    assert (as_u8(out) - ref8.float()).abs().max() <= 1


def test_blur_kernel_size_rule():
    assert AF.blur_kernel_size(224) == 23
    assert AF.blur_kernel_size(32) == 5
    assert AF.blur_kernel_size(96) == 11
    assert AF.blur_kernel_size(8) == 3


# ------------------------------------------------------------ RandAugment's ops

def test_pixel_ops_match_torchvision():
    img8 = smooth_images()
    img = f(img8)
    assert torch.equal(as_u8(AF.invert(img)), TF.invert(img8).float())
    bits = torch.tensor([1, 2, 4, 5, 7, 8])
    out = AF.posterize(img, bits)
    ref = torch.stack([TF.posterize(img8[i], int(bits[i])) for i in range(B)])
    assert torch.equal(as_u8(out), ref.float())
    assert (AF.autocontrast(img) - TF.autocontrast(img)).abs().max() < 1e-5
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert torch.equal(AF.autocontrast(flat), flat)
    # equalize is defined on the uint8 grid: exact
    for im in (img8, noise_images()):
        assert torch.equal(as_u8(AF.equalize(f(im))), TF.equalize(im).float())
    fac = torch.tensor([0.1, 0.5, 1.0, 1.3, 1.9, 0.0])
    out = AF.adjust_sharpness(img, fac)
    ref = per_sample(lambda im, v: TF.adjust_sharpness(im, float(v)), img, fac)
    assert (out - ref).abs().max() < 1e-5


def _frac_equal(a, b):
    return (as_u8(a) == b.float()).all(dim=0).float().mean().item()


def test_rotate_matches_torchvision():
    img8 = smooth_images()
    angles = torch.tensor([-60.0, -30.0, -7.5, 0.0, 12.0, 45.0])
    out = RA.apply_op(f(img8), "rotate", angles, torch.zeros(B, 2))
    for i in range(B):
        ref = TF.rotate(img8[i], float(angles[i]), interpolation=InterpolationMode.NEAREST)
        # nearest sampling: a pixel whose source lies on a rounding tie may pick the neighbour
        assert _frac_equal(out[i], ref) > 0.97


@pytest.mark.parametrize("op,axis", [("shear_x", 0), ("shear_y", 1)])
def test_shear_matches_torchvision(op, axis):
    img8 = smooth_images()
    v = torch.tensor([-0.6, -0.3, -0.05, 0.0, 0.2, 0.55])
    out = RA.apply_op(f(img8), op, v, torch.zeros(B, 2))
    for i in range(B):
        deg = math.degrees(math.atan(float(v[i])))
        shear = [deg, 0.0] if axis == 0 else [0.0, deg]
        # torchvision's RandAugment shears about the top-left corner like PIL (center=[0, 0])
        ref = TF.affine(img8[i], angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                        interpolation=InterpolationMode.NEAREST, center=[0, 0])
        assert _frac_equal(out[i], ref) > 0.97


def test_translate_matches_torchvision():
    img8 = smooth_images()
    frac = torch.tensor([-0.5, -0.25, 0.0, 0.125, 0.375, 0.625])   # whole pixels at 32 px
    for op in ("translate_x", "translate_y"):
        out = RA.apply_op(f(img8), op, frac, torch.zeros(B, 2))
        for i in range(B):
            t = -int(round(float(frac[i]) * 32))   # ours maps output x to input x + t: content moves by -t
            ref = TF.affine(img8[i], angle=0.0, translate=[t, 0] if op == "translate_x" else [0, t],
                            scale=1.0, shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST)
            assert torch.equal(as_u8(out[i]), ref.float())


def test_cutout_matches_pil_rectangle():
    from PIL import Image, ImageDraw
    img8 = smooth_images(n=3)
    v = torch.tensor([0.0, 0.25, 0.4])
    centre = torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.6, 0.3]])
    out = RA.apply_op(f(img8), "cutout", v, centre)
    for i in range(3):
        pil = Image.fromarray(img8[i].permute(1, 2, 0).numpy())
        side = float(v[i]) * 32
        if side > 0:
            x0 = int(max(0, float(centre[i, 1]) * 32 - side / 2))
            y0 = int(max(0, float(centre[i, 0]) * 32 - side / 2))
            ImageDraw.Draw(pil).rectangle((x0, y0, int(min(32, x0 + side)), int(min(32, y0 + side))),
                                          (125, 123, 114))
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        assert torch.equal(as_u8(out[i]), ref.float())


def test_masked_apply_leaves_others_bitwise():
    img = f(noise_images())
    mask = torch.tensor([False, True, False, True, True, False])
    fac = torch.full((B,), 1.7)
    for inplace in (False, True):
        src = img.clone()
        out = AF.masked_apply(src, mask, AF.adjust_brightness, fac, inplace=inplace)
        assert torch.equal(out[~mask], img[~mask])
        assert torch.equal(out[mask], AF.adjust_brightness(img[mask], fac[mask]))
    assert AF.masked_apply(img, torch.zeros(B, dtype=torch.bool), AF.invert) is img
