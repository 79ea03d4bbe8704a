"""The training step, shared by the loop (:mod:`fastssl.loop`) and ``fastssl bench e2e``.

One call of :class:`TrainStep` is one micro-step: forward of the method and the online probe
under autocast, backward, and -- when the micro-step completes an optimizer step -- the
update. It never reads a tensor on the host:

* the loss's finiteness is a device flag; at the update the flag is agreed over ranks (a
  collective, not a host sync) and, when any rank saw NaN/inf in this optimizer step, every
  gradient is zeroed on the device, so the bad values never reach the weights (the loop stops
  the run at the next log or checkpoint step and names the step);
* gradient clipping, then ``method.on_after_backward()`` run between backward and the update
  (DINO/SwAV drop the gradients of their frozen layers there);
* ``method.update_momentum(progress)`` follows every update (EMA encoders, schedules).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

__all__ = ["TrainModule", "TrainStep"]


class TrainModule(nn.Module):
    """Method + online probe as one module, so DDP synchronises both and sees one forward."""

    def __init__(self, method: nn.Module, probe: Optional[nn.Module]):
        super().__init__()
        self.method = method
        self.probe = probe

    def forward(self, views: List[torch.Tensor], labels: torch.Tensor):
        out = self.method(views)
        pout = self.probe(out.features, labels) if self.probe is not None else None
        return out, pout


class TrainStep:
    """``step(views, labels, progress=p) -> (MethodOutput, ProbeOutput or None, bad)``.

    ``views``: float ``[B, 3, H, W]`` tensors on the device; ``labels int64 [B]`` (-1 = none);
    ``progress``: (optimizer step + 1) / total steps, given to ``update_momentum`` after the
    update. ``bad`` is a 0-dim bool tensor: this micro-step's loss was not finite.
    ``module``/``optimizer``/``probe_opt`` are the objects returned by ``accelerator.prepare``;
    ``channels_last``: the views are converted to the channels-last memory format first.
    """

    def __init__(self, accelerator, module, optimizer, probe_opt=None, *, grad_clip: Optional[float] = None,
                 channels_last: bool = False):
        self.accelerator = accelerator
        self.module = module
        self.optimizer = optimizer
        self.probe_opt = probe_opt
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        self.inner = accelerator.unwrap_model(module)
        self.params = [p for p in self.inner.parameters() if p.requires_grad]
        self.world = accelerator.num_processes
        self._bad: Optional[torch.Tensor] = None
        #: the last optimizer step's agreed flag (0-dim bool): its gradients were zeroed
        self.last_update_bad: Optional[torch.Tensor] = None

    def __call__(self, views, labels, *, progress: Optional[float] = None):
        acc = self.accelerator
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with acc.accumulate(self.module):
            with acc.autocast():
                out, pout = self.module(views, labels)
            bad = ~torch.isfinite(out.loss.detach())
            self._bad = bad if self._bad is None else (self._bad | bad)
            total = out.loss + (pout.loss if pout is not None else 0.0)
            acc.backward(total)
            if acc.sync_gradients:
                self._update(progress)
        return out, pout, bad

    def _update(self, progress: Optional[float]) -> None:
        bad = self._bad
        if self.world > 1:  # any rank's NaN is in everyone's averaged gradients
            bad = self.accelerator.reduce(bad.float(), reduction="sum") > 0
        for p in self.params:
            if p.grad is not None:
                p.grad.masked_fill_(bad, 0.0)
        if self.grad_clip:  # before the hook, as DINO's reference: the clip norm includes frozen layers
            self.accelerator.clip_grad_norm_(self.inner.method.parameters(), self.grad_clip)
        hook = getattr(self.inner.method, "on_after_backward", None)
        if hook is not None:
            hook()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.probe_opt is not None:
            self.probe_opt.step()
            self.probe_opt.zero_grad(set_to_none=True)
        if progress is not None:
            self.inner.method.update_momentum(progress)
        self.last_update_bad, self._bad = bad, None
