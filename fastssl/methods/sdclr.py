"""SDCLR (Jiang et al. 2021, "Self-Damaging Contrastive Learning", ICML): SimCLR between a
network and its own magnitude-pruned copy, which forgets the rare (tail) samples first."""
from __future__ import annotations

import torch
import torch.nn as nn

from fastssl.losses import nt_xent
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.branch import NormBranch
from fastssl.models.heads import projection_mlp
from loaders.errors import ConfigError

__all__ = ["SDCLR", "global_magnitude_mask"]


@torch.no_grad()
def global_magnitude_mask(weights: list[torch.Tensor], prune_ratio: float) -> torch.Tensor:
    """Flat bool keep-mask over ``weights`` concatenated (each flattened in its logical
    row-major order): exactly ``k = round(prune_ratio * n)`` of the ``n`` entries are False,
    those of smallest ``|w|``; among entries equal to the k-th smallest magnitude the earliest
    in the concatenation are pruned first (what a stable sort gives). On the device, without
    host syncs (``kthvalue`` and a cumulative count, no Python loop over weights)."""
    flat = torch.cat([w.detach().reshape(-1).abs().float() for w in weights])
    n = flat.numel()
    k = min(n, max(0, int(round(prune_ratio * n))))
    if k == 0:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    threshold = flat.kthvalue(k).values
    below = flat < threshold
    tied = flat == threshold
    room = k - below.sum()  # how many of the tied entries are pruned (>= 1)
    pruned = below | (tied & (tied.cumsum(0) <= room))
    return ~pruned


@register_method("sdclr")
class SDCLR(Method):
    """SDCLR.

    The dense branch is ``backbone`` (view 0); the pruned branch (view 1) runs the same
    backbone with every convolution weight multiplied by ``prune_mask`` and its own BatchNorm
    layers (:class:`fastssl.models.NormBranch`: separate affine parameters and running
    statistics, trained). Gradients from both branches reach the shared weights (through the
    mask: pruned entries get gradient from the dense branch only). The projector's linear
    layers are shared and not pruned; its BatchNorm layers are separate per branch too, as in
    the reference implementation's dual-BN projection head.

    The mask keeps the largest ``1 - prune_ratio`` of all the backbone's ``nn.Conv2d``
    weights by magnitude, globally (stem, block and shortcut convolutions together; see
    :func:`global_magnitude_mask`). It is computed from the initial weights at construction
    (the reference prunes at the start of every epoch, the first one included) and again by
    :meth:`on_epoch_end`. It is the buffer ``prune_mask`` (flat bool over the concatenated
    weights), so checkpoints and resumes keep it; ``method.backbone`` stays a plain network
    (no mask, no extra BatchNorm keys).

    Loss: ``nt_xent(z_d, sg(z_p)) + nt_xent(sg(z_d), z_p)`` (``sg`` = stop-gradient; the value
    is twice NT-Xent, the gradient is that of the reference's two backward passes).
    ``per_sample_loss`` ``[B]``: the sum of each image's per-sample NT-Xent in the two terms
    (each the mean of the image's two anchors), so its mean is the loss (BCL-D tracks it).

    Args:
        temperature: NT-Xent temperature (0.2, BCL/SDCLR CIFAR recipe).
        proj_hidden_dim, proj_output_dim: projector 512 -> 128.
        proj_bn, proj_last_bn: BatchNorm in the hidden layer and (no bias) after the last one.
        prune_ratio: fraction of the convolution weights masked in the pruned branch (0.9).

    Logs: ``sdclr`` (the loss), ``nt_xent`` (its first term: NT-Xent of the two branches, the
    value SimCLR and the reference log), ``pruned_fraction`` (masked fraction of the conv
    weights).
    """

    defaults = {
        # SDCLR / BCL-D on CIFAR (BCL paper): SGD lr 0.5 at batch 512, momentum 0.9, wd 1e-4
        "optimizer": "sgd", "lr": 0.25, "weight_decay": 1e-4, "momentum": 0.9, "exclude_bias_norm": False,
        "temperature": 0.2, "proj_hidden_dim": 512, "proj_output_dim": 128, "proj_bn": True,
        "proj_last_bn": True, "prune_ratio": 0.9,
    }

    def __init__(self, *, backbone, feat_dim, temperature: float = 0.2, proj_hidden_dim: int = 512,
                 proj_output_dim: int = 128, proj_bn: bool = True, proj_last_bn: bool = True,
                 prune_ratio: float = 0.9):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        if not 0.0 <= float(prune_ratio) < 1.0:
            raise ConfigError(f"sdclr: prune_ratio must be in [0, 1), got {prune_ratio}")
        self.temperature = temperature
        self.prune_ratio = float(prune_ratio)
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim,
                                        hidden_bn=proj_bn, last_bn=proj_last_bn)
        self.conv_names = [f"{name}.weight" for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
        if not self.conv_names or not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()):
            raise ConfigError("sdclr needs a convolutional backbone with BatchNorm (a ResNet): it prunes "
                              "the convolution weights and keeps BatchNorm layers per branch")
        self.pruned_backbone = NormBranch(backbone)
        self.pruned_projector = NormBranch(self.projector)
        n = sum(w.numel() for w in self._conv_weights())
        self.register_buffer("prune_mask", torch.ones(n, dtype=torch.bool))
        self.register_buffer("pruned_fraction", torch.zeros(()))
        self.prune()

    def _conv_weights(self) -> list[torch.Tensor]:
        params = dict(self.backbone.named_parameters())
        return [params[name] for name in self.conv_names]

    @torch.no_grad()
    def prune(self) -> None:
        """Recompute ``prune_mask`` from the current conv weights (global magnitude)."""
        mask = global_magnitude_mask(self._conv_weights(), self.prune_ratio)
        self.prune_mask.copy_(mask)
        self.pruned_fraction.copy_(1.0 - mask.float().mean())

    def on_epoch_end(self, epoch: int) -> None:
        """Re-prune: the next epoch's pruned branch masks the then-smallest weights."""
        self.prune()

    def masked_weights(self) -> dict[str, torch.Tensor]:
        """``{conv weight name: weight * mask}`` for the pruned branch (differentiable in the weight)."""
        weights = self._conv_weights()
        masks = self.prune_mask.split([w.numel() for w in weights])
        return {name: w * m.view(w.shape) for name, w, m in zip(self.conv_names, weights, masks)}

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h_dense = self.backbone(views[0])
        h_pruned = self.pruned_backbone(self.backbone, views[1], self.masked_weights())
        z_dense = self.projector(h_dense)
        z_pruned = self.pruned_projector(self.projector, h_pruned)
        loss_d, per_d = nt_xent(z_dense, z_pruned.detach(), temperature=self.temperature)
        loss_p, per_p = nt_xent(z_dense.detach(), z_pruned, temperature=self.temperature)
        loss = loss_d + loss_p
        return MethodOutput(loss=loss, features=h_dense.detach(), per_sample_loss=(per_d + per_p).detach(),
                            logs={"sdclr": loss.detach(), "nt_xent": loss_d.detach(),
                                  "pruned_fraction": self.pruned_fraction.detach().clone()})
