"""A tiny IDAA VAE file for the tests that build ``idaa`` (its ``vae_path`` is required)."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from fastssl.models.vae import VAE

__all__ = ["write_tiny_vae", "tiny_vae_path", "TINY"]

#: the tiny architecture: 8 channels at the 8 x 8 bottleneck, 8 latent dims
TINY = {"channels": 8, "latent_dim": 8}
_CACHE: dict[int, Path] = {}


def write_tiny_vae(path, image_size: int = 16, seed: int = 0) -> Path:
    """Write a freshly initialised tiny VAE's state_dict (BatchNorm statistics moved off their
    initial values by a few train-mode passes, as a trained VAE's are) to ``path``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VAE(image_size=image_size, **TINY)
        with torch.no_grad():
            for _ in range(3):
                x = torch.randn(8, 3, image_size, image_size, generator=gen)
                vae.decode(vae.reparameterize(*vae.encode(x)))
    path = Path(path)
    torch.save(vae.state_dict(), path)
    return path


def tiny_vae_path(image_size: int = 16) -> str:
    """One tiny VAE file per image size for this process (a temporary folder, removed at exit)."""
    if image_size not in _CACHE:
        folder = Path(tempfile.mkdtemp(prefix="fastssl-tiny-vae-"))
        atexit.register(shutil.rmtree, folder, True)
        _CACHE[image_size] = write_tiny_vae(folder / f"vae{image_size}.pt", image_size)
    return str(_CACHE[image_size])
