"""Method state across a resume, frozen layers without gradients, no host syncs in a step,
per-sample losses and log keys, for every registered method (loop over METHODS)."""
import pytest
import torch
from synccount import count_host_syncs
from test_methods import make_optimizer, make_views, method_extras

from fastssl.methods import METHODS, build_method, method_hparams
from fastssl.models import build_backbone
from fastssl.probe import OnlineProbe, ProbeOutput

ALL = sorted(METHODS)
B = 6
#: DINO / SwAV freeze their last layer / prototypes for the first 30% of training here, so that
#: resume points inside (progress 0.1) and past (0.6) the freeze window are both covered
FREEZE = {"dino": {"freeze_last_layer": 0.3}, "swav": {"freeze_prototypes": 0.3}}
#: parameters that get no gradient while frozen
FROZEN_PARAMS = {"dino": ("head.last_v", "head.last_g"), "swav": ("prototypes.layer.weight",)}
#: the stable log keys of every method
LOG_KEYS = {
    "simclr": {"nt_xent"},
    "mocov2": {"infonce", "tau"},
    "mocov3": {"infonce", "tau"},
    "byol": {"byol", "tau"},
    "simsiam": {"simsiam"},
    "barlow": {"barlow"},
    "vicreg": {"vicreg", "invariance", "variance", "covariance"},
    "dino": {"dino", "tau", "teacher_temp", "frozen"},
    "swav": {"swav", "frozen"},
    "sdclr": {"sdclr", "nt_xent", "pruned_fraction"},
    "imle": {"imle", "mean_distance"},
    "vae": {"vae", "mse", "kl"},
    "idaa": {"idaa", "nt_xent", "nt_xent_adv", "adv_l1"},
}

pytestmark = pytest.mark.usefixtures("one_thread")


def views_for(method, seed=1):
    return make_views(method, B, seed)


def build(name: str, seed: int = 0, **extra):
    """``name`` on a width-4 CIFAR ResNet-18 with 8-dim heads and a 24-key queue."""
    hp = {}
    for key in method_hparams(METHODS[name]):
        if key.endswith("_dim") or key == "n_prototypes":
            hp[key] = 8
        elif key == "queue_size":
            hp[key] = 24
    torch.manual_seed(seed)
    backbone, feat = build_backbone("resnet18", cifar_stem=True, width=4)
    return build_method(name, backbone=backbone, feat_dim=feat,
                        **{**hp, **method_extras(name), **FREEZE.get(name, {}), **extra})


def train_step(method, opt, views, progress):
    """One step in the training loop's order."""
    opt.zero_grad(set_to_none=True)
    method(views).loss.backward()
    method.on_after_backward()
    opt.step()
    method.update_momentum(progress)


def python_state(method) -> dict:
    """Every plain Python scalar attribute of the method and its submodules."""
    out = {}
    for prefix, module in method.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, (bool, int, float, str)) and key != "training":
                out[f"{prefix}.{key}"] = value
    return out


def next_step(method, views):
    """Loss, logs and gradients (None for parameters without one) of the next step."""
    method.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    out = method(views)
    out.loss.backward()
    method.on_after_backward()
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in method.named_parameters()}
    return out, grads


# ---------------------------------------------------------------- 1. complete state
@pytest.mark.parametrize("end", [0.1, 0.6], ids=["in_freeze", "past_freeze"])
@pytest.mark.parametrize("name", ALL)
def test_state_dict_restores_everything_that_training_changes(name, end):
    a = build(name)
    a.train()
    opt = make_optimizer(a)
    steps = 3
    for step in range(steps):
        train_step(a, opt, views_for(a, seed=10 + step), end * (step + 1) / steps)
    assert a.progress == pytest.approx(end)
    if a.momentum_pairs:
        assert a.tau != a.tau_base

    b = build(name)
    b.train()
    b.load_state_dict(a.state_dict())
    assert b.progress == a.progress and b.tau == a.tau
    assert python_state(b) == python_state(a)

    views = views_for(a, seed=99)
    out_a, grads_a = next_step(a, views)
    out_b, grads_b = next_step(b, views)
    assert torch.equal(out_a.loss, out_b.loss), f"{name}: {out_a.loss.item()} != {out_b.loss.item()}"
    assert out_a.logs.keys() == out_b.logs.keys()
    for key in out_a.logs:
        assert torch.equal(torch.as_tensor(out_a.logs[key]), torch.as_tensor(out_b.logs[key])), key
    for key, ga in grads_a.items():
        gb = grads_b[key]
        assert (ga is None) == (gb is None), key
        assert ga is None or torch.equal(ga, gb), key
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, ka


def test_extra_state_round_trips_through_torch_save(tmp_path):
    a = build("dino")
    a.update_momentum(0.42)
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = build("dino")
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert b.progress == 0.42 and b.tau == a.tau != b.tau_base


# ---------------------------------------------------------------- 2. frozen layers: no gradient
@pytest.mark.parametrize("name,extra", [("dino", {}), ("dino", {"norm_last_layer": False}), ("swav", {})])
def test_frozen_parameters_get_no_gradient_and_no_adamw_update(name, extra):
    method = build(name, **extra)
    method.train()
    params = dict(method.named_parameters())
    frozen = [params[k] for k in FROZEN_PARAMS[name] if params[k].requires_grad]
    assert frozen
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2, weight_decay=0.04)
    views = views_for(method)

    method.update_momentum(0.1)  # inside the freeze window
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        out = method(views)
        assert out.logs["frozen"] == 1.0
        out.loss.backward()
        method.on_after_backward()
        assert all(p.grad is None for p in frozen)
        before = [p.detach().clone() for p in frozen]
        opt.step()
        assert all(torch.equal(p, w) for p, w in zip(frozen, before))  # no weight decay either
        assert all(p not in opt.state for p in frozen)  # AdamW never saw them: no step counted
    other = params["backbone.conv1.weight"]
    assert opt.state[other]["step"] == 2

    method.update_momentum(0.5)  # past it
    opt.zero_grad(set_to_none=True)
    out = method(views)
    assert out.logs["frozen"] == 0.0
    out.loss.backward()
    method.on_after_backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in frozen)
    before = [p.detach().clone() for p in frozen]
    opt.step()
    assert all(not torch.equal(p, w) for p, w in zip(frozen, before))
    assert all(opt.state[p]["step"] == 1 for p in frozen)


