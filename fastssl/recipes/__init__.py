"""Recipes: research ideas that plug into the training loop at fixed points.

A recipe is a small object registered by name and listed in the run config::

    recipes:
      - {name: bcl, beta: 0.97}

The loop (:mod:`fastssl.loop`) calls every listed recipe, in list order, at these points
(B = this rank's batch, W = world size, N = unique samples of the mixture, all tensors on the
training device; no hook may read a tensor on the host except :meth:`Recipe.metrics`):

==========================  =====================================================================
``setup(ctx)``              once, before the first step (also on resume, before ``load_state_dict``);
                            ``ctx`` is a :class:`SetupContext` (mixture sizes, method, accelerator)
``strength(index)``         per batch, before augmentation: ``index int64 [B]`` -> ``float [B]`` in
                            [0, 1] (per-sample augmentation strength, e.g. RandAugment magnitude)
                            or None; the first recipe that returns a tensor wins
``rewrite_views(views, b)`` per batch, after augmentation, before the method: ``views`` is the list
                            of float ``[B, 3, H, W]`` views, ``b`` the :class:`loaders.Batch`;
                            returns the views the method sees (same count and shapes)
``after_step(step, i, l)``  after every micro-step with the per-sample losses gathered over all
                            ranks: ``i int64 [W*B]`` (``Batch.index``), ``l float [W*B]`` detached
                            (only when ``needs_losses``; ``l`` is None if the method has none)
``end_epoch(epoch)``        when an epoch of the plan ends (``epoch`` counts from 1)
``state_dict()`` /          everything the recipe changes during training, saved in every
``load_state_dict(sd)``     checkpoint and restored on resume
``metrics()``               at log steps only: ``{name: float or 0-dim tensor}`` for the run's log,
                            and ``histograms()``: ``{name: 1-d tensor}`` for TensorBoard
==========================  =====================================================================

Adding a recipe: subclass :class:`Recipe`, decorate with ``@register_recipe("name")``, list its
keyword arguments in ``__init__``; config keys other than ``name`` go to the constructor.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence

import torch

from loaders.errors import ConfigError, check_keys

from ..registry import constructor_keywords, registrar

__all__ = ["Recipe", "SetupContext", "RECIPES", "register_recipe", "build_recipes"]

RECIPES: Dict[str, type] = {}


@dataclass
class SetupContext:
    """What a recipe sees at set-up."""

    #: unique samples of the mixture (``Batch.index`` is in ``[0, num_samples)``)
    num_samples: int
    #: unique samples per source, in config order, and the sources' names
    source_sizes: List[int]
    source_names: List[str]
    #: samples per epoch of the plan (over all ranks) and images per optimizer step
    epoch_length: int
    images_per_step: int
    #: optimizer steps of the run
    total_steps: int
    #: the (unwrapped) method and the run's Accelerator
    method: Any
    accelerator: Any
    device: torch.device


class Recipe:
    """Base class: every hook is a no-op; override the ones the idea needs."""

    name: ClassVar[str] = ""
    #: the loop gathers per-sample losses and indices over ranks for ``after_step`` only if set
    needs_losses: ClassVar[bool] = False
    #: the method must return per-sample losses (``MethodOutput.per_sample_loss``)
    requires_per_sample_loss: ClassVar[bool] = False

    def setup(self, ctx: SetupContext) -> None:
        self.ctx = ctx

    def strength(self, index: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def rewrite_views(self, views: List[torch.Tensor], batch) -> List[torch.Tensor]:
        return views

    def after_step(self, step: int, index: torch.Tensor, loss: Optional[torch.Tensor]) -> None:
        return None

    def end_epoch(self, epoch: int) -> None:
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        return None

    def metrics(self) -> Dict[str, Any]:
        return {}

    def histograms(self) -> Dict[str, torch.Tensor]:
        return {}


#: ``@register_recipe("name")``: class decorator registering a :class:`Recipe` subclass
register_recipe = registrar(RECIPES, "recipe")


def build_recipes(entries: Sequence[Dict[str, Any]]) -> List[Recipe]:
    """``[{name: bcl, beta: 0.97}, ...]`` -> recipe objects (unknown names/keys: ConfigError)."""
    out = []
    for i, entry in enumerate(entries or []):
        entry = dict(entry)
        name = entry.pop("name", None)
        if name not in RECIPES:
            check_keys({str(name): None}, RECIPES, f"recipes[{i}]: the recipe registry")
        cls = RECIPES[name]
        check_keys(entry, constructor_keywords(cls), f"recipes[{i}] ('{name}')")
        try:
            out.append(cls(**entry))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"recipes[{i}] ('{name}'): {e}") from e
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"recipes: each recipe may be listed once, got {names}")
    return out


# register the built-in recipes: every module of this package
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"fastssl.recipes.{_mod}")
