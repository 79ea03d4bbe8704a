"""Conditional image generators for ISICLE (image synthesis as augmentation) and their registry.

**The generator interface** (what the ``isicle`` recipe, :mod:`fastssl.recipes.isicle`, calls):
an ``nn.Module`` with

* ``forward(x, code) -> y``: ``x`` float ``[B, 3, H, W]`` (a view), ``code`` one random code
  per sample (see below); ``y`` float ``[B, 3, H, W]``, the same shape and value range as ``x``;
* ``value_range`` (class or instance attribute; ``"unit"`` when absent): the range of ``x`` and
  ``y``: ``"unit"`` = RGB in ``[0, 1]``, ``"symmetric"`` = ``[-1, 1]``, ``"normalized"`` = the
  training views as the loop has them (normalised with the augment preset's mean/std);
* codes: a method ``sample_code(batch, device, generator) -> Tensor`` (``batch`` an int,
  ``generator`` a ``torch.Generator`` on ``device``: draw every random number from it), else an
  integer attribute ``code_dim``: the code is ``torch.randn(batch, code_dim)`` from that
  generator;
* optionally a classmethod ``kwargs_from_state_dict(sd) -> dict``: the constructor keywords a
  saved ``state_dict`` was built with (so a ``weights`` file needs no ``kwargs`` in the config).

The recipe builds the class, loads the weights, freezes it (``eval()``, no gradients) and calls
it under ``torch.no_grad``. Generators are named in the config by registry name
(:data:`GENERATORS`: ``imle``, ``identity``) or by import path (``"pkg.mod:Class"`` or
``"pkg.mod.Class"``; any callable returning an ``nn.Module`` works); see
:func:`resolve_generator`.

**The built-in generator** (:class:`ConditionalGenerator`, registry ``imle``, trained by the
``imle`` method, :mod:`fastssl.methods.imle`) is a small U-Net in the spirit of CAMNet (the
conditional hierarchical IMLE generator of the ISICLE paper): a three-stage convolutional
encoder of the (corrupted) input and a decoder whose every stage is modulated (FiLM: scale and
shift per channel) by the random code, so the code acts at every scale. It works in ``[0, 1]``
RGB (``value_range = "unit"``) and outputs its input plus a learned change (the last layer
starts at zero: untrained, it is the identity; the output is not clamped). Called without a
code it is an ordinary fastssl backbone: ``forward(x)`` maps *normalised* views (the augment
preset's mean/std, kept as buffers ``mean`` / ``std``) to the pooled features of its deepest
encoder stage, ``[B, feat_dim]`` (the online probe and the end-of-run kNN use this), so the
method's ``backbone.pt`` is the whole generator.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from loaders.errors import ConfigError

from ..registry import registrar

__all__ = ["GENERATORS", "register_generator", "resolve_generator", "ConditionalGenerator",
           "IdentityGenerator", "VALUE_RANGES", "CIFAR_MEAN", "CIFAR_STD"]

#: name -> generator class
GENERATORS: Dict[str, type] = {}
#: ``@register_generator("name")``: class decorator registering a generator class
register_generator = registrar(GENERATORS, "generator")
VALUE_RANGES = ("unit", "symmetric", "normalized")
#: CIFAR-10 per-channel mean/std (the ``isicle`` and ``imle`` presets' normalisation)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def resolve_generator(spec: str) -> Callable[..., nn.Module]:
    """A registry name (``imle``, ``identity``) or an import path ``"pkg.mod:Class"`` /
    ``"pkg.mod.Class"`` -> the class (or factory). Unknown names: ConfigError naming the closest
    registered one; import failures name the module and the error."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"generator must be a registry name or an import path, got {spec!r}")
    if spec in GENERATORS:
        return GENERATORS[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
    elif "." in spec:
        module, _, attr = spec.rpartition(".")
    else:
        close = difflib.get_close_matches(spec, list(GENERATORS), n=1, cutoff=0.0)
        raise ConfigError(f"unknown generator '{spec}'" + (f"; did you mean '{close[0]}'?" if close else "")
                          + f" (registered: {', '.join(sorted(GENERATORS))}; or an import path "
                          f"'pkg.mod:Class')")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"generator '{spec}' does not import ({type(e).__name__}: {e})") from e
    if not callable(obj):
        raise ConfigError(f"generator '{spec}' is a {type(obj).__name__}, not a class")
    return obj


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


