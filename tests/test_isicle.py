"""ISICLE: the ``isicle`` recipe (a frozen conditional generator rewrites the views), the ``imle``
method that trains the built-in generator, and the generator registry / import paths.

Exactness is checked through the real trainer on CPU (``train.deterministic``): a recipe whose
generator returns its input, or that replaces nothing (p = 0), trains bit for bit like plain
SimCLR with the same preset. Resume of both (``imle``, ``simclr+isicle``) is in test_resume.py.
"""
import json
from types import SimpleNamespace

import pytest
import torch
from synccount import count_host_syncs

from fastssl.config import CONFIG_ROOT, load_config
from fastssl.methods import build_method
from fastssl.models import build_backbone
from fastssl.models.generator import ConditionalGenerator, IdentityGenerator, resolve_generator
from fastssl.recipes import SetupContext, build_recipes
from fastssl.recipes.isicle import ISICLE
from fastssl.trainer import train
from loaders.augment.params import make_generator
from loaders.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class TinyGenerator(torch.nn.Module):
    """A user generator named by import path: [-1, 1] range, codes from ``sample_code``."""

    value_range = "symmetric"

    def __init__(self, scale: float = 0.5):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def sample_code(self, batch, device, generator):
        return torch.rand(batch, 1, device=device, generator=generator)

    def forward(self, x, code):
        return x * self.scale + code.view(-1, 1, 1, 1)


def _ctx(world=1, rank=0):
    acc = SimpleNamespace(process_index=rank, num_processes=world)
    return SetupContext(num_samples=64, source_sizes=[64], source_names=["syn"], epoch_length=64,
                        images_per_step=16, total_steps=4, method=None, accelerator=acc,
                        device=torch.device("cpu"))


def _recipe(**kw):
    (r,) = build_recipes([{"name": "isicle", **kw}])
    r.setup(_ctx())
    return r


def _views(b=6, n=2, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(n)]


