"""The training loop: one HuggingFace Accelerate loop for every method, backend and device.

``train(cfg)`` builds, in this order, everything that can reject the user's input (augment
preset, data sources and loader, eval sources, method and optimizer) and only then creates the
run directory, so a bad config writes nothing. Then it runs ``total`` optimizer steps:

* lr = base per 256 x (batch x world x accumulation) / 256, warmup-cosine, set every step;
* EMA methods get ``method.update_momentum(step / total)`` after every step;
* an online linear probe (``fastssl.probe``) learns on detached features, ignoring label -1;
* a non-finite loss stops the run (:class:`NonFiniteLoss`, naming the step and the last good
  checkpoint) before the bad update is applied;
* checkpoints (model, optimizers, grad scaler, RNG states, the loader's cursor, BCL table) are
  written atomically every ``train.checkpoint_every`` steps and at the end; a resumed run
  continues at the exact next sample and, with ``train.deterministic`` on CPU, reproduces the
  uninterrupted run's losses;
* the backbone is exported as a plain ``state_dict`` (``backbone.pt``), then evaluated with
  kNN (and a linear probe) on frozen features of unaugmented images.

Run directory layout: ``config.yaml``, ``metrics.jsonl``/``metrics.csv``/``metrics.png``,
``tb/`` (TensorBoard), ``checkpoints/step_XXXXXXXX.pt``, ``backbone.pt`` (+ ``.json``),
``eval.json``; with ``log.indices`` also ``indices_rank{r}.jsonl`` (the sample ids each step
trained on, for reproducibility checks).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from loaders.errors import ConfigError

from .checkpoint import (save_backbone, latest_checkpoint, load_checkpoint, save_checkpoint,
                         set_rng_state)
from .config import RunConfig, dump, to_dict
from .metrics_log import MetricsLogger
from .probe import OnlineProbe

__all__ = ["train", "TrainResult", "NonFiniteLoss", "BCLTable", "build_augment", "TrainModule"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    #: the last logged metrics and the end-of-run evaluation (fractions in [0, 1])
    metrics: Dict[str, float] = field(default_factory=dict)
    images_per_sec: float = 0.0
    #: the trained method (unwrapped), for callers that keep working with it
    method: Any = None


# ----------------------------------------------------------------------------- parts
class TrainModule(nn.Module):
    """Method + online probe as one module, so DDP synchronises both and sees one forward."""

    def __init__(self, method: nn.Module, probe: Optional[OnlineProbe]):
        super().__init__()
        self.method = method
        self.probe = probe

    def forward(self, views: List[torch.Tensor], labels: torch.Tensor):
        out = self.method(views)
        pout = self.probe(out.features, labels) if self.probe is not None else None
        return out, pout


class BCLTable:
    """BCL's per-sample momentum loss and augmentation strength (REFERENCE.md section 3).

    ``m`` (``float32 [N]``, N = unique samples of the mixture) is indexed by ``Batch.index``:
    the first time a sample is seen ``m = l``, afterwards ``m = beta m + (1 - beta) l``. At each
    epoch end :meth:`end_epoch` sets ``w = (m - mean) / std``, ``w = (w / max|w|) / 2 + 0.5``
    over the samples seen so far; ``w`` starts at 0 (no RandAugment in the first epoch).
    """

    def __init__(self, n: int, *, beta: float = 0.97):
        self.beta = beta
        self.m = torch.zeros(n, dtype=torch.float32)
        self.seen = torch.zeros(n, dtype=torch.bool)
        self.w = torch.zeros(n, dtype=torch.float32)

    def update(self, index: torch.Tensor, loss: torch.Tensor) -> None:
        """``index int64 [B]``, ``loss float [B]`` (detached per-sample losses)."""
        index = index.long().cpu()
        loss = loss.detach().float().cpu()
        # a sample may appear twice in one batch (dup>1): the last write wins, as in a loop
        old = self.m[index]
        new = torch.where(self.seen[index], self.beta * old + (1 - self.beta) * loss, loss)
        self.m[index] = new
        self.seen[index] = True

    def end_epoch(self) -> None:
        m = self.m[self.seen]
        if m.numel() < 2:
            return
        w = (m - m.mean()) / m.std().clamp_min(1e-12)
        w = (w / w.abs().max().clamp_min(1e-12)) / 2 + 0.5
        self.w.zero_()
        self.w[self.seen] = w

    def strength(self, index: torch.Tensor) -> torch.Tensor:
        return self.w[index.long().cpu()]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"m": self.m.clone(), "seen": self.seen.clone(), "w": self.w.clone(), "beta": self.beta}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd["m"].shape != self.m.shape:
            raise ConfigError(f"BCL table in the checkpoint has {sd['m'].shape[0]} samples, "
                              f"the data has {self.m.shape[0]}")
        self.m.copy_(sd["m"])
        self.seen.copy_(sd["seen"])
        self.w.copy_(sd["w"])


def build_augment(section: Dict[str, Any]):
    """``{preset: NAME, **overrides}`` -> ``Augment.from_preset``; else ``Augment.from_config``."""
    from loaders.augment import Augment

    section = dict(section)
    preset = section.pop("preset", None)
    if preset is not None:
        return Augment.from_preset(preset, **section)
    return Augment.from_config(section)


def _seed_all(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _reset_accelerate_state() -> None:
    """Allow several runs in one process (tests): Accelerate keeps a process-wide state that
    refuses a new mixed-precision setting. The distributed part (PartialState) is kept."""
    try:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state()
        GradientState._reset_state()
    except (ImportError, AttributeError):  # older/newer accelerate without these helpers
        pass


def _source_names(data_cfg: Dict[str, Any]) -> List[str]:
    out = []
    for i, s in enumerate(data_cfg.get("sources") or []):
        out.append(str(s.get("name") or f"source{i}") if isinstance(s, dict) else f"source{i}")
    return out


def _with_state(loader):
    """Yield the loader's batches, each carrying the loader's state *after* it in
    ``batch.meta["loader_state"]``: prefetching runs ahead of training, so the checkpoint must
    store the cursor of the last batch trained on, not the loader's current one."""
    for batch in loader:
        batch.meta["loader_state"] = loader.state_dict()
        yield batch


