"""MoCo v3 (Chen, Xie, He 2021): predictor on the online branch, momentum keys, in-batch InfoNCE."""
from __future__ import annotations

import torch

from fastssl.losses import mocov3_infonce
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.heads import MLP, projection_mlp


@register_method("mocov3")
class MoCoV3(Method):
    """MoCo v3.

    Args:
        temperature: 0.2 (paper's ViT setting; its ResNet setting uses 1.0).
        proj_hidden_dim, proj_output_dim: 3-layer projector 4096 → 256 (BN, last BN without affine).
        pred_hidden_dim: predictor 256 → 4096 → 256 (BN, last BN without affine).
        tau_base/tau_final: EMA 0.99 → 1.0 (cosine).

    Loss: ``ctr(q1, k2) + ctr(q2, k1)`` with ``ctr = 2 t * InfoNCE`` over the global batch.
    ``per_sample_loss`` ``[B]``: image ``i``'s ``ctr_i(q1, k2) + ctr_i(q2, k1)`` (same ``2 t``
    scaling, summed like the loss), mean = loss.
    Logs: ``infonce`` (the loss), ``tau`` (current EMA coefficient).
    """

    defaults = {
        # paper, ResNet-50: LARS lr 0.6 per 256, wd 1e-6
        "optimizer": "lars", "lr": 0.6, "weight_decay": 1e-6, "eta": 0.02, "clip": True,
        "exclude_bias_norm": True, "classifier_lr": 0.05,
        "temperature": 0.2, "proj_hidden_dim": 4096, "proj_output_dim": 256, "pred_hidden_dim": 4096,
        "tau_base": 0.99, "tau_final": 1.0,
    }

    def __init__(self, *, backbone, feat_dim, temperature: float = 0.2, proj_hidden_dim: int = 4096,
                 proj_output_dim: int = 256, pred_hidden_dim: int = 4096, tau_base: float = 0.99,
                 tau_final: float = 1.0):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.temperature = temperature
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=3,
                                        last_bn=True, last_bn_affine=False)
        self.predictor = MLP([proj_output_dim, pred_hidden_dim, proj_output_dim], last_bn=True, last_bn_affine=False)
        self.add_momentum_encoders({"momentum_backbone": self.backbone, "momentum_projector": self.projector},
                                   tau_base=tau_base, tau_final=tau_final)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(views[0]))
            k2 = self.momentum_projector(self.momentum_backbone(views[1]))
        t = self.temperature
        per_sample = (mocov3_infonce(q1, k2, temperature=t, reduction="none")
                      + mocov3_infonce(q2, k1, temperature=t, reduction="none"))  # [B]
        loss = per_sample.mean()
        return MethodOutput(loss=loss, features=h1.detach(), per_sample_loss=per_sample.detach(),
                            logs={"infonce": loss.detach(), "tau": self.tau})
