"""One build path: a run config turned into its parts.

``pretrain`` (:mod:`fastssl.trainer`), ``eval`` (:mod:`fastssl.eval`) and ``bench e2e``
(:mod:`benchmarks.bench_e2e`) all build from here, so the benchmark measures the step users
train with and evaluation rebuilds exactly the trained architecture. Everything that can
reject the user's input runs here, before a run directory is written.

* :func:`build_augment` -- ``augment:`` -> :class:`loaders.augment.Augment` (the stream's keys
  ``where``/``worker_precision`` are taken off: :func:`augment_placement`);
* :func:`build_backbone` -- ``model:`` -> ``(backbone [B,3,H,W] -> [B, D], D)``;
* :func:`build_method` -- ``method:`` on that backbone;
* :func:`optim_recipe` -- the method's published optimisation recipe under ``optim:``;
* :func:`build_stream` -- the data stream (:class:`loaders.stream.Stream`: backend, where
  augmentation runs, prefetch to the device, the loader cursor);
* :func:`build_training` -- all of the above plus the online probe, the optimizers, the run
  length and the recipes, as :class:`Parts`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from loaders.errors import ConfigError

from .config import RunConfig

__all__ = ["Parts", "build_augment", "augment_placement", "build_stream", "recipe_strength", "build_backbone",
           "build_method", "optim_recipe", "build_optimizers", "run_length", "apply_speed_options", "check_labels",
           "build_training", "build_eval_sources"]


@dataclass
class Parts:
    """What a training run is made of (before ``accelerator.prepare``)."""

    aug: Any
    #: the backend loader (sources, mixture, skip counts); iterate ``stream``, not this
    loader: Any
    method: Any
    probe: Optional[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    probe_opt: Optional[torch.optim.Optimizer]
    recipes: List[Any]
    #: the optimisation recipe: optimizer name, lr per 256, schedule, clip (see optim_recipe)
    recipe: Dict[str, Any]
    #: the run's peak learning rate (recipe lr scaled to images_per_step)
    lr: float
    #: optimizer steps of the run
    total: int
    #: images per optimizer step over all ranks
    images_per_step: int
    feat_dim: int
    crop_in_decode: bool
    #: per-group multipliers of the scheduled lr
    lr_scale: List[float] = field(default_factory=list)
    #: the model and its input views use the channels-last memory format
    channels_last: bool = False
    #: the data stream (:class:`loaders.stream.Stream`): what the loop iterates and checkpoints
    stream: Any = None


#: keys of the ``augment:`` section that configure the stream, not the recipe
PLACEMENT_KEYS = {"where": "auto", "worker_precision": "uint8"}


def augment_placement(section: Dict[str, Any]) -> Dict[str, Any]:
    """``{"where": ..., "worker_precision": ...}`` of the ``augment:`` section (defaults filled)."""
    return {k: (section or {}).get(k, v) for k, v in PLACEMENT_KEYS.items()}


def build_augment(section: Dict[str, Any]):
    """``{preset: NAME, **overrides}`` -> ``Augment.from_preset``; else ``Augment.from_config``
    (the placement keys, :data:`PLACEMENT_KEYS`, are not part of the recipe)."""
    from loaders.augment import Augment

    section = {k: v for k, v in dict(section).items() if k not in PLACEMENT_KEYS}
    preset = section.pop("preset", None)
    if preset is not None:
        return Augment.from_preset(preset, **section)
    return Augment.from_config(section)


def build_backbone(cfg: RunConfig, aug=None):
    """``fastssl.models.build_backbone`` from ``cfg.model``; ViTs get ``img_size`` = the first
    augmented view's size unless ``model.img_size`` is set."""
    from .models import build_backbone as _build

    m = cfg.model
    kw: Dict[str, Any] = {}
    if m.backbone.startswith("vit"):
        size = m.img_size or (aug.specs[0].size if aug is not None else None)
        kw = {"img_size": size, "patch_size": m.patch_size} if size else {"patch_size": m.patch_size}
    return _build(m.backbone, cifar_stem=m.cifar_stem, width=m.width, **kw)


def build_method(cfg: RunConfig, aug=None):
    """The configured method on a fresh backbone; returns ``(method, feat_dim)``."""
    from .methods import build_method as _build

    mcfg = dict(cfg.method)
    name = mcfg.pop("name")
    backbone, feat_dim = build_backbone(cfg, aug)
    return _build(name, backbone=backbone, feat_dim=feat_dim, **mcfg), feat_dim