# ----------------------------------------------------------------------------- main entry
def train(cfg: RunConfig, *, out: Optional[str] = None) -> TrainResult:
    """Run the pretraining job described by ``cfg``; returns a :class:`TrainResult`.

    Raises ConfigError/DataError for bad input (before anything is written) and
    :class:`NonFiniteLoss` when the loss diverges.
    """
    from accelerate import Accelerator
    from loaders.base import build_source
    from loaders.pipeline import build_loader

    from .methods import build_method
    from .optim import build_optimizer, warmup_cosine

    t, o = cfg.train, cfg.optim
    run_dir = Path(out or cfg.log.out or Path("runs") / cfg.name)

    # ---------------------------------------------------------------- resume target
    resume_path: Optional[Path] = None
    if t.resume:
        if t.resume == "auto":
            resume_path = latest_checkpoint(run_dir)  # None: start fresh
        else:
            resume_path = Path(t.resume)
            if not resume_path.is_file():
                raise ConfigError(f"train.resume: checkpoint {resume_path} does not exist")

    # ---------------------------------------------------------------- determinism, device
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    cuda = torch.cuda.is_available() and t.device != "cpu"
    mixed = t.mixed_precision
    if not cuda and mixed == "fp16":
        mixed = "no"  # fp16 autocast + grad scaling is a CUDA feature; CPU trains in fp32
    _reset_accelerate_state()
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mixed,
                              gradient_accumulation_steps=t.grad_accum)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    _seed_all(t.seed)

    # ---------------------------------------------------------------- data + augmentation
    aug = build_augment(cfg.augment)
    crop_in_decode = bool(cfg.data.get("crop_in_decode", True))
    loader = build_loader(cfg.data, crops=list(aug.crop_specs) if crop_in_decode else None,
                          rank=rank, world_size=world)
    batch_size = int(cfg.data.get("batch_size", 256))
    images_per_step = batch_size * world * t.grad_accum
    if t.steps is not None:
        total = t.steps
    else:
        if not cfg.data.get("budget"):
            raise ConfigError("set train.steps or data.budget (images to see): the run has no length")
        total = len(loader) // t.grad_accum
    if total < 1:
        raise ConfigError(f"data.budget={cfg.data.get('budget')} is less than one step "
                          f"({images_per_step} images over all ranks)")
    ev = cfg.eval
    eval_sources = None
    if ev.enabled and main:
        if bool(ev.train) != bool(ev.test):
            raise ConfigError("eval needs both eval.train and eval.test source configs (or neither)")
        if ev.train:
            eval_sources = (build_source(ev.train), build_source(ev.test))

    # ---------------------------------------------------------------- model, optimizers
    mcfg = dict(cfg.method)
    name = mcfg.pop("name")
    backbone, feat_dim = _build_backbone(cfg, aug)
    method = build_method(name, backbone=backbone, feat_dim=feat_dim, **mcfg)
    recipe = _recipe(method, o, t)
    lr = recipe["lr"] * images_per_step / 256.0
    probe = OnlineProbe(feat_dim, t.num_classes) if t.probe else None
    module = TrainModule(method, probe)
    if world > 1 and t.sync_bn and cuda:
        # SyncBatchNorm runs on CUDA only; CPU (gloo) runs keep per-rank BatchNorm
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    opt_name = recipe["optimizer"]
    optimizer = build_optimizer(opt_name, method.param_groups(), lr=lr, weight_decay=recipe["weight_decay"],
                                **{k: recipe[k] for k in ("momentum", "eta", "clip", "betas") if k in recipe})
    lr_scale = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    probe_lr = recipe["classifier_lr"] * images_per_step / 256.0
    probe_opt = (torch.optim.SGD(probe.parameters(), lr=probe_lr, momentum=0.9, weight_decay=0.0)
                 if probe is not None else None)
    bcl = None
    if t.bcl:
        n_unique = int(loader.mixture.offsets[-1])
        bcl = BCLTable(n_unique, beta=t.bcl_beta)
    epoch_images = int(getattr(loader.mixture, "epoch_length", 0) or 0)

    # ---------------------------------------------------------------- resume state
    start = 0
    ckpt = None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if ckpt.get("world_size", world) != world:
            raise ConfigError(f"{resume_path} was written by {ckpt['world_size']} processes; "
                              f"this run has {world} (the sample order depends on it)")
        start = int(ckpt["step"])
        if start >= total:
            raise ConfigError(f"{resume_path} is at step {start}; the run has {total} steps: nothing to do")
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if probe_opt is not None and ckpt.get("probe_optimizer") is not None:
            probe_opt.load_state_dict(ckpt["probe_optimizer"])
        loader.load_state_dict(ckpt["loader"])
        if bcl is not None and ckpt.get("bcl") is not None:
            bcl.load_state_dict(ckpt["bcl"])

    # ---------------------------------------------------------------- run directory
    # everything that can reject the input ran above: only now is anything written
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            stale = _clear_checkpoints(run_dir)
            if stale:
                print(f"fastssl: fresh run in {run_dir}: removed {stale} checkpoint(s) of an earlier run "
                      f"(use --resume auto to continue one)", file=sys.stderr)
        (run_dir / "config.yaml").write_text(dump(cfg))
    accelerator.wait_for_everyone()

    if probe_opt is not None:
        module, optimizer, probe_opt = accelerator.prepare(module, optimizer, probe_opt)
    else:
        module, optimizer = accelerator.prepare(module, optimizer)
    if ckpt is not None:
        if accelerator.scaler is not None and ckpt.get("scaler") is not None:
            accelerator.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    inner = accelerator.unwrap_model(module)
    device = accelerator.device
    logger = MetricsLogger(run_dir, enabled=main, tensorboard=cfg.log.tensorboard, csv_file=cfg.log.csv,
                           plot=cfg.log.plot, resume_step=start if ckpt is not None else None)
    idx_log = None
    if cfg.log.indices:
        idx_path = run_dir / f"indices_rank{rank}.jsonl"
        if ckpt is not None and idx_path.exists():  # drop what the killed run wrote after its checkpoint
            keep = [ln for ln in idx_path.read_text().splitlines()
                    if ln.strip() and _line_step(ln) is not None and _line_step(ln) <= start]
            idx_path.write_text("".join(ln + "\n" for ln in keep))
        elif ckpt is None and idx_path.exists():
            idx_path.unlink()
        idx_log = open(idx_path, "a", buffering=1)
    names = _source_names(cfg.data)
    if main:
        print(f"fastssl: {name} on {world} process(es) ({device}), {total} steps x "
              f"{images_per_step} images, lr {lr:.4g} ({opt_name}), run dir {run_dir}"
              + (f", resumed at step {start}" if start else ""), file=sys.stderr)

    # ---------------------------------------------------------------- batches on the device
    strength_fn = (lambda b: bcl.strength(b.index)) if bcl is not None else None
    batches = _device_batches(_with_state(loader), device, _AugCall(aug, not crop_in_decode, rank, world),
                              strength_fn=strength_fn, start_step=start * t.grad_accum)

    # ---------------------------------------------------------------- loop
    last_ckpt: Optional[Path] = resume_path
    loader_state = ckpt["loader"] if ckpt is not None else loader.state_dict()
    window = {"loss": 0.0, "n": 0, "probe_correct": 0, "probe_count": 0, "images": 0}
    per_source: Dict[int, List[float]] = {}
    t_window = time.perf_counter()
    t_start = time.perf_counter()
    images_total = 0
    last_metrics: Dict[str, float] = {}
    bar = None
    if main and cfg.log.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="pretrain", dynamic_ncols=True, file=sys.stderr)
    step = start
    module.train()
    try:
        for step in range(start, total):
            cur_lr = warmup_cosine(step, total=total, warmup=recipe["warmup_steps"], base=lr,
                                   start=recipe["warmup_start"], final=recipe["final_lr"])
            for g, s in zip(optimizer.param_groups, lr_scale):
                g["lr"] = cur_lr * s
            for micro in range(t.grad_accum):
                try:
                    views, batch = next(batches)
                except StopIteration:
                    raise ConfigError(f"the data ran out at step {step} of {total}: "
                                      f"data.budget is smaller than train.steps x {images_per_step}") from None
                with accelerator.accumulate(module):
                    with accelerator.autocast():
                        out, pout = module(views, batch.label)
                    loss = out.loss
                    # one flag per micro-batch, agreed by all ranks, checked before any update
                    # (costs a host sync per step; a clear stop is worth it)
                    finite = torch.isfinite(loss.detach()).float()
                    if world > 1:
                        finite = accelerator.reduce(finite, reduction="sum") / world
                    if finite.item() < 1.0:
                        raise NonFiniteLoss(
                            f"non-finite loss ({loss.item()}) at step {step + 1}; stopped. "
                            f"Last good checkpoint: {last_ckpt or 'none written yet'}. "
                            f"Lower optim.lr or raise optim.warmup_steps, then resume from it.")
                    total_loss = loss + (pout.loss if pout is not None else 0.0)
                    accelerator.backward(total_loss)
                    if recipe.get("grad_clip") and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(inner.method.parameters(), recipe["grad_clip"])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if probe_opt is not None:
                        probe_opt.step()
                        probe_opt.zero_grad(set_to_none=True)
                # ---- bookkeeping (no host syncs beyond the finite flag)
                window["loss"] += float(loss.detach())
                window["n"] += 1
                if pout is not None:
                    window["probe_correct"] += pout.correct
                    window["probe_count"] += pout.count
                window["images"] += len(batch) * world
                images_total += len(batch) * world
                loader_state = batch.meta.get("loader_state", loader_state)
                psl = getattr(out, "per_sample_loss", None)
                if psl is None and step == start and micro == 0:
                    if bcl is not None:
                        raise ConfigError(f"train.bcl needs per-sample losses; method '{name}' returns none")
                    if len(names) > 1 and main:
                        print(f"fastssl: per-source loss unavailable (method '{name}' returns no "
                              f"per-sample loss); logging the total loss only", file=sys.stderr)
                if psl is not None:
                    psl = psl.detach().float()
                    if bcl is not None:
                        idx_all = accelerator.gather(batch.index.to(device))
                        loss_all = accelerator.gather(psl)
                        bcl.update(idx_all, loss_all)
                    if len(names) > 1:
                        src = batch.source.to(psl.device)
                        for s in torch.unique(src).tolist():
                            per_source.setdefault(int(s), []).append(float(psl[src == s].mean()))
                if idx_log is not None:
                    idx_log.write(json.dumps({"step": step + 1, "micro": micro,
                                              "index": batch.index.tolist(),
                                              "loss": float(loss.detach())}) + "\n")
            inner.method.update_momentum((step + 1) / total)
            done = step + 1
            if bcl is not None and epoch_images > 0 and \
                    (done * images_per_step) // epoch_images > (step * images_per_step) // epoch_images:
                bcl.end_epoch()
            if bar is not None:
                bar.update(1)
            if done % cfg.log.every == 0 or done == total:
                dt = max(time.perf_counter() - t_window, 1e-9)
                m = {"loss": window["loss"] / max(window["n"], 1), "lr": cur_lr,
                     "images_per_sec": window["images"] / dt, "images_seen": done * images_per_step}
                if window["probe_count"]:
                    m["probe_acc"] = window["probe_correct"] / window["probe_count"]
                for s, vals in sorted(per_source.items()):
                    label = names[s] if s < len(names) else f"source{s}"
                    m[f"loss/{label}"] = float(np.mean(vals))
                skipped = getattr(loader, "skipped", 0)
                if skipped:
                    m["skipped"] = skipped
                logger.log(done, m)
                last_metrics = m
                if bar is not None:
                    bar.set_postfix(loss=f"{m['loss']:.3f}", img_s=f"{m['images_per_sec']:.0f}",
                                    refresh=False)
                window = {"loss": 0.0, "n": 0, "probe_correct": 0, "probe_count": 0, "images": 0}
                per_source = {}
                t_window = time.perf_counter()
            if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == total:
                last_ckpt = _checkpoint(accelerator, run_dir, done, inner, optimizer, probe_opt,
                                        loader_state, bcl, cfg, world)
            if t.stop_after is not None and done >= t.stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
        if idx_log is not None:
            idx_log.close()
        logger.close()

    elapsed = time.perf_counter() - t_start
    ips = images_total / max(elapsed, 1e-9)
    result = TrainResult(run_dir=run_dir, step=step + 1, metrics=dict(last_metrics),
                         images_per_sec=ips, method=inner.method)
    if main:
        save_backbone(inner.method.backbone, run_dir / "backbone.pt",
                        meta={"backbone": cfg.model.backbone, "cifar_stem": cfg.model.cifar_stem,
                              "width": cfg.model.width, "feat_dim": feat_dim, "step": step + 1})
        # stdout: the run's summary (the progress bar and notes go to stderr)
        print(f"trained {step + 1 - start} steps, {images_total} images in {elapsed:.1f} s: "
              f"{ips:.1f} images/sec (all ranks, data + augmentation + model)", flush=True)
        if eval_sources is not None:
            result.metrics.update(_final_eval(cfg, inner.method, eval_sources, device, run_dir,
                                                  cfg.eval.mean or aug.mean, cfg.eval.std or aug.std))
    accelerator.wait_for_everyone()
    return result


