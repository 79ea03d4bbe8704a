"""The convolutional VAE of IDAA (Yang et al. 2022, "Identity-Disentangled Adversarial
Augmentation for Self-supervised Learning", ICML).

An image is split into what the VAE reconstructs and a residual, ``x = G(x) + R(x)`` with
``R(x) = x - G(x)``; IDAA perturbs G's latent and adds the fixed residual back
(:mod:`fastssl.methods.idaa`). The ``vae`` method (:mod:`fastssl.methods.vae`) trains it.

Architecture (``S`` = image size, ``n = log2(S / 8)`` stride-2 stages, ``C`` = ``channels``,
``L`` = ``latent_dim``; the published CIFAR model is ``S = 32, C = 128, L = 512``):

* encoder: ``n`` stages ``conv 4x4 / s2 (no bias) -> BN -> ReLU`` with ``C/2`` output channels
  except the last one's ``C`` (32 px: ``3 -> 64 -> 128``; every doubling of ``S`` adds one more
  ``C/2`` stage at the input, 16 px has the single stage ``3 -> C``), then ``residual block ->
  BN -> residual block``: a ``[B, C, 8, 8]`` map; linear layers from its ``64 C`` values to the
  mean and the log-variance (``[B, L]`` each);
* decoder: linear ``L -> 64 C``, ``residual block -> BN -> residual block -> BN``, the stages
  mirrored as ``transposed conv 4x4 / s2 (no bias)`` (each but the last followed by ``BN ->
  LeakyReLU``; the last one outputs 3 channels), ``tanh``, then ``BatchNorm2d(3)``;
* residual block: ``x + conv1x1(LeakyReLU(BN(conv3x3(LeakyReLU(x)))))``.

Supported sizes: ``S = 8 * 2**n`` with ``n >= 1`` (16, 32, 64, 128, ... px).

**Spaces.** The VAE works in its own *space*: pixels on the ``[0, 1]`` scale standardised with
``space_mean``/``space_std`` (default: the normalisation the published VAE was trained in,
CIFAR-10 mean ``(0.4914, 0.4822, 0.4465)`` and std ``(0.2023, 0.1994, 0.2010)``; the MSE + 0.1 KL
balance of its loss is stated in these units). The training loop hands methods views normalised
with the augmentation preset's ``mean``/``std`` (``input_mean``/``input_std`` here; the repo's
presets use std ``(0.2470, 0.2435, 0.2616)``). :meth:`VAE.to_space` and :meth:`VAE.from_space`
convert between the two exactly (``pixels = view * input_std + input_mean``), so a VAE trained
under one normalisation serves runs under another. All four are buffers (in the state_dict).

``forward(view)`` is the backbone contract ``[B, 3, S, S] -> [B, L]``: the latent mean of a
normalised view (what the online probe and a kNN read). In eval mode :meth:`reparameterize`
returns the mean; in train mode a sample.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["VAE", "ResBlock", "vae_arch", "REFERENCE_MEAN", "REFERENCE_STD", "CIFAR_MEAN", "CIFAR_STD",
           "BOTTLENECK"]

#: the normalisation the published CIFAR VAE was trained in (its default space)
REFERENCE_MEAN = (0.4914, 0.4822, 0.4465)
REFERENCE_STD = (0.2023, 0.1994, 0.2010)
#: the normalisation of the repo's augmentation presets (configs/augment/*.yaml)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
#: side of the encoder's output map
BOTTLENECK = 8


class ResBlock(nn.Module):
    """``x + conv1x1(LeakyReLU(BN(conv3x3(LeakyReLU(x)))))`` at ``channels`` channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.LeakyReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(),
            nn.Conv2d(channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def num_stages(image_size: int) -> int:
    """Stride-2 stages from ``image_size`` down to the 8 x 8 bottleneck; ValueError when the
    size is not ``8 * 2**n`` with ``n >= 1``."""
    n = round(math.log2(max(int(image_size), 1) / BOTTLENECK)) if image_size > 0 else 0
    if n < 1 or BOTTLENECK * 2 ** n != int(image_size):
        raise ValueError(f"VAE image_size must be 8 * 2**n with n >= 1 (16, 32, 64, ...), got {image_size}")
    return n


def _vector(values: Sequence[float], name: str) -> torch.Tensor:
    """A ``[3]`` float32 tensor of ``values``; a std must be positive (checked on the host, at set-up)."""
    vals = [float(v) for v in values]
    if len(vals) != 3 or (name.endswith("std") and min(vals) <= 0):
        raise ValueError(f"VAE {name} must be 3 values{' > 0' if name.endswith('std') else ''}, got {vals}")
    return torch.tensor(vals, dtype=torch.float32)


class VAE(nn.Module):
    """The IDAA VAE (see the module docstring). ``channels`` must be even."""

    def __init__(self, *, image_size: int = 32, channels: int = 128, latent_dim: int = 512,
                 input_mean: Sequence[float] = CIFAR_MEAN, input_std: Sequence[float] = CIFAR_STD,
                 space_mean: Sequence[float] = REFERENCE_MEAN, space_std: Sequence[float] = REFERENCE_STD):
        super().__init__()
        n = num_stages(image_size)
        if channels < 2 or channels % 2 or latent_dim < 1:
            raise ValueError(f"VAE needs an even channels >= 2 and latent_dim >= 1, got {channels}, {latent_dim}")
        self.image_size, self.channels, self.latent_dim = int(image_size), int(channels), int(latent_dim)
        widths = [channels // 2] * (n - 1) + [channels]
        enc: list[nn.Module] = []
        for c_in, c_out in zip([3] + widths[:-1], widths):
            enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        enc += [ResBlock(channels), nn.BatchNorm2d(channels), ResBlock(channels)]
        self.encoder = nn.Sequential(*enc)
        flat = channels * BOTTLENECK * BOTTLENECK
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)
        self.fc_dec = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = [ResBlock(channels), nn.BatchNorm2d(channels), ResBlock(channels),
                                nn.BatchNorm2d(channels)]
        outs = widths[::-1][1:] + [3]
        for i, (c_in, c_out) in enumerate(zip(widths[::-1], outs)):
            dec.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False))
            if i < len(outs) - 1:
                dec += [nn.BatchNorm2d(c_out), nn.LeakyReLU()]
        self.decoder = nn.Sequential(*dec)
        self.out_norm = nn.BatchNorm2d(3)
        for name, values in (("input_mean", input_mean), ("input_std", input_std),
                             ("space_mean", space_mean), ("space_std", space_std)):
            self.register_buffer(name, _vector(values, name))

    # -- spaces --------------------------------------------------------------------------
    @staticmethod
    def _c(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, 3, 1, 1)

    def to_space(self, view: torch.Tensor) -> torch.Tensor:
        """Normalised view (``input_mean``/``input_std``) -> the VAE's space (float32)."""
        pixels = view.float() * self._c(self.input_std) + self._c(self.input_mean)
        return (pixels - self._c(self.space_mean)) / self._c(self.space_std)

    def from_space(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE's space -> a view normalised like the input (float32)."""
        pixels = x.float() * self._c(self.space_std) + self._c(self.space_mean)
        return (pixels - self._c(self.input_mean)) / self._c(self.input_std)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE's space -> pixels on the ``[0, 1]`` scale."""
        return x.float() * self._c(self.space_std) + self._c(self.space_mean)

    @torch.no_grad()
    def set_input_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Use views normalised with ``mean``/``std`` (an IDAA run's augmentation)."""
        self.input_mean.copy_(_vector(mean, "input_mean"))
        self.input_std.copy_(_vector(std, "input_std"))

    # -- model ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, S, S]`` in the VAE's space -> ``(mean, log-variance)``, ``[B, L]`` each."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.image_size, self.image_size):
            from loaders.errors import ConfigError
            raise ConfigError(f"this VAE takes [B, 3, {self.image_size}, {self.image_size}] images, got "
                              f"{list(x.shape)}: set method.image_size (a vae run) to the views' size "
                              f"(augment.size), or use a VAE trained at that size (idaa)")
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
        """Train mode: ``mu + exp(logvar / 2) * noise`` (``noise``: standard normal ``[B, L]``,
        drawn from the global RNG when None); eval mode: ``mu``."""
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if noise is None else noise)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` latent -> ``[B, 3, S, S]`` in the VAE's space."""
        h = self.fc_dec(z).view(z.shape[0], self.channels, BOTTLENECK, BOTTLENECK)
        return self.out_norm(torch.tanh(self.decoder(h)))

    def forward(self, view: torch.Tensor) -> torch.Tensor:
        """Features: the latent mean ``[B, L]`` of a normalised view."""
        return self.encode(self.to_space(view))[0]

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "VAE":
        """A VAE of the architecture ``state`` was saved from (:func:`vae_arch`), with its weights,
        buffers and normalisations loaded (strict)."""
        vae = cls(**vae_arch(state))
        vae.load_state_dict(dict(state), strict=True)
        return vae


def vae_arch(state: Mapping[str, torch.Tensor]) -> dict:
    """``{"image_size", "channels", "latent_dim"}`` of a :class:`VAE` state_dict (from its
    shapes: the decoder's input layer, the mean layer and the number of stride-2 stages)."""
    try:
        flat = state["fc_dec.weight"].shape[0]
        latent = state["fc_mu.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a fastssl VAE state_dict (no {e.args[0]!r}; keys: {sorted(state)[:6]}...)") from None
    stages = [k for k, v in state.items()
              if re.fullmatch(r"encoder\.\d+\.weight", k) and v.dim() == 4 and v.shape[-1] == 4]
    channels = flat // (BOTTLENECK * BOTTLENECK)
    return {"image_size": BOTTLENECK * 2 ** len(stages), "channels": channels, "latent_dim": latent}
