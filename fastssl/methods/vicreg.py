"""VICReg (Bardes, Ponce, LeCun 2022): invariance, variance and covariance terms on two projections."""
from __future__ import annotations

import torch

from fastssl.losses import vicreg_loss
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.heads import projection_mlp


@register_method("vicreg")
class VICReg(Method):
    """VICReg.

    Args:
        proj_hidden_dim, proj_output_dim: 3-layer projector 2048 → 2048 → 2048 (solo-learn CIFAR;
            8192 in the paper's ImageNet setting); sim_coeff / std_coeff / cov_coeff: 25 / 25 / 1.

    No ``per_sample_loss`` (see ``per_sample_loss_note``). Logs: ``vicreg`` (the loss) and its
    unweighted terms ``invariance``, ``variance``, ``covariance``
    (loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance).
    """

    per_sample_loss_note = ("VICReg's variance and covariance terms are functions of batch statistics, "
                            "not means over samples")

    defaults = {
        # solo-learn CIFAR recipe: LARS lr 0.3 @256, wd 1e-4
        "optimizer": "lars", "lr": 0.3, "weight_decay": 1e-4, "eta": 0.02, "clip": True,
        "exclude_bias_norm": True, "classifier_lr": 0.05,
        "proj_hidden_dim": 2048, "proj_output_dim": 2048,
        "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0,
    }

    def __init__(self, *, backbone, feat_dim, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048,
                 proj_layers: int = 3, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.coeffs = dict(sim_coeff=sim_coeff, std_coeff=std_coeff, cov_coeff=cov_coeff)
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=proj_layers)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        loss, terms = vicreg_loss(self.projector(h1), self.projector(h2), **self.coeffs)
        return MethodOutput(loss=loss, features=h1.detach(), logs={"vicreg": loss.detach(), **terms})
