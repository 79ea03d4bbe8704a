"""Heads: projection/prediction MLPs, the DINO head and SwAV prototypes. Input/output ``[B, dim]``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MLP", "projection_mlp", "prediction_mlp", "DINOHead", "Prototypes"]


class MLP(nn.Sequential):
    """Linear layers ``dims[0] → dims[1] → ... → dims[-1]``.

    Hidden layers: ``Linear (+ BatchNorm1d if hidden_bn) + activation``. The last layer:
    ``Linear`` (bias unless ``last_bn``), then ``BatchNorm1d(affine=last_bn_affine)`` if ``last_bn``.
    Examples: SimCLR (solo-learn) ``MLP([512, 2048, 256], hidden_bn=False)``;
    BCL/SDCLR ``MLP([512, 512, 128], last_bn=True)`` (= 512→512 (BN, ReLU) → 128 (BN, no bias)).
    """

    def __init__(self, dims: list[int], *, hidden_bn: bool = True, last_bn: bool = False,
                 last_bn_affine: bool = True, activation: type[nn.Module] = nn.ReLU):
        if len(dims) < 2:
            raise ValueError(f"MLP needs at least input and output dims, got {dims}")
        layers: list[nn.Module] = []
        for i in range(len(dims) - 2):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not hidden_bn))
            if hidden_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(activation())
        layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
        super().__init__(*layers)
        self.out_dim = dims[-1]


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int = 2,
                   hidden_bn: bool = True, last_bn: bool = False, last_bn_affine: bool = True) -> MLP:
    """Projector ``in → hidden (× num_layers - 1) → out`` (see :class:`MLP`)."""
    if num_layers < 1:
        raise ValueError(f"projector num_layers must be >= 1, got {num_layers}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    return MLP(dims, hidden_bn=hidden_bn, last_bn=last_bn, last_bn_affine=last_bn_affine)


def prediction_mlp(in_dim: int, hidden_dim: int, out_dim: int | None = None) -> MLP:
    """Predictor ``in → hidden (BN, ReLU) → out`` (BYOL 256→4096→256; SimSiam bottleneck 2048→512→2048)."""
    return MLP([in_dim, hidden_dim, out_dim or in_dim], hidden_bn=True)


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021).

    ``[B, in_dim]`` → MLP (``num_layers`` linear layers, GELU, hidden 2048, bottleneck 256) →
    L2-normalise → weight-normalised linear to ``[B, out_dim]`` (65536 in the paper). With
    ``norm_last_layer`` the weight norm's gain is fixed to 1 (rows of the last weight are unit
    vectors), which the paper recommends for stability.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, *, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, use_bn: bool = False,
                 norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        self.mlp = MLP(dims, hidden_bn=use_bn, activation=nn.GELU)
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_v, std=0.02)
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The weight-normalised last layer (``last_v``, ``last_g``), which DINO freezes early on."""
        return [self.last_v, self.last_g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim]`` → ``[B, out_dim]``."""
        x = F.normalize(self.mlp(x), dim=-1)
        weight = self.last_g * F.normalize(self.last_v, dim=1)  # weight norm: g * v / ||v|| per row
        return x @ weight.T


class Prototypes(nn.Module):
    """SwAV prototypes: ``[B, dim]`` (L2-normalised) → ``[B, n_prototypes]`` cosine scores (3000 in the paper).

    Call :meth:`normalize` before each step (SwAV keeps the prototype vectors on the unit sphere).
    """

    def __init__(self, dim: int, n_prototypes: int = 3000):
        super().__init__()
        self.layer = nn.Linear(dim, n_prototypes, bias=False)
        self.normalize()

    @torch.no_grad()
    def normalize(self) -> None:
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, dim]`` → ``[B, n_prototypes]``."""
        return self.layer(z)