def optim_recipe(method, cfg: RunConfig) -> Dict[str, Any]:
    """The method's optimisation recipe with the config's explicit ``optim.*`` values on top."""
    o, t = cfg.optim, cfg.train
    recipe = dict(getattr(method, "recipe", {}) or {})
    for key, default in (("optimizer", "sgd"), ("weight_decay", 0.0), ("warmup_steps", 0),
                         ("warmup_start", 0.0), ("final_lr", 0.0), ("classifier_lr", 0.05)):
        recipe.setdefault(key, default)
    explicit = {"optimizer": o.name, "lr": o.lr, "weight_decay": o.weight_decay, "momentum": o.momentum,
                "eta": o.eta, "warmup_steps": o.warmup_steps, "warmup_start": o.start_lr,
                "final_lr": o.final_lr, "grad_clip": o.clip_grad, "classifier_lr": t.probe_lr}
    recipe.update({k: v for k, v in explicit.items() if v is not None})
    recipe["warmup_from_config"] = o.warmup_steps is not None
    if recipe.get("lr") is None:
        raise ConfigError(f"optim.lr is not set and method '{method.name}' publishes no default lr")
    return recipe


def build_optimizers(method, probe, recipe: Dict[str, Any], images_per_step: int):
    """``(optimizer, probe_optimizer or None, peak lr)``; lrs scale linearly per 256 images."""
    from .optim import build_optimizer

    lr = recipe["lr"] * images_per_step / 256.0
    opt = build_optimizer(recipe["optimizer"], method.param_groups(), lr=lr,
                          weight_decay=recipe["weight_decay"],
                          **{k: recipe[k] for k in ("momentum", "eta", "clip", "betas") if k in recipe})
    probe_opt = None
    if probe is not None:
        probe_lr = recipe["classifier_lr"] * images_per_step / 256.0
        probe_opt = torch.optim.SGD(probe.parameters(), lr=probe_lr, momentum=0.9, weight_decay=0.0)
    return opt, probe_opt, lr


def run_length(cfg: RunConfig, loader, images_per_step: int, recipe: Dict[str, Any]) -> int:
    """Optimizer steps of the run: ``train.steps``, else ``data.budget`` / images per step.

    A budget that is not a whole number of steps and a warm-up longer than the run are errors
    that name the numbers.
    """
    t = cfg.train
    if t.steps is not None:
        total = t.steps
    else:
        if not cfg.data.get("budget"):
            raise ConfigError("set train.steps or data.budget (images to see): the run has no length")
        total = len(loader) // t.grad_accum
    if total < 1:
        raise ConfigError(f"data.budget={cfg.data.get('budget')} is less than one step "
                          f"({images_per_step} images over all ranks)")
    warm = int(recipe.get("warmup_steps") or 0)
    if warm > total:
        origin = "optim.warmup_steps" if recipe.get("warmup_from_config") else \
            f"the default of method '{cfg.method['name']}'; set optim.warmup_steps"
        raise ConfigError(f"the warm-up ({warm} steps, {origin}) is longer than the run ({total} steps)")
    return total


def apply_speed_options(method, cfg: RunConfig, device) -> bool:
    """``train.channels_last`` (default: on CUDA) for convolutional backbones and
    ``train.compile`` (the backbone, in place: state_dict keys unchanged). Returns whether the
    input views must be channels-last too."""
    t = cfg.train
    conv = not cfg.model.backbone.startswith("vit")
    channels_last = t.channels_last if t.channels_last is not None else torch.device(device).type == "cuda"
    channels_last = bool(channels_last and conv)
    if channels_last and torch.device(device).type == "cpu" and _narrow_strided_1x1(method):
        print("fastssl: train.channels_last kept off: on CPU, torch's channels-last weight gradient of a "
              "strided 1x1 convolution with fewer than 8 input channels is wrong (measured on torch 2.14.1, "
              "AVX2); widen the backbone (model.width >= 8) or train on CUDA", file=sys.stderr)
        channels_last = False
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if t.compile:
        method.backbone.compile(backend=t.compile_backend)
    return channels_last


def _narrow_strided_1x1(module: torch.nn.Module) -> bool:
    """Whether ``module`` has a strided 1x1 ``Conv2d`` with fewer than 8 input channels: the case
    whose channels-last CPU weight gradient torch gets wrong (``tests/test_trainer.py`` checks it)."""
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
               and m.in_channels < 8 for m in module.modules())


