"""IMLE (implicit maximum likelihood estimation): the conditional generator of ISICLE.

Per target image ``y`` (the one augmented view, crop + flip, preset ``imle``): corrupt it into
``x`` (one of: grayscale, half-grayscale, random pixel mask; drawn per sample on the device),
draw ``num_samples`` codes, generate ``G(x, z_k)`` for every code without gradients, keep the
code whose sample is nearest to ``y`` and pull that sample toward ``y``: the loss is its squared
pixel distance (mean over pixels and channels, in [0, 1] RGB). Every target thus gets a nearby
sample (no mode dropping), and the codes spread over the ways the corruption can be undone.
The generator is :class:`fastssl.models.generator.ConditionalGenerator` (``backbone``), so
``backbone.pt`` is the whole generator, which the ``isicle`` recipe loads.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from fastssl.methods import register_method
from fastssl.methods.base import Method, MethodOutput, NoiseStream
from fastssl.models.generator import ConditionalGenerator

__all__ = ["IMLE", "corrupt", "check_corruptions", "CORRUPTIONS"]

#: luma weights (ITU-R 601-2, as torchvision's rgb_to_grayscale)
_LUMA = (0.299, 0.587, 0.114)


#: the corruptions of the ISICLE paper's generator training, in the order of their kind ids
CORRUPTIONS = ("grayscale", "half_grayscale", "pixel_mask")


def check_corruptions(kinds: Sequence[str]) -> None:
    """ValueError unless ``kinds`` is a non-empty list of :data:`CORRUPTIONS` names."""
    if isinstance(kinds, str) or not kinds or any(k not in CORRUPTIONS for k in kinds):
        raise ValueError(f"corruptions must be a non-empty list of {', '.join(CORRUPTIONS)}; got {kinds!r}")


def corrupt(y: torch.Tensor, kinds: Sequence[str] = CORRUPTIONS, *, mask_range: Sequence[float] = (0.25, 0.75),
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Corrupt ``y`` (``[B, 3, H, W]`` in [0, 1]) per sample with one of ``kinds``, uniformly:
    ``grayscale``; ``half_grayscale`` (the left, right, top or bottom half); ``pixel_mask``
    (each pixel set to 0 with a per-sample probability ~ U(``mask_range``)). Random numbers
    come from ``generator`` (None: the global RNG of ``y``'s device), the same count whatever
    is drawn; no host sync."""
    check_corruptions(kinds)
    B, _, H, W = y.shape
    dev, g = y.device, generator
    ids = torch.tensor([CORRUPTIONS.index(k) for k in kinds], device=dev)
    kind = ids[torch.randint(0, len(ids), (B,), device=dev, generator=g)].view(B, 1, 1, 1)
    side = torch.randint(0, 4, (B,), device=dev, generator=g).view(B, 1, 1, 1)
    lo, hi = float(mask_range[0]), float(mask_range[1])
    rate = (torch.rand(B, device=dev, generator=g) * (hi - lo) + lo).view(B, 1, 1, 1)
    pixel = torch.rand(B, 1, H, W, device=dev, generator=g)
    w = torch.tensor(_LUMA, device=dev, dtype=y.dtype).view(1, 3, 1, 1)
    gray = (y * w).sum(dim=1, keepdim=True).expand_as(y)
    # half-grayscale: side 0/1 = left/right half (columns), 2/3 = top/bottom half (rows)
    cols = (torch.arange(W, device=dev).view(1, 1, 1, W) + 0.5) / W
    rows = (torch.arange(H, device=dev).view(1, 1, H, 1) + 0.5) / H
    coord = torch.where(side < 2, cols, rows)
    half = torch.where(side % 2 == 0, coord < 0.5, coord >= 0.5)
    x = torch.where((kind == 0) | ((kind == 1) & half), gray, y)
    return torch.where((kind == 2) & (pixel < rate), torch.zeros_like(x), x)


