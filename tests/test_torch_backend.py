"""The torch backend: torchvision-exact crops, worker-count-independent order, exact resume, errors."""
import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from loaders.augment.sampler import batch_key, draw_boxes, draw_flips
from loaders.base import ArraySource, Source
from loaders.crop import CropSpec
from loaders.errors import DataError, SampleError
from loaders.mixture import Mixture, Plan
from loaders.torch_backend import BatchMaker, TorchLoader


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class BytesSource(Source):
    """PNG bytes of varying sizes held in memory; indices in ``corrupt`` hold garbage bytes."""

    type_name = "mem"

    def __init__(self, n: int, *, seed: int = 0, corrupt=(), name: str = "png"):
        rng = np.random.default_rng(seed)
        self.arrays = [rng.integers(0, 256, (int(rng.integers(10, 24)), int(rng.integers(10, 24)), 3),
                                    dtype=np.uint8) for _ in range(n)]
        self.data = [b"\x89PNG not really" if i in corrupt else _png(a) for i, a in enumerate(self.arrays)]
        self.name = name

    def __len__(self):
        return len(self.data)

    def read(self, i):
        return self.data[self._check_index(i)], 100 + i

    def labels(self):
        return 100 + np.arange(len(self))

    def describe(self, i):
        return f"mem://{self.name}/img{i}.png"


def _array_source(n=40, h=16, w=20, seed=1):
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), labels=np.arange(n) % 10, name="arr")


CROPS = [CropSpec(12, scale=(0.08, 1.0)), CropSpec(8, scale=(0.2, 1.0), interpolation="bicubic")]
_INTERP = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}


def test_crops_match_torchvision_resized_crop():
    sources = [_array_source(), BytesSource(30)]
    mix = Mixture([40, 30], dups=[1, 2], seed=3)
    plan = Plan(mix, batch_size=10, rank=1, world_size=2)
    plan.advance(2)  # the crop seed uses the absolute rank-stream position
    maker = BatchMaker(sources, plan, crops=CROPS, seed=5)
    for b in range(2):
        batch = maker(b)
        src, smp, gid = plan.batch(b)
        assert torch.equal(batch.index, torch.from_numpy(gid)) and torch.equal(batch.source, torch.from_numpy(src))
        pils = [Image.fromarray(sources[s].decode(j)[0]) for s, j in zip(src.tolist(), smp.tolist())]
        labels = [sources[s].read(j)[1] for s, j in zip(src.tolist(), smp.tolist())]
        assert batch.label.tolist() == labels
        key = batch_key(5, 1, plan.samples + b * 10)       # (seed, rank, rank-stream position)
        hw = [(p.size[1], p.size[0]) for p in pils]
        for spec, view, boxes in zip(CROPS, batch.views, draw_boxes(CROPS, hw, key=key)):
            assert view.dtype == torch.uint8 and view.shape == (10, 3, spec.size, spec.size)
            for i, (t, left, h, w) in enumerate(boxes.tolist()):
                ref = TF.pil_to_tensor(TF.resized_crop(pils[i], t, left, h, w, [spec.size, spec.size],
                                                       interpolation=_INTERP[spec.interpolation]))
                assert torch.equal(view[i], ref), (b, i)


def test_resize_and_as_is_views():
    arr = _array_source(n=12)
    mix = Mixture([12], seed=0)
    maker = BatchMaker([arr], Plan(mix, batch_size=6), resize=None)
    batch = maker(0)
    ids = batch.index.numpy()
    assert torch.equal(batch.views[0], torch.from_numpy(arr.images[ids]).permute(0, 3, 1, 2))
    maker = BatchMaker([arr], Plan(mix, batch_size=6), resize=8)
    view = maker(1).views[0]
    ids = maker(1).index.numpy()
    ref = np.stack([np.asarray(Image.fromarray(arr.images[i]).resize((8, 8), Image.Resampling.BILINEAR))
                    for i in ids])
    assert torch.equal(view, torch.from_numpy(ref).permute(0, 3, 1, 2))
    mixed = BatchMaker([BytesSource(8)], Plan(Mixture([8]), batch_size=8), resize=None)
    with pytest.raises(DataError, match=r"mem://png/img\d+\.png is \d+x\d+.*image_size"):
        mixed(0)