@register_generator("imle")
class ConditionalGenerator(nn.Module):
    """The built-in conditional generator (see the module doc).

    Args:
        width: channels of the full-resolution stage (the half-resolution stage has ``2 width``).
        feat_dim: channels of the quarter-resolution stage = the feature dimension of
            ``forward(x)`` (the ``imle`` method sets it to the configured backbone's feat_dim,
            which the online probe is sized for).
        code_dim: length of the random code (standard normal).
        mean, std: the normalisation of the views ``forward(x)`` (feature mode) receives.

    ``forward(x, code)``: ``x`` in ``[0, 1]``, ``code [B, code_dim]`` -> ``x`` + a change;
    ``forward(x)``: normalised ``x`` -> ``[B, feat_dim]``. :meth:`encode` / :meth:`decode`
    split the two halves (the IMLE search encodes once and decodes many codes).
    """

    value_range = "unit"

    def __init__(self, width: int = 32, feat_dim: int = 128, code_dim: int = 32,
                 mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD):
        super().__init__()
        if min(width, feat_dim, code_dim) < 1:
            raise ValueError(f"width, feat_dim and code_dim must be >= 1, got {width}, {feat_dim}, {code_dim}")
        w, d = int(width), int(feat_dim)
        self.width, self.feat_dim, self.code_dim = w, d, int(code_dim)
        # encoder: full, half, quarter resolution
        self.conv1, self.enc1 = _conv(3, w), _conv(w, w)
        self.down2, self.enc2 = _conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w)
        self.down3, self.enc3 = _conv(2 * w, d, stride=2), _conv(d, d)
        # decoder: each stage is modulated by the code (FiLM: per-channel scale and shift)
        self.dec3, self.code3 = _conv(d, d), nn.Linear(self.code_dim, 2 * d)
        self.up2, self.dec2, self.code2 = _conv(d + 2 * w, 2 * w), _conv(2 * w, 2 * w), nn.Linear(self.code_dim, 4 * w)
        self.up1, self.dec1, self.code1 = _conv(2 * w + w, w), _conv(w, w), nn.Linear(self.code_dim, 2 * w)
        self.out = nn.Conv2d(w, 3, kernel_size=1)
        nn.init.zeros_(self.out.weight)  # starts as the identity of its input
        nn.init.zeros_(self.out.bias)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]))
        self.register_buffer("std", torch.tensor([float(s) for s in std]))

    @classmethod
    def kwargs_from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
        """``{width, feat_dim, code_dim}`` of a saved state_dict (mean/std are in it)."""
        try:
            return {"width": int(sd["conv1.weight"].shape[0]), "feat_dim": int(sd["enc3.weight"].shape[0]),
                    "code_dim": int(sd["code1.weight"].shape[1])}
        except KeyError as e:
            raise ConfigError(f"not a state_dict of the built-in generator 'imle' (no {e})") from e

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised views -> RGB in [0, 1] (with this generator's mean/std)."""
        return x * self.std.view(1, 3, 1, 1) + self.mean.view(1, 3, 1, 1)

    def encode(self, x: torch.Tensor):
        """``x`` in [0, 1] -> ``(x, full, half, quarter resolution stages)``."""
        s1 = _act(self.enc1(_act(self.conv1(x))))
        s2 = _act(self.enc2(_act(self.down2(s1))))
        s3 = _act(self.enc3(_act(self.down3(s2))))
        return x, s1, s2, s3

    @staticmethod
    def _film(h: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
        g, b = gb.to(h.dtype).chunk(2, dim=1)
        return _act(h * (1 + g[:, :, None, None]) + b[:, :, None, None])

    def decode(self, skips, code: torch.Tensor) -> torch.Tensor:
        """Encoder output (``encode``) and ``code [B, code_dim]`` -> image (input + change)."""
        x, s1, s2, s3 = skips
        h = self._film(self.dec3(s3), self.code3(code))
        h = F.interpolate(h, size=s2.shape[-2:], mode="nearest")
        h = self._film(self.dec2(_act(self.up2(torch.cat([h, s2], dim=1)))), self.code2(code))
        h = F.interpolate(h, size=s1.shape[-2:], mode="nearest")
        h = self._film(self.dec1(_act(self.up1(torch.cat([h, s1], dim=1)))), self.code1(code))
        return x + self.out(h)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised views -> ``[B, feat_dim]``: the deepest encoder stage, average-pooled."""
        return self.encode(self.to_unit(x))[3].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, code: Optional[torch.Tensor] = None) -> torch.Tensor:
        if code is None:
            return self.features(x)
        return self.decode(self.encode(x), code)


@register_generator("identity")
class IdentityGenerator(nn.Module):
    """Returns its input (ignores the code): the ``isicle`` recipe with it trains exactly as
    without it (a test of the plumbing)."""

    value_range = "unit"
    code_dim = 1

    def forward(self, x: torch.Tensor, code: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x
