"""LARS step, schedules and the optimiser factory against their formulas."""
import math

import pytest
import torch

from fastssl.optim import LARS, build_optimizer, cosine_increase, scaled_lr, warmup_cosine
from loaders.errors import ConfigError


def _lars_reference(w, g, buf, *, lr, wd, m, eta, clip, exclude, eps=1e-8):
    """One LARS step written out from the docstring's formula (float64)."""
    if exclude:
        u = g.clone()
    else:
        wn, gn = w.norm().item(), g.norm().item()
        if wn > 0 and gn > 0:
            trust = eta * wn / (gn + wd * wn + eps)
            scale = min(trust / lr, 1.0) if clip else trust
        else:
            scale = 1.0
        u = scale * (g + wd * w)
    buf = u.clone() if buf is None else m * buf + u
    return w - lr * buf, buf


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("lr", [0.5, 1e-4])
def test_lars_matches_formula_over_three_steps(clip, lr):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b0 = torch.randn(3, generator=gen, dtype=torch.float64)
    grads = [(torch.randn(4, 3, generator=gen, dtype=torch.float64),
              torch.randn(3, generator=gen, dtype=torch.float64) * 10) for _ in range(3)]
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=lr, momentum=0.9, weight_decay=1e-4, eta=0.02, clip=clip)
    rw, rb, bw, bb = w0.clone(), b0.clone(), None, None
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        rw, bw = _lars_reference(rw, gw, bw, lr=lr, wd=1e-4, m=0.9, eta=0.02, clip=clip, exclude=False)
        rb, bb = _lars_reference(rb, gb, bb, lr=lr, wd=0.0, m=0.9, eta=0.02, clip=clip, exclude=True)
        torch.testing.assert_close(w.detach(), rw, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(b.detach(), rb, atol=1e-12, rtol=1e-12)


def test_lars_clip_caps_the_step_at_lr():
    # tiny gradient: the trust ratio is huge, clip makes the step exactly SGD's lr * (g + wd w)
    w = torch.nn.Parameter(torch.ones(10, dtype=torch.float64))
    w.grad = torch.full((10,), 1e-3, dtype=torch.float64)
    LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0, eta=0.02, clip=True).step()
    torch.testing.assert_close(w.detach(), torch.full((10,), 1 - 0.1 * 1e-3, dtype=torch.float64))


def test_warmup_cosine_values():
    kw = dict(total=100, warmup=10, base=0.4, start=3e-5, final=0.0)
    assert warmup_cosine(0, **kw) == pytest.approx(3e-5)
    assert warmup_cosine(5, **kw) == pytest.approx(3e-5 + (0.4 - 3e-5) * 0.5)
    assert warmup_cosine(10, **kw) == pytest.approx(0.4)
    assert warmup_cosine(55, **kw) == pytest.approx(0.2)  # half-way through the cosine
    assert warmup_cosine(40, **kw) == pytest.approx(0.2 * (1 + math.cos(math.pi * 30 / 90)))
    assert warmup_cosine(100, **kw) == pytest.approx(0.0)
    assert warmup_cosine(150, **kw) == pytest.approx(0.0)
    assert warmup_cosine(0, total=10, warmup=0, base=1.0, final=0.1) == pytest.approx(1.0)


def test_scaled_lr_and_cosine_increase():
    assert scaled_lr(0.2, 512) == pytest.approx(0.4)  # REFERENCE §1: SimCLR 0.4 at batch 2x256
    assert cosine_increase(0.0, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_increase(1.0, 0.99, 1.0) == pytest.approx(1.0)
    p = 0.3
    assert cosine_increase(p, 0.99, 1.0) == pytest.approx(1 - 0.01 * (math.cos(math.pi * p) + 1) / 2)


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW),
                                      ("adam", torch.optim.Adam)])
def test_build_optimizer(name, cls):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(name, [{"params": [p], "lars_exclude": True, "weight_decay": 0.0}],
                          lr=0.1, weight_decay=1e-4, momentum=0.9, eta=0.02)
    assert isinstance(opt, cls) and opt.param_groups[0]["weight_decay"] == 0.0


def test_build_optimizer_errors():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'"):
        build_optimizer("lamb", [p], lr=0.1, weight_decay=0.0)
    with pytest.raises(ConfigError, match="etta"):
        build_optimizer("lars", [p], lr=0.1, weight_decay=0.0, etta=0.1)