def _collect(loader, limit=None):
    out = []
    for k, batch in enumerate(loader):
        out.append(batch)
        if limit is not None and k + 1 == limit:
            break
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.label, y.label)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))


@pytest.mark.timeout(120)
def test_order_pixels_and_resume_independent_of_workers():
    sources = [_array_source(), BytesSource(30, seed=2)]
    mix = Mixture([40, 30], dups=[2, 1], budget=200, seed=11)

    def make(workers):
        return TorchLoader(sources, mix, batch_size=16, crops=CROPS, num_workers=workers, seed=4)

    ref_loader = make(0)
    assert len(ref_loader) == 12
    ref = _collect(ref_loader)
    assert len(ref) == 12 and len(ref_loader) == 0
    ids = torch.cat([b.index for b in ref]).numpy()
    src, smp = mix.positions(0, 192)
    assert np.array_equal(ids, mix.global_ids(src, smp))

    _same(_collect(make(2)), ref)
    for workers, k in [(0, 5), (1, 3), (2, 7)]:
        first = make(workers)
        head = _collect(first, limit=k)
        sd = first.state_dict()
        assert sd["plan"]["samples"] == 16 * k and len(first) == 12 - k
        resumed = make(workers)
        resumed.load_state_dict(sd)
        assert len(resumed) == 12 - k
        _same(head + _collect(resumed), ref)


@pytest.mark.timeout(120)
def test_on_error_skip_replaces_and_counts_corrupt_samples():
    corrupt = {3, 7, 21}
    sources = [_array_source(n=20), BytesSource(25, corrupt=corrupt)]
    mix = Mixture([20, 25], seed=2, budget=45)
    loader = TorchLoader(sources, mix, batch_size=9, crops=CROPS[:1], num_workers=2, on_error="skip")
    batches = _collect(loader)
    src, smp = mix.positions(0, 45)
    bad = (src == 1) & np.isin(smp, list(corrupt))
    good = mix.global_ids(src, smp)[~bad]
    # every batch whole (42 readable samples: 4 batches, the 6 left over are dropped at the plan's end)
    assert [len(b) for b in batches] == [9] * 4
    assert np.array_equal(torch.cat([b.index for b in batches]).numpy(), good[:36])
    last = np.flatnonzero(~bad)[35]  # the stream position of the last sample handed out
    assert [b.skipped for b in batches][-1] >= 0 and sum(b.skipped for b in batches) == bad[:last + 1].sum()
    assert loader.skipped == bad.sum() == 3 and loader.skipped_by_source == {"source0": 0, "source1": 3}
    assert loader.state_dict()["skipped"] == 3 and len(loader) == 0


@pytest.mark.timeout(60)
def test_on_error_raise_names_the_sample_without_hanging():
    sources = [BytesSource(12, corrupt={5})]
    loader = TorchLoader(sources, Mixture([12], budget=12), batch_size=4, crops=CROPS, num_workers=2)
    with pytest.raises(SampleError, match=r"mem://png/img5\.png: sample 5 cannot be decoded"):
        _collect(loader)
    with pytest.raises(SampleError, match=r"img5\.png"):
        _collect(TorchLoader(sources, Mixture([12], budget=12), batch_size=4, crops=CROPS, num_workers=0))


