"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp cluster codes, multi-crop."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.losses import swav_loss
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput, encode_views
from fastssl.models.heads import Prototypes, projection_mlp


@register_method("swav")
class SwAV(Method):
    """SwAV without the feature queue. Views: first ``n_global`` global crops, then local crops.

    Args:
        proj_hidden_dim, proj_output_dim: projector 2048 → 128 (BN, ReLU).
        n_prototypes: 3000; temperature: 0.1; sinkhorn_eps: 0.05; sinkhorn_iters: 3.
        freeze_prototypes: fraction of training during which the prototypes are not updated
            (paper: the first epoch; 0.01 = one epoch of a 100-epoch run): :meth:`on_after_backward`
            sets their gradient to None, so the optimizer skips them. Reads ``self.progress``,
            which :meth:`update_momentum` records every step.

    ``per_sample_loss`` ``[B]``: image ``i``'s swapped-prediction cross-entropy averaged over its
    (code view, predicting view) pairs, mean = loss.
    Logs: ``swav`` (the loss), ``frozen`` (1.0 while the prototypes are frozen, else 0.0).
    """

    num_views = None
    defaults = {
        # paper: LARS lr 4.8 @4096 (= 0.3 per 256), wd 1e-6, final lr 0.0048 @4096
        "optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6, "final_lr": 3e-4, "eta": 0.02,
        "clip": True, "exclude_bias_norm": True, "classifier_lr": 0.05,
        "proj_hidden_dim": 2048, "proj_output_dim": 128, "n_prototypes": 3000, "temperature": 0.1,
        "sinkhorn_eps": 0.05, "sinkhorn_iters": 3, "n_global": 2, "freeze_prototypes": 0.01,
    }

    def __init__(self, *, backbone, feat_dim, proj_hidden_dim: int = 2048, proj_output_dim: int = 128,
                 n_prototypes: int = 3000, temperature: float = 0.1, sinkhorn_eps: float = 0.05,
                 sinkhorn_iters: int = 3, n_global: int = 2, freeze_prototypes: float = 0.01):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.temperature, self.eps, self.iters, self.n_global = temperature, sinkhorn_eps, sinkhorn_iters, n_global
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim)
        self.prototypes = Prototypes(proj_output_dim, n_prototypes)
        self.freeze_prototypes = freeze_prototypes

    @property
    def prototypes_frozen(self) -> bool:
        """Whether the prototypes are frozen at the current ``progress`` (paper: epoch 1)."""
        return self.progress < self.freeze_prototypes

    def on_after_backward(self) -> None:
        """While frozen: the prototypes' gradient becomes None (skipped by the optimizer)."""
        if self.prototypes_frozen:
            for p in self.prototypes.parameters():
                p.grad = None

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        if not 1 <= self.n_global <= len(views):
            raise ValueError(f"SwAV: n_global={self.n_global} must be between 1 and the number of views ({len(views)})")
        if self.training:
            self.prototypes.normalize()  # keep prototypes on the unit sphere (paper)
        feats = encode_views(self.backbone, views)
        z = F.normalize(self.projector(torch.cat(feats, dim=0)), dim=1)
        scores = self.prototypes(z).chunk(len(views))  # V x [B, n_prototypes]
        per_sample = swav_loss(scores, n_global=self.n_global, temperature=self.temperature,
                               eps=self.eps, iters=self.iters, reduction="none")  # [B]
        loss = per_sample.mean()
        return MethodOutput(loss=loss, features=feats[0].detach(), per_sample_loss=per_sample.detach(),
                            logs={"swav": loss.detach(), "frozen": float(self.prototypes_frozen)})
