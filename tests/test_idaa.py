"""IDAA (Yang et al. 2022) and its VAE: the VAE's shapes per image size, the vae loss against its
formula and its training, the residual identity at eps = 0, the FGSM step, the frozen VAE, the
two sets of BatchNorm statistics, the export, the published configs and a vae -> idaa run
through the trainer. (Resume: tests/test_resume.py; state, host syncs, per-sample losses and
log keys: tests/test_method_state.py.)"""
import copy
import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny_vae import TINY, write_tiny_vae

from fastssl.config import CONFIG_ROOT, load_config, to_dict
from fastssl.losses import nt_xent
from fastssl.methods import METHODS, build_method
from fastssl.metrics_log import read_metrics
from fastssl.models import build_backbone, export_backbone
from fastssl.models.vae import CIFAR_MEAN, CIFAR_STD, REFERENCE_STD, VAE, vae_arch
from fastssl.optim import build_optimizer
from fastssl.trainer import train
from loaders.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
B = 8


def views(seed=1, b=B, size=16, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(n)]


def tiny_vae_method(seed=0, **extra):
    torch.manual_seed(seed)
    backbone, feat = build_backbone("resnet18", cifar_stem=True, width=4)
    return build_method("vae", backbone=backbone, feat_dim=feat, **{"image_size": 16, "channels": 8, **extra})


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return str(write_tiny_vae(tmp_path_factory.mktemp("vae") / "vae.pt", image_size=16))


def tiny_idaa(vae_file, seed=0, **extra):
    torch.manual_seed(seed)
    backbone, feat = build_backbone("resnet18", cifar_stem=True, width=4)
    return build_method("idaa", backbone=backbone, feat_dim=feat,
                        **{"vae_path": vae_file, "proj_hidden_dim": 16, "proj_output_dim": 8, **extra})


def optimizer_for(method):
    r = method.recipe
    return build_optimizer(r["optimizer"], method.param_groups(), lr=r["lr"], weight_decay=r["weight_decay"],
                           betas=r["betas"])


def bn_state(module, prefix=""):
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.startswith(prefix) and ("running" in k or "num_batches" in k)}


# ---------------------------------------------------------------- the VAE
def test_published_32px_vae_shapes():
    vae = VAE()  # 32 px, 128 channels, latent 512
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes["encoder.0.weight"] == (64, 3, 4, 4) and shapes["encoder.3.weight"] == (128, 64, 4, 4)
    assert shapes["fc_mu.weight"] == (512, 8192) and shapes["fc_logvar.weight"] == (512, 8192)
    assert shapes["fc_dec.weight"] == (8192, 512)
    convt = [m for m in vae.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in convt] == [(128, 64), (64, 3)]
    assert isinstance(vae.out_norm, nn.BatchNorm2d) and vae.out_norm.num_features == 3
    x = torch.randn(2, 3, 32, 32)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (2, 512)
    assert vae.decode(mu).shape == (2, 3, 32, 32)
    assert vae_arch(vae.state_dict()) == {"image_size": 32, "channels": 128, "latent_dim": 512}