def _build_backbone(cfg: RunConfig, aug):
    """``fastssl.models.build_backbone`` from ``cfg.model`` (ViTs get ``img_size`` = the first
    augmented view's size unless ``model.img_size`` is set)."""
    from .models import build_backbone

    m = cfg.model
    kw = {}
    if m.backbone.startswith("vit"):
        size = m.img_size or (aug.specs[0].size if aug is not None else None)
        kw = {"img_size": size, "patch_size": m.patch_size} if size else {"patch_size": m.patch_size}
    return build_backbone(m.backbone, cifar_stem=m.cifar_stem, width=m.width, **kw)


def _recipe(method, o, t) -> Dict[str, Any]:
    """The method's optimisation recipe with the config's explicit ``optim.*`` values on top."""
    recipe = dict(getattr(method, "recipe", {}) or {})
    recipe.setdefault("optimizer", "sgd")
    recipe.setdefault("weight_decay", 0.0)
    recipe.setdefault("warmup_steps", 0)
    recipe.setdefault("warmup_start", 0.0)
    recipe.setdefault("final_lr", 0.0)
    recipe.setdefault("classifier_lr", 0.05)
    explicit = {"optimizer": o.name, "lr": o.lr, "weight_decay": o.weight_decay, "momentum": o.momentum,
                "eta": o.eta, "warmup_steps": o.warmup_steps, "warmup_start": o.start_lr,
                "final_lr": o.final_lr, "grad_clip": o.clip_grad, "classifier_lr": t.probe_lr}
    recipe.update({k: v for k, v in explicit.items() if v is not None})
    if recipe.get("lr") is None:
        raise ConfigError(f"optim.lr is not set and method '{method.name}' publishes no default lr")
    return recipe


