"""Fréchet distance between the pretraining stream and the downstream set (``--frechet``).

``FD = |mu_p - mu_d|^2 + tr(S_p) + tr(S_d) - 2 tr((S_p^1/2 S_d S_p^1/2)^1/2)`` between the
mean and covariance (float64, ``ddof=1``) of features of

* **pretraining**: the first ``K`` positions of the point's sample stream (``Mixture.lookup``:
  epoch 0 is a seeded shuffle, so these are ``min(K, epoch length)`` draws of the mixture the
  point trains on, every source in its share; with ``N < K`` unique images only ``N`` distinct
  images enter, as in training);
* **downstream**: ``K`` images of ``eval.train`` drawn without replacement (numpy seed 0),

under one **fixed encoder**: the config's backbone architecture at random initialisation with
``torch.manual_seed(0)``, in eval mode (nothing pretrained can be downloaded here; a random
convolutional network is a fixed, data-independent embedding). Images are unaugmented, resized
(bilinear, antialiased) to ``eval.image_size`` (else ``data.image_size``, else the first view's
size) and normalised with the augmentation preset's mean/std, as the end-of-run evaluation does.
The matrix square root uses symmetric eigendecompositions (no scipy). Small samples bias FD
upwards (a covariance from fewer images than feature dimensions is rank-deficient): compare FDs
of the same ``K``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

__all__ = ["frechet_distance", "ENCODER", "FrechetProbe"]

ENCODER = ("random-init {backbone} (width {width}, cifar_stem {cifar_stem}), torch.manual_seed(0), eval mode; "
           "unaugmented images at {size} px; K = {k}: the first K stream positions of the point's mixture vs "
           "K images of eval.train (numpy seed 0)")


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between the Gaussians fitted to feature rows ``a [n, D]`` and ``b [m, D]`` (n, m >= 2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh((root @ cov_b @ root + (root @ cov_b @ root).T) / 2)
    trace_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_cross)
    return max(fd, 0.0)


class FrechetProbe:
    """The fixed encoder and the downstream features of one config; :meth:`distance` per mixture."""

    def __init__(self, cfg, sources: Sequence, *, k: int = 1000):
        from ..build import build_augment, build_backbone, build_eval_sources

        self.cfg, self.sources, self.k = cfg, list(sources), int(k)
        aug = build_augment(cfg.augment)
        self.size = int(cfg.eval.image_size or cfg.data.get("image_size") or aug.specs[0].size)
        self.mean, self.std = cfg.eval.mean or aug.mean, cfg.eval.std or aug.std
        torch.manual_seed(0)
        self.encoder, _ = build_backbone(cfg, aug)
        self.encoder.eval()
        ev_train, _ = build_eval_sources(cfg)
        pick = np.random.default_rng(0).choice(len(ev_train), size=min(self.k, len(ev_train)), replace=False)
        self.downstream = self._features(ev_train, np.sort(pick))
        self._cache: Dict[tuple, float] = {}
        m = cfg.model
        self.encoder_text = ENCODER.format(backbone=m.backbone, width=m.width, cifar_stem=m.cifar_stem,
                                           size=self.size, k=self.k)

    def _images(self, source, ids: np.ndarray) -> torch.Tensor:
        """uint8 [n, 3, S, S]: decoded, resized like the evaluation (bilinear, antialiased, rounded)."""
        import torch.nn.functional as F
        out = []
        for i in ids.tolist():
            img = torch.from_numpy(np.ascontiguousarray(source.decode(int(i))[0])).permute(2, 0, 1)[None]
            if img.shape[-2:] != (self.size, self.size):
                img = F.interpolate(img.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                                    align_corners=False).round().clamp(0, 255).to(torch.uint8)
            out.append(img[0])
        return torch.stack(out)

    def _features(self, source, ids: np.ndarray) -> np.ndarray:
        from ..eval import extract_features
        x = self._images(source, ids)
        return extract_features(self.encoder, x, mean=self.mean, std=self.std, batch_size=256).numpy()

    def distance(self, mixture, key: Optional[tuple] = None) -> float:
        """FD between the first K stream positions of ``mixture`` (over ``self.sources``) and the
        downstream sample; cached by ``key``."""
        if key is not None and key in self._cache:
            return self._cache[key]
        n = min(self.k, int(mixture.epoch_length))
        src, smp = mixture.lookup(np.arange(n, dtype=np.int64))
        feats = [self._features(self.sources[s], smp[src == s]) for s in np.unique(src).tolist()]
        fd = frechet_distance(np.concatenate(feats), self.downstream)
        if key is not None:
            self._cache[key] = fd
        return fd
