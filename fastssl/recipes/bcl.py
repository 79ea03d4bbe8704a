"""BCL (boosted contrastive learning, Zhou et al. 2022): each sample's momentum loss sets its
augmentation strength.

Per sample (``Batch.index``) the recipe keeps a momentum loss ``m``: the first time a sample is
seen ``m = l``, afterwards ``m = beta m + (1 - beta) l``. At each epoch's end the strengths of
the samples seen so far become ``w = (m - mean) / std``, ``w = (w / max|w|) / 2 + 0.5`` (in
[0, 1]); ``w`` starts at 0, so the first epoch runs without RandAugment. The strength drives
the preset's RandAugment (``bcl``: k = 1 op, ``bcl_d``: k = 2) through the loop's
``strength`` hook. The table lives on the training device: no host copies per step.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from loaders.errors import ConfigError

from . import Recipe, SetupContext, register_recipe

__all__ = ["BCLTable", "BCL"]


class BCLTable:
    """``m``, ``seen`` and ``w`` (``[N]``, N = unique samples of the mixture) indexed by
    ``Batch.index``; see the module doc for the formulas."""

    def __init__(self, n: int, *, beta: float = 0.97, device="cpu"):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.m = torch.zeros(n, dtype=torch.float32, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)
        self.w = torch.zeros(n, dtype=torch.float32, device=device)

    def update(self, index: torch.Tensor, loss: torch.Tensor) -> None:
        """``index int64 [B]``, ``loss float [B]`` (detached per-sample losses)."""
        index = index.long().to(self.m.device)
        loss = loss.detach().float().to(self.m.device)
        # a sample may appear twice in one batch (dup > 1): the last write wins, as in a loop
        new = torch.where(self.seen[index], self.beta * self.m[index] + (1 - self.beta) * loss, loss)
        self.m[index] = new
        self.seen[index] = True

    def end_epoch(self) -> None:
        """Set ``w`` from ``m`` over the seen samples (computed on the device, no host sync)."""
        seen = self.seen.float()
        n = seen.sum()
        mean = (self.m * seen).sum() / n.clamp_min(1)
        var = (((self.m - mean) * seen) ** 2).sum() / (n - 1).clamp_min(1)
        w = (self.m - mean) / var.sqrt().clamp_min(1e-12)
        w = (w / (w.abs() * seen).amax().clamp_min(1e-12)) / 2 + 0.5
        # fewer than two samples seen: no statistics yet, keep the previous strengths
        ready = n >= 2
        self.w.copy_(torch.where(ready & self.seen, w, torch.where(ready, torch.zeros_like(w), self.w)))

    def strength(self, index: torch.Tensor) -> torch.Tensor:
        return self.w[index.long().to(self.w.device)]

    def state_dict(self) -> Dict[str, Any]:
        return {"m": self.m.cpu().clone(), "seen": self.seen.cpu().clone(), "w": self.w.cpu().clone(),
                "beta": self.beta}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd["m"].shape != self.m.shape:
            raise ConfigError(f"BCL table in the checkpoint has {sd['m'].shape[0]} samples, "
                              f"the data has {self.m.shape[0]}")
        self.m.copy_(sd["m"])
        self.seen.copy_(sd["seen"])
        self.w.copy_(sd["w"])


@register_recipe("bcl")
class BCL(Recipe):
    """``{name: bcl, beta: 0.97}``: per-sample momentum loss -> augmentation strength.

    Needs a method with per-sample losses and an augment preset with RandAugment (``bcl``,
    ``bcl_d``). Logs ``bcl/strength_mean``, ``bcl/strength_p10/p50/p90`` and the strength
    histogram of the samples seen so far.
    """

    needs_losses = True
    requires_per_sample_loss = True

    def __init__(self, beta: float = 0.97):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.table = None

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        self.table = BCLTable(ctx.num_samples, beta=self.beta, device=ctx.device)

    def strength(self, index: torch.Tensor) -> torch.Tensor:
        return self.table.strength(index)

    def after_step(self, step: int, index: torch.Tensor, loss) -> None:
        if loss is None:
            raise ConfigError("recipe 'bcl' needs per-sample losses; the method returns none")
        self.table.update(index, loss)

    def end_epoch(self, epoch: int) -> None:
        self.table.end_epoch()

    def state_dict(self) -> Dict[str, Any]:
        return self.table.state_dict()

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.table.load_state_dict(sd)

    def _seen_strengths(self) -> torch.Tensor:
        return self.table.w[self.table.seen]

    def metrics(self) -> Dict[str, Any]:
        w = self._seen_strengths()
        if w.numel() == 0:
            return {"bcl/strength_mean": 0.0}
        q = torch.quantile(w.float(), torch.tensor([0.1, 0.5, 0.9], device=w.device))
        return {"bcl/strength_mean": w.mean(), "bcl/strength_p10": q[0], "bcl/strength_p50": q[1],
                "bcl/strength_p90": q[2]}

    def histograms(self) -> Dict[str, torch.Tensor]:
        w = self._seen_strengths()
        return {"bcl/strength": w} if w.numel() else {}
