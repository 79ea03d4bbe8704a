"""The worker path's fused per-image view (flip + colour chain + planar/normalised store in one
numba pass) equals the unfused composition it replaces, byte for byte:

* ``fused_colour.colour_view_u8`` = ``colour_chain_u8`` of the flipped image, split into planes
  (uint8) or normalised (float32), for tiles that cross rows and rows wider than a tile;
* ``cv2_view(precision="uint8")`` = flip, ``_affine_chain_u8``, ``_blur`` and split/normalise per
  image (the executor before fusion), with and without numba;
* a blur whose rounded result is the identity is skipped only when ``sepFilter2D`` returns its input;
* ``cv2_ops._blur_taps`` is the blur op's one taps rule.
"""
import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
from loaders.augment import Augment  # noqa: E402
from loaders.augment import cv2_ops as K  # noqa: E402
from loaders.augment import ops as O  # noqa: E402
from loaders.augment import sampler as S  # noqa: E402
from loaders.cpu_augment import cv2_view  # noqa: E402

CHAINS = [[], [(0, 0.7)], [(3, 0.27)], [(1, 0.8)], [(0, 1.4), (3, 0.27), (1, 0.8), (2, 1.2), (4, 1.0)],
          [(3, -0.3), (1, 1.6), (0, 0.2)]]
NORM = (1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225), -0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225)


@pytest.fixture
def fused():
    if K._fused_import() is None:
        pytest.skip("numba not installed")
    from loaders.augment import fused_colour
    before, K._USE_FUSED[0] = K._USE_FUSED[0], True
    yield fused_colour
    K._USE_FUSED[0] = before


def image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(1, 1), (37, 29), (3, 700), (224, 224)], ids=str)
def test_colour_view_is_flip_chain_and_split(fused, shape):
    x = image(*shape)
    for ops in CHAINS:
        for flip in (False, True):
            ref = fused.colour_chain_u8(np.ascontiguousarray(x[:, ::-1]) if flip else x, ops)
            assert np.array_equal(fused.colour_view_u8(x, ops, flip), ref)
            p8 = np.full((3, *shape), 7, np.uint8)
            assert fused.colour_view_u8(x, ops, flip, planes=p8) is p8
            assert np.array_equal(p8, ref.transpose(2, 0, 1))
            pf = np.full((3, *shape), np.nan, np.float32)
            fused.colour_view_u8(x, ops, flip, planes=pf, norm=NORM)
            scale, offset = np.float32(NORM[:3]).reshape(3, 1, 1), np.float32(NORM[3:]).reshape(3, 1, 1)
            want = ref.transpose(2, 0, 1) * scale + offset
            assert np.abs(pf - want).max() <= 1e-5
    with pytest.raises(ValueError, match="planes"):
        fused.colour_view_u8(x, [], planes=np.empty((3, 2, 2), np.uint8))


def _unfused_view(img, spec, params, normalize, mean, std):
    """The u8 executor before fusion: flip, chain, blur, then split or 3x4 transform + split."""
    taps = O.blur.taps(params.sigma, spec.kernel_size, K.TAIL_SIGMAS_U8, renormalize=True)
    src = img.permute(0, 2, 3, 1).contiguous().numpy()
    out = np.empty(img.shape, np.float32 if normalize else np.uint8)
    strengths = O.jitter.strengths(spec)
    for i in range(img.shape[0]):
        x = cv2.flip(src[i], 1) if params.flip[i] else src[i]
        f = params.jitter_factors[i].tolist()
        order = params.jitter_order[i].tolist() if params.jitter_apply[i] else []
        ops = [(k, f[k]) for k in order if strengths[k] != 0]
        ops += [(4, 1.0)] if params.gray[i] else []
        x = K._affine_chain_u8(cv2, x, ops) if ops else x
        x = K._blur(cv2, x, taps[i]) if params.blur[i] else x
        if normalize:
            m = np.zeros((3, 4), np.float32)
            for c in range(3):
                m[c, c], m[c, 3] = 1 / (255 * std[c]), -mean[c] / std[c]
            x = cv2.transform(x.astype(np.float32), m)
        cv2.split(x, [out[i, 0], out[i, 1], out[i, 2]])
    return torch.from_numpy(out)


@pytest.mark.parametrize("use_fused", [True, False], ids=["numba", "opencv"])
def test_cv2_view_uint8_equals_the_unfused_executor(use_fused):
    if use_fused and K._fused_import() is None:
        pytest.skip("numba not installed")
    aug = Augment.from_preset("imagenet_simclr", size=40)
    spec = aug.specs[0]
    img = torch.from_numpy(np.stack([image(40, 40, s) for s in range(24)])).permute(0, 3, 1, 2)
    params = S.draw(aug, 24, key=11)[0]
    assert 0 < int(params.flip.sum()) < 24 and 0 < int(params.blur.sum()) < 24
    before, K._USE_FUSED[0] = K._USE_FUSED[0], use_fused
    try:
        for normalize in (False, True):
            got = cv2_view(img, spec, params, mean=aug.mean, std=aug.std, normalize=normalize, precision="uint8")
            ref = _unfused_view(img, spec, params, normalize, aug.mean, aug.std)
            # uint8: the same bytes; float: the same rounded image, normalised by another kernel
            assert torch.equal(got, ref) if not normalize else (got - ref).abs().max() <= 2e-5
    finally:
        K._USE_FUSED[0] = before


def test_blur_identity_rule_matches_sepfilter():
    x = image(48, 48, 3)
    for sigma in (0.1, 0.2, 0.25, 0.27, 0.3, 0.5):
        t = O.blur.taps(torch.tensor([sigma]), 23, K.TAIL_SIGMAS_U8, renormalize=True)[0]
        same = np.array_equal(K._blur(cv2, x, t), x)
        if K._blur_is_identity(t):
            assert same, sigma
        assert K._blur_is_identity(t) == (sigma <= 0.25), sigma


def test_blur_taps_is_the_ops_rule():
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    for args in ((23,), (23, K.TAIL_SIGMAS), (23, K.TAIL_SIGMAS_U8, True), (5, 3.0, True)):
        ours = K._blur_taps(sigma, *args)
        ref = O.blur.taps(sigma, *args) if len(args) > 1 else O.blur.taps(sigma, 23, K.TAIL_SIGMAS)
        assert all(np.array_equal(a, b) for a, b in zip(ours, ref))
