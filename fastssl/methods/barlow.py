"""Barlow Twins (Zbontar et al. 2021): cross-correlation of two views' projections towards identity."""
from __future__ import annotations

import torch

from fastssl.losses import barlow_twins_loss
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.heads import projection_mlp


@register_method("barlow")
class BarlowTwins(Method):
    """Barlow Twins.

    Args:
        proj_hidden_dim, proj_output_dim: 3-layer projector 2048 → 2048 → 2048 (BN, ReLU)
            (REFERENCE §1); lambd: off-diagonal weight 0.0051; scale: loss scale 0.1.

    No ``per_sample_loss`` (see ``per_sample_loss_note``). Logs: ``barlow`` (the loss).
    """

    per_sample_loss_note = ("Barlow Twins' loss is a function of the batch's cross-correlation matrix, "
                            "not a mean over samples")

    defaults = {
        # REFERENCE §1: LARS, lr 0.3 @512, wd 1e-4
        "optimizer": "lars", "lr": 0.15, "weight_decay": 1e-4, "eta": 0.02, "clip": True,
        "exclude_bias_norm": True, "classifier_lr": 0.05,
        "proj_hidden_dim": 2048, "proj_output_dim": 2048, "lambd": 0.0051, "scale": 0.1,
    }

    def __init__(self, *, backbone, feat_dim, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048,
                 proj_layers: int = 3, lambd: float = 0.0051, scale: float = 0.1):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.lambd, self.scale = lambd, scale
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=proj_layers)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        loss = barlow_twins_loss(self.projector(h1), self.projector(h2), lambd=self.lambd, scale=self.scale)
        return MethodOutput(loss=loss, features=h1.detach(), logs={"barlow": loss.detach()})
