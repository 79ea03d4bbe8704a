"""SDCLR: the global magnitude mask, the pruned branch's own BatchNorm, gradients from both
branches, the loss against a loop NT-Xent, re-pruning at epoch ends, state and export, no host
syncs, and a short BCL-D training run through the trainer."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from synccount import count_host_syncs

from fastssl.checkpoint import load_checkpoint
from fastssl.config import load_config
from fastssl.methods import build_method
from fastssl.methods.sdclr import global_magnitude_mask
from fastssl.metrics_log import read_metrics
from fastssl.models import build_backbone, export_backbone
from fastssl.trainer import train
from loaders.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
B = 6


def build(seed=0, **extra):
    torch.manual_seed(seed)
    backbone, feat = build_backbone("resnet18", cifar_stem=True, width=4)
    return build_method("sdclr", backbone=backbone, feat_dim=feat,
                        **{"proj_hidden_dim": 16, "proj_output_dim": 8, **extra})


def views(seed=1, b=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]


def conv_weights(backbone):
    return [m.weight for m in backbone.modules() if isinstance(m, nn.Conv2d)]


def sorted_mask(weights, ratio):
    """Reference: a stable sort of all conv |w| concatenated; the first round(ratio * n) are pruned."""
    flat = torch.cat([w.detach().reshape(-1).abs() for w in weights])
    k = round(ratio * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    return keep


def loop_nt_xent(z1, z2, t):
    """NT-Xent written out anchor by anchor: ``[2B]`` anchor losses (anchor i's positive is the
    other view of image i; every other embedding of the 2B is a negative)."""
    z = torch.cat([nn.functional.normalize(z1, dim=1), nn.functional.normalize(z2, dim=1)]).double()
    n = z1.shape[0]
    out = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        den = sum(torch.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        out.append(-torch.log(torch.exp(z[i] @ z[pos] / t) / den))
    return torch.stack(out)


def branches(method, vs):
    """``(z_dense, z_pruned)`` computed from the method's parts."""
    h_d = method.backbone(vs[0])
    h_p = method.pruned_backbone(method.backbone, vs[1], method.masked_weights())
    return method.projector(h_d), method.pruned_projector(method.projector, h_p)


# ---------------------------------------------------------------- the mask
@pytest.mark.parametrize("ratio", [0.9, 0.37, 0.0])
def test_mask_prunes_exactly_the_smallest_conv_weights_globally(ratio):
    m = build(prune_ratio=ratio)
    weights = conv_weights(m.backbone)
    n = sum(w.numel() for w in weights)
    assert len(weights) == 20   # stem, 16 block convs, 3 shortcut convs: all of them
    assert m.prune_mask.shape == (n,) and m.prune_mask.dtype == torch.bool
    assert int((~m.prune_mask).sum()) == round(ratio * n)
    assert torch.equal(m.prune_mask, sorted_mask(weights, ratio))
    assert m.pruned_fraction.item() == pytest.approx(round(ratio * n) / n)
    # global, not per layer: layers keep different fractions
    kept = [float(k.float().mean()) for k in m.prune_mask.split([w.numel() for w in weights])]
    if ratio > 0:
        assert max(kept) - min(kept) > 0.05


def test_mask_breaks_ties_like_a_stable_sort():
    weights = [torch.randint(-3, 4, (5, 3, 3, 3)).float() / 4, torch.randint(-3, 4, (7, 5, 1, 1)).float() / 4]
    for ratio in (0.1, 0.5, 0.77, 0.9):
        mask = global_magnitude_mask(weights, ratio)
        assert torch.equal(mask, sorted_mask(weights, ratio)), ratio
        assert int((~mask).sum()) == round(ratio * 170)
    assert global_magnitude_mask(weights, 0.0).all()


