"""The Augment engine: wiring, determinism, per-sample strength, presets and config checks."""
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from loaders import Batch, ConfigError
from loaders.augment import Augment, ViewSpec, list_presets, load_grid, load_preset_config
from loaders.augment import params as P
from loaders.augment import sampler as S
from loaders.augment.randaugment import RandAugmentSpec

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def make_batch(n=16, size=32, seed=0, views=1, same=False):
    g = torch.Generator().manual_seed(seed)
    if same:
        img = torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8).expand(n, 3, size, size)
        vs = [img.contiguous() for _ in range(views)]
    else:
        vs = [torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8) for _ in range(views)]
    z = torch.zeros(n, dtype=torch.long)
    return Batch(views=vs, index=torch.arange(n), source=z, label=z)


def denorm(x, mean=CIFAR_MEAN, std=CIFAR_STD):
    return x * torch.tensor(std).reshape(1, 3, 1, 1) + torch.tensor(mean).reshape(1, 3, 1, 1)


def test_output_layout_and_dtype():
    aug = Augment.from_preset("symmetric")
    out = aug(make_batch(), step=0)
    assert aug.num_views == 2 and len(out.views) == 2
    for v in out.views:
        assert v.dtype == torch.float32 and v.shape == (16, 3, 32, 32)
    assert torch.equal(out.index, torch.arange(16))


def test_determinism_and_independence():
    aug = Augment.from_preset("symmetric")
    b = make_batch(same=True)
    a1, a2 = aug(b, step=5), aug(b, step=5)
    for x, y in zip(a1.views, a2.views):
        assert torch.equal(x, y)
    a3 = aug(b, step=6)
    assert not torch.equal(a1.views[0], a3.views[0])
    # identical input images: every sample and every view still gets its own parameters
    v0 = a1.views[0].flatten(1)
    assert torch.unique(v0, dim=0).shape[0] == v0.shape[0]
    assert not torch.equal(a1.views[0], a1.views[1])
    # another seed, other views
    other = Augment.from_preset("symmetric", seed=1)(b, step=5)
    assert not torch.equal(other.views[0], a1.views[0])


