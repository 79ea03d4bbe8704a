"""``train(cfg)``: one pretraining run, from a validated config to an exported, evaluated encoder.

The order is fixed so that a bad input writes nothing: every part is built and checked first
(:func:`fastssl.build.build_training`: augmentation, loader, method, optimizers, run length,
recipes; then the resume checkpoint and the run directory's policy, :mod:`fastssl.rundir`),
and only then is the run directory written. The loop (:mod:`fastssl.loop`) runs the steps:

* lr = base per 256 x (batch x world x accumulation) / 256, warmup-cosine, set every step;
* EMA methods get ``method.update_momentum(step / total)`` after every update;
* an online linear probe (``fastssl.probe``) learns on detached features, ignoring label -1;
* the data come from one stream (:class:`loaders.stream.Stream`, built by
  :func:`fastssl.build.build_stream`): the backend, augmentation where ``augment.where`` says
  (loader workers on a CPU-only machine, the device with a GPU), the copy to the device and the
  loader cursor the checkpoints store;
* recipes (``recipes:`` in the config, :mod:`fastssl.recipes`) hook into set-up, augmentation
  strength, the views, every step, every epoch, the checkpoint and the log;
* nothing is read on the host outside log steps; a non-finite loss never reaches the weights
  and stops the run (:class:`NonFiniteLoss`, naming the step and the last good checkpoint);
* checkpoints (:mod:`fastssl.state`: model with each method's schedule state, optimizers,
  scaler, RNG, the loader's cursor, recipe states, the open log window) are written atomically
  every ``train.checkpoint_every`` steps and at the end; a resumed run continues at the exact
  next sample and, with ``train.deterministic`` on CPU, reproduces the uninterrupted run;
* the backbone is exported as a plain ``state_dict`` (``backbone.pt``) and evaluated with kNN
  (and a linear probe) on frozen features of unaugmented images (:func:`fastssl.eval.final_eval`).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from .build import build_eval_sources, build_training
from .checkpoint import save_backbone, set_rng_state
from .config import RunConfig, dump, to_dict
from .loop import Loop, NonFiniteLoss, device_batches
from .meters import Meters
from .metrics_log import MetricsLogger
from .recipes import SetupContext
from .rundir import check_fresh, clear_run, load_resume, open_indices_log, run_is_complete
from .state import check_resume, restore_state, world_change_note
from .step import TrainModule, TrainStep

__all__ = ["train", "TrainResult", "NonFiniteLoss", "make_accelerator", "setup_recipes"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    #: the last logged metrics and the end-of-run evaluation (fractions in [0, 1])
    metrics: Dict[str, float] = field(default_factory=dict)
    images_per_sec: float = 0.0
    #: the trained method (unwrapped), for callers that keep working with it
    method: Any = None


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


def make_accelerator(cfg: RunConfig):
    """The run's Accelerator (CPU unless CUDA is there and ``train.device`` allows it)."""
    from accelerate import Accelerator

    t = cfg.train
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
    return Accelerator(cpu=not cuda, mixed_precision=mixed, gradient_accumulation_steps=t.grad_accum)


def train(cfg: RunConfig, *, out: Optional[str] = None, force: bool = False) -> TrainResult:
    """Run the pretraining job described by ``cfg``; returns a :class:`TrainResult`.

    ``force``: start over in a run directory that holds an earlier run (its files are removed).
    Raises ConfigError/DataError for bad input (before anything is written) and
    :class:`NonFiniteLoss` when the loss diverges.
    """
    t = cfg.train
    run_dir = Path(out or cfg.log.out or Path("runs") / cfg.name)
    accelerator = make_accelerator(cfg)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    _seed_all(t.seed)
    parts = build_training(cfg, rank=rank, world=world, device=accelerator.device)
    eval_sources = build_eval_sources(cfg) if cfg.eval.enabled and main else None
    module = TrainModule(parts.method, parts.probe)
    if world > 1 and t.sync_bn and accelerator.device.type == "cuda":
        # SyncBatchNorm runs on CUDA only; CPU (gloo) runs keep per-rank BatchNorm
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    meters = Meters(accelerator.device, len(parts.loader.sources))
    ckpt, start = _resume(cfg, run_dir, parts, module, meters, rank, world, force)
    if ckpt is not None and start == parts.total and _complete(cfg, run_dir):
        return _already_complete(cfg, run_dir, parts, start, main)
    setup_recipes(parts, accelerator, world, ckpt)
    _write_run_dir(cfg, run_dir, accelerator, fresh=ckpt is None)
    return _run(cfg, run_dir, parts, module, meters, accelerator, ckpt, start, eval_sources)