def test_pruned_branch_uses_masked_weights():
    m = build()
    masked = m.masked_weights()
    for name, w, k in zip(m.conv_names, conv_weights(m.backbone),
                          m.prune_mask.split([w.numel() for w in conv_weights(m.backbone)])):
        assert torch.equal(masked[name], w * k.view(w.shape).float())
    # the pruned branch equals a deep copy of the backbone with masked weights and its own BNs
    m.eval()
    x = views()[1]
    ref = copy.deepcopy(m.backbone)
    with torch.no_grad():
        for mod, w in zip([mm for mm in ref.modules() if isinstance(mm, nn.Conv2d)], masked.values()):
            mod.weight.copy_(w)
        for path, bn in zip(m.pruned_backbone.paths, m.pruned_backbone.norms.values()):
            ref.get_submodule(path).load_state_dict(bn.state_dict())
        torch.testing.assert_close(m.pruned_backbone(m.backbone, x, masked), ref(x))


def test_bad_prune_ratio_and_backbone_without_batchnorm_are_refused():
    with pytest.raises(ConfigError, match="prune_ratio"):
        build(prune_ratio=1.0)
    with pytest.raises(ConfigError, match="BatchNorm"):
        build_method("sdclr", backbone=nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), feat_dim=4)


# ---------------------------------------------------------------- separate BatchNorm
def test_pruned_branch_has_its_own_batchnorm():
    m = build()
    m.train()
    dense = {n: mod for n, mod in m.backbone.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    assert list(dense) == m.pruned_backbone.paths
    dense_params = {id(p) for mod in dense.values() for p in mod.parameters()}
    pruned_params = {id(p) for p in m.pruned_backbone.parameters()}
    assert len(pruned_params) == 2 * len(dense) and not dense_params & pruned_params
    proj_bn = [mod for mod in m.projector.modules() if isinstance(mod, nn.BatchNorm1d)]
    assert len(proj_bn) == 2 and len(m.pruned_projector.norms) == 2
    assert not {id(p) for mod in proj_bn for p in mod.parameters()} & {id(p) for p in m.pruned_projector.parameters()}

    before = {k: v.clone() for k, v in m.state_dict().items() if "running_mean" in k}
    out = m(views())
    out.loss.backward()
    after = m.state_dict()
    for path in m.pruned_backbone.paths:
        d = f"backbone.{path}.running_mean"
        p = f"pruned_backbone.norms.{path.replace('.', '_')}.running_mean"
        assert not torch.equal(after[d], before[d]) and not torch.equal(after[p], before[p])  # both updated
        assert not torch.equal(after[d], after[p])                                              # differently
        assert int(after[p.replace("running_mean", "num_batches_tracked")]) == 1
    for p in m.pruned_backbone.parameters():   # trained: they get gradients
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.pruned_projector.parameters())


