"""SSL losses with documented shapes. ``B`` = per-rank batch, ``D`` = embedding dim, ``W`` = world size.

Under ``torch.distributed`` the contrastive and cross-correlation losses see the global batch
(:func:`fastssl.distributed.all_gather_grad`); on one process they are plain functions of
their inputs. Stateful losses (MoCo queue, DINO centre) are ``nn.Module`` s with buffers.

Losses that are a mean over this rank's samples take ``reduction="mean"`` (scalar, default) or
``"none"`` (``[B]``, one value per sample, whose mean is the scalar). None of them reads a value
on the host, so a training step never waits for the device.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.distributed import all_gather_grad, all_gather_nograd, all_reduce_sum, get_rank

__all__ = [
    "nt_xent",
    "moco_infonce",
    "KeyQueue",
    "mocov3_infonce",
    "byol_loss",
    "simsiam_loss",
    "barlow_twins_loss",
    "vicreg_loss",
    "DINOLoss",
    "sinkhorn",
    "swav_loss",
]


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """``[B]`` → its mean (``"mean"``) or itself (``"none"``)."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------- contrastive
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.2
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent / InfoNCE of SimCLR (Chen et al. 2020).

    Args:
        z1, z2: ``[B, D]`` projections of two views of the same ``B`` images (any scale; they
            are L2-normalised here).
        temperature: softmax temperature (0.2 in the CIFAR recipe, REFERENCE §1; 0.5 in IDAA).

    Every one of the ``2N`` embeddings of the global batch (``N = W*B``) is an anchor whose
    positive is the other view of its image and whose negatives are the other ``2N - 2``
    embeddings: ``l(a) = -log(exp(s(a,p)/t) / sum_{k != a} exp(s(a,k)/t))`` with cosine ``s``.

    Returns:
        ``(loss, per_sample)``: ``loss`` is a scalar, the mean over this rank's ``2B`` anchors;
        ``per_sample`` is ``[B]``, the mean of each image's two anchor losses (what BCL tracks),
        so ``per_sample.mean() == loss``.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two [B, D] tensors of one shape, "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    k1, k2 = all_gather_grad(z1), all_gather_grad(z2)  # [N, D] each
    n = k1.shape[0]
    keys = torch.cat([k1, k2], dim=0)  # [2N, D]
    anchors = torch.cat([z1, z2], dim=0)  # [2B, D]
    logits = anchors @ keys.T / temperature  # [2B, 2N]
    local = torch.arange(b, device=z1.device) + get_rank() * b  # rows of this rank within [0, N)
    self_idx = torch.cat([local, local + n])
    pos_idx = torch.cat([local + n, local])
    rows = torch.arange(2 * b, device=z1.device)
    logits[rows, self_idx] = float("-inf")  # an anchor is never its own negative
    per_anchor = F.cross_entropy(logits, pos_idx, reduction="none")  # [2B]
    per_sample = 0.5 * (per_anchor[:b] + per_anchor[b:])
    return per_sample.mean(), per_sample


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, *, temperature: float = 0.2,
                 reduction: str = "mean") -> torch.Tensor:
    """MoCo InfoNCE (He et al. 2020): one positive key per query, negatives from a queue.

    Args:
        q: ``[B, D]`` queries (online encoder); normalised here.
        k: ``[B, D]`` positive keys (momentum encoder, no gradient); normalised here.
        queue: ``[K, D]`` L2-normalised negative keys from previous batches.
        temperature: 0.2 for MoCo v2+ (REFERENCE §1).

    Returns: scalar ``mean_i -log(exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_j exp(q_i.queue_j/t)))``
    (``reduction="none"``: the ``[B]`` terms).
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
    neg = q @ queue.detach().T  # [B, K]
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return _reduce(F.cross_entropy(logits, target, reduction="none"), reduction)


class KeyQueue(nn.Module):
    """Ring buffer of ``size`` L2-normalised keys of dim ``dim`` (MoCo's negatives; 32768 in MoCo v2+).

    ``queue`` is ``[size, dim]``, initialised with random unit vectors (seeded by the global RNG,
    like MoCo). :meth:`push` enqueues the gathered keys of all ranks, overwriting the oldest.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"KeyQueue: size and dim must be positive, got size={size}, dim={dim}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue ``[B, dim]`` keys (normalised here; gathered over ranks first)."""
        keys = F.normalize(all_gather_nograd(keys.detach()), dim=1).to(self.queue.dtype)
        size = self.queue.shape[0]
        keys = keys[-size:]
        idx = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        # out of place: the old queue may still be saved by autograd for this step's backward
        # (push runs inside forward); one [size, dim] copy per step is cheap next to the encoders
        self.queue = self.queue.index_copy(0, idx, keys)
        self.ptr.add_(keys.shape[0]).remainder_(size)  # stays on the device: no host sync


def mocov3_infonce(q: torch.Tensor, k: torch.Tensor, *, temperature: float = 0.2,
                   reduction: str = "mean") -> torch.Tensor:
    """MoCo v3 contrastive loss (Chen, Xie, He 2021): in-batch negatives over the global batch.

    Args:
        q: ``[B, D]`` predictor outputs (online); k: ``[B, D]`` momentum-projector outputs
            (no gradient). Both normalised here.
        temperature: 0.2 (MoCo v3 ViT setting).

    Returns: scalar ``2 t * CE(q k_all^T / t, own index)``, the paper's ``2 tau`` scaling
    (``reduction="none"``: the ``[B]`` terms, scaled alike).
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(all_gather_nograd(k.detach()), dim=1)  # [N, D]
    logits = q @ k.T / temperature
    target = torch.arange(q.shape[0], device=q.device) + get_rank() * q.shape[0]
    return _reduce(2 * temperature * F.cross_entropy(logits, target, reduction="none"), reduction)


# ----------------------------------------------------------------------------- non-contrastive
def byol_loss(p: torch.Tensor, z: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """BYOL regression loss (Grill et al. 2020): ``mean_i (2 - 2 cos(p_i, z_i))``.

    Args: p ``[B, D]`` online predictions; z ``[B, D]`` target projections (gradient stopped here);
    reduction: ``"mean"`` (scalar) or ``"none"`` (``[B]``).
    """
    return _reduce(2 - 2 * F.cosine_similarity(p, z.detach(), dim=1), reduction)


def simsiam_loss(p: torch.Tensor, z: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """SimSiam negative cosine (Chen & He 2021): ``-mean_i cos(p_i, stopgrad(z_i))``. Shapes ``[B, D]``;
    ``reduction="none"`` gives the ``[B]`` terms."""
    return _reduce(-F.cosine_similarity(p, z.detach(), dim=1), reduction)


def _standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension ``(z - mean) / sqrt(var + eps)`` over the batch (biased var, like BatchNorm without affine)."""
    mean = z.mean(dim=0)
    var = z.var(dim=0, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, *, lambd: float = 0.0051,
                      scale: float = 0.1) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021).

    Args:
        z1, z2: ``[B, D]`` projections (gathered to the global batch ``N``).
        lambd: off-diagonal weight (0.0051, REFERENCE §1).
        scale: loss scale (0.1, REFERENCE §1 / solo-learn).

    With ``c = zn1^T zn2 / N`` (``zn`` standardised per dimension over the batch, ``[D, D]``):
    ``scale * (sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2)``.
    """
    z1, z2 = all_gather_grad(z1), all_gather_grad(z2)
    n = z1.shape[0]
    c = _standardise(z1).T @ _standardise(z2) / n
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return scale * (on + lambd * off)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, *, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """VICReg (Bardes, Ponce, LeCun 2022), coefficients 25 / 25 / 1 as in the paper.

    Args:
        z1, z2: ``[B, D]`` projections (variance and covariance use the gathered global batch).

    Terms: invariance ``mean((z1 - z2)^2)``; variance ``mean_d relu(1 - sqrt(var_d + eps))``
    averaged over both branches (unbiased var); covariance ``sum_{i != j} C_ij^2 / D`` summed over
    both branches with ``C = (z - mean)^T (z - mean) / (N - 1)``.

    Returns: ``(loss, {"invariance": ..., "variance": ..., "covariance": ...})`` (terms detached).
    """
    inv = F.mse_loss(z1, z2)
    z1, z2 = all_gather_grad(z1), all_gather_grad(z2)
    n, d = z1.shape
    var = z1.new_zeros(())
    cov = z1.new_zeros(())
    for z in (z1, z2):
        zc = z - z.mean(dim=0)
        std = torch.sqrt(zc.pow(2).sum(dim=0) / (n - 1) + eps)
        var = var + F.relu(1 - std).mean() / 2
        c = zc.T @ zc / (n - 1)
        cov = cov + (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()) / d
    loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}


# ----------------------------------------------------------------------------- DINO
class DINOLoss(nn.Module):
    """DINO self-distillation loss (Caron et al. 2021) with teacher centring and sharpening.

    Args:
        out_dim: prototype dimension ``K`` of the DINO head (65536 in the paper).
        n_global: number of global crops (2); they are the first views and the teacher's inputs.
        student_temp: 0.1.
        teacher_temp: final teacher temperature (0.07; paper range 0.04-0.07).
        warmup_teacher_temp: starting teacher temperature (0.04).
        teacher_temp_warmup: fraction of training over which the teacher temperature rises
            linearly (30 of 300 epochs in the paper = 0.1).
        center_momentum: EMA of the centre (0.9).

    ``forward(student [V*B, K], teacher [n_global*B, K], progress, reduction)`` with view-major
    rows: ``-sum softmax((t - c)/T_t) * log_softmax(s/T_s)`` averaged over the batch and over all
    (teacher view, student view) pairs with different views (``reduction="none"``: ``[B]``, each
    image's average over its pairs). Updates the centre with the batch mean of the teacher
    outputs (over all ranks) after computing the loss.
    """

    def __init__(self, out_dim: int, *, n_global: int = 2, student_temp: float = 0.1,
                 teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 teacher_temp_warmup: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp_warmup = teacher_temp_warmup
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, progress: float) -> float:
        """Linear warmup from ``warmup_teacher_temp`` to ``teacher_temp`` over ``teacher_temp_warmup``."""
        if self.teacher_temp_warmup <= 0 or progress >= self.teacher_temp_warmup:
            return self.teacher_temp
        frac = max(progress, 0.0) / self.teacher_temp_warmup
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * frac

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *, progress: float = 0.0,
                reduction: str = "mean") -> torch.Tensor:
        b = teacher.shape[0] // self.n_global
        if teacher.shape[0] != b * self.n_global or student.shape[0] % b:
            raise ValueError(f"DINOLoss: teacher rows {teacher.shape[0]} / student rows {student.shape[0]} "
                             f"are not multiples of one batch with {self.n_global} global views")
        n_views = student.shape[0] // b
        temp = self.teacher_temperature(progress)
        t = F.softmax((teacher.detach() - self.center) / temp, dim=-1).chunk(self.n_global)
        s = F.log_softmax(student / self.student_temp, dim=-1).chunk(n_views)
        total, pairs = student.new_zeros(b), 0  # [B]
        for i, ti in enumerate(t):
            for v, sv in enumerate(s):
                if v == i:
                    continue
                total = total - (ti * sv).sum(dim=-1)
                pairs += 1
        self.update_center(teacher)
        return _reduce(total / pairs, reduction)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """``c = m c + (1 - m) mean(teacher)`` with the mean over the global batch."""
        count = teacher.new_full((), float(teacher.shape[0]))  # a fill kernel: no blocking host copy
        mean = all_reduce_sum(teacher.detach().sum(dim=0, keepdim=True)) / all_reduce_sum(count)
        self.center.mul_(self.center_momentum).add_(mean.to(self.center.dtype), alpha=1 - self.center_momentum)


# ----------------------------------------------------------------------------- SwAV
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp equipartition of SwAV (Caron et al. 2020).

    Args:
        scores: ``[B, K]`` prototype scores (cosine similarities); the batch is the global one.
        eps: entropy regularisation (0.05).
        iters: number of alternating normalisations (3).

    ``Q = exp(scores / eps)``; each iteration scales the prototypes (columns) to total mass
    ``1/K``, then the samples (rows) to ``1/N``. Returns ``[B, K]`` soft codes ``N * Q``: every
    row sums to 1 exactly, every prototype column to about ``N/K``.
    """
    # scores are cosines in [-1, 1], so exp(scores / eps) <= e^20 stays finite in float32
    # (a per-rank max shift would not cancel across ranks).
    # (fp16/bf16 scores are promoted to float32; float64 stays float64)
    q = torch.exp(scores.to(torch.promote_types(scores.dtype, torch.float32)) / eps)
    b, k = q.shape
    n = all_reduce_sum(q.new_full((), float(b)))  # a fill kernel: no blocking host copy
    q = q / all_reduce_sum(q.sum())
    for _ in range(iters):
        q = q / all_reduce_sum(q.sum(dim=0, keepdim=True)) / k
        q = q / q.sum(dim=1, keepdim=True) / n
    return (q * n).to(scores.dtype)


def swav_loss(scores: Sequence[torch.Tensor], *, n_global: int = 2, temperature: float = 0.1,
              eps: float = 0.05, iters: int = 3, reduction: str = "mean") -> torch.Tensor:
    """SwAV swapped prediction.

    Args:
        scores: ``V`` tensors ``[B, K]`` of prototype scores, global views first.
        n_global: views whose codes are computed (2).
        temperature: 0.1; eps, iters: Sinkhorn settings (0.05, 3).

    For each global view ``i``: ``q_i = sinkhorn(scores_i)`` (no gradient), and every other view
    ``v`` predicts it: ``-mean_b sum_k q_i log softmax(scores_v / temperature)``. Averaged over pairs
    (``reduction="none"``: ``[B]``, each image's average over its pairs).
    """
    total, pairs = scores[0].new_zeros(scores[0].shape[0]), 0  # [B]
    for i in range(n_global):
        q = sinkhorn(scores[i].detach(), eps=eps, iters=iters)
        for v, sv in enumerate(scores):
            if v == i:
                continue
            total = total - (q * F.log_softmax(sv / temperature, dim=1)).sum(dim=1)
            pairs += 1
    return _reduce(total / pairs, reduction)

