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
    #: mean cross-entropy over labelled samples (0 with a graph when there are none)
    loss: torch.Tensor
    #: ``[B, num_classes]``
    logits: torch.Tensor
    #: correct top-1 predictions among labelled samples (int)
    correct: int
    #: labelled samples in the batch (int)
    count: int


class OnlineProbe(nn.Module):
    """``Linear(feat_dim, num_classes)`` on ``features.detach()``.

    The features are detached here, so the probe's loss never reaches the backbone.
    """

    def __init__(self, feat_dim: int, num_classes: int):
        super().__init__()
        if feat_dim <= 0 or num_classes <= 1:
            raise ValueError(f"probe needs feat_dim > 0 and num_classes > 1, got {feat_dim}, {num_classes}")
        self.num_classes = num_classes
        self.linear = nn.Linear(feat_dim, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> ProbeOutput:
        """``features`` ``[B, D]`` float, ``labels`` ``int64 [B]`` (``-1`` = ignore)."""
        logits = self.linear(features.detach().float())
        labels = labels.to(logits.device).long()
        known = labels != IGNORE
        if (labels[known] >= self.num_classes).any() or (labels < IGNORE).any():
            bad = labels[(labels >= self.num_classes) | (labels < IGNORE)][0].item()
            raise ValueError(f"online probe: label {bad} outside [-1, {self.num_classes}); "
                             f"set train.num_classes to the data's number of classes")
        count = int(known.sum())
        # sum / count, not reduction="mean": mean over zero labelled samples is NaN, and the
        # loss must keep its graph (DDP expects every parameter to take part in backward)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") / max(count, 1)
        with torch.no_grad():
            correct = int((logits.argmax(1)[known] == labels[known]).sum()) if count else 0
        return ProbeOutput(loss=loss, logits=logits, correct=correct, count=count)