# ---------------------------------------------------------------- gradients
def test_gradients_reach_the_shared_weights_from_both_branches():
    m = build(prune_ratio=0.5)
    m.train()
    vs = views()
    weights = conv_weights(m.backbone)
    masks = [k.view(w.shape) for w, k in zip(weights, m.prune_mask.split([w.numel() for w in weights]))]
    from fastssl.losses import nt_xent
    z_d, z_p = branches(m, vs)
    g_pruned = torch.autograd.grad(nt_xent(z_d.detach(), z_p, temperature=m.temperature)[0], weights)
    z_d, z_p = branches(m, vs)
    g_dense = torch.autograd.grad(nt_xent(z_d, z_p.detach(), temperature=m.temperature)[0], weights)
    for g, k in zip(g_pruned, masks):   # the pruned branch alone: gradient exactly on the kept entries
        assert torch.all(g[~k] == 0)
    nz = torch.cat([(g[k] != 0).flatten() for g, k in zip(g_pruned, masks)]).float().mean()
    assert nz > 0.5
    assert torch.cat([(g[~k] != 0).flatten() for g, k in zip(g_dense, masks)]).float().mean() > 0.5
    m.zero_grad(set_to_none=True)
    m(vs).loss.backward()   # the method's gradient is the sum of both branches'
    for w, gd, gp in zip(weights, g_dense, g_pruned):
        torch.testing.assert_close(w.grad, gd + gp, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- loss
def test_loss_and_per_sample_loss_follow_the_formula():
    m = build()
    m.train()
    vs = views(seed=5)
    with torch.no_grad():
        z_d, z_p = branches(m, vs)   # train-mode BN: outputs do not depend on the running stats
        out = m(vs)
    anchors = loop_nt_xent(z_d, z_p, m.temperature)           # [2B]
    term = anchors.mean()                                      # NT-Xent(dense, pruned), either stop-grad
    torch.testing.assert_close(out.loss.double(), 2 * term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logs["nt_xent"].double(), term, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.logs["sdclr"], out.loss)
    per_image = 2 * 0.5 * (anchors[:B] + anchors[B:])          # the two terms, each the mean of 2 anchors
    torch.testing.assert_close(out.per_sample_loss.double(), per_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.per_sample_loss.mean(), out.loss)
    assert out.logs["pruned_fraction"].item() == pytest.approx(0.9, abs=1e-4)
    assert out.features.shape == (B, m.feat_dim) and not out.features.requires_grad


# ---------------------------------------------------------------- re-pruning, state, export
def test_on_epoch_end_reprunes_from_the_current_weights():
    m = build()
    old = m.prune_mask.clone()
    with torch.no_grad():
        for w in conv_weights(m.backbone):
            w.normal_()
    assert torch.equal(m.prune_mask, old)       # nothing changes until the epoch ends
    m.on_epoch_end(1)
    assert not torch.equal(m.prune_mask, old)
    assert torch.equal(m.prune_mask, sorted_mask(conv_weights(m.backbone), 0.9))


def test_state_dict_restores_the_mask_and_export_is_a_plain_backbone(tmp_path):
    a = build(seed=0)
    with torch.no_grad():
        for w in conv_weights(a.backbone):
            w.mul_(torch.rand_like(w))
    a.on_epoch_end(1)
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = build(seed=1)
    assert not torch.equal(a.prune_mask, b.prune_mask)
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(a.prune_mask, b.prune_mask) and torch.equal(a.pruned_fraction, b.pruned_fraction)
    vs = views()
    torch.manual_seed(0)
    torch.testing.assert_close(a(vs).loss, b(vs).loss, rtol=0, atol=0)
    plain, _ = build_backbone("resnet18", cifar_stem=True, width=4)
    exported = export_backbone(a)
    assert exported.keys() == plain.state_dict().keys()
    plain.load_state_dict(exported, strict=True)
    assert not any("mask" in k or "pruned" in k for k in a.backbone.state_dict())


def test_no_host_sync_in_forward_backward_or_repruning():
    m = build()
    m.train()
    vs = views()
    m(vs).loss.backward()
    with count_host_syncs() as counts:
        out = m(vs)
        out.loss.backward()
        m.on_after_backward()
        m.update_momentum(0.5)
    assert sum(counts.values()) == 0, counts
    with count_host_syncs() as counts:
        m.on_epoch_end(1)
    assert sum(counts.values()) == 0, counts   # kthvalue + cumulative count on the device


# ---------------------------------------------------------------- a BCL-D run through the trainer
def test_bcl_d_trains_reprunes_at_the_epoch_end_and_logs_per_source(tmp_path):
    base = {
        "name": "sdclr-tiny",
        "data": {"sources": [{"name": "real", "type": "synthetic", "n": 48, "size": 16},
                             {"name": "gen", "type": "synthetic", "n": 16, "size": 16, "variant": "generated"}],
                 "batch_size": 16, "num_workers": 0, "seed": 0},
        "augment": {"preset": "bcl_d", "size": 16},
        "method": {"name": "sdclr", "proj_hidden_dim": 32, "proj_output_dim": 16, "lr": 4.0},
        "recipes": [{"name": "bcl"}],
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3},
        "eval": {"enabled": False},
        "log": {"out": str(tmp_path / "run"), "every": 2, "progress": False, "tensorboard": False,
                "plot": False},
    }
    res = train(load_config(None, [], base=base))
    run = tmp_path / "run"
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [2, 4, 6]
    for r in recs:
        assert {"loss/real", "loss/gen", "method/sdclr", "method/pruned_fraction"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "loss/real", "loss/gen"))
        assert r["method/pruned_fraction"] == pytest.approx(0.9, abs=1e-4)
    assert recs[-1]["bcl/strength_mean"] > 0   # BCL's strengths were set at the epoch end (step 4)

    def mask_and_weights(step):
        model = load_checkpoint(run / "checkpoints" / f"step_{step:08d}.pt")["model"]
        weights = [model[f"method.backbone.{n}"] for n in res.method.conv_names]
        return model["method.prune_mask"], weights

    m2, w2 = mask_and_weights(2)
    m4, w4 = mask_and_weights(4)
    m6, w6 = mask_and_weights(6)
    # 64 samples / 16 per step: the epoch ends at step 4, after its update and before its checkpoint
    assert torch.equal(m4, sorted_mask(w4, 0.9))
    assert not torch.equal(m4, m2) and not torch.equal(m2, sorted_mask(w2, 0.9))   # epoch 1: the init's mask
    assert torch.equal(m6, m4) and not torch.equal(m6, sorted_mask(w6, 0.9))        # kept until the next end
    exported = torch.load(run / "backbone.pt", weights_only=True)
    plain, _ = build_backbone("resnet18", cifar_stem=True, width=4)
    assert exported.keys() == plain.state_dict().keys()


