"""Where the shipped YAML configs live: :func:`config_root`.

The repository keeps them in its top-level ``configs/`` folder (``augment/`` presets, ``method/``,
``data/`` and ``recipe/`` run configs). ``setup.py`` also ships that folder as package data at
``loaders/configs/``, so an installed copy (``pip install .``, a wheel) finds them without the
checkout. ``loaders`` never imports ``fastssl``; ``fastssl.config`` takes its root from here.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import ConfigError

__all__ = ["config_root"]

_HERE = Path(__file__).resolve().parent
#: the repository's configs/ (exists when running from a checkout)
_CHECKOUT = _HERE.parent / "configs"


def config_root() -> Path:
    """The folder that holds ``augment/``, ``method/``, ``data/`` and ``recipe/``.

    From a checkout (``setup.py`` next to the ``configs/`` folder above ``loaders/``): the
    repository's ``configs/``; otherwise the installed package data ``loaders/configs/``.
    """
    if (_CHECKOUT / "augment").is_dir() and (_CHECKOUT.parent / "setup.py").is_file():
        return _CHECKOUT
    packaged = Path(str(resources.files(__package__) / "configs"))
    if (packaged / "augment").is_dir():
        return packaged
    raise ConfigError(f"the shipped configs are missing: neither {_CHECKOUT} nor {packaged} holds "
                      f"augment/ (reinstall fastssl)")
