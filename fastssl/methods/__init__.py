"""SSL methods and their registry.

``build_method("simclr", backbone=..., feat_dim=..., temperature=0.5, lr=0.3)`` builds a method;
keyword arguments are the method's constructor arguments or recipe keys (``optimizer``, ``lr``,
``weight_decay``, ... see :data:`fastssl.methods.base.RECIPE_DEFAULTS`), which end up in
``method.recipe``. Unknown keys raise ``ConfigError`` naming the closest valid key.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch.nn as nn

from fastssl.methods.base import RECIPE_DEFAULTS, Method, MethodOutput
from fastssl.registry import constructor_keywords, registrar
from loaders.errors import check_keys

__all__ = ["METHODS", "register_method", "build_method", "method_hparams", "Method", "MethodOutput"]

METHODS: dict[str, type[Method]] = {}


#: ``@register_method("name")``: class decorator registering a :class:`Method` subclass
register_method = registrar(METHODS, "method")


def method_hparams(cls: type[Method]) -> list[str]:
    """Constructor keyword arguments of a method (without ``backbone``/``feat_dim``)."""
    return constructor_keywords(cls, keyword_only=True, skip=("backbone", "feat_dim"))


def build_method(name: str, *, backbone: nn.Module, feat_dim: int, **hparams) -> Method:
    """Build registered method ``name`` on ``backbone`` (``[B,3,H,W] → [B, feat_dim]``).

    ``hparams`` override ``cls.defaults``: constructor arguments go to the constructor, recipe
    keys to ``method.recipe``.
    """
    if name not in METHODS:
        check_keys({name: None}, METHODS, "the method registry (fastssl.methods.METHODS)")
    cls = METHODS[name]
    model_keys = method_hparams(cls)
    check_keys(hparams, list(model_keys) + list(RECIPE_DEFAULTS), f"hyper-parameters of method '{name}'")
    merged = {**cls.defaults, **hparams}
    model_kw = {k: v for k, v in merged.items() if k in model_keys}
    method = cls(backbone=backbone, feat_dim=feat_dim, **model_kw)
    method.recipe.update({k: v for k, v in merged.items() if k in RECIPE_DEFAULTS})
    return method


# register the built-in methods: every module of this package but the interface
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
    importlib.import_module(f"fastssl.methods.{_mod}")