def _resume(cfg, run_dir: Path, parts, module, meters, rank: int, world: int, force: bool):
    """``(checkpoint or None, start step)``; refuses what would silently change the experiment
    and a fresh run over an earlier run's files (unless ``force``)."""
    from loaders.errors import ConfigError

    path, ckpt = load_resume(cfg.train.resume, run_dir)
    if path is None:
        check_fresh(run_dir, resume=cfg.train.resume, force=force)
        return None, 0
    check_resume(path, ckpt, to_dict(cfg), world)
    start = int(ckpt["step"])
    if start > parts.total:
        raise ConfigError(f"{path} is at step {start}, past the run's {parts.total} steps (train.steps or "
                          f"data.budget shrank?)")
    if start == parts.total and not _complete(cfg, run_dir):
        print(f"fastssl: {path} is the run's final step: finishing it (backbone export, evaluation)",
              file=sys.stderr)
    note = world_change_note(ckpt, world, int(cfg.data.get("batch_size", 256)))
    if note:
        print(f"fastssl: {note}", file=sys.stderr)
    ckpt["_path"] = path
    try:  # recipes load their state in _setup_recipes, after set-up sized their tables
        restore_state(ckpt, module=module, optimizer=parts.optimizer, probe_opt=parts.probe_opt,
                      loader=parts.stream, recipes=[], meters=meters, rank=rank, world=world)
    except ValueError as e:  # the plan refuses another mixture
        raise ConfigError(f"cannot resume from {path}: {e}") from e
    return ckpt, start


def _complete(cfg, run_dir: Path) -> bool:
    return run_is_complete(run_dir, eval_enabled=bool(cfg.eval.enabled and cfg.eval.train))


def _already_complete(cfg, run_dir: Path, parts, step: int, main: bool) -> TrainResult:
    """``--resume auto`` on a finished run (a preemption-retry loop): nothing to redo, exit 0."""
    import json
    saved = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    metrics = {k: v for k, v in saved.items() if isinstance(v, (int, float))}
    if main:
        print(f"fastssl: the run in {run_dir} is complete (step {step} of {parts.total}, backbone.pt"
              f"{', eval.json' if metrics else ''} written): nothing to do", file=sys.stderr)
    return TrainResult(run_dir=run_dir, step=step, metrics=metrics, method=parts.method)


def setup_recipes(parts, accelerator, world: int, ckpt) -> None:
    mixture = parts.loader.mixture
    ctx = SetupContext(num_samples=int(mixture.offsets[-1]), source_sizes=[int(n) for n in mixture.sizes],
                       source_names=list(mixture.names), epoch_length=int(mixture.epoch_length),
                       images_per_step=parts.images_per_step, total_steps=parts.total, method=parts.method,
                       accelerator=accelerator, device=accelerator.device)
    saved = (ckpt or {}).get("recipes") or {}
    for r in parts.recipes:
        r.setup(ctx)
        if r.name in saved:
            r.load_state_dict(saved[r.name])


def _write_run_dir(cfg, run_dir: Path, accelerator, *, fresh: bool) -> None:
    """Everything that can reject the input ran above: only now is anything written."""
    accelerator.wait_for_everyone()  # every rank has checked the directory before rank 0 writes
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            removed = clear_run(run_dir)
            if removed:
                print(f"fastssl: fresh run in {run_dir}: removed {removed} file(s) of an earlier run",
                      file=sys.stderr)
        (run_dir / "config.yaml").write_text(dump(cfg))
    accelerator.wait_for_everyone()
    check_shared_run_dir(run_dir, accelerator)


def check_shared_run_dir(run_dir: Path, accelerator) -> None:
    """Every rank must see rank 0's run directory (multi-node: a filesystem all nodes share), as
    checkpoints written by rank 0 are read by every rank on resume and each rank writes its own
    indices log there. Every rank raises the same ConfigError (no rank is left waiting in a
    collective) when some rank does not see rank 0's ``config.yaml``."""
    if accelerator.num_processes == 1:
        return
    seen = torch.tensor([float((run_dir / "config.yaml").is_file())], device=accelerator.device)
    missing = [r for r, s in enumerate(accelerator.gather(seen).tolist()) if not s]
    if missing:
        from loaders.errors import ConfigError
        raise ConfigError(f"run directory '{run_dir}' is not visible to rank(s) {missing}: a multi-node run needs "
                          "log.out / --out on a filesystem shared by every node")