def test_infinite_stream_and_bad_arguments():
    arr = _array_source(n=10)
    loader = TorchLoader([arr], Mixture([10]), batch_size=4, num_workers=0)
    with pytest.raises(TypeError, match="infinite"):
        len(loader)
    got = _collect(loader, limit=6)  # 24 samples of a 10-sample source: runs past epochs
    assert sorted(torch.cat([b.index for b in got[:5]])[:20].tolist()) == sorted(list(range(10)) * 2)
    assert loader.state_dict()["plan"]["samples"] == 24
    with pytest.raises(ValueError, match="'source0' has 10 samples but the mixture expects 11"):
        TorchLoader([arr], Mixture([11]), batch_size=4)
    with pytest.raises(ValueError, match="on_error"):
        TorchLoader([arr], Mixture([10]), batch_size=4, on_error="ignore")
    other = TorchLoader([arr], Mixture([10], seed=1), batch_size=4)
    with pytest.raises(ValueError, match="another mixture"):
        other.load_state_dict(loader.state_dict())


class _AddKey:
    """Picklable worker hook: float views plus a value drawn from the batch's seed key."""

    def __call__(self, views, seed_key):
        g = torch.Generator().manual_seed(hash(seed_key) & 0x7FFFFFFF)
        return [v.float() + torch.rand((), generator=g) for v in views]  # one draw per view


@pytest.mark.timeout(120)
def test_worker_augment_hook_runs_per_batch_and_is_worker_independent():
    sources = [_array_source(), BytesSource(30, seed=2)]
    mix = Mixture([40, 30], budget=96, seed=7)

    def make(workers, hook):
        return TorchLoader(sources, mix, batch_size=16, crops=CROPS, num_workers=workers, seed=3,
                           worker_augment=hook)

    plain = _collect(make(0, None))
    got0 = _collect(make(0, _AddKey()))
    got2 = _collect(make(2, _AddKey()))
    _same(got0, got2)
    for b, (p, g) in enumerate(zip(plain, got0)):
        key = batch_key(3, 0, 16 * b)  # (seed, rank, rank-stream index of the batch's first sample)
        gen = torch.Generator().manual_seed(hash(key) & 0x7FFFFFFF)
        for u, v in zip(p.views, g.views):
            assert v.dtype == torch.float32 and torch.equal(v, u.float() + torch.rand((), generator=gen)), b
    with pytest.raises(ValueError, match="worker_augment must be callable"):
        TorchLoader(sources, mix, batch_size=4, worker_augment=3)


class JpegSource(Source):
    """JPEG bytes (quality 90) of natural-looking synthetic images; ``corrupt`` holds garbage."""

    type_name = "memjpg"

    def __init__(self, n: int, *, size: int = 64, corrupt=()):
        from loaders.synthetic import SyntheticSource
        self.images = SyntheticSource(n=n, size=size, seed=0).images
        self.data = []
        for i, a in enumerate(self.images):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=90)
            self.data.append(b"\xff\xd8 broken" if i in corrupt else buf.getvalue())
        self.name = "jpg"

    def __len__(self):
        return len(self.data)

    def read(self, i):
        return self.data[self._check_index(i)], i % 7

    def describe(self, i):
        return f"mem://jpg/{i}.jpg"


def test_cv2_fast_path_close_to_torchvision_same_boxes():
    """decoder="cv2": same crop boxes, resampling within the documented tolerance of the
    torchvision-exact PIL path (mean |diff| in 0..255 levels): < 0.5 when every crop is upscaled
    bilinearly, < 3 with OpenCV's bicubic (a=-0.75) and area (downscale) filters."""
    src = [JpegSource(48, size=64), _array_source(n=16, h=16, w=20)]
    mix = Mixture([48, 16], seed=1)
    cases = [([CropSpec(64)], 0.5, 2), ([CropSpec(32), CropSpec(16, interpolation="bicubic")], 3.0, 64),
             ([CropSpec(32, interpolation="bicubic")], 3.0, 64)]
    for crops, mean_tol, max_tol in cases:
        ref = BatchMaker(src, Plan(mix, batch_size=64), crops=crops, seed=2)(0)
        fast = BatchMaker(src, Plan(mix, batch_size=64), crops=crops, seed=2, decoder="cv2")(0)
        assert torch.equal(ref.index, fast.index) and torch.equal(ref.label, fast.label)
        for a, b in zip(ref.views, fast.views):
            assert a.shape == b.shape and b.dtype == torch.uint8
            d = (a.float() - b.float()).abs()
            assert d.mean() < mean_tol and d.max() <= max_tol, (crops, d.mean(), d.max())