def _cfg(tmp_path, name, *overrides):
    base = {
        "name": "isicle",
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 32, "size": 16}],
                 "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": "isicle", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 4, "deterministic": True, "seed": 2},
        "eval": {"enabled": False},
        "log": {"out": str(tmp_path / name), "every": 2, "progress": False, "indices": True,
                "tensorboard": False, "plot": False},
    }
    return load_config(None, list(overrides), base=base)


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "indices_rank0.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- exactness through the trainer
def test_identity_generator_and_p0_train_exactly_like_plain_simclr(tmp_path):
    train(_cfg(tmp_path, "plain"))
    plain = _losses(tmp_path / "plain")
    assert len(plain) == 4
    for name, recipe in [("identity", "{name: isicle, generator: identity}"),
                         ("p0", "{name: isicle, generator: imle, p: 0.0, kwargs: {width: 4, feat_dim: 8}, "
                                "corrupt: [grayscale, pixel_mask]}")]:
        train(_cfg(tmp_path, name, f"recipes=[{recipe}]"))
        assert _losses(tmp_path / name) == plain, name   # bit for bit
    wa = torch.load(tmp_path / "plain" / "backbone.pt", weights_only=True)
    wb = torch.load(tmp_path / "identity" / "backbone.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same generator with p = 1 does change the views, hence the losses
    train(_cfg(tmp_path, "p1", "recipes=[{name: isicle, generator: imle, p: 1.0, kwargs: {width: 4, feat_dim: 8}, "
                               "corrupt: [grayscale]}]"))
    assert _losses(tmp_path / "p1") != plain


# ---------------------------------------------------------------- the recipe's hook
def test_rewrite_views_follows_the_seeding_rule_and_the_generator_range():
    r = _recipe(generator="test_isicle:TinyGenerator", kwargs={"scale": 0.25}, p=0.5, seed=7)
    assert isinstance(r.generator, TinyGenerator) and not r.generator.training
    assert not any(p.requires_grad for p in r.generator.parameters())
    views = _views()
    for call in range(2):
        with count_host_syncs() as syncs:
            out = r.rewrite_views(views, None)
        assert sum(syncs.values()) == 0, syncs
        for v, (x, y) in enumerate(zip(views, out)):
            g = make_generator("cpu", 7, call, v)   # (seed, call * world + rank, view)
            keep = torch.rand(6, generator=g) < 0.5
            code = torch.rand(6, 1, generator=g).view(-1, 1, 1, 1)
            u = (x * STD + MEAN) * 2 - 1
            want = (((u * 0.25 + code) + 1) / 2 - MEAN) / STD
            torch.testing.assert_close(y[keep], want[keep], rtol=1e-5, atol=1e-5)
            assert torch.equal(y[~keep], x[~keep])   # not replaced: untouched
            assert 0 < int(keep.sum()) < 6
    assert r.state_dict() == {"calls": 2}
    m = r.metrics()
    assert set(m) == {"isicle/replaced", "isicle/change"} and 0 < float(m["isicle/replaced"]) < 1
    # resume: a fresh recipe with the saved counter draws the same next views
    again = _recipe(generator="test_isicle.TinyGenerator", kwargs={"scale": 0.25}, p=0.5, seed=7)
    again.load_state_dict({"calls": 1})
    r.load_state_dict({"calls": 1})
    assert all(torch.equal(a, b) for a, b in zip(r.rewrite_views(views, None), again.rewrite_views(views, None)))


def test_ranks_draw_different_codes_and_identity_is_exact():
    views = _views()
    out = []
    for rank in (0, 1):
        (r,) = build_recipes([{"name": "isicle", "generator": "test_isicle:TinyGenerator"}])
        r.setup(_ctx(world=2, rank=rank))
        out.append(r.rewrite_views(views, None))
    assert not torch.equal(out[0][0], out[1][0])
    ident = _recipe(generator="identity")
    assert all(torch.equal(a, b) for a, b in zip(ident.rewrite_views(views, None), views))


def test_generator_names_and_errors(tmp_path):
    assert resolve_generator("identity") is IdentityGenerator
    assert resolve_generator("imle") is ConditionalGenerator
    assert resolve_generator("test_isicle:TinyGenerator") is TinyGenerator
    assert resolve_generator("test_isicle.TinyGenerator") is TinyGenerator
    with pytest.raises(ConfigError, match="did you mean 'identity'"):
        build_recipes([{"name": "isicle", "generator": "identiy"}])
    with pytest.raises(ConfigError, match="does not import"):
        build_recipes([{"name": "isicle", "generator": "test_isicle:Missing"}])
    with pytest.raises(ConfigError, match="do not exist"):
        build_recipes([{"name": "isicle", "weights": str(tmp_path / "none.pt")}])
    with pytest.raises(ConfigError, match="p must be"):
        build_recipes([{"name": "isicle", "p": 1.5}])
    with pytest.raises(ConfigError, match="corruptions"):
        build_recipes([{"name": "isicle", "corrupt": ["sepia"]}])
    torch.save(ConditionalGenerator(width=4, feat_dim=8, code_dim=3).state_dict(), tmp_path / "g.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        _recipe(generator="imle", weights=str(tmp_path / "g.pt"), kwargs={"code_dim": 5})


# ---------------------------------------------------------------- the imle method
def _synthetic_views(n=16):
    from fastssl.eval import source_arrays
    from loaders.base import build_source
    x, _ = source_arrays(build_source({"type": "synthetic", "n": n, "size": 16}))
    return ((x.float() / 255) - MEAN) / STD


def _nearest_distance(method, view):
    method.draws = 10**6   # the same corruptions and codes before and after training
    with torch.no_grad():
        return method([view]).loss.item()


def test_imle_step_reduces_the_nearest_sample_distance():
    torch.manual_seed(0)
    backbone, feat = build_backbone("resnet18", width=4)
    method = build_method("imle", backbone=backbone, feat_dim=feat, gen_width=8, code_dim=8, num_samples=8)
    assert isinstance(method.backbone, ConditionalGenerator) and method.feat_dim == feat == 32
    view = _synthetic_views()
    before = _nearest_distance(method, view)
    opt = torch.optim.Adam(method.parameters(), lr=2e-3)
    torch.manual_seed(1)
    for _ in range(40):
        out = method([view])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = _nearest_distance(method, view)
    assert after < 0.8 * before, (before, after)
    out = method([view])
    assert out.features.shape == (16, 32) and out.per_sample_loss.shape == (16,)
    assert float(out.logs["mean_distance"]) >= float(out.logs["imle"])
    with pytest.raises(ValueError, match="augment=imle"):
        method([view, view])


def test_imle_run_exports_a_generator_the_recipe_loads(tmp_path):
    cfg = _cfg(tmp_path, "imle", "method={name: imle, gen_width: 8, code_dim: 6, num_samples: 4}",
               "augment.preset=imle", "train.steps=3", "eval.enabled=true", "eval.linear=false", "eval.knn_k=10",
               "eval.random_init_baseline=false", "eval.train={type: synthetic, n: 64, size: 16}",
               "eval.test={type: synthetic, n: 32, size: 16, split: test}")
    res = train(cfg)
    assert 0 <= res.metrics["eval/knn_top1"] <= 1 and "method/imle" in res.metrics
    weights = tmp_path / "imle" / "backbone.pt"
    sd = torch.load(weights, weights_only=True)
    assert ConditionalGenerator.kwargs_from_state_dict(sd) == {"width": 8, "feat_dim": 32, "code_dim": 6}
    r = _recipe(generator="imle", weights=str(weights), corrupt=["grayscale"])   # sizes read from the file
    gen = r.generator
    assert isinstance(gen, ConditionalGenerator) and gen.code_dim == 6
    assert all(torch.equal(v, sd[k]) for k, v in gen.state_dict().items())
    views = _views(size=16)
    out = r.rewrite_views(views, None)
    assert [o.shape for o in out] == [v.shape for v in views]
    assert all(torch.isfinite(o).all() and not torch.equal(o, v) for o, v in zip(out, views))
    # a training checkpoint works as the weights file too
    (ckpt,) = sorted((tmp_path / "imle" / "checkpoints").glob("step_*.pt"))
    r2 = _recipe(generator="imle", weights=str(ckpt))
    assert all(torch.equal(v, sd[k]) for k, v in r2.generator.state_dict().items())


def test_isicle_configs_compose():
    for name, recipes in [("isicle_baseline", []), ("isicle_simclr", ["isicle"])]:
        cfg = load_config(CONFIG_ROOT / "recipe" / f"{name}.yaml")
        assert cfg.augment == {"preset": "isicle"} and [r["name"] for r in cfg.recipes] == recipes
        assert cfg.data["batch_size"] == 1000 and cfg.method["temperature"] == 0.5
        assert cfg.method["proj_output_dim"] == 128 and cfg.method["optimizer"] == "adam"
        assert cfg.method["lr"] * 1000 / 256 == pytest.approx(1e-3)
    gen = load_config(CONFIG_ROOT / "recipe" / "isicle_imle.yaml")
    assert gen.method["name"] == "imle" and gen.augment == {"preset": "imle"}
    assert ISICLE.name == "isicle"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rewrite_views_and_imle_step_do_not_synchronize():
    """CUDA's sync debug mode raises on any synchronising call: the recipe's hook (mask, codes,
    corruptions, generator) and the imle method's forward/backward (argmin, gather)."""
    acc = SimpleNamespace(process_index=0, num_processes=1)
    ctx = SetupContext(num_samples=64, source_sizes=[64], source_names=["syn"], epoch_length=64,
                       images_per_step=16, total_steps=4, method=None, accelerator=acc,
                       device=torch.device("cuda"))
    (r,) = build_recipes([{"name": "isicle", "p": 0.5, "kwargs": {"width": 8, "feat_dim": 16},
                           "corrupt": ["grayscale", "half_grayscale", "pixel_mask"]}])
    r.setup(ctx)
    backbone, feat = build_backbone("resnet18", width=4)
    method = build_method("imle", backbone=backbone, feat_dim=feat, gen_width=8, code_dim=8).cuda()
    views = [v.cuda() for v in _views(size=16)]
    r.rewrite_views(views, None)
    method(views[:1]).loss.backward()   # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = r.rewrite_views(views, None)
        method(out[:1]).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(o.is_cuda for o in out)
