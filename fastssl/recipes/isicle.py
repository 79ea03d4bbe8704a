"""ISICLE (image synthesis as augmentation): a frozen conditional generator rewrites the views.

``{name: isicle, generator: imle, weights: runs/isicle_imle/backbone.pt, p: 1.0, kwargs: {}}``:
at set-up the recipe builds the generator (a registry name of
:mod:`fastssl.models.generator` or an import path ``"pkg.mod:Class"`` / ``"pkg.mod.Class"``,
constructed with ``kwargs``; the interface is in that module's doc), loads ``weights`` (a plain
``state_dict`` such as the ``imle`` method's ``backbone.pt``, or a training checkpoint's
``backbone``; the built-in generator reads its sizes from the file, so ``kwargs`` may stay
empty), freezes it (``eval()``, ``requires_grad`` off) and moves it to the training device.

Per batch, every view is replaced, per sample with probability ``p`` (a device-side mask, no
host sync), by ``G(view, fresh random code)``. The ISICLE paper replaces every augmented view
(``p = 1``) and uses only crop + flip (preset ``isicle``); the generator supplies the rest of
the variation. The views reach the recipe normalised with the augment preset's mean/std; the
recipe takes them as its keys ``mean``/``std`` (default: the ``isicle`` preset's; set them
when the run uses another preset -- a recipe does not see the augmentation), converts to the
generator's ``value_range`` and back. The replacement is applied as a change,
``view + (norm(G(u, z)) - norm(u))`` with ``u`` the view in the generator's range: the same
image up to float rounding, and a generator that returns its input leaves the views bit for bit
as they were (the normalise round trip alone is not exact in float).

``corrupt`` (default null: the view goes in as it is): a list of the ``imle`` method's
corruptions (``grayscale``, ``half_grayscale``, ``pixel_mask``, see
:func:`fastssl.methods.imle.corrupt`): each view is corrupted, one of them drawn per sample,
before it goes into the generator, which then re-colours / in-paints it as it learned to; the
result replaces the view. (The published description only says that the view is replaced by a
sample from a fresh code, so the default feeds the view itself.)

Random numbers (the mask, the corruptions and the codes) come from a ``torch.Generator`` on
the device seeded from ``(seed, c * W + r, v)``: ``c`` counts the recipe's ``rewrite_views`` calls (micro-steps)
and is its checkpoint state, ``r``/``W`` the rank and world size, ``v`` the view, so a resumed
run draws the same codes without saving an RNG state, ranks draw different ones, and the
run's global RNG is never touched (a recipe that replaces nothing trains exactly like no
recipe). The generator is built under a forked RNG seeded with ``seed`` for the same reason.

Logs ``isicle/replaced`` (fraction of the last batch's views replaced) and ``isicle/change``
(mean absolute change of the last batch's views, in normalised units).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from loaders.augment.params import make_generator
from loaders.errors import ConfigError

from ..methods.imle import check_corruptions
from ..methods.imle import corrupt as _corrupt
from ..models.generator import VALUE_RANGES, resolve_generator
from . import Recipe, SetupContext, register_recipe

__all__ = ["ISICLE", "build_frozen_generator", "load_generator_weights"]


def load_generator_weights(path) -> Dict[str, torch.Tensor]:
    """A plain ``state_dict`` file (``backbone.pt``) or a fastssl training checkpoint (its
    exported ``backbone``)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"isicle: generator weights {path} do not exist (train the generator first, e.g. "
                          f"fastssl pretrain configs/recipe/isicle_imle.yaml, and point 'weights' at its "
                          f"backbone.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a training checkpoint also holds numpy RNG state
        from ..checkpoint import load_checkpoint
        obj = load_checkpoint(path)
    if isinstance(obj, Mapping) and "backbone" in obj and "step" in obj:
        obj = obj["backbone"]
    if not isinstance(obj, Mapping):
        raise ConfigError(f"isicle: {path} holds a {type(obj).__name__}, not a state_dict")
    return dict(obj)


def build_frozen_generator(spec: str, *, weights=None, kwargs: Optional[Mapping[str, Any]] = None,
                           seed: int = 0, device="cpu") -> nn.Module:
    """Build ``spec`` (see :func:`fastssl.models.generator.resolve_generator`) with ``kwargs``,
    load ``weights``, freeze it and move it to ``device``. Initialisation runs under a forked
    CPU RNG seeded with ``seed`` (the caller's RNG stream is untouched)."""
    cls = resolve_generator(spec)
    sd = load_generator_weights(weights) if weights else None
    kw = dict(kwargs or {})
    if sd is not None and hasattr(cls, "kwargs_from_state_dict"):
        kw = {**cls.kwargs_from_state_dict(sd), **kw}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            gen = cls(**kw)
        except TypeError as e:
            raise ConfigError(f"isicle: generator '{spec}' does not take kwargs {sorted(kw)} ({e})") from e
    if not isinstance(gen, nn.Module):
        raise ConfigError(f"isicle: generator '{spec}' built a {type(gen).__name__}, not an nn.Module")
    if sd is not None:
        try:
            gen.load_state_dict(sd)
        except RuntimeError as e:
            raise ConfigError(f"isicle: {weights} does not fit generator '{spec}' with kwargs {kw}: "
                              f"{' '.join(str(e).split())[:300]}") from e
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return gen.to(device)