def _clear_checkpoints(run_dir: Path) -> int:
    """Remove an earlier run's step files so that 'auto' resume and the keep-newest rotation
    only ever see this run's checkpoints. Returns how many were removed."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return 0
    n = 0
    for p in list(folder.glob("step_*.pt")) + list(folder.glob("last.txt")):
        p.unlink()
        n += p.suffix == ".pt"
    return n


def _line_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _checkpoint(accelerator, run_dir, step, inner, optimizer, probe_opt, loader_state, bcl, cfg, world):
    """Every rank joins (so that no rank races ahead); rank 0 writes."""
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        state = {
            "model": inner.state_dict(),
            "backbone": inner.method.backbone.state_dict(),
            "optimizer": optimizer.state_dict(),
            "probe_optimizer": probe_opt.state_dict() if probe_opt is not None else None,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "loader": loader_state,
            "bcl": bcl.state_dict() if bcl is not None else None,
            "config": to_dict(cfg),
            "world_size": world,
        }
        path = save_checkpoint(run_dir, step, state)
    accelerator.wait_for_everyone()
    return path or (Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt")


def _device_batches(batch_iter, device, aug, *, strength_fn, start_step: int):
    """Yield ``(views, batch)``: float views augmented on ``device``, micro-step by micro-step.

    Uses ``loaders.prefetch.DevicePrefetcher`` (copies the next uint8 batch while the model
    runs) when it is available, else a plain synchronous copy + augment.
    """
    step = start_step
    try:
        from loaders.prefetch import DevicePrefetcher
    except ImportError:
        DevicePrefetcher = None
    if DevicePrefetcher is not None:
        pf = DevicePrefetcher(batch_iter, device, augment=aug, strength_fn=strength_fn,
                              start_step=start_step)
        for batch in pf:
            yield batch.views, batch
        return
    for batch in batch_iter:
        b = batch.to(device)
        strength = strength_fn(batch).to(device) if strength_fn is not None else None
        views = aug(b, step=step, strength=strength).views
        step += 1
        yield views, b


class _AugCall:
    """The augment with ``crop`` fixed (crop-in-decode loaders hand over cropped views) and
    per-rank random streams: Augment seeds from (seed, step, view), so rank r of W augments
    micro-step s as step ``s * W + r`` (W = 1: the step itself)."""

    def __init__(self, aug, crop: bool, rank: int = 0, world: int = 1):
        self.aug = aug
        self.crop = crop
        self.rank = rank
        self.world = world

    def __call__(self, batch, *, step, strength=None, **kw):
        return self.aug(batch, step=step * self.world + self.rank, strength=strength, crop=self.crop)


def _final_eval(cfg: RunConfig, method, sources, device, run_dir: Path, mean, std) -> Dict[str, float]:
    """kNN (and linear-probe) top-1 on the held-out split, and kNN of the same architecture at
    random initialisation; printed and written to ``eval.json``."""
    from .eval import evaluate_features, extract_features, source_arrays

    ev = cfg.eval
    tr_x, tr_y = source_arrays(sources[0], size=ev.image_size, progress=cfg.log.progress)
    te_x, te_y = source_arrays(sources[1], size=ev.image_size, progress=cfg.log.progress)
    num_classes = int(max(int(tr_y.max()), int(te_y.max())) + 1)
    kw = dict(mean=mean, std=std, batch_size=ev.batch_size, device=device)
    lin = dict(epochs=ev.linear_epochs, optimizer=ev.linear_optimizer, lr=ev.linear_lr,
               weight_decay=ev.linear_weight_decay, batch_size=ev.linear_batch_size)
    t0 = time.perf_counter()
    res = evaluate_features(extract_features(method.backbone, tr_x, **kw), tr_y,
                            extract_features(method.backbone, te_x, **kw), te_y,
                            num_classes=num_classes, k=ev.knn_k, temperature=ev.knn_t,
                            linear=ev.linear, linear_kwargs=lin)
    out = {"eval/knn_top1": res["knn_top1"], "eval/chance": 1.0 / num_classes}
    if "linear_top1" in res:
        out["eval/linear_top1"] = res["linear_top1"]
    if ev.random_init_baseline:
        torch.manual_seed(cfg.train.seed)
        rand, _ = _build_backbone(cfg, build_augment(cfg.augment))
        rand.to(device)
        base = evaluate_features(extract_features(rand, tr_x, **kw), tr_y,
                                 extract_features(rand, te_x, **kw), te_y,
                                 num_classes=num_classes, k=ev.knn_k, temperature=ev.knn_t, linear=False)
        out["eval/knn_top1_random_init"] = base["knn_top1"]
    out["eval/seconds"] = time.perf_counter() - t0
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2))
    lines = [f"kNN top-1 (k={ev.knn_k}, held-out split, {len(te_y)} images): {100 * out['eval/knn_top1']:.2f}%"]
    if "eval/knn_top1_random_init" in out:
        lines.append(f"kNN top-1, same encoder at random init: {100 * out['eval/knn_top1_random_init']:.2f}%")
    lines.append(f"chance: {100 * out['eval/chance']:.2f}%")
    if "eval/linear_top1" in out:
        lines.append(f"linear-probe top-1 (frozen features): {100 * out['eval/linear_top1']:.2f}%")
    print("\n".join(lines))
    return out