@pytest.mark.parametrize("size,stages", [(16, 1), (64, 3)])
def test_other_sizes_add_or_drop_a_stride2_stage(size, stages):
    vae = VAE(image_size=size, **TINY)
    convs = [m for m in vae.encoder if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(convs) == stages and convs[-1].out_channels == 8
    assert all(c.out_channels == 4 for c in convs[:-1])
    x = torch.randn(2, 3, size, size)
    mu, _ = vae.encode(x)
    assert mu.shape == (2, 8) and vae.decode(mu).shape == (2, 3, size, size)
    assert vae.encoder(x).shape == (2, 8, 8, 8)  # the 8 x 8 bottleneck at every size
    again = VAE.from_state_dict(vae.state_dict())
    assert (again.image_size, again.channels, again.latent_dim) == (size, 8, 8)
    with pytest.raises(ValueError, match="takes"):
        vae.encode(torch.randn(2, 3, 2 * size, 2 * size))


@pytest.mark.parametrize("size", [8, 24, 0])
def test_unsupported_sizes_are_refused(size):
    with pytest.raises(ValueError, match="8 \\* 2\\*\\*n"):
        VAE(image_size=size, **TINY)


def test_space_conversion_round_trips_and_uses_both_normalisations():
    vae = VAE(image_size=16, **TINY)
    v = views()[0]
    torch.testing.assert_close(vae.from_space(vae.to_space(v)), v, rtol=0, atol=1e-5)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)   # the presets' and the reference's mean are equal
    pixels = v * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + mean
    ref = (pixels - mean) / torch.tensor(REFERENCE_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(vae.to_space(v), ref)
    torch.testing.assert_close(vae.to_pixels(vae.to_space(v)), pixels)


# ---------------------------------------------------------------- the vae method
def test_vae_loss_follows_the_published_formula():
    m = tiny_vae_method()
    m.train()
    v = views(n=1)
    draws = m.noise.draws
    out = m(v)
    assert m.noise.draws == draws + 1
    vae = m.backbone
    x = vae.to_space(v[0])
    mu, logvar = vae.encode(x)
    m.noise.draws = draws   # the same posterior noise again
    z = mu + torch.exp(0.5 * logvar) * m.posterior_noise(mu)
    recon = vae.decode(z)
    mse = F.mse_loss(recon, x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / (B * 3 * mu.shape[1])
    torch.testing.assert_close(out.loss, mse + 0.1 * kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logs["mse"], mse.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logs["kl"], kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.per_sample_loss.mean(), out.loss.detach(), rtol=1e-5, atol=1e-6)
    assert out.per_sample_loss.shape == (B,) and out.features.shape == (B, m.feat_dim) == (B, 32)
    m.eval()   # eval mode: no sampling, the features are the latent mean
    torch.testing.assert_close(m.backbone(v[0]), vae.encode(vae.to_space(v[0]))[0])


def test_vae_training_steps_reduce_the_loss_on_a_fixed_batch():
    m = tiny_vae_method()
    m.train()
    v = views(n=1)
    opt = optimizer_for(m)
    assert m.recipe["optimizer"] == "adamw" and tuple(m.recipe["betas"]) == (0.0, 0.9)

    def loss():
        draws, m.noise.draws = m.noise.draws, 0   # the same posterior noise each time
        with torch.no_grad():
            value = m(v).loss.item()
        m.noise.draws = draws
        return value

    before = loss()
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        m(v).loss.backward()
        opt.step()
    assert loss() < 0.8 * before


def test_vae_refuses_a_latent_dim_the_probe_cannot_read_and_one_view_only():
    with pytest.raises(ConfigError, match="latent_dim"):
        tiny_vae_method(latent_dim=16)
    m = tiny_vae_method()
    with pytest.raises(ValueError, match="needs 1 views"):
        m(views(n=2))
    assert tiny_vae_method(latent_dim=32).feat_dim == 32


# ---------------------------------------------------------------- IDAA
def test_vae_path_is_required_and_checked(tmp_path, vae_file):
    with pytest.raises(ConfigError, match="vae_path"):
        tiny_idaa(None)
    with pytest.raises(ConfigError, match="not a file"):
        tiny_idaa(str(tmp_path / "missing.pt"))
    plain, _ = build_backbone("resnet18", cifar_stem=True, width=4)
    torch.save(plain.state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ConfigError, match="not a VAE"):
        tiny_idaa(str(tmp_path / "resnet.pt"))
    m = tiny_idaa(vae_file)
    with pytest.raises(ValueError, match="takes"):   # the VAE's image size is the views' size
        m(views(size=32))


def test_eps_zero_gives_back_the_view(vae_file):
    m = tiny_idaa(vae_file, eps=0.0)
    m.train()
    v = views()
    anchor = m.projector(m.backbone(v[0]))
    x_adv, dist = m.adversarial_view(v[0], anchor)
    assert not x_adv.requires_grad
    torch.testing.assert_close(x_adv, v[0], rtol=0, atol=1e-5)
    assert dist.item() < 1e-6
    m.eps = 0.1
    x_adv, dist = m.adversarial_view(v[0], anchor)
    assert (x_adv - v[0]).abs().max() > 1e-3 and dist.item() > 0


@pytest.mark.parametrize("eps", [0.03, 0.1])
def test_fgsm_step_increases_the_adversarial_nt_xent(vae_file, eps):
    m = tiny_idaa(vae_file, eps=eps)
    m.train()
    v = views(seed=3)
    with torch.no_grad():
        anchor = m.projector(m.backbone(v[0]))

    def adv_loss(eps_):
        m.eps = eps_
        x_adv, _ = m.adversarial_view(v[0], anchor)
        with torch.no_grad():
            return nt_xent(anchor, m._adv_project(x_adv, scratch=True), temperature=m.temperature)[0].item()

    clean, attacked = adv_loss(0.0), adv_loss(eps)
    assert attacked > clean + 1e-4, (clean, attacked)


def test_vae_is_frozen_gets_no_gradient_and_keeps_its_statistics(vae_file):
    m = tiny_idaa(vae_file)
    m.train()
    assert not m.vae.training and m.training
    assert all(not p.requires_grad for p in m.vae.parameters())
    assert not {id(p) for g in m.param_groups() for p in g["params"]} & {id(p) for p in m.vae.parameters()}
    before = {k: v.clone() for k, v in m.vae.state_dict().items()}
    opt = optimizer_for(m)
    for seed in (1, 2):
        opt.zero_grad(set_to_none=True)
        m(views(seed=seed)).loss.backward()
        opt.step()
    assert all(p.grad is None for p in m.vae.parameters())
    after = m.vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    m.eval()
    m.train()
    assert not m.vae.training


def test_fgsm_leaves_no_gradient_on_the_parameters_and_no_statistics_changed(vae_file):
    m = tiny_idaa(vae_file)
    m.train()
    v = views()
    anchor = m.projector(m.backbone(v[0]))   # with a graph: the attack must not backpropagate into it
    state = {k: t.clone() for k, t in m.state_dict().items() if isinstance(t, torch.Tensor)}
    m.adversarial_view(v[0], anchor)
    assert all(p.grad is None for p in m.parameters())
    now = m.state_dict()
    assert all(torch.equal(state[k], now[k]) for k in state)


def test_each_set_of_batchnorm_statistics_sees_only_its_inputs(vae_file):
    m = tiny_idaa(vae_file)
    m.train()
    bns = list(m.adv_backbone.norms.values())
    assert bns and all(bn.momentum == 0.01 for bn in bns)
    assert all(mod.momentum == 0.1 for mod in m.backbone.modules() if isinstance(mod, nn.BatchNorm2d))
    ref = copy.deepcopy(m)
    v = views(seed=4)
    m(v)
    # the same updates by hand: the clean BatchNorm on the two clean views, the adversarial one
    # on x_adv once (the attack's forward changes nothing)
    h1 = ref.backbone(v[0])
    ref.backbone(v[1])
    clean_after = bn_state(ref, "backbone.")
    adv_before = bn_state(ref, "adv_backbone.")
    x_adv, _ = ref.adversarial_view(v[0], ref.projector(h1))
    assert all(torch.equal(t, bn_state(ref, "adv_backbone.")[k]) for k, t in adv_before.items())
    assert all(torch.equal(t, bn_state(ref, "backbone.")[k]) for k, t in clean_after.items())
    ref._adv_project(x_adv)
    got, want = m.state_dict(), ref.state_dict()
    for k in list(clean_after) + list(adv_before):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert int(got["backbone.bn1.num_batches_tracked"]) == 2
    assert int(got["adv_backbone.norms.bn1.num_batches_tracked"]) == 1
    key = "adv_backbone.norms.bn1.running_mean"
    assert not torch.equal(got[key], adv_before[key])


def test_loss_terms_per_sample_loss_and_export(vae_file):
    m = tiny_idaa(vae_file, alpha=0.5)
    m.train()
    out = m(views())
    torch.testing.assert_close(out.loss.detach(), out.logs["nt_xent"] + 0.5 * out.logs["nt_xent_adv"])
    torch.testing.assert_close(out.per_sample_loss.mean(), out.loss.detach())
    assert out.logs["adv_l1"].item() > 0
    out.loss.backward()   # both branches' BatchNorm affine parameters are trained
    assert all(p.grad is not None for p in m.adv_backbone.parameters())
    plain, _ = build_backbone("resnet18", cifar_stem=True, width=4)
    exported = export_backbone(m)
    assert exported.keys() == plain.state_dict().keys()
    assert not any("adv" in k or "vae" in k for k in exported)


# ---------------------------------------------------------------- configs
def test_published_configs():
    from loaders.augment import load_preset_config
    vae = to_dict(load_config(CONFIG_ROOT / "recipe" / "idaa_vae_cifar10.yaml"))
    idaa = to_dict(load_config(CONFIG_ROOT / "recipe" / "idaa_simclr_cifar10.yaml"))
    assert vae["method"]["name"] == "vae" and idaa["method"]["name"] == "idaa"
    assert idaa["method"]["vae_path"] == f"runs/{vae['name']}/backbone.pt"
    # lr per 256 images x batch / 256 = the published lr; 300 epochs of 50,000 images
    assert vae["method"]["lr"] * vae["data"]["batch_size"] / 256 == pytest.approx(5e-4)
    assert idaa["method"]["lr"] * idaa["data"]["batch_size"] / 256 == pytest.approx(3e-4)
    assert vae["train"]["steps"] == 300 * (50000 // 128) and idaa["train"]["steps"] == 300 * (50000 // 256)
    assert vae["method"]["betas"] == [0.0, 0.9] and vae["method"]["kl_weight"] == 0.1
    m = idaa["method"]
    assert (m["optimizer"], m["temperature"], m["proj_hidden_dim"], m["proj_output_dim"], m["eps"], m["alpha"],
            m["adv_bn_momentum"]) == ("adam", 0.5, 512, 64, 0.1, 1.0, 0.01)
    assert load_preset_config("vae")["views"] == [{"count": 1}]
    # the methods' default normalisation is the presets'
    for cfg, cls in ((vae, METHODS["vae"]), (idaa, METHODS["idaa"])):
        preset = load_preset_config(cfg["augment"]["preset"])
        params = inspect.signature(cls.__init__).parameters
        assert list(params["mean"].default) == preset["mean"] and list(params["std"].default) == preset["std"]


# ---------------------------------------------------------------- the two stages through the trainer
def _run_cfg(tmp_path, name, method, preset, steps):
    return load_config(None, [], base={
        "name": name,
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 64, "size": 16}],
                 "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": preset, "size": 16},
        "method": method,
        "model": {"width": 4},
        "train": {"steps": steps, "checkpoint_every": steps},
        "eval": {"enabled": False},
        "log": {"out": str(tmp_path / name), "every": steps, "progress": False, "tensorboard": False,
                "plot": False},
    })