def _run(cfg, run_dir, parts, module, meters, accelerator, ckpt, start, eval_sources) -> TrainResult:
    """Prepare, loop, export, evaluate."""
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    objs = [module, parts.optimizer] + ([parts.probe_opt] if parts.probe_opt is not None else [])
    prepared = accelerator.prepare(*objs)
    module, parts.optimizer = prepared[0], prepared[1]
    if parts.probe_opt is not None:
        parts.probe_opt = prepared[2]
    if ckpt is not None:
        if accelerator.scaler is not None and ckpt.get("scaler") is not None:
            accelerator.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    step_fn = TrainStep(accelerator, module, parts.optimizer, parts.probe_opt, grad_clip=parts.recipe.get("grad_clip"),
                        channels_last=parts.channels_last)
    resume_step = start if ckpt is not None else None
    logger = MetricsLogger(run_dir, enabled=main, tensorboard=cfg.log.tensorboard, csv_file=cfg.log.csv,
                           plot=cfg.log.plot, resume_step=resume_step, wandb=cfg.log.wandb, config=to_dict(cfg))
    idx_log = open_indices_log(run_dir, rank, resume_step) if cfg.log.indices else None
    if main:
        print(f"fastssl: {parts.method.name} on {world} process(es) ({accelerator.device}), {parts.total} steps x "
              f"{parts.images_per_step} images, lr {parts.lr:.4g} ({parts.recipe['optimizer']}), run dir {run_dir}"
              + (f", resumed at step {start}" if start else ""), file=sys.stderr)
    batches = device_batches(parts.stream, start_step=start * cfg.train.grad_accum)
    bar = None
    if main and cfg.log.progress:
        from tqdm import tqdm
        bar = tqdm(total=parts.total, initial=start, desc="pretrain", dynamic_ncols=True, file=sys.stderr)
    loop = Loop(cfg=cfg, parts=parts, accelerator=accelerator, step_fn=step_fn, meters=meters, logger=logger,
                batches=batches, run_dir=run_dir, source_names=list(parts.loader.mixture.names), start=start,
                stream=parts.stream,
                last_ckpt=ckpt["_path"] if ckpt is not None else None, idx_log=idx_log, bar=bar)
    t0 = time.perf_counter()
    try:
        done = loop.run()
    finally:
        for h in (bar, idx_log):
            if h is not None:
                h.close()
        logger.close()
    return _finish(cfg, run_dir, parts, loop, accelerator, start, done, time.perf_counter() - t0, eval_sources)


def _finish(cfg, run_dir, parts, loop, accelerator, start, done, elapsed, eval_sources) -> TrainResult:
    from .eval import final_eval, mixture_class_counts

    method = loop.step_fn.inner.method
    ips = loop.images_total / max(elapsed, 1e-9)
    result = TrainResult(run_dir=run_dir, step=done, metrics=dict(loop.last_metrics), images_per_sec=ips,
                         method=method)
    if accelerator.is_main_process:
        m = cfg.model
        save_backbone(method.backbone, run_dir / "backbone.pt",
                      meta={"backbone": m.backbone, "cifar_stem": m.cifar_stem, "width": m.width,
                            "feat_dim": parts.feat_dim, "step": done})
        # stdout: the run's summary (the progress bar and notes go to stderr)
        print(f"trained {done - start} steps, {loop.images_total} images in {elapsed:.1f} s: "
              f"{ips:.1f} images/sec (all ranks, data + augmentation + model)", flush=True)
        if eval_sources is not None:
            counts = mixture_class_counts(parts.loader.sources, parts.loader.mixture) if cfg.eval.groups else None
            result.metrics.update(final_eval(cfg, method.backbone, eval_sources, accelerator.device,
                                             run_dir=run_dir, aug=parts.aug, train_counts=counts,
                                             counts_origin="the pretraining mixture (data.sources)"))
    accelerator.wait_for_everyone()
    return result
