"""SimSiam (Chen & He 2021): Siamese network with a bottleneck predictor and stop-gradient."""
from __future__ import annotations

import torch

from fastssl.losses import simsiam_loss
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.heads import prediction_mlp, projection_mlp


@register_method("simsiam")
class SimSiam(Method):
    """SimSiam.

    Args:
        proj_hidden_dim, proj_output_dim, proj_layers: projector 2048 → 2048 → 2048 with BN on
            every layer (output BN without affine), 3 layers (2 in the paper's CIFAR setting).
        pred_hidden_dim: bottleneck predictor 2048 → 512 → 2048.

    Loss: ``(D(p1, sg(z2)) + D(p2, sg(z1))) / 2`` with ``D`` the negative cosine.
    ``per_sample_loss`` ``[B]``: image ``i``'s ``(D_i(p1, z2) + D_i(p2, z1)) / 2``, mean = loss.
    Logs: ``simsiam`` (the loss).
    """

    defaults = {
        # paper: SGD lr 0.05 per 256, wd 1e-4, momentum 0.9 (cosine schedule)
        "optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9, "classifier_lr": 0.05,
        "proj_hidden_dim": 2048, "proj_output_dim": 2048, "pred_hidden_dim": 512,
    }

    def __init__(self, *, backbone, feat_dim, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048,
                 proj_layers: int = 3, pred_hidden_dim: int = 512):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=proj_layers,
                                        last_bn=True, last_bn_affine=False)
        self.predictor = prediction_mlp(proj_output_dim, pred_hidden_dim, proj_output_dim)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        per_sample = 0.5 * (simsiam_loss(p1, z2, reduction="none") + simsiam_loss(p2, z1, reduction="none"))
        loss = per_sample.mean()
        return MethodOutput(loss=loss, features=h1.detach(), per_sample_loss=per_sample.detach(),
                            logs={"simsiam": loss.detach()})
