"""Device-side accumulators of the training log: nothing is read on the host between log steps.

Each micro-step adds its loss, the probe's counts, per-source loss sums and the method's log
scalars to tensors on the training device (a GPU keeps running ahead); :meth:`Meters.read`
fetches them all with one copy at a log step and starts a new window. The non-finite flag and
the step where it was first raised live here too, so the loop can stop at the next log or
checkpoint step without checking every step.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch

__all__ = ["Meters"]


class Meters:
    """Sums over the current log window, on ``device``.

    ``num_sources`` per-source slots take ``per_sample_loss [B]`` by ``Batch.source [B]``.
    """

    def __init__(self, device, num_sources: int):
        self.device = torch.device(device)
        self.num_sources = int(num_sources)
        z = dict(device=self.device, dtype=torch.float64)
        self.loss = torch.zeros((), **z)
        self.steps = torch.zeros((), **z)
        self.probe_correct = torch.zeros((), **z)
        self.probe_count = torch.zeros((), **z)
        self.src_loss = torch.zeros(self.num_sources, **z)
        self.src_count = torch.zeros(self.num_sources, **z)
        self.logs: Dict[str, torch.Tensor] = {}
        self.float_logs: Dict[str, float] = {}
        #: the first optimizer step (1-based) whose loss was NaN/inf, 0 while none was; and that loss
        self.bad_step = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_loss = torch.zeros((), **z)

    # ------------------------------------------------------------------ accumulate
    def add(self, loss: torch.Tensor, *, probe=None, per_sample_loss: Optional[torch.Tensor] = None,
            source: Optional[torch.Tensor] = None, logs: Optional[Mapping[str, Any]] = None) -> None:
        """One micro-step: the detached loss, the probe's output, ``per_sample_loss [B]`` with
        ``source int64 [B]`` and the method's ``logs`` (0-dim tensors or floats)."""
        self.loss += loss.detach().to(torch.float64)
        self.steps += 1
        if probe is not None:
            self.probe_correct += probe.correct
            self.probe_count += probe.count
        if per_sample_loss is not None and source is not None and self.num_sources > 1:
            src = source.to(self.device).long()
            self.src_loss.index_add_(0, src, per_sample_loss.detach().to(torch.float64))
            self.src_count.index_add_(0, src, torch.ones_like(src, dtype=torch.float64))
        for k, v in (logs or {}).items():
            if isinstance(v, torch.Tensor):  # summed on the device
                v = v.detach().to(self.device, torch.float64)
                self.logs[k] = self.logs[k] + v if k in self.logs else v.clone()
            else:  # Python floats (schedules such as tau) stay on the host: no copy to the device
                self.float_logs[k] = self.float_logs.get(k, 0.0) + float(v)

    def flag_nonfinite(self, bad: torch.Tensor, step: int, loss: torch.Tensor) -> None:
        """Record ``step`` (1-based) as the first bad one if ``bad`` (0-dim bool) and none was."""
        first = bad & (self.bad_step == 0)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_loss = torch.where(first, loss.detach().to(torch.float64), self.bad_loss)

    # ------------------------------------------------------------------ read (host sync)
    def read(self, source_names: List[str]) -> Dict[str, float]:
        """Means over the window (one host copy) and a new window; ``loss/<source>`` per source."""
        keys = sorted(self.logs)
        flat = torch.cat([torch.stack([self.loss, self.steps, self.probe_correct, self.probe_count,
                                       self.bad_step.to(torch.float64), self.bad_loss]),
                          self.src_loss, self.src_count,
                          torch.stack([self.logs[k] for k in keys]) if keys else self.loss.new_zeros(0)])
        vals = flat.tolist()
        loss, steps, correct, count, bad_step, bad_loss = vals[:6]
        s = self.num_sources
        src_loss, src_count, logv = vals[6:6 + s], vals[6 + s:6 + 2 * s], vals[6 + 2 * s:]
        out: Dict[str, float] = {"loss": loss / max(steps, 1)}
        if count:
            out["probe_acc"] = correct / count
        for i, (ls, c) in enumerate(zip(src_loss, src_count)):
            if c:
                out[f"loss/{source_names[i] if i < len(source_names) else f'source{i}'}"] = ls / c
        for k, v in [*zip(keys, logv), *self.float_logs.items()]:
            out[f"method/{k}"] = v / max(steps, 1)
        self.nonfinite = (int(bad_step), bad_loss) if bad_step else None
        self._reset()
        return out

    def check_finite(self):
        """``(first bad step, its loss)`` or None: one host read (at checkpoint steps)."""
        step = int(self.bad_step)
        return (step, float(self.bad_loss)) if step else None

    def _reset(self) -> None:
        for t in (self.loss, self.steps, self.probe_correct, self.probe_count, self.src_loss, self.src_count):
            t.zero_()
        self.logs, self.float_logs = {}, {}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """The open window (so a resumed run logs the same means as an uninterrupted one)."""
        sd = {k: getattr(self, k).cpu().clone() for k in
              ("loss", "steps", "probe_correct", "probe_count", "src_loss", "src_count")}
        sd["logs"] = {k: v.cpu().clone() for k, v in self.logs.items()}
        sd["float_logs"] = dict(self.float_logs)
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        for k in ("loss", "steps", "probe_correct", "probe_count", "src_loss", "src_count"):
            if k in sd and sd[k].shape == getattr(self, k).shape:
                getattr(self, k).copy_(sd[k])
        self.logs = {k: v.to(self.device) for k, v in (sd.get("logs") or {}).items()}
        self.float_logs = dict(sd.get("float_logs") or {})