def test_vae_run_then_idaa_run_on_its_backbone(tmp_path):
    train(_run_cfg(tmp_path, "vae", {"name": "vae", "image_size": 16, "channels": 8}, "vae", 4))
    vae_pt = tmp_path / "vae" / "backbone.pt"
    saved = torch.load(vae_pt, weights_only=True)
    assert vae_arch(saved) == {"image_size": 16, "channels": 8, "latent_dim": 32}
    rec = read_metrics(tmp_path / "vae" / "metrics.jsonl")[-1]
    assert {"method/vae", "method/mse", "method/kl"} <= set(rec) and math.isfinite(rec["loss"])

    res = train(_run_cfg(tmp_path, "idaa", {"name": "idaa", "vae_path": str(vae_pt), "proj_hidden_dim": 32,
                                            "proj_output_dim": 16}, "symmetric", 3))
    rec = read_metrics(tmp_path / "idaa" / "metrics.jsonl")[-1]
    assert {"method/idaa", "method/nt_xent", "method/nt_xent_adv", "method/adv_l1"} <= set(rec)
    assert rec["method/adv_l1"] > 0 and math.isfinite(rec["loss"])
    vae_state = res.method.vae.state_dict()
    for k, v in saved.items():   # the VAE is used as trained (its input normalisation aside) and never changes
        if not k.startswith("input_"):
            assert torch.equal(vae_state[k], v), k
    plain, _ = build_backbone("resnet18", cifar_stem=True, width=4)
    assert torch.load(tmp_path / "idaa" / "backbone.pt", weights_only=True).keys() == plain.state_dict().keys()
    # a vae run's training checkpoint loads as well
    ckpt = tmp_path / "vae" / "checkpoints" / "step_00000004.pt"
    m = tiny_idaa(str(ckpt))
    assert all(torch.equal(m.vae.state_dict()[k], v) for k, v in saved.items())
