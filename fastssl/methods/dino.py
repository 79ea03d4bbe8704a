"""DINO (Caron et al. 2021): self-distillation from a momentum teacher with multi-crop."""
from __future__ import annotations

import torch

from fastssl.losses import DINOLoss
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput, encode_views
from fastssl.models.heads import DINOHead


@register_method("dino")
class DINO(Method):
    """DINO. Views: the first ``n_global`` are global crops (teacher and student), the rest
    local crops (student only).

    Args:
        out_dim: 65536 prototypes; hidden_dim / bottleneck_dim: 2048 / 256; norm_last_layer: True.
        student_temp: 0.1; teacher_temp: 0.04 → 0.07 over ``teacher_temp_warmup`` of training
            (``warmup_teacher_temp`` → ``teacher_temp``); center_momentum: 0.9.
        tau_base/tau_final: teacher EMA 0.996 → 1.0 (cosine).
        freeze_last_layer: fraction of training during which the head's last layer (``last_v``,
            ``last_g``) is not updated (paper: the first epoch; 0.01 = one epoch of a 100-epoch
            run): :meth:`on_after_backward` sets its gradients to None, so the optimizer skips it
            (no weight decay, no step count), as the official DINO does.

    The schedules read ``self.progress``, which :meth:`update_momentum` records every step.
    ``per_sample_loss`` ``[B]``: image ``i``'s cross-entropy averaged over its (teacher view,
    student view) pairs, mean = loss.
    Logs: ``dino`` (the loss), ``tau`` (teacher EMA coefficient), ``teacher_temp`` (current
    teacher temperature), ``frozen`` (1.0 while the last layer is frozen, else 0.0).
    """

    num_views = None
    defaults = {
        # paper (ViT-S/16): AdamW lr 5e-4 per 256, wd 0.04 (rising to 0.4), final lr 1e-6, clip 3.0
        "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.04, "final_lr": 1e-6, "grad_clip": 3.0,
        "exclude_bias_norm": True, "classifier_lr": 0.05,
        "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "norm_last_layer": True,
        "n_global": 2, "student_temp": 0.1, "teacher_temp": 0.07, "warmup_teacher_temp": 0.04,
        "teacher_temp_warmup": 0.1, "center_momentum": 0.9, "tau_base": 0.996, "tau_final": 1.0,
        "freeze_last_layer": 0.01,
    }

    def __init__(self, *, backbone, feat_dim, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, n_global: int = 2,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 teacher_temp_warmup: float = 0.1, center_momentum: float = 0.9, tau_base: float = 0.996,
                 tau_final: float = 1.0, freeze_last_layer: float = 0.01):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        self.n_global = n_global
        self.head = DINOHead(feat_dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                             norm_last_layer=norm_last_layer)
        self.add_momentum_encoders({"teacher_backbone": self.backbone, "teacher_head": self.head},
                                   tau_base=tau_base, tau_final=tau_final)
        self.criterion = DINOLoss(out_dim, n_global=n_global, student_temp=student_temp,
                                  teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp,
                                  teacher_temp_warmup=teacher_temp_warmup, center_momentum=center_momentum)
        self.freeze_last_layer = freeze_last_layer

    @property
    def last_layer_frozen(self) -> bool:
        """Whether the head's last layer is frozen at the current ``progress`` (paper: epoch 1)."""
        return self.progress < self.freeze_last_layer

    def on_after_backward(self) -> None:
        """While frozen: the last layer's gradients become None (skipped by the optimizer)."""
        if self.last_layer_frozen:
            for p in self.head.last_layer_parameters():
                p.grad = None

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        if len(views) <= self.n_global:
            raise ValueError(f"DINO needs more than n_global={self.n_global} views, got {len(views)}")
        feats = encode_views(self.backbone, views)
        student = self.head(torch.cat(feats, dim=0))  # [V*B, out_dim]
        with torch.no_grad():
            teacher = self.teacher_head(torch.cat(encode_views(self.teacher_backbone, views[:self.n_global]), 0))
        per_sample = self.criterion(student, teacher, progress=self.progress, reduction="none")  # [B]
        loss = per_sample.mean()
        return MethodOutput(loss=loss, features=feats[0].detach(), per_sample_loss=per_sample.detach(),
                            logs={"dino": loss.detach(), "tau": self.tau,
                                  "teacher_temp": self.criterion.teacher_temperature(self.progress),
                                  "frozen": float(self.last_layer_frozen)})
