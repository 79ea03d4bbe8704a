"""A second branch of a module that shares its weights but has its own BatchNorm layers.

SDCLR (Jiang et al. 2021) contrasts a network with a pruned copy of itself: the pruned branch
uses the same (masked) convolution weights and its own BatchNorm layers. :class:`NormBranch`
does this without touching the shared module: it holds deep copies of the module's BatchNorm
layers (their own affine parameters and running statistics, trained and saved like any
others) and runs the shared module through :func:`torch.func.functional_call` with those
BatchNorm tensors, plus any replaced weights (``weight * mask``), substituted for the call.
The shared module's own state_dict, modules and forward are unchanged (it exports as a plain
network; compiled in place it keeps one graph per branch), and gradients of replaced weights
(``weight * mask``) flow back to the shared parameters.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NormBranch"]


class NormBranch(nn.Module):
    """Own copies of every BatchNorm layer of ``module`` (``module`` itself is not stored).

    ``branch(module, x, replace)`` runs ``module(x)`` with each BatchNorm layer's parameters
    and buffers taken from this branch (running statistics updated in place here in train
    mode) and with the tensors of ``replace`` (``{"conv1.weight": tensor, ...}``, names as in
    ``module.named_parameters()``) in place of those parameters. Copies are keyed by the
    module path with ``.`` replaced by ``_`` (``layer1.0.bn1`` -> ``layer1_0_bn1``).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.paths: list[str] = [name for name, m in module.named_modules() if isinstance(m, _BatchNorm)]
        keys = [p.replace(".", "_") for p in self.paths]
        if len(set(keys)) != len(keys):
            raise ValueError(f"NormBranch: BatchNorm paths collide once '.' becomes '_': {self.paths}")
        self.norms = nn.ModuleDict({k: copy.deepcopy(module.get_submodule(p)) for k, p in zip(keys, self.paths)})

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{path in the shared module: tensor of this branch}`` for every BatchNorm parameter/buffer."""
        out: dict[str, torch.Tensor] = {}
        for path, norm in zip(self.paths, self.norms.values()):
            for name, t in norm.named_parameters(recurse=False):
                out[f"{path}.{name}"] = t
            for name, t in norm.named_buffers(recurse=False):
                if t is not None:
                    out[f"{path}.{name}"] = t
        return out

    def forward(self, module: nn.Module, x: torch.Tensor, replace: dict[str, torch.Tensor] | None = None):
        return functional_call(module, {**self.tensors(), **(replace or {})}, (x,))
