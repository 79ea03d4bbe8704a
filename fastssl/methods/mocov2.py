"""MoCo v2+ (He et al. 2020; Chen et al. 2020): momentum encoder, key queue, symmetric InfoNCE."""
from __future__ import annotations

import torch

from fastssl.losses import KeyQueue, moco_infonce
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.heads import projection_mlp


@register_method("mocov2")
class MoCoV2(Method):
    """MoCo v2+ (solo-learn's symmetric variant: one queue per view).

    Args:
        temperature: 0.2; queue_size: 32768; proj_hidden_dim/proj_output_dim: 2048 → 256;
        tau_base/tau_final: EMA 0.99 → 0.999 (all REFERENCE §1).

    Loss: ``(InfoNCE(q1, k2, queue_2) + InfoNCE(q2, k1, queue_1)) / 2`` where ``k`` come from the
    momentum backbone+projector; then the keys of this batch (all ranks) are enqueued.
    ``per_sample_loss`` ``[B]``: image ``i``'s two InfoNCE terms averaged, mean = loss.
    Logs: ``infonce`` (the loss), ``tau`` (current EMA coefficient).
    """

    defaults = {
        # REFERENCE §1: SGD momentum 0.9, lr 0.3 @512, wd 1e-4, `symmetric_weak` augmentation
        "optimizer": "sgd", "lr": 0.15, "weight_decay": 1e-4, "momentum": 0.9, "classifier_lr": 0.05,
        "temperature": 0.2, "queue_size": 32768, "proj_hidden_dim": 2048, "proj_output_dim": 256,
        "tau_base": 0.99, "tau_final": 0.999,
    }

    def __init__(self, *, backbone, feat_dim, temperature: float = 0.2, queue_size: int = 32768,
                 proj_hidden_dim: int = 2048, proj_output_dim: int = 256, tau_base: float = 0.99,
                 tau_final: float = 0.999):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.temperature = temperature
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim, hidden_bn=False)
        self.add_momentum_encoders({"momentum_backbone": self.backbone, "momentum_projector": self.projector},
                                   tau_base=tau_base, tau_final=tau_final)
        self.queue1 = KeyQueue(queue_size, proj_output_dim)
        self.queue2 = KeyQueue(queue_size, proj_output_dim)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        q1, q2 = self.projector(h1), self.projector(h2)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(views[0]))
            k2 = self.momentum_projector(self.momentum_backbone(views[1]))
        t = self.temperature
        per_sample = 0.5 * (moco_infonce(q1, k2, self.queue2.queue, temperature=t, reduction="none")
                            + moco_infonce(q2, k1, self.queue1.queue, temperature=t, reduction="none"))  # [B]
        loss = per_sample.mean()
        if self.training:
            self.queue1.push(k1)
            self.queue2.push(k2)
        return MethodOutput(loss=loss, features=h1.detach(), per_sample_loss=per_sample.detach(),
                            logs={"infonce": loss.detach(), "tau": self.tau})
