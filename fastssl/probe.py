"""Online linear probe: a linear classifier trained on detached backbone features.

It measures representation quality during pretraining (AdaInf's "online linear top-1").
Samples with label ``-1`` (generated images, unlabelled data) are ignored: they contribute
nothing to the loss or to the accuracy, whatever their features are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OnlineProbe", "ProbeOutput", "IGNORE"]

#: label of samples without a class (generated images)
IGNORE = -1


@dataclass
class ProbeOutput:
    """What :meth:`OnlineProbe.forward` returns. ``correct`` and ``count`` are 0-dim int64 tensors
    on the logits' device, so a training step never waits for them: accumulate them on the device
    and read them (``.item()``) only when logging."""

    #: sum of the cross-entropies of the labelled samples / max(count, 1): their mean, and 0
    #: (with a graph) when there are none
    loss: torch.Tensor
    #: ``[B, num_classes]``
    logits: torch.Tensor
    #: correct top-1 predictions among labelled samples (0-dim int64 tensor on the device)
    correct: torch.Tensor
    #: labelled samples in the batch (0-dim int64 tensor on the device)
    count: torch.Tensor


class OnlineProbe(nn.Module):
    """``Linear(feat_dim, num_classes)`` on ``features.detach()``.

    The features are detached here, so the probe's loss never reaches the backbone. ``forward``
    needs no host sync. It does not validate the labels (that would sync): check the data's
    labels once at set-up; a label outside ``[-1, num_classes)`` still fails inside
    ``cross_entropy`` (an ``IndexError`` on the CPU, a device-side assert on CUDA).
    """

    def __init__(self, feat_dim: int, num_classes: int):
        super().__init__()
        if feat_dim <= 0 or num_classes <= 1:
            raise ValueError(f"probe needs feat_dim > 0 and num_classes > 1, got {feat_dim}, {num_classes}")
        self.num_classes = num_classes
        self.linear = nn.Linear(feat_dim, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> ProbeOutput:
        """``features`` ``[B, D]`` float, ``labels`` ``int64 [B]`` (``-1`` = ignore), best already
        on the features' device (a blocking host-to-device copy would wait for the device)."""
        logits = self.linear(features.detach().float())
        labels = labels.to(logits.device).long()
        known = labels != IGNORE
        count = known.sum()  # int64, on the device
        # sum / count, not reduction="mean": mean over zero labelled samples is NaN, and the
        # loss must keep its graph (DDP expects every parameter to take part in backward)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") / count.clamp_min(1)
        with torch.no_grad():
            correct = ((logits.argmax(1) == labels) & known).sum()
        return ProbeOutput(loss=loss, logits=logits, correct=correct, count=count)
