"""Backbones: torchvision-layout ResNet-18/50 with a channel width knob and a CIFAR stem, and ViT via timm.

A ResNet built here has exactly torchvision's module names (``conv1, bn1, layer1..4``), with
``fc = Identity``; at ``width=64`` its state_dict loads into ``torchvision.models.resnet18()``
(with ``fc`` replaced by ``Identity`` and, for the CIFAR stem, ``conv1``/``maxpool`` swapped the
same way), so exported weights need nothing from fastssl.
"""
from __future__ import annotations

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from loaders.errors import ConfigError

__all__ = ["build_backbone", "BACKBONES", "WidthResNet", "export_backbone"]

_RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}
_VITS = {"vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
         "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
         "vit_base": dict(embed_dim=768, depth=12, num_heads=12)}
BACKBONES = tuple(_RESNETS) + tuple(_VITS)


class WidthResNet(ResNet):
    """torchvision ``ResNet`` whose stage widths are ``width * (1, 2, 4, 8)`` (64 = standard).

    Reuses torchvision's ``BasicBlock``/``Bottleneck``, ``_make_layer`` and ``forward``; only the
    channel counts and the stem differ. ``cifar_stem``: 3x3 conv stride 1 and no max-pool (for
    32 px inputs). Input ``[B, 3, H, W]`` float → output ``[B, width * 8 * expansion]``.
    """

    def __init__(self, block, layers, *, width: int = 64, cifar_stem: bool = True,
                 zero_init_residual: bool = False):
        nn.Module.__init__(self)  # torchvision's __init__ hard-codes 64 channels; build here instead
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # Bottleneck inner width = planes * base_width / 64 = planes
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feat_dim = width * 8 * block.expansion
        # same initialisation as torchvision's ResNet
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)


def _build_vit(name: str, *, img_size: int, patch_size: int, depth: int | None):
    try:
        from timm.models.vision_transformer import VisionTransformer  # optional dependency
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConfigError(f"backbone '{name}' needs timm: pip install 'fastssl[vit]'") from err
    cfg = dict(_VITS[name])
    if depth is not None:
        cfg["depth"] = depth
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0,
                              dynamic_img_size=True, **cfg)
    return model, cfg["embed_dim"]


def build_backbone(name: str = "resnet18", *, cifar_stem: bool = True, width: int = 64,
                   img_size: int = 224, patch_size: int = 16, depth: int | None = None,
                   zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """Build a backbone without classifier. Returns ``(module, feat_dim)``; the module maps
    ``[B, 3, H, W]`` float to ``[B, feat_dim]``.

    Args:
        name: ``resnet18`` (feat 8*width) | ``resnet50`` (feat 32*width) | ``vit_tiny`` (192) |
            ``vit_small`` (ViT-S, 384) | ``vit_base`` (768).
        cifar_stem: ResNet only: 3x3 stride-1 stem without max-pool (32 px images, REFERENCE §1).
        width: ResNet only: channels of the first stage (64 = torchvision; 8-32 for CPU runs).
        img_size, patch_size: ViT only (e.g. 32 and 4 for CIFAR); other sizes work too
            (position embeddings are interpolated for multi-crop).
        depth: ViT only: override the number of blocks (tests).
        zero_init_residual: ResNet only: zero the last BN of every residual block.
    """
    if name in _RESNETS:
        if width <= 0:
            raise ConfigError(f"backbone width must be positive, got {width}")
        block, layers = _RESNETS[name]
        model = WidthResNet(block, layers, width=width, cifar_stem=cifar_stem,
                            zero_init_residual=zero_init_residual)
        return model, model.feat_dim
    if name in _VITS:
        return _build_vit(name, img_size=img_size, patch_size=patch_size, depth=depth)
    import difflib
    close = difflib.get_close_matches(name, BACKBONES, n=1, cutoff=0.0)
    raise ConfigError(f"unknown backbone '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
                      + f" (valid: {', '.join(BACKBONES)})")


def export_backbone(method: nn.Module) -> dict:
    """Plain CPU ``state_dict`` of ``method.backbone`` (the online encoder; ``method`` may also be
    a bare backbone). Loads with ``strict=True`` into a freshly built backbone of the same config,
    or into torchvision's ResNet with ``fc = Identity`` (and the CIFAR stem swapped in)."""
    method = getattr(method, "module", method)  # unwrap DDP / Accelerate
    backbone = getattr(method, "backbone", method)
    backbone = getattr(backbone, "module", backbone)
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
