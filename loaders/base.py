"""The source contract: every on-disk format is a random-access ``Source``.

A source has a length and returns sample ``i`` either as *encoded bytes* (JPEG/PNG/WebP, decoded
by the backend) or as a ``uint8 [H, W, 3]`` RGB ``numpy`` array, plus its integer label
(``-1`` when unknown, e.g. generated images). Sources are pickled into DataLoader worker
processes, so they open files lazily (per process) and hold no open handles when pickled.

Sources are registered by name (``@register_source("npz")``) and built from a config mapping
with :func:`build_source` (``{"type": "npz", "path": ..., ...}``); unknown keys are rejected.
The built-in types live in the modules of :data:`SOURCE_MODULES`, which :func:`build_source`
imports on first use, so building one needs no prior import of its module.
"""
from __future__ import annotations

import importlib
import io
from typing import Callable, Dict, Mapping, Tuple, Union

import numpy as np

from .errors import ConfigError, DataError, SampleError, check_keys

__all__ = [
    "Source", "InMemorySource", "ArraySource", "Sample", "register_source", "build_source", "SOURCES",
    "SOURCE_MODULES", "source_types", "decode_image", "prefetch_calls",
]

#: encoded image bytes, or a decoded uint8 [H, W, 3] RGB array
Sample = Tuple[Union[bytes, np.ndarray], int]

SOURCES: Dict[str, Callable[..., "Source"]] = {}


def register_source(name: str):
    def deco(cls):
        if name in SOURCES:
            raise ValueError(f"source type '{name}' registered twice")
        SOURCES[name] = cls
        cls.type_name = name
        return cls
    return deco


#: built-in source type -> the module that registers it (imported by :func:`build_source` on first
#: use: those modules import this one, so they cannot be imported here at module level)
SOURCE_MODULES: Dict[str, str] = {
    "folder": "loaders.sources", "csv": "loaders.sources", "parquet": "loaders.sources", "npz": "loaders.sources",
    "cifar": "loaders.sources", "synthetic": "loaders.synthetic", "shards": "loaders.shards",
    "beton": "loaders.beton",
}


def _import_source_module(module: str, *, strict: bool) -> None:
    """Import a module of :data:`SOURCE_MODULES` (registering its types).

    A missing module is skipped. A module that is present but misses a dependency raises when
    ``strict`` (its type was asked for) and is skipped otherwise (only listing the types).
    """
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if strict and e.name != module:
            raise


def _ensure_registered(kind) -> None:
    """Register ``kind`` if it is a built-in type; for an unknown ``kind``, every built-in type."""
    if kind in SOURCES:
        return
    if kind in SOURCE_MODULES:
        _import_source_module(SOURCE_MODULES[kind], strict=True)
    else:  # unknown: register them all, so the error suggests among every built-in type
        source_types()


def source_types() -> Tuple[str, ...]:
    """The names of all source types (built-in ones registered on the way), sorted."""
    for module in sorted(set(SOURCE_MODULES.values())):
        _import_source_module(module, strict=False)
    return tuple(sorted(SOURCES))


def build_source(cfg: Mapping) -> "Source":
    """Build a source from ``{"type": NAME, **kwargs}``; kwargs are the class's keyword arguments.

    A built-in ``NAME`` (:data:`SOURCE_MODULES`) needs no prior import of its module.
    """
    if "type" not in cfg:
        raise ConfigError(f"source config {dict(cfg)} has no 'type' (one of: {', '.join(source_types())})")
    kind = cfg["type"]
    if not isinstance(kind, str):
        raise ConfigError(f"source config {dict(cfg)}: 'type' must be a string (one of: {', '.join(source_types())})")
    _ensure_registered(kind)
    if kind not in SOURCES:
        check_keys({kind: None}, SOURCES, "source types")
    cls = SOURCES[kind]
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    check_keys(kwargs, getattr(cls, "config_keys", ()), f"source '{kind}'")
    return cls(**kwargs)


def decode_image(data: Union[bytes, np.ndarray], *, path: str = "", index: int = -1) -> np.ndarray:
    """Decode encoded bytes (any PIL format) to ``uint8 [H, W, 3]`` RGB; arrays pass through.

    Raises :class:`SampleError` naming ``path``/``index`` for corrupt or truncated data.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] != 3:
            raise SampleError(f"{path or 'array'}[{index}]: expected uint8 [H,W,3], got {data.dtype} {data.shape}",
                              path=path, index=index)
        return data
    from PIL import Image  # local: workers import it once
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data
        raise SampleError(f"{path or 'bytes'}: sample {index} cannot be decoded ({type(e).__name__}: {e})",
                          path=path, index=index) from e


class Source:
    """Random-access image source. Subclasses implement ``__len__``, ``read`` and ``labels``."""

    type_name = "source"
    config_keys: Tuple[str, ...] = ()
    #: a short name for logs and per-source metrics
    name: str = ""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, i: int) -> Sample:
        """Sample ``i`` as (encoded bytes or uint8 HWC RGB array, label). Raises SampleError."""
        raise NotImplementedError  # pragma: no cover

    def labels(self) -> np.ndarray:
        """All labels as ``int64 [len(self)]`` (``-1`` where unknown)."""
        raise NotImplementedError  # pragma: no cover

    def decode(self, i: int) -> Tuple[np.ndarray, int]:
        """Sample ``i`` decoded to ``uint8 [H, W, 3]`` RGB, plus its label."""
        data, label = self.read(i)
        return decode_image(data, path=self.describe(i), index=i), label

    def prefetch(self, indices) -> None:
        """A hint: these samples are read next, by this thread (remote shards fetch them batched)."""

    def describe(self, i: int) -> str:
        """Where sample ``i`` lives (a file path, ``shard.tar:key``...), for error messages."""
        return f"{self.type_name}:{self.name}[{i}]"

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"{self.type_name} source '{self.name}' has {n} samples; index {i} is out of range")
        return int(i)


def prefetch_calls(calls) -> None:
    """Call ``source.prefetch`` once per source for the ``(source, index)`` pairs about to be read
    in this thread (loaders call it before reading a chunk); a failing hint is ignored (the reads
    report their own errors)."""
    by: Dict[int, Tuple["Source", list]] = {}
    for src, i in calls:
        if type(src).prefetch is not Source.prefetch:
            by.setdefault(id(src), (src, []))[1].append(int(i))
    for src, idx in by.values():
        try:
            src.prefetch(idx)
        except Exception:  # noqa: BLE001  (only a hint)
            pass


class InMemorySource(Source):
    """A source whose samples are rows of ``self.images`` (``uint8 [N, H, W, 3]``, RGB) with labels
    ``self._labels`` (``int64 [N]``): reading is an index, nothing to decode."""

    images: np.ndarray
    _labels: np.ndarray

    def __len__(self) -> int:
        return len(self._labels)

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        return self.images[i], int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels


@register_source("array")
class ArraySource(InMemorySource):
    """In-memory ``uint8 [N, H, W, 3]`` images and ``int [N]`` labels (tests, generated data)."""

    config_keys = ("images", "labels", "name")

    def __init__(self, images: np.ndarray, labels=None, *, name: str = "array"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"array source '{name}': images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        if len(images) == 0:
            raise DataError(f"array source '{name}' is empty")
        self.images = images
        self._labels = (np.full(len(images), -1, np.int64) if labels is None
                        else np.asarray(labels, dtype=np.int64))
        if self._labels.shape != (len(images),):
            raise DataError(f"array source '{name}': {len(images)} images but labels of shape {self._labels.shape}")
        self.name = name
