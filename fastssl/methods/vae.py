"""``vae``: trains the IDAA VAE (:class:`fastssl.models.vae.VAE`) with ``fastssl pretrain``, as
the first stage of IDAA (Yang et al. 2022, ICML). Its exported ``backbone.pt`` is the whole VAE,
which the ``idaa`` method loads (``method.vae_path``)."""
from __future__ import annotations

from typing import Sequence

import torch

from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput, NoiseStream
from fastssl.models.vae import CIFAR_MEAN, CIFAR_STD, VAE
from loaders.errors import ConfigError

__all__ = ["VAEMethod", "vae_loss"]


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(per-sample loss [B], per-sample MSE [B], per-sample KL [B])``, all float32.

    ``MSE_i = mean over the 3*S*S values of (recon - x)^2`` (both in the VAE's space) and
    ``KL_i = -0.5 * sum_j (1 + logvar_ij - mu_ij^2 - exp(logvar_ij)) / (3 * L)``, so that the
    batch means are the published ``F.mse_loss(x, recon)`` and the KL summed over the batch and the
    ``L`` latent dims divided by ``B * 3 * L``; loss ``= MSE + kl_weight * KL``.
    """
    mse = (recon.float() - x.float()).pow(2).flatten(1).mean(1)
    mu, logvar = mu.float(), logvar.float()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1) / (3 * mu.shape[1])
    return mse + kl_weight * kl, mse, kl


@register_method("vae")
class VAEMethod(Method):
    """The IDAA VAE, trained on ONE view per image (``num_views = 1``; augment preset ``vae``).

    ``backbone`` is the :class:`~fastssl.models.vae.VAE` itself (the ``model:`` section's network
    is not used; only its feature dimension is, see ``latent_dim``): ``backbone(view)`` gives the
    latent mean ``[B, L]`` (the online probe's features), and the exported ``backbone.pt`` holds
    the whole VAE (encoder, decoder, BatchNorm statistics and its normalisation buffers), what
    ``idaa`` loads with ``vae_path: runs/<vae run>/backbone.pt``. ``fastssl eval`` rebuilds the
    ``model:`` network and so does not apply to a ``vae`` run.

    Loss (per image, in the VAE's space; see :func:`vae_loss`): ``MSE + kl_weight * KL`` with the
    KL summed over the latent dims and divided by ``3 * L`` (the published normalisation: the
    batch's KL sum over ``B * 3 * L``); the reconstruction decodes a sample of the posterior
    (train mode; its noise from :meth:`posterior_noise`, a stream kept in the state).
    ``per_sample_loss`` ``[B]``: each image's term, its mean is the loss.

    Args:
        image_size: side of the views (``8 * 2**n``: 16, 32, 64, ...; 32 for CIFAR).
        channels: width at the 8 x 8 bottleneck (128 published; the earlier stages have half).
        latent_dim: latent size; None (default) = the ``model:`` backbone's feature dimension
            (512 for ResNet-18 at width 64, the published size), which the online probe is
            built for: any other value is refused.
        kl_weight: weight of the KL term (0.1).
        mean, std: the normalisation of the views (the augmentation preset's ``mean``/``std``).

    Logs: ``vae`` (the loss), ``mse`` and ``kl`` (its two terms, batch means).
    """

    num_views = 1
    defaults = {
        # IDAA's VAE: AdamW (no weight decay) lr 5e-4 at batch 128, betas (0.0, 0.9)
        "optimizer": "adamw", "lr": 1.0e-3, "weight_decay": 0.0, "betas": (0.0, 0.9), "warmup_steps": 0,
        "exclude_bias_norm": False,
        "image_size": 32, "channels": 128, "latent_dim": None, "kl_weight": 0.1,
    }

    def __init__(self, *, backbone, feat_dim, image_size: int = 32, channels: int = 128,
                 latent_dim: int | None = None, kl_weight: float = 0.1,
                 mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD):
        latent = int(feat_dim if latent_dim is None else latent_dim)
        if latent != feat_dim:
            raise ConfigError(f"vae: latent_dim={latent} differs from the model's feature dimension {feat_dim}, "
                              f"which the online probe reads; leave latent_dim unset (it follows model.width: "
                              f"8 x width for ResNet-18) or change the model")
        try:
            vae = VAE(image_size=image_size, channels=channels, latent_dim=latent, input_mean=mean, input_std=std)
        except ValueError as e:
            raise ConfigError(f"vae: {e}") from e
        super().__init__(backbone=vae, feat_dim=latent)
        self.kl_weight = float(kl_weight)
        #: the posterior noise's own random stream (see :meth:`posterior_noise`)
        self.noise = NoiseStream()

    def posterior_noise(self, mu: torch.Tensor) -> torch.Tensor:
        """Standard normal noise like ``mu`` from the method's :class:`NoiseStream` (in the
        state: a resumed run draws what the uninterrupted one did)."""
        gen = self.noise.generator(mu.device)
        return torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        vae = self.backbone
        x = vae.to_space(views[0])
        mu, logvar = vae.encode(x)
        noise = self.posterior_noise(mu) if vae.training else None
        recon = vae.decode(vae.reparameterize(mu, logvar, noise))
        per, mse, kl = vae_loss(x, recon, mu, logvar, self.kl_weight)
        loss = per.mean()
        return MethodOutput(loss=loss, features=mu.detach(), per_sample_loss=per.detach(),
                            logs={"vae": loss.detach(), "mse": mse.mean().detach(), "kl": kl.mean().detach()})
