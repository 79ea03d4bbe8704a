"""Errors of the data layer. Every message names the file (or config key) and the problem."""
from __future__ import annotations

import difflib
from typing import Iterable, Mapping

__all__ = ["DataError", "SampleError", "ConfigError", "check_keys", "ON_ERROR", "check_on_error"]

#: the values of every ``on_error`` setting: raise a one-line error, or skip the sample and count it
ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A source, shard or file cannot be used at all (missing, empty, wrong format)."""


class SampleError(DataError):
    """One sample cannot be read or decoded. With ``on_error: skip`` it is skipped and counted."""

    def __init__(self, message: str, *, path: str = "", index: int = -1):
        super().__init__(message)
        self.path = path
        self.index = index


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


def check_on_error(value, where: str) -> str:
    """``value`` when it is ``"raise"`` or ``"skip"``, else a ``ConfigError`` naming ``where``
    (the config key or function, e.g. ``data.on_error``). The one check of every backend, source
    and converter."""
    if value not in ON_ERROR:
        raise ConfigError(f"{where}: on_error must be 'raise' or 'skip', got {value!r}")
    return value


def check_keys(cfg: Mapping, allowed: Iterable[str], where: str) -> None:
    """Raise ``ConfigError`` for the first key of ``cfg`` not in ``allowed``, naming the closest valid key."""
    allowed = list(allowed)
    for key in cfg:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.0)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{key}' in {where}{hint} (valid: {', '.join(sorted(allowed))})")
