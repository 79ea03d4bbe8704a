"""Region decode (loaders/_jpeg_region.c via loaders.decode.decode_region and ViewPlan): the region's
pixels equal the whole image decoded at the same scale (simplejpeg), for every scale, colour space
and JPEG kind; rows below the region are never decoded; the torch backend's views are identical
with region decode on and off; corrupt data falls back to the unreduced path."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import loaders.decode as D
from loaders.base import Source
from loaders.crop import CropSpec
from loaders.decode import LateDecodeError, ViewPlan, decode_region, decode_scaled, lazy_jpeg, reduced_size
from loaders.mixture import Mixture, Plan
from loaders.torch_backend import BatchMaker

pytest.importorskip("simplejpeg", reason="reduced decode uses simplejpeg (extra 'fast')")
pytest.importorskip("cv2")
if not D.region_available():
    pytest.skip("the loaders._jpeg_region extension is not built (make setup builds it)", allow_module_level=True)

CROPS = [CropSpec(40, scale=(0.08, 1.0)), CropSpec(24, scale=(0.05, 0.4))]


def natural(h, w, seed=0):
    from benchmarks.bench_feed import natural_image
    return natural_image(seed, h, w, seed=seed)


def encode(a, quality=90, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def whole(data, d, h, w):
    img, used = decode_scaled(data, d, h, w)
    assert used == d
    return img


def random_regions(rng, H, W, k):
    for _ in range(k):
        t, lf = int(rng.integers(0, H)), int(rng.integers(0, W))
        yield t, lf, int(rng.integers(1, H - t + 1)), int(rng.integers(1, W - lf + 1))


@pytest.mark.parametrize("kind", ["420", "444", "gray", "progressive", "odd-size"])
def test_region_equals_whole_decode_at_every_scale(kind):
    """With a column of margin each side (what ViewPlan asks for), every pixel of the wanted region
    equals the whole image decoded at that scale; the rows returned are exactly the ones asked."""
    h, w = (203, 317) if kind == "odd-size" else (192, 256)
    a = natural(h, w, seed=3)
    kw = {"444": {"subsampling": 0}, "progressive": {"progressive": True}}.get(kind, {})
    if kind == "gray":
        a = np.repeat(np.asarray(Image.fromarray(a).convert("L"))[..., None], 3, axis=2)
        data = encode(a[..., 0])
    else:
        data = encode(a, **kw)
    rng = np.random.default_rng(0)
    for d in (1, 2, 4, 8):
        ref = whole(data, d, h, w)
        H, W = ref.shape[:2]
        assert (H, W) == reduced_size(h, w, d)
        for t, lf, rh, rw in random_regions(rng, H, W, 12):
            l2, r2 = max(lf - 1, 0), min(lf + rw + 1, W)
            got, y0, x0 = decode_region(data, d, t, l2, rh, r2 - l2)
            assert y0 == t and x0 <= l2 and got.shape[0] == rh and x0 + got.shape[1] >= r2
            assert np.array_equal(got[:, lf - x0:lf - x0 + rw], ref[t:t + rh, lf:lf + rw]), (d, t, lf, rh, rw)


def test_rows_below_the_region_are_never_decoded():
    """A JPEG cut off in its lower half: its top rows decode by region (the decoder stops before the
    missing data), while the whole-image decoder fails on the same bytes."""
    import simplejpeg
    a = natural(256, 256, seed=1)
    data = encode(a)
    cut = data[:int(len(data) * 0.6)]
    top, _, _ = decode_region(cut, 1, 0, 0, 64, 256)
    assert np.array_equal(top, whole(data, 1, 256, 256)[:64])
    with pytest.raises((ValueError, RuntimeError)):
        simplejpeg.decode_jpeg(cut, colorspace="RGB")
    with pytest.raises(ValueError):
        decode_region(cut, 1, 160, 0, 96, 256)


def test_corrupt_data_raises_a_one_line_error():
    with pytest.raises(ValueError, match=r"\S"):
        decode_region(b"\xff\xd8not a jpeg at all", 1, 0, 0, 4, 4)
    data = encode(natural(64, 64))
    with pytest.raises(ValueError, match="outside"):
        decode_region(data, 2, 0, 0, 40, 10)  # 1/2 scale is 32 x 32
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        decode_region(data, 3, 0, 0, 4, 4)


def test_view_plan_region_and_whole_give_the_same_view_pixels():
    """ViewPlan: the boxes cut from a region equal those cut from the whole image at that scale."""
    images = [natural(300, 400, seed=s) for s in range(6)]
    encs = [lazy_jpeg(encode(a)) for a in images]
    rng = np.random.default_rng(4)
    boxes = []
    for side in (96, 40):  # one view large enough for 1/2 scale, one small
        t = rng.integers(0, 300 - side, 6)
        lf = rng.integers(0, 400 - side, 6)
        boxes.append(np.stack([t, lf, np.full(6, side), np.full(6, side)], 1).astype(np.int64))
    outs = [(32, 32), (16, 16)]
    reg, flat = ViewPlan(encs, boxes, outs, region=True), ViewPlan(encs, boxes, outs, region=False)
    assert reg.region and not flat.region and np.array_equal(reg.d, flat.d) and (reg.d > 1).any()
    for i in range(6):
        a, ba = reg.sample(i)
        a = a.copy()  # a region lives in a reused buffer
        b, bb = flat.sample(i)
        assert a.shape[0] * a.shape[1] < b.shape[0] * b.shape[1]
        for (t1, l1, h1, w1), (t2, l2, h2, w2) in zip(ba, bb):
            assert (h1, w1) == (h2, w2)
            assert np.array_equal(a[t1:t1 + h1, l1:l1 + w1], b[t2:t2 + h2, l2:l2 + w2])


class _Jpegs(Source):
    type_name = "memjpg-region"

    def __init__(self, data):
        self.data = data
        self.name = "jpg"

    def __len__(self):
        return len(self.data)

    def read(self, i):
        return self.data[i], 0

    def describe(self, i):
        return f"mem://jpg/{i}.jpg"


def test_backend_views_identical_with_region_on_and_off(monkeypatch):
    """The torch backend (decoder cv2, flips on): region decode changes no pixel of any view, and
    without the extension the same batch comes from whole-image decode."""
    src = _Jpegs([encode(natural(288, 384, seed=s)) for s in range(16)])
    mix = Mixture([16], seed=1)

    def batch(**kw):
        return BatchMaker([src], Plan(mix, batch_size=16), crops=CROPS, seed=7, decoder="cv2", flip=True, **kw)(0)

    on, off = batch(), batch(region_decode=False)
    assert all(torch.equal(a, b) for a, b in zip(on.views, off.views))
    monkeypatch.setattr(D, "_region_ext", lambda: None)
    assert not D.region_available()
    assert all(torch.equal(a, b) for a, b in zip(batch().views, on.views))


def test_broken_jpeg_in_a_region_raises_late_decode_error():
    good = encode(natural(128, 128))
    broken = good[:len(good) // 3]
    encs = [lazy_jpeg(good), lazy_jpeg(broken)]
    boxes = [np.array([[0, 0, 128, 128], [64, 0, 64, 128]], np.int64)]
    plan = ViewPlan(encs, boxes, [(32, 32)])
    plan.sample(0)
    with pytest.raises(LateDecodeError, match="slot 1"):
        plan.sample(1)