def test_crop_only_view_equals_functional_crop():
    """With every random op off, view v is exactly resized_crop on the boxes the sampler draws
    for (seed, key, v): the wiring adds nothing else."""
    spec = ViewSpec(size=24, scale=(0.2, 1.0), interpolation="bicubic", flip=0.0)
    aug = Augment([spec], mean=(0, 0, 0), std=(1, 1, 1), seed=3)
    b = make_batch(n=8, size=32)
    out = aug(b, key=11).views[0]
    boxes = S.draw_view(spec, 8, key=11, view=0, seed=3, sizes=torch.tensor([[32, 32]] * 8)).box
    ref = torch.stack([TF.resized_crop(b.views[0][i].float() / 255, *boxes[i].tolist(), [24, 24],
                                       interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
                       for i in range(8)])
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(aug(b, step=11).views[0], out)      # step= is the key's old name


def test_flip_probability_and_grayscale_effect():
    b = make_batch(n=64)
    always = Augment([ViewSpec(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)], mean=(0, 0, 0), std=(1, 1, 1))
    out = always(b, step=0).views[0]
    assert (out - b.views[0].flip(-1).float() / 255).abs().max() < 1e-6
    gray = Augment([ViewSpec(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, grayscale=1.0)],
                   mean=(0, 0, 0), std=(1, 1, 1))(b, step=0).views[0]
    assert (gray[:, 0] == gray[:, 1]).all() and (gray[:, 1] == gray[:, 2]).all()


def test_jitter_view_matches_torchvision_order():
    """One sample through the jitter path equals torchvision's ops applied in the sampled order."""
    spec = ViewSpec(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, jitter_p=1.0,
                    brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    aug = Augment([spec], mean=(0, 0, 0), std=(1, 1, 1), seed=0)
    b = make_batch(n=8)
    out = aug(b, step=2).views[0]
    p = S.draw_view(spec, 8, key=2, view=0, seed=0)
    jit = P.JitterParams(apply=p.jitter_apply, order=p.jitter_order, factors=p.jitter_factors)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(8):
        x = b.views[0][i].float() / 255
        for k in jit.order[i].tolist():
            x = fns[k](x, float(jit.factors[i, k]))
        assert (out[i] - x).abs().max() < 1e-4


def test_crop_false_path_and_view_count_checks():
    aug = Augment.from_preset("symmetric")
    pre = make_batch(n=4, views=2)
    out = aug(pre, step=0, crop=False)
    assert [tuple(v.shape) for v in out.views] == [(4, 3, 32, 32)] * 2
    # no crop, no flip etc: an isicle view with flip 0 is then just normalisation
    plain = Augment.from_preset("isicle", flip=0.0)(pre, step=0, crop=False)
    assert (denorm(plain.views[1]) - pre.views[1].float() / 255).abs().max() < 1e-5
    with pytest.raises(ValueError, match="one pre-cropped input view per output view"):
        aug(make_batch(n=4), step=0, crop=False)
    with pytest.raises(ValueError, match="expected 1 or 2"):
        aug(make_batch(n=4, views=3), step=0)
    with pytest.raises(ValueError, match="strength"):
        aug(make_batch(n=4), step=0, strength=torch.ones(3))
    assert [c.size for c in aug.crop_specs] == [32, 32]
    assert aug.crop_specs[0].interpolation == "bicubic" and aug.crop_specs[0].scale == (0.08, 1.0)


def test_bcl_strength_zero_equals_no_randaugment_and_one_changes():
    bcl = Augment.from_preset("bcl")
    plain_cfg = load_preset_config("bcl")
    plain_cfg["defaults"] = {k: v for k, v in plain_cfg["defaults"].items() if k != "randaugment"}
    plain = Augment.from_config(plain_cfg)
    b = make_batch(n=32)
    none = plain(b, step=4)
    zero = bcl(b, step=4, strength=torch.zeros(32))
    off = bcl(b, step=4)            # no strength: RandAugment off (BCL's first epoch)
    one = bcl(b, step=4, strength=torch.ones(32))
    for v in range(2):
        assert torch.equal(zero.views[v], none.views[v])
        assert torch.equal(off.views[v], none.views[v])
    changed = (one.views[0] != none.views[0]).flatten(1).any(1).float().mean().item()
    assert changed > 0.8   # 14 of 15 ops change an image at m = 30 (posterize keeps 8 bits)
    # mixed strengths: w = 0 samples are exactly the no-RandAugment samples
    w = torch.zeros(32)
    w[::2] = 1.0
    mixed = bcl(b, step=4, strength=w)
    assert torch.equal(mixed.views[0][1::2], none.views[0][1::2])


def test_multicrop_dino():
    aug = Augment.from_preset("dino_multicrop")
    assert aug.num_views == 8
    assert [s.size for s in aug.specs] == [224, 224] + [96] * 6
    assert aug.specs[0].scale == (0.4, 1.0) and aug.specs[2].scale == (0.05, 0.4)
    assert (aug.specs[0].blur_p, aug.specs[1].blur_p, aug.specs[2].blur_p) == (1.0, 0.1, 0.5)
    assert (aug.specs[0].solarize, aug.specs[1].solarize) == (0.0, 0.2)
    out = aug(make_batch(n=2, size=64), step=0)
    assert [v.shape[-1] for v in out.views] == [224, 224] + [96] * 6


# ------------------------------------------------------------------ presets carry REFERENCE's numbers

# preset: (min scale, jitter p, (b, c, s, h), blur per view, solarize per view) -- REFERENCE.md §1
REF = {
    "symmetric": (0.08, 0.8, (0.8, 0.8, 0.8, 0.2), (0.5, 0.5), (0.0, 0.0)),
    "symmetric_adainf": (0.2, 0.4, (0.4, 0.4, 0.4, 0.1), (0.5, 0.5), (0.0, 0.0)),
    "symmetric_weak": (0.08, 0.8, (0.4, 0.4, 0.4, 0.1), (0.5, 0.5), (0.0, 0.0)),
    "asymmetric": (0.08, 0.8, (0.4, 0.4, 0.2, 0.1), (0.0, 0.0), (0.0, 0.2)),
    "asymmetric_adainf": (0.2, 0.4, (0.4, 0.4, 0.2, 0.1), (0.0, 0.0), (0.0, 0.2)),
}


@pytest.mark.parametrize("name", sorted(REF))
def test_adainf_presets_carry_reference_numbers(name):
    scale, jp, jitter, blur, sol = REF[name]
    aug = Augment.from_preset(name)
    assert aug.num_views == 2
    assert aug.mean == CIFAR_MEAN and aug.std == CIFAR_STD
    for v, spec in enumerate(aug.specs):
        assert spec.size == 32 and spec.scale == (scale, 1.0) and spec.interpolation == "bicubic"
        assert spec.flip == 0.5 and spec.grayscale == 0.2 and spec.jitter_p == jp
        assert (spec.brightness, spec.contrast, spec.saturation, spec.hue) == jitter
        assert spec.blur_p == blur[v] and spec.solarize == sol[v]
        assert spec.randaugment is None


def test_other_presets():
    bcl = Augment.from_preset("bcl").specs[0]
    assert bcl.scale == (0.1, 1.0) and bcl.interpolation == "bicubic" and bcl.jitter_p == 0.8
    assert (bcl.brightness, bcl.contrast, bcl.saturation, bcl.hue) == (0.4, 0.4, 0.4, 0.1)
    assert bcl.grayscale == 0.2 and bcl.blur_p == 0.0
    assert bcl.randaugment.num_ops == 1 and bcl.randaugment.min_magnitude == 10
    assert Augment.from_preset("bcl_d").specs[0].randaugment.num_ops == 2
    isicle = Augment.from_preset("isicle").specs[0]
    assert isicle.jitter_p == isicle.blur_p == isicle.grayscale == isicle.solarize == 0.0 and isicle.flip == 0.5
    byol = Augment.from_preset("imagenet_byol")
    assert [s.blur_p for s in byol.specs] == [1.0, 0.1] and [s.solarize for s in byol.specs] == [0.0, 0.2]
    assert byol.mean == (0.485, 0.456, 0.406) and byol.specs[0].kernel_size == 23
    simclr = Augment.from_preset("imagenet_simclr").specs[0]
    assert (simclr.size, simclr.jitter_p, simclr.brightness, simclr.hue, simclr.blur_p) == (224, 0.8, 0.8, 0.2, 0.5)
    assert set(list_presets()) >= {"symmetric", "symmetric_weak", "symmetric_adainf", "asymmetric",
                                   "asymmetric_adainf", "bcl", "isicle", "imagenet_simclr",
                                   "imagenet_byol", "dino_multicrop"}


def test_ablation_grids_and_overrides():
    grid = load_grid("crop_min_scale")
    assert grid["values"] == [0.02, 0.05, 0.08, 0.1, 0.2, 0.3, 0.4]
    for s in grid["values"]:
        aug = Augment.from_preset(grid["preset"], **{grid["override"]: s})
        assert all(sp.scale == (s, 1.0) for sp in aug.specs)
    jgrid = load_grid("jitter_strength")
    assert jgrid["values"] == [0.1, 0.5, 1.0, 2.0]
    for s in jgrid["values"]:
        sp = Augment.from_preset("symmetric", jitter_strength=s).specs[1]
        got = (sp.brightness, sp.contrast, sp.saturation, sp.hue)
        assert got == pytest.approx((0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s))
    # per-view overrides are replaced too (asymmetric's view 2 has its own solarize)
    asym = Augment.from_preset("asymmetric", solarize=0.5)
    assert [s.solarize for s in asym.specs] == [0.5, 0.5]


def test_config_errors_name_the_closest_key():
    with pytest.raises(ConfigError, match="jitter_p"):
        Augment.from_preset("symmetric", jiter_p=0.5)
    with pytest.raises(ConfigError, match="symmetric"):
        Augment.from_preset("symetric")
    cfg = load_preset_config("symmetric")
    cfg["defaults"]["blur_sigmaa"] = [0.1, 2.0]
    with pytest.raises(ConfigError, match="blur_sigma"):
        Augment.from_config(cfg)
    cfg = load_preset_config("bcl")
    cfg["defaults"]["randaugment"] = {"num_op": 1}
    with pytest.raises(ConfigError, match="num_ops"):
        Augment.from_config(cfg)
    with pytest.raises(ConfigError, match="probability"):
        Augment.from_preset("symmetric", flip=1.5)
    with pytest.raises(ConfigError, match="missing key 'std'"):
        Augment.from_config({"mean": [0, 0, 0], "views": [{"size": 8}]})


def test_user_yaml_preset_is_data(tmp_path):
    import yaml
    cfg = {"mean": [0.5] * 3, "std": [0.5] * 3, "defaults": {"size": 16, "flip": 0.0},
           "views": [{"count": 1}, {"size": 8, "randaugment": {"num_ops": 2, "magnitude": 9, "p": 1.0}}]}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    aug = Augment.from_config(yaml.safe_load(path.read_text()))
    out = aug(make_batch(n=4), step=0)
    assert [v.shape[-1] for v in out.views] == [16, 8]
    assert aug.specs[1].randaugment == RandAugmentSpec(num_ops=2, magnitude=9, p=1.0)
