"""The training loop: steps, recipe hooks, logging and checkpoints -- nothing else.

:class:`Loop` runs optimizer steps ``start .. total - 1`` over batches of the run's data stream
(:class:`loaders.stream.Stream`): already on the device and augmented (the recipes' ``strength``
hook is applied by the augmentation; see :func:`device_batches`). The stream holds the loader
cursor; checkpoints read it there (``stream.state_dict()``: the sample after the last batch
trained on). Per micro-step: recipes rewrite the views, :class:`~fastssl.step.
TrainStep` runs forward/backward/update, the device meters accumulate, recipes that need them
get the per-sample losses gathered over ranks. Per optimizer step: the lr schedule, the plan's
epoch boundaries (``end_epoch`` hooks), the log (only there are values read on the host) and
the checkpoint. A non-finite loss is caught at the next log or checkpoint step
(:class:`NonFiniteLoss`, naming the step and the last good checkpoint); it never reached the
weights (see :mod:`fastssl.step`).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from .checkpoint import save_checkpoint
from .optim import warmup_cosine
from .state import collect_state

__all__ = ["Loop", "NonFiniteLoss", "device_batches"]


class _PlanEnded(Exception):
    """The loader has no batch left (the plan's budget is used up)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def device_batches(stream, *, start_step: int = 0):
    """``(views, batch)`` of a :class:`loaders.stream.Stream` until it is exhausted: final views on
    the stream's device (augmented where ``augment.where`` put it; the recipes' ``strength`` hook
    is the stream's ``strength_fn``). ``start_step``: the micro-step of the first batch (the seed
    counter of batches that carry no key; see the stream)."""
    stream.step = start_step
    for batch in stream:
        yield batch.views, batch


@dataclass
class Loop:
    """One run's loop state; :meth:`run` trains and returns the last step done."""

    cfg: Any
    parts: Any
    accelerator: Any
    step_fn: Any
    meters: Any
    logger: Any
    batches: Iterator
    run_dir: Path
    source_names: List[str]
    start: int
    #: the data stream: its state_dict() is the loader cursor a checkpoint stores
    stream: Any
    last_ckpt: Optional[Path] = None
    idx_log: Any = None
    bar: Any = None
    images_total: int = 0
    last_metrics: Dict[str, float] = field(default_factory=dict)

    def run(self) -> int:
        p = self.parts
        self._t_window = time.perf_counter()
        self._window_images = 0
        self._checked_losses = False
        self.step_fn.module.train()
        done = self.start
        for step in range(self.start, p.total):
            lr = warmup_cosine(step, total=p.total, warmup=p.recipe["warmup_steps"], base=p.lr,
                               start=p.recipe["warmup_start"], final=p.recipe["final_lr"])
            for g, s in zip(p.optimizer.param_groups, p.lr_scale):
                g["lr"] = lr * s
            try:
                for micro in range(self.cfg.train.grad_accum):
                    self._micro(step, micro)
            except _PlanEnded:
                self._plan_ended(step, done, lr)
                break
            done = step + 1
            self._end_of_step(done, lr)
            if self.cfg.train.stop_after is not None and done >= self.cfg.train.stop_after:
                break
        return done

    # ------------------------------------------------------------------ micro-step
    def _next(self, step: int):
        try:
            return next(self.batches)
        except StopIteration:
            raise _PlanEnded() from None

    def _plan_ended(self, step: int, done: int, lr: float) -> None:
        """The plan has no batch left before ``total``. A budget-sized run on one process ends
        there (samples skipped under ``on_error: skip`` used up plan positions): the last steps
        are logged and checkpointed. Otherwise it is an error naming the numbers."""
        from loaders.errors import ConfigError
        p, loader = self.parts, self.parts.loader
        skipped = int(getattr(loader, "skipped", 0) or 0)
        if self.cfg.train.steps is not None or self.accelerator.num_processes > 1 or not skipped:
            why = f" ({skipped} samples skipped)" if skipped else ""
            raise ConfigError(f"the data ran out at step {step} of {p.total}: data.budget is smaller than "
                              f"train.steps x {p.images_per_step}{why}")
        if self.accelerator.is_main_process:
            print(f"fastssl: the data budget ran out at step {done} of {p.total}: {skipped} skipped samples used "
                  f"up plan positions; {done * p.images_per_step} images were trained on", file=sys.stderr)
        if done > self.start and done % self.cfg.log.every:
            self._log(done, lr, int(getattr(loader.mixture, "epoch_length", 0) or 0))
        if done > self.start and not (self.cfg.train.checkpoint_every and done % self.cfg.train.checkpoint_every == 0):
            self._checkpoint(done)

    def _micro(self, step: int, micro: int) -> None:
        views, batch = self._next(step)
        for r in self.parts.recipes:
            views = r.rewrite_views(views, batch)
        out, pout, _ = self.step_fn(views, batch.label, progress=(step + 1) / self.parts.total)
        psl = out.per_sample_loss
        if not self._checked_losses:
            self._check_losses(psl)
        self.meters.add(out.loss, probe=pout, per_sample_loss=psl, source=batch.source, logs=out.logs)
        self._recipes_after(step, batch, psl)
        n = len(batch) * self.accelerator.num_processes
        self.images_total += n
        self._window_images += n
        if self.idx_log is not None:  # a debugging record: reads the loss on the host
            self.idx_log.write(json.dumps({"step": step + 1, "micro": micro,
                                           "index": batch.meta.get("host_index", batch.index).tolist(),
                                           "loss": float(out.loss.detach())}) + "\n")

    def _check_losses(self, psl) -> None:
        """Once: say that per-source losses are unavailable, or refuse a recipe that needs them."""
        from loaders.errors import ConfigError
        self._checked_losses = True
        if psl is not None:
            return
        name = self.parts.method.name
        need = [r.name for r in self.parts.recipes if r.requires_per_sample_loss]
        if need:
            raise ConfigError(f"recipe '{need[0]}' needs per-sample losses; method '{name}' returns none")
        if len(self.source_names) > 1 and self.accelerator.is_main_process:
            why = getattr(self.parts.method, "per_sample_loss_note", None) or "it returns no per-sample loss"
            print(f"fastssl: per-source loss unavailable for method '{name}' ({why}); "
                  f"logging the total loss only", file=sys.stderr)

    def _recipes_after(self, step: int, batch, psl) -> None:
        needy = [r for r in self.parts.recipes if r.needs_losses]
        if not needy:
            for r in self.parts.recipes:
                r.after_step(step + 1, batch.index, None)
            return
        acc = self.accelerator
        index = acc.gather(batch.index)
        losses = acc.gather(psl.detach().float()) if psl is not None else None
        for r in self.parts.recipes:
            r.after_step(step + 1, index, losses if r.needs_losses else None)

    # ------------------------------------------------------------------ optimizer step
    def _end_of_step(self, done: int, lr: float) -> None:
        p, t, log = self.parts, self.cfg.train, self.cfg.log
        bad = self.step_fn.last_update_bad
        if bad is not None:
            # the window's loss sum is non-finite once any loss in it was: the value to report
            self.meters.flag_nonfinite(bad, done, self.meters.loss)
        epoch_len = int(getattr(p.loader.mixture, "epoch_length", 0) or 0)
        if epoch_len > 0:
            before, after = ((done - 1) * p.images_per_step) // epoch_len, (done * p.images_per_step) // epoch_len
            for epoch in range(before + 1, after + 1):
                self.step_fn.inner.method.on_epoch_end(epoch)
                for r in p.recipes:
                    r.end_epoch(epoch)
        if self.bar is not None:
            self.bar.update(1)
        if done % log.every == 0 or done == p.total:
            self._log(done, lr, epoch_len)
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == p.total:
            self._checkpoint(done)

    def _log(self, done: int, lr: float, epoch_len: int) -> None:
        p = self.parts
        dt = max(time.perf_counter() - self._t_window, 1e-9)
        m = self.meters.read(self.source_names)
        self._stop_if_nonfinite(self.meters.nonfinite, done)
        m.update({"lr": lr, "images_per_sec": self._window_images / dt, "images_seen": done * p.images_per_step})
        if epoch_len > 0:
            m["epoch"] = done * p.images_per_step / epoch_len
        skipped = getattr(p.loader, "skipped", 0)
        if skipped:  # this rank's samples replaced under on_error: skip, in all and per source
            m["skipped"] = skipped
            for name, n in (getattr(p.loader, "skipped_by_source", None) or {}).items():
                m[f"skipped/{name}"] = n
        for r in p.recipes:
            m.update({k: float(v) for k, v in r.metrics().items()})
            for k, v in r.histograms().items():
                self.logger.histogram(k, v, done)
        self.logger.log(done, m)
        self.last_metrics = m
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", img_s=f"{m['images_per_sec']:.0f}", refresh=False)
        self._t_window, self._window_images = time.perf_counter(), 0

    def _stop_if_nonfinite(self, bad, done: int) -> None:
        if bad is None:
            return
        step, loss = bad
        raise NonFiniteLoss(
            f"non-finite loss ({loss}) at step {step}; stopped at step {done}, its update skipped. "
            f"Last good checkpoint: {self.last_ckpt or 'none written yet'}. "
            f"Lower optim.lr or raise optim.warmup_steps, then resume from it.")

    def _all_loader_states(self) -> List[Dict[str, Any]]:
        """The loader state of every rank, in rank order (one collective at checkpoint steps)."""
        state = self.stream.state_dict()
        if self.accelerator.num_processes == 1:
            return [state]
        from accelerate.utils import gather_object
        return list(gather_object([state]))

    def _checkpoint(self, done: int) -> None:
        """Every rank joins (so that no rank races ahead); rank 0 writes. A run whose loss went
        non-finite since the last check is stopped instead of saved."""
        from .config import to_dict
        self._stop_if_nonfinite(self.meters.check_finite(), done)
        acc = self.accelerator
        acc.wait_for_everyone()
        # every rank's cursor: with on_error: skip each rank moves past its own skipped samples
        loader_states = self._all_loader_states()
        if acc.is_main_process:
            p = self.parts
            state = collect_state(inner=self.step_fn.inner, optimizer=p.optimizer, probe_opt=p.probe_opt,
                                  scaler=acc.scaler, loader_state=loader_states, recipes=p.recipes,
                                  meters=self.meters, config=to_dict(self.cfg), world=acc.num_processes)
            self.last_ckpt = save_checkpoint(self.run_dir, done, state, keep=self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
