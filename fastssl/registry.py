"""Name -> class registries (``fastssl.methods.METHODS``, ``fastssl.recipes.RECIPES``): the
registering decorator and the constructor keywords a config may set."""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Sequence

__all__ = ["registrar", "constructor_keywords"]


def registrar(table: Dict[str, type], kind: str) -> Callable[[str], Callable[[type], type]]:
    """``register = registrar(TABLE, "method")``; ``@register("name")`` puts a class in ``TABLE``
    under ``name`` (and sets ``cls.name``); another class under a taken name is a ValueError."""

    def register(name: str):
        def wrap(cls: type) -> type:
            if name in table and table[name] is not cls:
                raise ValueError(f"{kind} '{name}' registered twice ({table[name].__qualname__}, {cls.__qualname__})")
            cls.name = name
            table[name] = cls
            return cls

        return wrap

    return register


def constructor_keywords(cls: type, *, keyword_only: bool = False, skip: Sequence[str] = ()) -> List[str]:
    """The names ``cls(...)`` takes by keyword (all named parameters, or only keyword-only ones)."""
    kinds = (inspect.Parameter.KEYWORD_ONLY,) if keyword_only else \
        (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(cls.__init__).parameters
    return [k for k, p in params.items() if p.kind in kinds and k != "self" and k not in skip]