@register_recipe("isicle")
class ISICLE(Recipe):
    """``{name: isicle, generator, weights, p, kwargs, mean, std, seed, corrupt}`` (module doc)."""

    def __init__(self, generator: str = "imle", weights: Optional[str] = None, p: float = 1.0,
                 kwargs: Optional[Dict[str, Any]] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, seed: int = 0, corrupt: Optional[List[str]] = None):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(f"kwargs must be a mapping, got {kwargs!r}")
        if mean is None or std is None:
            from loaders.augment import load_preset_config
            preset = load_preset_config("isicle")
            mean, std = mean or preset["mean"], std or preset["std"]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std need 3 values and std > 0, got {mean}, {std}")
        resolve_generator(generator)  # fail before the run directory is written
        if weights and not Path(weights).is_file():
            load_generator_weights(weights)  # raises, naming the file
        self.spec, self.weights, self.p = generator, weights, float(p)
        self.kwargs = dict(kwargs or {})
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.seed = int(seed)
        self.corrupt = tuple(corrupt or ())
        if self.corrupt:
            check_corruptions(self.corrupt)
        self.calls = 0
        self.generator: Optional[nn.Module] = None
        self._last: Dict[str, torch.Tensor] = {}

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        acc = ctx.accelerator
        self.rank = int(getattr(acc, "process_index", 0) or 0)
        self.world = int(getattr(acc, "num_processes", 1) or 1)
        self.device = torch.device(ctx.device)
        self.generator = build_frozen_generator(self.spec, weights=self.weights, kwargs=self.kwargs,
                                                seed=self.seed, device=self.device)
        g = self.generator
        self.range = getattr(g, "value_range", "unit")
        if self.range not in VALUE_RANGES:
            raise ConfigError(f"isicle: generator '{self.spec}' has value_range {self.range!r}; expected one "
                              f"of {', '.join(VALUE_RANGES)}")
        if not hasattr(g, "sample_code") and not isinstance(getattr(g, "code_dim", None), int):
            raise ConfigError(f"isicle: generator '{self.spec}' has neither sample_code(batch, device, "
                              f"generator) nor an integer code_dim")
        if self.weights is None and any(True for _ in g.parameters()) and self.rank == 0:
            print(f"fastssl: isicle: generator '{self.spec}' has no weights (weights: null): it runs at its "
                  f"random initialisation", file=sys.stderr)
        self._m = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._s = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ value ranges
    def _to_range(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised views -> the generator's range."""
        return x if self.range == "normalized" else self._unit_to_range(x * self._s + self._m)

    def _unit_to_range(self, u: torch.Tensor) -> torch.Tensor:
        if self.range == "normalized":
            return (u - self._m) / self._s
        return u * 2 - 1 if self.range == "symmetric" else u

    def _from_range(self, y: torch.Tensor) -> torch.Tensor:
        """The generator's range -> normalised views."""
        if self.range == "normalized":
            return y
        u = (y + 1) / 2 if self.range == "symmetric" else y
        return (u - self._m) / self._s

    def _code(self, batch: int, device, g: torch.Generator) -> torch.Tensor:
        gen = self.generator
        if hasattr(gen, "sample_code"):
            return gen.sample_code(batch, device, g)
        return torch.randn(batch, int(gen.code_dim), device=device, generator=g)

    # ------------------------------------------------------------------ hooks
    def rewrite_views(self, views: List[torch.Tensor], batch) -> List[torch.Tensor]:
        c = self.calls
        self.calls += 1
        out, replaced, change = [], [], []
        for v, x in enumerate(views):
            B = x.shape[0]
            g = make_generator(x.device, self.seed, c * self.world + self.rank, v)
            keep = torch.rand(B, device=x.device, generator=g) < self.p
            code = self._code(B, x.device, g)
            with torch.no_grad():
                u = self._to_range(x.float())
                inp = u
                if self.corrupt:
                    inp = self._unit_to_range(_corrupt(x.float() * self._s + self._m, self.corrupt, generator=g))
                y = self.generator(inp, code)
                new = (x + (self._from_range(y.float()) - self._from_range(u))).to(x.dtype)
                y = torch.where(keep.view(B, 1, 1, 1), new, x)
                replaced.append(keep.float().mean())
                change.append((y - x).abs().float().mean())
            out.append(y)
        self._last = {"replaced": torch.stack(replaced).mean(), "change": torch.stack(change).mean()}
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"calls": int(self.calls)}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.calls = int(sd["calls"])

    def metrics(self) -> Dict[str, Any]:
        return {f"isicle/{k}": v for k, v in self._last.items()}
