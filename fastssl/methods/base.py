"""The ``Method`` interface, its output and the shared wiring helpers (momentum encoders, param groups)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from fastssl.optim import cosine_increase

__all__ = ["Method", "MethodOutput", "NoiseStream", "RECIPE_DEFAULTS", "momentum_copy", "ema_update", "encode_views"]

#: Optimisation recipe keys every method has (values per 256 images; overridden by ``Method.defaults``).
#: REFERENCE §1: warmup-cosine per step, 1000 warmup steps from 3e-5, min lr 0, online linear
#: classifier lr 0.1 at batch 512 (= 0.05 per 256).
RECIPE_DEFAULTS: dict = {
    "optimizer": "sgd",        # lars | sgd | adamw | adam
    "lr": 0.05,                # per 256 images; scale with fastssl.optim.scaled_lr
    "weight_decay": 1e-4,
    "momentum": 0.9,           # SGD/LARS momentum
    "eta": 0.02,               # LARS trust coefficient
    "clip": True,              # LARS clip variant
    "exclude_bias_norm": False,  # biases/norm params: no weight decay and no LARS adaptation
    "betas": (0.9, 0.999),     # Adam/AdamW
    "warmup_steps": 1000,
    "warmup_start": 3e-5,
    "final_lr": 0.0,
    "classifier_lr": 0.05,     # online linear probe, per 256 images
    "grad_clip": None,         # max gradient norm (DINO: 3.0)
}


@dataclass
class MethodOutput:
    """What ``Method.forward`` returns (``B`` = this rank's batch size).

    loss: scalar training loss (0-dim, with a graph).
    features: ``[B, feat_dim]`` backbone features of view 0, detached (input of the online
        linear probe).
    per_sample_loss: ``[B]`` detached, same dtype and device as ``loss``: sample ``i``'s term of
        the loss, averaged over the view pairs that involve image ``i`` and summed like the
        loss sums its terms, so ``per_sample_loss.mean() == loss`` (up to rounding) for every
        built-in method that returns it. None where the loss is not a mean over samples (see
        :attr:`Method.per_sample_loss_note`).
    logs: ``{short stable key: scalar}``, each a detached 0-dim tensor on the device or a Python
        float; reading them needs no host sync until the caller does (keys per method in its
        class docstring).
    """

    loss: torch.Tensor
    features: torch.Tensor
    per_sample_loss: torch.Tensor | None = None
    logs: dict = field(default_factory=dict)


class NoiseStream:
    """A method's own random stream, for randomness drawn inside ``forward`` (VAE posterior noise,
    IMLE codes): call ``k`` on rank ``r`` of ``W`` uses a generator seeded from ``(seed, k * W + r)``.
    ``seed`` (from the global RNG at construction, i.e. the run's seed) and the call count live
    in the method's extra state, so a resumed run draws what the uninterrupted one did (the global
    RNG cannot promise that). Python ints only: no host sync."""

    def __init__(self):
        self.seed = int(torch.randint(0, 2**62, ()).item())
        self.draws = 0

    def generator(self, device) -> torch.Generator:
        from fastssl.distributed import get_rank, get_world_size
        from loaders.augment.params import make_generator

        g = make_generator(device, self.seed, self.draws * get_world_size() + get_rank(), 0)
        self.draws += 1
        return g


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` for a momentum (EMA) encoder: ``requires_grad=False`` everywhere."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target_param = tau * target_param + (1 - tau) * online_param`` for every parameter
    (buffers such as BN running statistics are left to the target's own forward passes)."""
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("ema_update: target and online modules have different parameter lists")
    # one fused foreach op instead of a Python loop of small kernels
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1 - tau)


