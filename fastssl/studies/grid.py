"""Sweep grids: ``key=v1,v2,...`` axes, their product (or zip), and the points' names.

Value syntax (``fastssl sweep CONFIG key=v1,v2 ...``): the text after the first ``=`` is split
on commas that are outside brackets ``[]``, braces ``{}``, parentheses ``()`` and quotes
(``'...'``, ``"..."``); each piece is one value, parsed later as a YAML scalar exactly like a
``fastssl pretrain`` override (so ``null`` unsets the key and ``method=simclr,byol`` selects
group files). Examples::

    optim.lr=0.1,0.3,1.0               three values
    model.width=[1,2],[3,4]            two list values: [1, 2] and [3, 4]
    'eval.train={type: synthetic, n: 40},{type: synthetic, n: 80}'   two mappings
    data.sources.0.path='a,b.csv'      one value with a comma: quote it

An empty piece (``key=1,,2`` or a trailing comma) is an error. Axes combine as the Cartesian
product in the order given (the first axis varies slowest) or, with ``--zip``, position by
position (every axis must then have the same number of values).
"""
from __future__ import annotations

import itertools
import re
from typing import Dict, List, Sequence, Tuple

from loaders.errors import ConfigError

__all__ = ["split_values", "parse_axis", "grid", "point_name", "slug", "varying_keys"]

_OPEN = {"[": "]", "{": "}", "(": ")"}


def split_values(text: str, *, where: str = "value") -> List[str]:
    """``"1,[2,3],{a: 4}"`` -> ``["1", "[2,3]", "{a: 4}"]``: commas at bracket depth 0 and
    outside quotes separate values; unbalanced brackets or quotes and empty values are errors."""
    out, buf, stack, quote = [], [], [], None
    for ch in text:
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            stack.append(_OPEN[ch])
        elif ch in _OPEN.values():
            if not stack or stack.pop() != ch:
                raise ConfigError(f"{where} '{text}': unbalanced '{ch}'")
        elif ch == "," and not stack:
            out.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    if quote or stack:
        raise ConfigError(f"{where} '{text}': unclosed {quote or stack[-1]!r}")
    out.append("".join(buf).strip())
    if any(v == "" for v in out):
        raise ConfigError(f"{where} '{text}': empty value (two commas in a row or a trailing comma)")
    return out


def parse_axis(text: str) -> Tuple[str, List[str]]:
    """``"optim.lr=0.1,0.3"`` -> ``("optim.lr", ["0.1", "0.3"])``."""
    if "=" not in text or text.startswith("-"):
        raise ConfigError(f"sweep axis '{text}' must look like key.sub=v1,v2,...")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"sweep axis '{text}': empty key")
    if not raw.strip():
        return key, [""]  # key= : unset the key (one value)
    return key, split_values(raw, where=f"sweep axis '{key}'")


def grid(axes: Sequence[str], *, zip_axes: bool = False) -> List[List[str]]:
    """Every point's override list (``key=value`` strings) for the ``axes`` texts."""
    parsed = [parse_axis(a) for a in axes]
    keys = [k for k, _ in parsed]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"sweep axis '{dup[0]}' is given twice: list all its values in one key=v1,v2")
    if not parsed:
        return [[]]
    if zip_axes:
        lengths = {k: len(v) for k, v in parsed}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"--zip needs axes of one length, got {lengths}")
        combos = list(zip(*[v for _, v in parsed]))
    else:
        combos = list(itertools.product(*[v for _, v in parsed]))
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in combos]


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe short form of an override text."""
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")
    return s[:limit] or "x"


def point_name(index: int, overrides: Sequence[str], varying: Sequence[str]) -> str:
    """``p003_lr=0.3_width=8``: the index, then the last key part and value of each varying axis."""
    parts = []
    for o in overrides:
        key, value = o.split("=", 1)
        if key in varying:
            parts.append(f"{key.split('.')[-1]}={value}")
    tail = slug("_".join(parts)) if parts else ""
    return f"p{index:03d}" + (f"_{tail}" if tail else "")


def varying_keys(points: Sequence[Sequence[str]]) -> List[str]:
    """Keys whose value differs between points (in first-seen order)."""
    values: Dict[str, set] = {}
    order: List[str] = []
    for ov in points:
        for o in ov:
            k, v = o.split("=", 1)
            if k not in values:
                values[k] = set()
                order.append(k)
            values[k].add(v)
    n = len(points)
    return [k for k in order if len(values[k]) > 1 or sum(any(o.split("=", 1)[0] == k for o in ov)
                                                            for ov in points) < n]