def check_labels(sources: Sequence, num_classes: int, *, where: str = "data") -> None:
    """Every label in ``sources`` is -1 (no class) or in ``[0, num_classes)``; checked once at
    set-up so that the online probe needs no per-step check (a host sync)."""
    for src in sources:
        labels = np.asarray(src.labels())
        if labels.size == 0:
            continue
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= num_classes:
            bad = hi if hi >= num_classes else lo
            raise ConfigError(f"{where}: source '{getattr(src, 'name', '?')}' has label {bad}, outside "
                              f"[-1, {num_classes}); set train.num_classes to the data's number of classes")


def build_eval_sources(cfg: RunConfig, data: Optional[Dict[str, Any]] = None):
    """``(train source, test source)`` of ``eval.train``/``eval.test`` (``data`` overrides them
    with its ``train:``/``test:`` keys), or None when neither is configured."""
    from loaders.base import build_source

    ev = cfg.eval
    train_cfg = (data or {}).get("train") or ev.train
    test_cfg = (data or {}).get("test") or ev.test
    if not train_cfg and not test_cfg:
        return None
    if not train_cfg or not test_cfg:
        raise ConfigError("eval needs both eval.train and eval.test source configs (or neither)")
    out = []
    for key, scfg in (("eval.train", train_cfg), ("eval.test", test_cfg)):
        try:
            out.append(build_source(dict(scfg)))
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{key}: {e}") from e
    return tuple(out)


def recipe_strength(recipes):
    """``strength_fn(batch)`` giving the first per-sample strength a recipe sets, or None when no
    recipe has a ``strength`` hook (then augmentation may run in the workers or DALI)."""
    from .recipes import Recipe

    givers = [r for r in recipes if type(r).strength is not Recipe.strength]
    if not givers:
        return None

    def strength(batch):
        for r in givers:
            s = r.strength(batch.index)
            if s is not None:
                return s
        return None
    return strength


def build_stream(cfg: RunConfig, aug, *, rank: int = 0, world: int = 1, device="cpu", recipes=()):
    """The run's :class:`loaders.stream.Stream`: the configured backend with augmentation where
    ``augment.where`` says (``auto``: the loader workers on a CPU-only machine, the device with
    a GPU), copied to ``device``."""
    from loaders.stream import Stream

    place = augment_placement(cfg.augment)
    return Stream(cfg.data, aug, where=place["where"], device=device, rank=rank, world_size=world,
                  strength_fn=recipe_strength(recipes), worker_precision=place["worker_precision"])


def build_training(cfg: RunConfig, *, rank: int = 0, world: int = 1, device="cpu") -> Parts:
    """Every part of a pretraining run, validated (nothing is written); ``device`` is where the
    run trains (the model's memory format, where augmentation runs and a device-resident loader
    depend on it)."""
    from .probe import OnlineProbe
    from .recipes import build_recipes

    t = cfg.train
    if cfg.log.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"log.wandb={cfg.log.wandb} needs the wandb package: "
                              f"pip install 'fastssl[wandb]' ({e})") from e
    aug = build_augment(cfg.augment)
    recipes = build_recipes(cfg.recipes)
    stream = build_stream(cfg, aug, rank=rank, world=world, device=device, recipes=recipes)
    loader = stream.loader
    # the loader cut the views while decoding, or (crop_in_decode: false, resident backend) hands
    # over whole images that the engine crops on the device
    crop_in_decode = stream.crops_in_decode
    if t.probe:
        check_labels(loader.sources, t.num_classes)
    images_per_step = int(cfg.data.get("batch_size", 256)) * world * t.grad_accum
    method, feat_dim = build_method(cfg, aug)
    channels_last = apply_speed_options(method, cfg, device)
    recipe = optim_recipe(method, cfg)
    total = run_length(cfg, loader, images_per_step, recipe)
    probe = OnlineProbe(feat_dim, t.num_classes) if t.probe else None
    optimizer, probe_opt, lr = build_optimizers(method, probe, recipe, images_per_step)
    return Parts(aug=aug, loader=loader, method=method, probe=probe, optimizer=optimizer,
                 probe_opt=probe_opt, recipes=recipes, recipe=recipe, lr=lr, total=total,
                 images_per_step=images_per_step, feat_dim=feat_dim, crop_in_decode=crop_in_decode,
                 lr_scale=[g.get("lr_scale", 1.0) for g in optimizer.param_groups], channels_last=channels_last,
                 stream=stream)
