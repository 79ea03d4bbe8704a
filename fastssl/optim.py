"""Optimisers and schedules: LARS (clip variant), an optimiser factory, warmup-cosine per step,
linear lr scaling and the cosine EMA-momentum increase used by momentum encoders."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from loaders.errors import ConfigError

__all__ = ["LARS", "build_optimizer", "warmup_cosine", "scaled_lr", "cosine_increase", "OPTIMIZERS"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), "clip" variant.

    For every parameter ``w`` with gradient ``g`` in a group with learning rate ``lr``,
    weight decay ``wd``, momentum ``m`` and LARS coefficient ``eta``:

    - groups with ``lars_exclude=True`` (biases and norm parameters in the SimCLR/BYOL/Barlow
      recipes) take a plain SGD-momentum step: ``u = g`` (no weight decay, no adaptation);
    - otherwise ``u = s * (g + wd * w)`` with the trust ratio
      ``t = eta * ||w|| / (||g|| + wd * ||w|| + eps)`` and
      ``s = min(t / lr, 1)`` when ``clip`` (the step ``lr * s`` never exceeds ``lr``), else ``s = t``;
      ``s = 1`` when ``||w|| == 0`` or ``||g|| == 0``;
    - then ``buf = m * buf + u`` (``buf = u`` on the first step) and ``w -= lr * buf``.

    Args:
        params: parameters or param groups (a group may set ``lars_exclude``).
        lr: learning rate (already scaled by batch size).
        momentum: heavy-ball momentum (0.9).
        weight_decay: L2 coefficient applied inside the trust-ratio update.
        eta: trust coefficient (0.02 in the SimCLR/BYOL/Barlow CIFAR recipes, REFERENCE §1).
        clip: cap the adaptive rate at ``lr`` (see above).
        eps: numerical guard in the trust ratio.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, clip: bool = True, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                        eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(update)
                    trust = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    if group["clip"]:
                        # lr may be 0 at the very start of a schedule: the cap then binds (scale 1).
                        trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
                    scale = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    update = (update + wd * p) * scale
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = update.clone()
                    else:
                        buf.mul_(mom).add_(update)
                    update = buf
                p.add_(update, alpha=-lr)
        return loss


def _build_lars(groups, *, lr, weight_decay, momentum=0.9, eta=0.02, clip=True, **_):
    return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip)


def _build_sgd(groups, *, lr, weight_decay, momentum=0.9, nesterov=False, **_):
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def _build_adamw(groups, *, lr, weight_decay, betas=(0.9, 0.999), **_):
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))


def _build_adam(groups, *, lr, weight_decay, betas=(0.9, 0.999), **_):
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))


OPTIMIZERS = {"lars": _build_lars, "sgd": _build_sgd, "adamw": _build_adamw, "adam": _build_adam}
_OPTIM_KW = {"momentum", "eta", "clip", "nesterov", "betas"}


def build_optimizer(name: str, param_groups: Iterable, *, lr: float, weight_decay: float,
                    **kw) -> torch.optim.Optimizer:
    """Build ``lars`` | ``sgd`` | ``adamw`` | ``adam`` over ``param_groups``.

    Groups may carry their own ``weight_decay`` (e.g. 0 for biases/norms) and ``lars_exclude``;
    other optimisers keep the extra keys untouched. Extra keywords: ``momentum`` (0.9),
    ``eta`` (0.02), ``clip`` (True), ``nesterov`` (False), ``betas`` ((0.9, 0.999)); a keyword an
    optimiser does not use is ignored, an unknown keyword raises ``ConfigError``.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}' (valid: {', '.join(OPTIMIZERS)})")
    unknown = set(kw) - _OPTIM_KW
    if unknown:
        raise ConfigError(f"unknown optimizer option(s) {sorted(unknown)} (valid: {sorted(_OPTIM_KW)})")
    return OPTIMIZERS[key](list(param_groups), lr=lr, weight_decay=weight_decay, **kw)


def warmup_cosine(step: int, *, total: int, warmup: int, base: float, start: float = 3e-5,
                  final: float = 0.0) -> float:
    """Learning rate at optimisation ``step`` (0-based), set per step.

    ``step < warmup``: linear from ``start`` (step 0) towards ``base`` (reached at ``step == warmup``);
    then half-cosine from ``base`` to ``final`` at ``step == total`` (held at ``final`` beyond).
    REFERENCE §1: 1000 warmup steps from 3e-5, final 0.
    """
    if step < warmup:
        return start + (base - start) * step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_per_256: float, total_batch: int) -> float:
    """Linear scaling rule: ``base_per_256 * total_batch / 256`` (total batch over all ranks)."""
    return base_per_256 * total_batch / 256.0


def cosine_increase(progress: float, start: float, end: float) -> float:
    """Cosine ramp from ``start`` (progress 0) to ``end`` (progress 1):
    ``end - (end - start) * (cos(pi * progress) + 1) / 2``. With ``end = 1`` this is the BYOL
    EMA schedule ``tau = 1 - (1 - tau_base)(cos(pi p) + 1) / 2``."""
    p = min(max(float(progress), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * p) + 1.0) / 2.0