@register_method("imle")
class IMLE(Method):
    """IMLE training of the built-in conditional generator (module doc).

    Args:
        gen_width: channels of the generator's full-resolution stage.
        code_dim: length of the random code.
        num_samples: codes drawn per target for the nearest-sample search (8).
        corruptions: the corruptions drawn from, uniformly per sample (:func:`corrupt`; default
            all three).
        mask_range: the pixel mask's drop probability is drawn per sample from U(lo, hi).
        mean, std: the augment preset's normalisation (None: the ``imle`` preset's, CIFAR-10),
            to turn the views into [0, 1] RGB; kept in the generator for its feature mode.

    The generator's deepest stage has ``feat_dim`` channels (the configured backbone's feature
    dimension, e.g. 8 x ``model.width`` for resnet18; the backbone itself is not used), and
    ``features`` are its average-pooled activations on the clean view (what the online probe
    and the final kNN see). ``per_sample_loss [B]``: each target's distance to its selected
    sample; its mean is the loss. Logs: ``imle`` (the loss: mean nearest-sample squared
    distance) and ``mean_distance`` (mean squared distance over all drawn samples; its gap to
    ``imle`` shows how much the codes matter).

    Corruptions and codes come from the method's own seeded stream (:meth:`draw_generator`,
    state in the extra state), not the global RNG: a resumed run draws exactly what the
    uninterrupted one did.
    """

    num_views = 1
    defaults = {
        # not published for ISICLE's generator: Adam, 5e-4 per 256 images (1e-3 at batch 512),
        # no weight decay, 500 warmup steps
        "optimizer": "adam", "lr": 5e-4, "weight_decay": 0.0, "warmup_steps": 500,
        "exclude_bias_norm": False, "gen_width": 32, "code_dim": 32, "num_samples": 8,
    }

    def __init__(self, *, backbone: nn.Module, feat_dim: int, gen_width: int = 32, code_dim: int = 32,
                 num_samples: int = 8, corruptions: Sequence[str] = CORRUPTIONS,
                 mask_range: Sequence[float] = (0.25, 0.75), mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if len(mask_range) != 2 or not 0.0 <= float(mask_range[0]) <= float(mask_range[1]) <= 1.0:
            raise ValueError(f"mask_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {mask_range}")
        check_corruptions(corruptions)
        if mean is None or std is None:
            from loaders.augment import load_preset_config
            preset = load_preset_config("imle")
            mean, std = mean or preset["mean"], std or preset["std"]
        if not isinstance(backbone, ConditionalGenerator):  # the configured encoder is not used
            backbone = ConditionalGenerator(width=gen_width, feat_dim=feat_dim, code_dim=code_dim,
                                            mean=mean, std=std)
        super().__init__(backbone=backbone, feat_dim=backbone.feat_dim)
        self.num_samples = int(num_samples)
        self.corruptions = tuple(corruptions)
        self.mask_range = (float(mask_range[0]), float(mask_range[1]))
        #: the corruptions' and codes' own random stream (see :meth:`draw_generator`)
        self.noise = NoiseStream()

    def draw_generator(self, device) -> torch.Generator:
        """The next generator of the method's :class:`NoiseStream` (in the state; ranks draw
        different corruptions and codes)."""
        return self.noise.generator(device)

    def check_views(self, views: list[torch.Tensor]) -> None:
        if len(views) != 1:
            raise ValueError(f"method 'imle' needs 1 view, got {len(views)} (use a one-view preset: "
                             f"augment=imle)")

    def nearest_codes(self, skips, target: torch.Tensor, g: Optional[torch.Generator] = None):
        """Draw ``num_samples`` codes per target, generate without gradients from the encoded
        corrupted input ``skips``; returns ``(code of the nearest sample [B, code_dim], mean
        squared distance over all samples (0-dim))``."""
        G, K = self.backbone, self.num_samples
        B = target.shape[0]
        codes = torch.randn(B, K, G.code_dim, device=target.device, generator=g)
        with torch.no_grad():
            rep = [s.detach().repeat_interleave(K, dim=0) for s in skips]
            samples = G.decode(rep, codes.flatten(0, 1).to(skips[0].dtype)).float()
            dist = (samples - target.float().repeat_interleave(K, dim=0)).pow(2).flatten(1).mean(1).view(B, K)
        best = dist.argmin(dim=1)
        return codes[torch.arange(B, device=target.device), best], dist.mean()

    def forward(self, views: list[torch.Tensor]) -> MethodOutput:
        self.check_views(views)
        G = self.backbone
        view = views[0]
        target = G.to_unit(view)
        g = self.draw_generator(view.device)
        x = corrupt(target, self.corruptions, mask_range=self.mask_range, generator=g)
        skips = G.encode(x)
        code, mean_dist = self.nearest_codes(skips, target, g)
        out = G.decode(skips, code.to(skips[0].dtype))
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        loss = per_sample.mean()
        with torch.no_grad():
            features = G.encode(target)[3].mean(dim=(2, 3))
        return MethodOutput(loss=loss, features=features.detach(), per_sample_loss=per_sample.detach(),
                            logs={"imle": loss.detach(), "mean_distance": mean_dist.detach()})