# ---------------------------------------------------------------- the published rows
def test_the_four_long_tailed_cifar100_rows_differ_only_where_the_paper_does():
    from fastssl.config import CONFIG_ROOT, to_dict
    from fastssl.methods import METHODS, method_hparams
    from fastssl.methods.base import RECIPE_DEFAULTS
    bcl = [{"name": "bcl", "beta": 0.97}]
    expect = {  # row: (method, weight decay, recipes, augment preset)
        "simclr_lt": ("simclr", 5e-4, [], "bcl"),
        "sdclr_lt": ("sdclr", 1e-4, [], "bcl"),
        "bcl_i": ("simclr", 5e-4, bcl, "bcl"),
        "bcl_d": ("sdclr", 1e-4, bcl, "bcl_d"),
    }
    rest = {}
    for row, (method, wd, recipes, preset) in expect.items():
        d = to_dict(load_config(CONFIG_ROOT / "recipe" / f"{row}.yaml"))
        m = d["method"]
        assert (m["name"], m["weight_decay"], d["recipes"], d["augment"]) == (method, wd, recipes, {"preset": preset})
        assert set(m) - {"name"} <= set(method_hparams(METHODS[method])) | set(RECIPE_DEFAULTS), row
        if method == "sdclr":
            assert m.pop("prune_ratio") == 0.9
        for key in ("name", "weight_decay"):
            m.pop(key)
        rest[row] = {k: v for k, v in d.items() if k not in ("recipes", "augment", "name")}
    first = rest["simclr_lt"]
    assert first["method"]["lr"] * 2 == 0.5 and first["method"]["temperature"] == 0.2
    assert first["data"]["batch_size"] == 512 and first["optim"]["warmup_steps"] == 190
    for row, r in rest.items():
        assert r == first, row
    # the method's own defaults are the published SDCLR recipe
    sd = {**RECIPE_DEFAULTS, **METHODS["sdclr"].defaults}
    for key, value in to_dict(load_config(CONFIG_ROOT / "recipe" / "sdclr_lt.yaml"))["method"].items():
        if key != "name":
            assert sd[key] == value, key
