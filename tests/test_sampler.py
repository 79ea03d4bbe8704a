"""The one sampler: every place that augments gets the same parameters for the same (seed, rank, step).

* the key: the torch backend's batches carry ``batch_key(seed, rank, first_item)`` and hand it to
  the worker hook;
* worker crops are the engine's crops for that key (pixels equal torchvision's resized_crop on the
  engine's boxes), the OpenCV executor's views equal the engine's for that key (float32 rounding);
* an op's draw does not depend on the other ops (turn blur off: crops, flips, jitter unchanged);
* the crop sampler with per-sample sizes is torchvision's distribution (KS), its fallback, and box for
  box its get_params logic run per sample on the same draws;
* one hash (scalar == vectorised, the old formulas' values), one on_error check, stage checks.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from test_torch_backend import BytesSource
from torchvision.transforms import v2

from loaders import Batch
from loaders.augment import Augment, ViewSpec
from loaders.augment import ops as O
from loaders.augment import sampler as S
from loaders.errors import ConfigError, check_on_error
from loaders.hashing import mix, splitmix64, splitmix64_np
from loaders.mixture import Mixture
from loaders.torch_backend import TorchLoader

RECIPE = dict(size=16, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale=0.2,
              blur_p=0.5, flip=0.5)


def _aug(seed=3, **kw):
    return Augment([ViewSpec(**{**RECIPE, **kw}, count=2)], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), seed=seed)


def _source(n=24, seed=0):
    """PNG images of mixed sizes (10..23 px a side: a crop sampler with per-sample sizes is needed)."""
    return BytesSource(n, seed=seed)


def _batches(loader):
    return [b for b in loader]


def test_batch_key_is_what_the_torch_backend_uses():
    seen = []

    def hook(views, key):
        seen.append(key)
        return [v.float() for v in views]

    aug = _aug()
    src = _source()
    loader = TorchLoader([src], Mixture([len(src)], budget=32, seed=1), batch_size=8, crops=aug.crop_specs,
                         num_workers=0, seed=7, rank=1, world_size=2, worker_augment=hook)
    batches = _batches(loader)
    assert seen == [S.batch_key(7, 1, 0), S.batch_key(7, 1, 8)]
    assert [b.key for b in batches] == seen and all(b.stage == "augmented" for b in batches)
    assert S.batch_key(7, 1, 0) != S.batch_key(7, 0, 0) != S.batch_key(8, 1, 0)


def test_worker_crops_are_the_engine_crops_for_the_key():
    aug = _aug(interpolation="bilinear")
    src = _source()
    loader = TorchLoader([src], Mixture([len(src)], budget=16, seed=2), batch_size=8, crops=aug.crop_specs,
                         num_workers=0, seed=5)
    for batch in _batches(loader):
        assert batch.stage == "cropped"
        imgs = [src.arrays[int(i)] for i in batch.index]
        sizes = torch.tensor([im.shape[:2] for im in imgs])
        params = aug.draw(len(batch), key=batch.key, sizes=sizes)          # what the engine draws
        for v, p in enumerate(params):
            for i, (t, left, h, w) in enumerate(p.box.tolist()):
                ref = TF.pil_to_tensor(TF.resized_crop(Image.fromarray(imgs[i]), t, left, h, w, [16, 16],
                                                       interpolation=TF.InterpolationMode.BILINEAR))
                assert torch.equal(batch.views[v][i], ref), (v, i)


def test_cv2_executor_equals_the_engine_for_the_key():
    pytest.importorskip("cv2")
    from loaders.cpu_augment import WorkerAugment
    aug = _aug()
    src = _source()
    kw = dict(batch_size=8, crops=aug.crop_specs, num_workers=0, seed=4, decoder="cv2")
    mix = Mixture([len(src)], budget=16, seed=3)
    crops = _batches(TorchLoader([src], mix, **kw))
    done = _batches(TorchLoader([src], mix, worker_augment=WorkerAugment(aug, impl="cv2"), **kw))
    for c, d in zip(crops, done):
        assert c.key == d.key and d.stage == "augmented"
        ref = aug(c, crop=False)          # the key comes from the batch
        for r, o in zip(ref.views, d.views):
            assert (r - o).abs().max() < 2e-4


def test_an_ops_draw_does_not_depend_on_the_other_ops():
    sizes = torch.tensor([[30, 40]] * 64)
    on = S.draw(_aug(), 64, key=11, sizes=sizes)
    off = S.draw(_aug(blur_p=0.0, jitter_p=0.0), 64, key=11, sizes=sizes)
    only = S.draw(_aug(), 64, key=11, sizes=sizes, ops=("flip", "crop"))
    for a, b, c in zip(on, off, only):
        for f in ("box", "flip", "gray", "jitter_order"):
            assert torch.equal(a[f], b[f]), f
        assert torch.equal(a.box, c.box) and torch.equal(a.flip, c.flip) and c.jitter_apply is None
        assert 10 < int(a.flip.sum()) < 54
    # views and keys differ
    assert not torch.equal(on[0].box, on[1].box)
    assert not torch.equal(on[0].box, S.draw(_aug(), 64, key=12, sizes=sizes)[0].box)
    # the engine on a batch applies exactly this draw: flip-only view of a full-size crop
    flip_only = Augment([ViewSpec(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.5)], mean=(0, 0, 0),
                        std=(1, 1, 1), seed=3)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    z = torch.zeros(16, dtype=torch.long)
    out = flip_only(Batch(views=[x], index=torch.arange(16), source=z, label=z), key=5)
    m = S.draw(flip_only, 16, key=5)[0].flip
    assert out.stage == "augmented" and out.key == 5
    assert torch.allclose(out.views[0][m], x[m].flip(-1).float() / 255) and torch.allclose(
        out.views[0][~m], x[~m].float() / 255)


def test_crop_sampler_with_per_sample_sizes_is_torchvisions():
    n, scale, ratio = 3000, (0.08, 1.0), (3 / 4, 4 / 3)
    hw = np.array([(24, 40), (32, 32), (50, 20)])
    g = torch.Generator().manual_seed(0)
    which = np.arange(n) % 3
    ours = O.crop.rrc_boxes(torch.from_numpy(hw[which, 0]), torch.from_numpy(hw[which, 1]), scale=scale,
                            ratio=ratio, g=g).numpy()
    torch.manual_seed(1)
    for k, (h, w) in enumerate(hw):
        tv = np.array([v2.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))
                       for _ in range(n // 3)])
        mine = ours[which == k]
        for f in (lambda b: b[:, 2] * b[:, 3], lambda b: np.log(b[:, 3] / b[:, 2]), lambda b: b[:, 0],
                  lambda b: b[:, 1]):
            assert stats.ks_2samp(f(mine), f(tv)).pvalue > 1e-3
        assert (mine[:, 0] + mine[:, 2] <= h).all() and (mine[:, 1] + mine[:, 3] <= w).all()
        assert (mine[:, :2] >= 0).all()


def test_crop_boxes_equal_torchvisions_get_params_run_per_sample_on_the_same_draws():
    """rrc_boxes resolves attempt by attempt, vectorised over the samples still without a box:
    every box must equal torchvision's get_params logic run sample by sample in plain Python on
    the same three draws (area fractions, log aspects, placements)."""
    rng = np.random.default_rng(3)
    for scale, ratio in (((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (0.5, 2.0)), ((0.99, 1.0), (0.9, 1.1))):
        n = 400
        H, W = rng.integers(1, 600, n), rng.integers(1, 600, n)
        H[:100] = W[:100] = 32
        got = O.crop.rrc_boxes(torch.from_numpy(H), torch.from_numpy(W), scale=scale, ratio=ratio,
                               g=torch.Generator().manual_seed(11)).tolist()
        g = torch.Generator().manual_seed(11)
        ra, rr, u = (torch.rand(n, k, generator=g, dtype=torch.float64).tolist() for k in (10, 10, 2))
        lr = (math.log(ratio[0]), math.log(ratio[1]))
        for i in range(n):
            h0, w0 = int(H[i]), int(W[i])
            for a in range(10):
                target = h0 * w0 * (ra[i][a] * (scale[1] - scale[0]) + scale[0])
                ar = math.exp(rr[i][a] * (lr[1] - lr[0]) + lr[0])
                w, h = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
                if 0 < w <= w0 and 0 < h <= h0:
                    want = [math.floor(u[i][0] * (h0 - h + 1)), math.floor(u[i][1] * (w0 - w + 1)), h, w]
                    break
            else:  # torchvision's central fallback
                r = w0 / h0
                h = round(w0 / min(ratio)) if r < min(ratio) else h0
                w = round(h0 * max(ratio)) if r > max(ratio) else w0
                want = [(h0 - h) // 2, (w0 - w) // 2, h, w]
            assert got[i] == want, (scale, ratio, h0, w0)


def test_crop_fallback_is_torchvisions_central_crop_per_sample():
    hw = [(10, 40), (40, 10)]   # too wide, too tall for the ratio range: no attempt fits at scale >= 0.99
    g = torch.Generator().manual_seed(0)
    b = O.crop.rrc_boxes(torch.tensor([h for h, _ in hw]), torch.tensor([w for _, w in hw]), scale=(0.99, 1.0),
                         ratio=(0.9, 1.1), g=g)
    for (h, w), box in zip(hw, b.tolist()):
        tv = v2.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.99, 1.0], [0.9, 1.1])
        assert box == list(tv), (h, w)


def test_params_are_cpu_and_move_to_a_device():
    p = S.draw(_aug(), 4, key=1, sizes=torch.tensor([[20, 20]] * 4))[0]
    assert p.box.device.type == "cpu" and p.to("cpu") is p
    d = p.numpy()
    assert d["box"].dtype == np.int64 and d["jitter_factors"].dtype == np.float32 and d["flip"].dtype == bool
    assert set(O.BY_NAME) == {"crop", "flip", "jitter", "grayscale", "blur", "solarize", "randaugment", "normalize"}
    assert O.blur.kernel_size(224) == 23 and O.blur.kernel_size(32) == 5 and O.blur.kernel_size(32, 9) == 9


def test_one_hash():
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 2**63, 50, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    assert [splitmix64(int(x)) for x in xs] == [int(v) for v in splitmix64_np(xs)]
    # the chain the engine's old make_generator/step_for used (kept: same keys, same resumes)
    h = 0
    for p in (5, 2, 96):
        x = (h ^ p) + 0x9E3779B97F4A7C15 & (2**64 - 1)
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        h = x ^ (x >> 31)
    assert mix(5, 2, 96) == h & (2**63 - 1) == S.batch_key(5, 2, 96)
    assert mix(1, 2) != mix(2, 1) and mix(-1) == mix(2**64 - 1)


def test_stage_checks_and_fallback_warning_and_on_error():
    aug = _aug()
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    z = torch.zeros(4, dtype=torch.long)
    for stage in ("augmented", "augmented-uint8"):
        done = Batch(views=[x, x], index=torch.arange(4), source=z, label=z, stage=stage, key=1)
        with pytest.raises(ValueError, match="augmented already"):
            aug(done, crop=False)
    with pytest.raises(ValueError, match="batch key"):
        aug(Batch(views=[x], index=torch.arange(4), source=z, label=z))
    pytest.importorskip("cv2")
    from loaders.cpu_augment import WorkerAugment
    hook = WorkerAugment(_aug(solarize=0.2), impl="cv2")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hook([x, x], 3)
        hook([x, x], 4)
    msgs = [str(m.message) for m in w if "OpenCV executor lacks" in str(m.message)]
    assert len(msgs) == 1 and "solarize" in msgs[0]
    assert check_on_error("skip", "data") == "skip"
    with pytest.raises(ConfigError, match="data.x: on_error must be 'raise' or 'skip', got 'ignore'"):
        check_on_error("ignore", "data.x")