@pytest.mark.parametrize("decoder", ["pil", "cv2"])
def test_flip_in_decode_mirrors_the_drawn_samples(decoder):
    src = [JpegSource(24, size=32), _array_source(n=16)]
    mix = Mixture([24, 16], seed=3)
    plan = Plan(mix, batch_size=20)
    plan.advance(1)
    plain = BatchMaker(src, plan, crops=CROPS, seed=4, decoder=decoder)(0)
    flipped = BatchMaker(src, plan, crops=CROPS, seed=4, decoder=decoder, flip=True)(0)
    mask = draw_flips(20, len(CROPS), key=batch_key(4, 0, 20))
    for v, (p, f) in enumerate(zip(plain.views, flipped.views)):
        m = torch.from_numpy(mask[:, v])
        assert 0 < int(m.sum()) < 20
        assert torch.equal(f[m], p[m].flip(-1)) and torch.equal(f[~m], p[~m])
    one = BatchMaker([src[1]], Plan(Mixture([16]), batch_size=8), seed=4, decoder=decoder, flip=True)(0)
    base = BatchMaker([src[1]], Plan(Mixture([16]), batch_size=8), seed=4, decoder=decoder)(0)
    m = torch.from_numpy(draw_flips(8, 1, key=batch_key(4, 0, 0))[:, 0])
    assert torch.equal(one.views[0][m], base.views[0][m].flip(-1)) and torch.equal(one.views[0][~m], base.views[0][~m])


@pytest.mark.timeout(120)
def test_cv2_path_workers_resume_and_errors():
    src = [JpegSource(30, size=24, corrupt={4}), _array_source(n=20)]
    mix = Mixture([30, 20], budget=96, seed=5)

    def make(workers, on_error="skip"):
        return TorchLoader(src, mix, batch_size=16, crops=CROPS, num_workers=workers, seed=1, on_error=on_error,
                           decoder="cv2", flip=True)

    ref_loader = make(0)
    ref = _collect(ref_loader)
    assert ref_loader.flip and ref_loader.skipped == int(((mix.positions(0, 96)[0] == 0)
                                                          & (mix.positions(0, 96)[1] == 4)).sum()) > 0
    _same(_collect(make(2)), ref)
    first = make(2)
    head = _collect(first, limit=2)
    resumed = make(1)
    resumed.load_state_dict(first.state_dict())
    _same(head + _collect(resumed), ref)
    with pytest.raises(SampleError, match=r"mem://jpg/4\.jpg: sample 4 cannot be decoded"):
        _collect(make(0, on_error="raise"))
    with pytest.raises(ValueError, match="decoder must be one of"):
        TorchLoader(src, mix, batch_size=4, decoder="turbo")


def test_build_loader_passes_fast_path_options():
    from loaders.pipeline import build_loader
    cfg = {"sources": [{"name": "syn", "type": "synthetic", "n": 32, "size": 16}], "backend": "torch",
           "batch_size": 8, "num_workers": 0, "backend_options": {"decoder": "cv2", "flip": True}}
    loader = build_loader(cfg, crops=[CropSpec(8)])
    assert isinstance(loader, TorchLoader) and loader.decoder == "cv2" and loader.flip
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch.views] == [(8, 3, 8, 8)] and batch.views[0].dtype == torch.uint8