@pytest.mark.parametrize("name", ALL)
def test_on_after_backward_is_a_no_op_without_frozen_layers(name):
    method = build(name)
    method.update_momentum(0.9)
    method(views_for(method)).loss.backward()
    grads = {k: p.grad for k, p in method.named_parameters()}
    method.on_after_backward()
    assert {k: p.grad for k, p in method.named_parameters()} == grads


# ---------------------------------------------------------------- 3. no host syncs
@pytest.mark.parametrize("name", ALL)
def test_forward_backward_and_probe_need_no_host_sync(name):
    method = build(name)
    method.train()
    probe = OnlineProbe(method.feat_dim, 10)
    views = views_for(method)
    labels = torch.tensor([0, 3, -1, 9, -1, 2])
    for progress in (0.1, 0.6):  # DINO/SwAV frozen and not
        method.update_momentum(progress)
        with count_host_syncs() as counts:
            out = method(views)
            pout = probe(out.features, labels)
            (out.loss + pout.loss).backward()
            method.on_after_backward()
            method.update_momentum(progress)
        assert sum(counts.values()) == 0, counts
        for key, value in out.logs.items():
            assert isinstance(value, float) or (
                isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad), key


def test_probe_counts_are_device_tensors():
    torch.manual_seed(0)
    probe = OnlineProbe(8, 4)
    feats = torch.randn(6, 8)
    labels = torch.tensor([0, 1, -1, 3, -1, 2])
    with count_host_syncs() as counts:
        out = probe(feats, labels)
    assert sum(counts.values()) == 0, counts
    assert isinstance(out, ProbeOutput)
    for t in (out.correct, out.count):
        assert isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == torch.int64
        assert t.device == out.logits.device
    known = labels >= 0
    assert out.count.item() == 4
    assert out.correct.item() == (out.logits.argmax(1)[known] == labels[known]).sum().item()
    ref = torch.nn.functional.cross_entropy(out.logits[known], labels[known])
    torch.testing.assert_close(out.loss, ref)
    empty = probe(feats[:3], torch.full((3,), -1))
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad
    assert empty.count.item() == 0 and empty.correct.item() == 0
    with pytest.raises((IndexError, RuntimeError)):  # out-of-range labels still fail, in cross_entropy
        probe(feats[:2], torch.tensor([0, 4]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cuda_step_does_not_synchronize(name):
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising CUDA call
    (item, value-dependent shapes, blocking host-device copies) in forward, backward and the probe."""
    method = build(name).cuda().train()
    probe = OnlineProbe(method.feat_dim, 10).cuda()
    views = [v.cuda() for v in views_for(method)]
    labels = torch.tensor([0, 3, -1, 9, -1, 2]).cuda()
    method(views).loss.backward()  # warm-up: lazy initialisation may synchronise once
    for progress in (0.1, 0.6):
        method.update_momentum(progress)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = method(views)
            pout = probe(out.features, labels)
            (out.loss + pout.loss).backward()
            method.on_after_backward()
            method.update_momentum(progress)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert pout.count.item() == 4


# ---------------------------------------------------------------- 4. per-sample losses
@pytest.mark.parametrize("name", ALL)
def test_per_sample_loss_averages_to_loss_or_is_explained(name):
    method = build(name)
    method.train()
    method.update_momentum(0.5)
    out = method(views_for(method))
    note = type(method).per_sample_loss_note
    if out.per_sample_loss is None:
        assert isinstance(note, str) and note, f"{name}: no per_sample_loss and no per_sample_loss_note"
        assert name in ("barlow", "vicreg")
        return
    assert note is None
    psl = out.per_sample_loss
    assert psl.shape == (B,) and not psl.requires_grad and psl.dtype == out.loss.dtype
    torch.testing.assert_close(psl.mean(), out.loss.detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 5. logs
def test_every_method_has_documented_log_keys():
    assert set(LOG_KEYS) == set(METHODS), "add the new method's log keys to LOG_KEYS"
    for name, keys in LOG_KEYS.items():
        doc = METHODS[name].__doc__
        for key in keys:
            assert f"``{key}``" in doc, f"{name}: log key {key!r} not documented in the class docstring"


@pytest.mark.parametrize("name", ALL)
def test_logs_have_the_stable_keys(name):
    method = build(name)
    method.train()
    method.update_momentum(0.2)
    out = method(views_for(method))
    assert set(out.logs) == LOG_KEYS[name]
    if "tau" in out.logs:
        assert out.logs["tau"] == method.tau
    if name == "vicreg":
        total = 25 * out.logs["invariance"] + 25 * out.logs["variance"] + out.logs["covariance"]
        torch.testing.assert_close(total, out.loss.detach())
    if name == "dino":
        assert out.logs["teacher_temp"] == method.criterion.teacher_temperature(0.2)
    if "frozen" in out.logs:
        assert out.logs["frozen"] == 1.0  # 0.2 < 0.3
