"""IDAA (Yang et al. 2022, "Identity-Disentangled Adversarial Augmentation for Self-supervised
Learning", ICML) on SimCLR: a third view made by an adversarial step in the latent space of a
frozen VAE, with the image's residual (what the VAE does not reconstruct) added back unchanged."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import torch

from fastssl.losses import nt_xent
from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput
from fastssl.models.branch import NormBranch
from fastssl.models.heads import projection_mlp
from fastssl.models.vae import CIFAR_MEAN, CIFAR_STD, VAE
from loaders.errors import ConfigError

__all__ = ["IDAA", "load_vae"]


def load_vae(path, *, mean: Sequence[float], std: Sequence[float]) -> VAE:
    """The frozen VAE of ``path``: a ``backbone.pt`` of a ``vae`` run (a plain VAE state_dict; a
    ``vae`` run's training checkpoint works too), architecture read from its shapes, eval mode,
    ``requires_grad=False``, its input normalisation set to ``mean``/``std``."""
    if path is None:
        raise ConfigError("idaa needs method.vae_path: the backbone.pt of a finished `vae` run "
                          "(fastssl pretrain configs/recipe/idaa_vae_cifar10.yaml)")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"idaa: method.vae_path {p} is not a file (train the VAE first: "
                          f"fastssl pretrain configs/recipe/idaa_vae_cifar10.yaml)")
    try:
        state = _read_state(p)
        vae = VAE.from_state_dict(state)
        vae.set_input_normalisation(mean, std)
    except Exception as e:  # not a VAE file, torn file, wrong keys
        raise ConfigError(f"idaa: method.vae_path {p} is not a VAE saved by the `vae` method "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    for q in vae.parameters():
        q.requires_grad_(False)
    return vae.eval()


def _read_state(path: Path) -> dict:
    """A plain state_dict (``backbone.pt``, loaded weights-only), or the ``backbone`` of one of
    fastssl's training checkpoints (its own format, with RNG states and the config)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        from fastssl.checkpoint import load_checkpoint
        return load_checkpoint(path)["backbone"]


def _fp32(t: torch.Tensor):
    """Autocast off on ``t``'s device (the frozen VAE runs in float32)."""
    return torch.autocast(t.device.type, enabled=False)


def _scratch_stats(branch: NormBranch) -> dict[str, torch.Tensor]:
    """Copies of the running statistics of ``branch``'s BatchNorm layers: a forward given these
    (``replace=``) updates the copies, so the branch's own statistics stay as they are."""
    out = {}
    for path, norm in zip(branch.paths, branch.norms.values()):
        for name, buf in norm.named_buffers(recurse=False):
            if buf is not None:
                out[f"{path}.{name}"] = buf.clone()
    return out


@register_method("idaa")
class IDAA(Method):
    """SimCLR + IDAA's adversarial view.

    Per step, on the first view ``x`` (VAE frozen, always in eval mode, run in float32 outside
    autocast; views are converted to its space and back with :meth:`VAE.to_space` /
    :meth:`VAE.from_space`, using ``mean``/``std``): ``z0 = enc(x)`` (the mean), residual
    ``r = x - dec(z0)`` (detached), ``x_adv(z) = dec(z) + r``, so ``x_adv(z0) = x``. One FGSM step
    ``z = z0 + eps * sign(d/dz NT-Xent(p(f(x)), p(f_adv(x_adv(z)))))`` at ``z = z0``, where
    ``f`` is the backbone (clean BatchNorm), ``f_adv`` the same weights through the adversarial
    BatchNorm layers, ``p`` the projector and the clean term ``p(f(x))`` is the training forward's
    (detached), so the step ascends exactly the adversarial loss term below. The gradient is
    ``torch.autograd.grad`` w.r.t. ``z`` only (no parameter receives a ``.grad``), and that
    forward leaves every running statistic unchanged (it updates throwaway copies). Then
    ``x_adv = x_adv(z)`` (no gradient) and

        ``loss = NT-Xent(p(f(x)), p(f(view 2))) + alpha * NT-Xent(p(f(x)), p(f_adv(x_adv)))``.

    The reference code (kai-wen-yang/IDAA) takes the attack's clean term through the adversarial
    BatchNorm and lets the attack's forward passes update running statistics; here they do not.

    Dual BatchNorm: ``adv_backbone`` (:class:`~fastssl.models.NormBranch`) holds the backbone's
    second set of BatchNorm layers, momentum ``adv_bn_momentum`` (0.01), used for ``x_adv`` only
    (trained, in the state); the projector has none unless ``proj_bn`` (then ``adv_projector``
    holds its copies). ``method.backbone`` stays the plain clean network (the export).

    The VAE (``self.vae``, loaded from ``vae_path`` at construction: the ``backbone.pt`` of a
    ``vae`` run) is a submodule with ``requires_grad=False``, kept in eval mode by
    :meth:`train`; it is in ``state_dict()`` (a resume restores the checkpoint's copy; the file
    must still exist to build the method). Its image size must be the views' size.

    Args:
        vae_path: the VAE file (required).
        eps: FGSM step size in the latent space (0.1 on CIFAR-10); 0 skips the attack
            (``x_adv = x`` up to rounding).
        alpha: weight of the adversarial term (1.0).
        adv_bn_momentum: momentum of the adversarial BatchNorm layers (0.01).
        temperature: NT-Xent temperature (0.5).
        proj_hidden_dim, proj_output_dim: projector 512 -> 512 -> 64 (ReLU, no BatchNorm).
        proj_bn: BatchNorm in the projector's hidden layer (False).
        mean, std: the views' normalisation (the augmentation preset's ``mean``/``std``).

    ``per_sample_loss`` ``[B]``: each image's NT-Xent in the clean term plus ``alpha`` times its
    NT-Xent in the adversarial term; its mean is the loss. Logs: ``idaa`` (the loss),
    ``nt_xent`` (the clean term), ``nt_xent_adv`` (the adversarial term) and ``adv_l1`` (mean
    ``|x_adv - x|`` over pixels and channels, on the ``[0, 1]`` pixel scale).
    """

    defaults = {
        # IDAA's SimCLR: Adam lr 3e-4 at batch 256, no weight decay, cosine decay, no warm-up
        "optimizer": "adam", "lr": 3.0e-4, "weight_decay": 0.0, "warmup_steps": 0, "exclude_bias_norm": False,
        "temperature": 0.5, "proj_hidden_dim": 512, "proj_output_dim": 64, "eps": 0.1, "alpha": 1.0,
        "adv_bn_momentum": 0.01,
    }

    def __init__(self, *, backbone, feat_dim, vae_path: str | None = None, eps: float = 0.1, alpha: float = 1.0,
                 adv_bn_momentum: float = 0.01, temperature: float = 0.5, proj_hidden_dim: int = 512,
                 proj_output_dim: int = 64, proj_bn: bool = False,
                 mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD):
        super().__init__(backbone=backbone, feat_dim=feat_dim)
        if float(eps) < 0 or float(alpha) < 0 or not 0.0 < float(adv_bn_momentum) <= 1.0:
            raise ConfigError(f"idaa: need eps >= 0, alpha >= 0 and 0 < adv_bn_momentum <= 1, got "
                              f"{eps}, {alpha}, {adv_bn_momentum}")
        self.eps, self.alpha, self.temperature = float(eps), float(alpha), float(temperature)
        self.projector = projection_mlp(feat_dim, proj_hidden_dim, proj_output_dim, hidden_bn=proj_bn)
        self.adv_backbone = NormBranch(backbone)
        self.adv_projector = NormBranch(self.projector)
        if not self.adv_backbone.paths:
            raise ConfigError("idaa needs a backbone with BatchNorm layers (a ResNet): adversarial inputs "
                              "go through a second set of them")
        for norm in [*self.adv_backbone.norms.values(), *self.adv_projector.norms.values()]:
            norm.momentum = float(adv_bn_momentum)
        self.vae = load_vae(vae_path, mean=mean, std=std)

    def train(self, mode: bool = True):
        """Train/eval mode for everything but the VAE, which stays in eval mode."""
        super().train(mode)
        self.vae.eval()
        return self

    def _adv_project(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """``p(f_adv(x))``; ``scratch``: the BatchNorm running statistics are left unchanged."""
        rb = _scratch_stats(self.adv_backbone) if scratch else None
        rp = _scratch_stats(self.adv_projector) if scratch else None
        return self.adv_projector(self.projector, self.adv_backbone(self.backbone, x, rb), rp)

    def adversarial_view(self, view: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_adv, mean |x_adv - x| on the [0, 1] pixel scale)`` for the normalised ``view`` and
        its clean projections ``anchor`` ``[B, D]`` (used detached); ``x_adv`` is a normalised
        view without gradient. The VAE runs in float32 (autocast off), the backbone as called."""
        vae = self.vae
        if vae.training:
            vae.eval()
        attack = self.eps > 0.0
        with torch.no_grad(), _fp32(view):
            x = vae.to_space(view)
            z0 = vae.encode(x)[0]
        z = z0.clone().requires_grad_(True) if attack else z0
        with torch.enable_grad() if attack else torch.no_grad():
            with _fp32(view):
                rec = vae.decode(z)
                resid = (x - rec).detach()
            if attack:  # FGSM: the gradient of the adversarial term w.r.t. z only
                adv = self._adv_project(vae.from_space(rec + resid).to(view.dtype), scratch=True)
                loss, _ = nt_xent(anchor.detach(), adv, temperature=self.temperature)
                (grad,) = torch.autograd.grad(loss, z)
        with torch.no_grad(), _fp32(view):
            x_adv = vae.decode(z0 + self.eps * grad.sign()) + resid if attack else rec + resid
            dist = (vae.to_pixels(x_adv) - vae.to_pixels(x)).abs().mean()
            return vae.from_space(x_adv).to(view.dtype), dist

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        z1, z2 = self.projector(h1), self.projector(h2)
        x_adv, dist = self.adversarial_view(views[0], z1)
        z_adv = self._adv_project(x_adv)
        loss_clean, per_clean = nt_xent(z1, z2, temperature=self.temperature)
        loss_adv, per_adv = nt_xent(z1, z_adv, temperature=self.temperature)
        loss = loss_clean + self.alpha * loss_adv
        per_sample = (per_clean + self.alpha * per_adv).detach()
        return MethodOutput(loss=loss, features=h1.detach(), per_sample_loss=per_sample,
                            logs={"idaa": loss.detach(), "nt_xent": loss_clean.detach(),
                                  "nt_xent_adv": loss_adv.detach(), "adv_l1": dist.detach()})