def encode_views(module: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``module`` on each run of consecutive same-resolution views in one batched call
    (multi-crop: the global crops together, the local crops together, as DINO/SwAV do).
    Returns one ``[B, ...]`` output per view."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(views):
        j = i + 1
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        y = module(torch.cat(views[i:j], dim=0))
        out.extend(y.chunk(j - i))
        i = j
    return out


class Method(nn.Module):
    """Base of all SSL methods: holds ``backbone`` (``[B,3,H,W] → [B, feat_dim]``) and the recipe.

    Subclasses set ``defaults`` (the published hyper-parameters: recipe keys of
    :data:`RECIPE_DEFAULTS` plus their constructor's keyword arguments), implement ``forward``,
    and list their momentum pairs in ``self.momentum_pairs`` (``[(online, target), ...]``)
    with ``tau_base``/``tau_final`` to get :meth:`update_momentum` for free.

    Per optimizer step the training loop calls ``out = method(views)``, ``out.loss.backward()``,
    :meth:`on_after_backward`, ``optimizer.step()``, then :meth:`update_momentum`. ``forward``
    and ``on_after_backward`` never synchronise with the device (no ``.item()``, no
    value-dependent shapes).

    State: ``state_dict()`` holds everything training changes: parameters, buffers (momentum
    encoders, MoCo queues and pointers, DINO's centre, BatchNorm statistics) and, as the
    module's extra state (key ``"_extra_state"``), the Python floats ``progress`` and ``tau``
    (:meth:`get_extra_state`), so ``load_state_dict`` of a freshly built method resumes the
    schedules (DINO teacher temperature and frozen last layer, SwAV frozen prototypes, EMA tau).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict] = {}
    #: number of views ``forward`` needs (None = at least 2, multi-crop)
    num_views: ClassVar[int | None] = 2
    #: None when ``forward`` returns ``MethodOutput.per_sample_loss`` (``[B]``); otherwise a
    #: one-line reason why the loss has no per-sample decomposition (e.g. it is a function of
    #: batch statistics), for the training loop to report once
    per_sample_loss_note: ClassVar[str | None] = None

    def __init__(self, *, backbone: nn.Module, feat_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.recipe: dict = dict(RECIPE_DEFAULTS)
        self.momentum_pairs: list[tuple[nn.Module, nn.Module]] = []
        self.tau_base = 0.0
        self.tau_final = 0.0
        self.tau = 0.0
        #: training progress (step / total) recorded by :meth:`update_momentum`, for schedules
        #: inside ``forward`` (DINO teacher temperature, frozen last layer / prototypes)
        self.progress = 0.0

    # -- momentum ------------------------------------------------------------------------
    def add_momentum_encoders(self, pairs: dict[str, nn.Module], *, tau_base: float, tau_final: float) -> None:
        """Make a frozen EMA copy of each online module: ``pairs`` maps the copy's attribute name to
        its online module (e.g. ``{"momentum_backbone": self.backbone}``); the copies follow
        :meth:`update_momentum`'s schedule from ``tau_base`` to ``tau_final``."""
        for name, online in pairs.items():
            setattr(self, name, momentum_copy(online))
            self.momentum_pairs.append((online, getattr(self, name)))
        self.tau_base, self.tau_final, self.tau = tau_base, tau_final, tau_base

    def update_momentum(self, progress: float) -> float:
        """EMA step of every momentum encoder with ``tau = cosine_increase(progress, tau_base, tau_final)``
        (``progress = step / total_steps``); call after every ``optimizer.step()``. Also records
        ``self.progress`` for the method's other schedules. Returns tau (0, and no EMA, for
        methods without momentum encoders)."""
        self.progress = float(progress)
        if not self.momentum_pairs:
            return 0.0
        self.tau = cosine_increase(progress, self.tau_base, self.tau_final)
        for online, target in self.momentum_pairs:
            ema_update(target, online, self.tau)
        return self.tau

    def on_after_backward(self) -> None:
        """Hook called after backward, gradients all-reduced, before the optimizer step, once per
        optimizer step (after the last micro-batch when gradients accumulate). Base: no-op.

        DINO and SwAV set the gradients of their frozen last layer / prototypes to None here
        while frozen (as the official DINO does after backward), so the optimizer skips them
        entirely: no weight decay, no momentum, no step count. ``forward`` still uses those
        parameters normally, so DistributedDataParallel sees them used."""

    def on_epoch_end(self, epoch: int) -> None:
        """Hook called when an epoch of the data plan ends (``epoch`` counts from 1), after that
        step's update and before the recipes' ``end_epoch``; on every rank. Base: no-op (SDCLR
        re-prunes here). State it changes must be in ``state_dict()`` (buffers or extra state)."""

    # -- state -----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """``{"progress": float, "tau": float}``: the schedule state that is not a tensor (stored
        under ``"_extra_state"`` in ``state_dict()``; plain floats, ``torch.load(weights_only=True)``-safe)."""
        state = {"progress": float(self.progress), "tau": float(self.tau)}
        noise = getattr(self, "noise", None)
        if noise is not None:  # a method with its own random stream (NoiseStream)
            state.update(noise_seed=noise.seed, draws=noise.draws)
        return state

    def set_extra_state(self, state: dict) -> None:
        """Restore what :meth:`get_extra_state` returned."""
        self.progress = float(state["progress"])
        self.tau = float(state["tau"])
        noise = getattr(self, "noise", None)
        if noise is not None:
            noise.seed, noise.draws = int(state["noise_seed"]), int(state["draws"])

    # -- optimisation --------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Trainable parameters (momentum encoders excluded) as optimiser groups.

        With ``recipe["exclude_bias_norm"]``: ``[{"name": "weights", params}, {"name":
        "bias_norm", params, "weight_decay": 0.0, "lars_exclude": True}]`` where ``bias_norm``
        holds every parameter with ``ndim <= 1`` (biases, BatchNorm/LayerNorm scales); otherwise
        one group. Groups carry no ``lr``; the trainer sets it per step.
        """
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if self.recipe["exclude_bias_norm"] and p.ndim <= 1 else decay).append(p)
        groups = [{"name": "weights", "params": decay}]
        if no_decay:
            groups.append({"name": "bias_norm", "params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
        return groups

    def check_views(self, views: list[torch.Tensor]) -> None:
        """Raise ``ValueError`` if the number of views does not fit the method."""
        need = self.num_views
        if need is not None and len(views) != need:
            raise ValueError(f"method '{self.name}' needs {need} views, got {len(views)}")
        if need is None and len(views) < 2:
            raise ValueError(f"method '{self.name}' needs at least 2 views, got {len(views)}")

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError
