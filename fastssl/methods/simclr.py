"""SimCLR (Chen et al. 2020): two views, a projector and NT-Xent over the global batch."""
from __future__ import annotations

import torch

from fastssl.losses import nt_xent
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.heads import projection_mlp


@register_method("simclr")
class SimCLR(Method):
    """SimCLR.

    Args:
        temperature: NT-Xent temperature (0.2, REFERENCE §1).
        proj_hidden_dim, proj_output_dim: projector 2048 → 256 (REFERENCE §1).
        proj_bn: BatchNorm in the projector's hidden layer (solo-learn's CIFAR recipe: none).
        proj_last_bn: BatchNorm (no bias) after the last projector layer (BCL/SDCLR: True,
            with 512 → 128 dims).

    ``per_sample_loss`` ``[B]``: the NT-Xent of each image (mean of its two anchors; BCL uses
    it); its mean is the loss. Logs: ``nt_xent`` (the loss).
    """

    defaults = {
        # REFERENCE §1: LARS eta 0.02 clip, no bias/norm adaptation, lr 0.4 @512, wd 1e-4
        "optimizer": "lars", "lr": 0.2, "weight_decay": 1e-4, "eta": 0.02, "clip": True,
        "exclude_bias_norm": True, "classifier_lr": 0.05,
        "temperature": 0.2, "proj_hidden_dim": 2048, "proj_output_dim": 256,
    }

    def __init__(self, *, backbone, feat_dim, temperature: float = 0.2, proj_hidden_dim: int = 2048,
                 proj_output_dim: int = 256, proj_bn: bool = False, proj_last_bn: bool = False):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.temperature = temperature
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim,
                                        hidden_bn=proj_bn, last_bn=proj_last_bn)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        loss, per_sample = nt_xent(self.projector(h1), self.projector(h2), temperature=self.temperature)
        return MethodOutput(loss=loss, features=h1.detach(), per_sample_loss=per_sample.detach(),
                            logs={"nt_xent": loss.detach()})