def test_cv2_decoder_reads_jpeg_pixel_identical_to_pil_and_other_formats_via_opencv():
    """decoder="cv2" decodes JPEG bytes with simplejpeg when installed: the same libjpeg-turbo
    decode as PIL, so the pixels are identical (colour and grayscale JPEGs); other formats and
    JPEGs simplejpeg refuses go through OpenCV."""
    pytest.importorskip("cv2")
    from loaders.torch_backend import _fast_decoders, _open_cv2
    rng = np.random.default_rng(0)
    src = JpegSource(1, size=8)
    low = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(low).resize((50, 37), Image.Resampling.BICUBIC))
    for img, fmt in ((Image.fromarray(rgb), "JPEG"), (Image.fromarray(rgb).convert("L"), "JPEG"),
                     (Image.fromarray(rgb), "PNG")):
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=90)
        data = buf.getvalue()
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        got = _open_cv2(data, src, 0)
        assert got.shape == want.shape and got.dtype == np.uint8
        assert np.array_equal(got, want), (fmt, img.mode, np.abs(got.astype(int) - want).max())
    try:
        import simplejpeg  # noqa: F401
        assert _fast_decoders()[0] is not None
    except ImportError:
        assert _fast_decoders()[0] is None


def test_cv2_mild_reductions_resample_like_pil():
    """Crops reduced by less than AREA_MIN_FACTOR use OpenCV's bilinear/bicubic (not its slow
    area filter on non-integer factors): still within a fraction of a level of PIL's
    antialiased filters on natural-looking images."""
    pytest.importorskip("cv2")
    from loaders import torch_backend as T
    rng = np.random.default_rng(3)
    low = rng.integers(0, 256, (12, 40, 10, 10, 3), dtype=np.uint8)[0]
    imgs = np.stack([np.asarray(Image.fromarray(x).resize((72, 72), Image.Resampling.BICUBIC)) for x in low])
    src = ArraySource(imgs, np.arange(40))
    mix = Mixture([40], seed=0)
    crops = [CropSpec(64, scale=(0.85, 1.0)), CropSpec(64, scale=(0.85, 1.0), interpolation="bicubic")]
    ref = BatchMaker([src], Plan(mix, batch_size=40), crops=crops, seed=1)(0)
    fast = BatchMaker([src], Plan(mix, batch_size=40), crops=crops, seed=1, decoder="cv2")(0)
    for a, b in zip(ref.views, fast.views):
        d = (a.float() - b.float()).abs()
        assert d.mean() < 1.0, d.mean()
    assert T.AREA_MIN_FACTOR > 72 / 64


@pytest.mark.parametrize("decoder", ["pil", "cv2"])
def test_hook_returning_its_crops_never_sees_them_overwritten(decoder):
    """With a worker hook the crop buffers are reused from batch to batch; a hook that hands the
    crops back (or a view of them) must still get distinct, intact batches."""
    if decoder == "cv2":
        pytest.importorskip("cv2")
    src = _array_source(n=32, h=24, w=20)
    crops = [CropSpec(16), CropSpec(12)]
    kw = dict(batch_size=8, crops=crops, num_workers=0, seed=4, decoder=decoder)
    want = [b.views for b in TorchLoader([src], Mixture([32], budget=32, seed=0), **kw)]
    for hook in (lambda views, key: views, lambda views, key: [v[:, :, 1:] for v in views]):
        got = [b.views for b in TorchLoader([src], Mixture([32], budget=32, seed=0), worker_augment=hook, **kw)]
        assert len(got) == len(want) == 4
        for g, w in zip(got, want):
            assert all(torch.equal(x, y[:, :, -x.shape[2]:]) for x, y in zip(g, w))


@pytest.mark.parametrize("workers", [0, 1])
def test_starting_the_loader_draws_nothing_from_the_global_rng(workers):
    """A resumed trainer restores the global RNG before the first batch: the loader must not
    draw from it, or every later draw of a method (VAE noise, masks) shifts."""
    src = ArraySource(np.zeros((32, 8, 8, 3), np.uint8))
    loader = TorchLoader([src], Mixture([32], budget=32), batch_size=8, num_workers=workers)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    it = iter(loader)
    next(it)
    assert torch.equal(torch.rand(4), expected)
