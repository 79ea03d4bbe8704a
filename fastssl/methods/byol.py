"""BYOL (Grill et al. 2020): online projector + predictor regress a momentum target."""
from __future__ import annotations

import torch

from fastssl.losses import byol_loss
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.heads import prediction_mlp, projection_mlp


@register_method("byol")
class BYOL(Method):
    """BYOL.

    Args:
        proj_hidden_dim, proj_output_dim: projector 4096 → 256 (BN, ReLU);
        pred_hidden_dim: predictor 256 → 4096 → 256; tau_base/tau_final: EMA 0.99 → 1.0
        (all REFERENCE §1).

    Loss: ``byol(p1, z2') + byol(p2, z1')`` with ``byol = mean(2 - 2 cos)`` and ``z'`` the
    momentum encoder's projections. ``per_sample_loss`` ``[B]``: image ``i``'s
    ``(2 - 2 cos(p1_i, z2'_i)) + (2 - 2 cos(p2_i, z1'_i))`` (summed like the loss), mean = loss.
    Logs: ``byol`` (the loss), ``tau`` (current EMA coefficient).
    """

    defaults = {
        # REFERENCE §1: LARS, lr 1.0 @512, wd 1e-5
        "optimizer": "lars", "lr": 0.5, "weight_decay": 1e-5, "eta": 0.02, "clip": True,
        "exclude_bias_norm": True, "classifier_lr": 0.05,
        "proj_hidden_dim": 4096, "proj_output_dim": 256, "pred_hidden_dim": 4096,
        "tau_base": 0.99, "tau_final": 1.0,
    }

    def __init__(self, *, backbone, feat_dim, proj_hidden_dim: int = 4096, proj_output_dim: int = 256,
                 pred_hidden_dim: int = 4096, tau_base: float = 0.99, tau_final: float = 1.0):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim, hidden_bn=True)
        self.predictor = prediction_mlp(proj_output_dim, pred_hidden_dim)
        self.add_momentum_encoders({"momentum_backbone": self.backbone, "momentum_projector": self.projector},
                                   tau_base=tau_base, tau_final=tau_final)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        p1, p2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with torch.no_grad():
            t1 = self.momentum_projector(self.momentum_backbone(views[0]))
            t2 = self.momentum_projector(self.momentum_backbone(views[1]))
        per_sample = byol_loss(p1, t2, reduction="none") + byol_loss(p2, t1, reduction="none")  # [B]
        loss = per_sample.mean()
        return MethodOutput(loss=loss, features=h1.detach(), per_sample_loss=per_sample.detach(),
                            logs={"byol": loss.detach(), "tau": self.tau})
