"""Build sources, mixture and backend from the ``data:`` section of a config.

.. code-block:: yaml

    data:
      sources:            # each: a source config (type + its keys) plus mixture keys
        - {name: real, type: synthetic, n: 5000, dup: 10}
        - {name: gen, type: synthetic, n: 20000, variant: generated, fraction: 1.0}
      budget: null        # images to see in total (all ranks); null = unlimited
      epoch_length: null  # weight mode only: samples per epoch (default: sum of unique counts)
      seed: 0
      backend: torch      # torch | dali | ffcv | resident
      batch_size: 256     # per rank
      num_workers: 2
      on_error: raise     # raise | skip (a failed sample is replaced by the plan's next one)
      max_skip_fraction: 0.01  # skip: more failed samples than this fraction of those read -> DataError
      read_timeout_s: 60  # a sample read that takes longer fails (raise) or is skipped; null/0 = none
      image_size: 32      # resize size when crops are not done while decoding
      crop_in_decode: true # ignored (false) with backend: resident
      pin_memory: false
      backend_options: {} # extra keyword arguments for the backend (e.g. prefetch_factor)

``backend_options`` keys are checked against the chosen backend's constructor: an unknown key is a
one-line ConfigError naming the closest valid one (the torch backend takes ``prefetch_factor``,
``drop_last``, ``worker_augment``, ``decoder``, ``flip``, ``shared_slots``, ``timeout``,
``reduced_decode`` (torch with ``decoder: cv2`` and ffcv; default true: large JPEGs decoded at 1/2,
1/4 or 1/8 scale when every view allows it, see :mod:`loaders.decode`), ``region_decode`` (torch;
default true: only the rows and columns the views cover are decoded), ...); a key
that has its own ``data.`` key (``batch_size``, ``seed``, ...) is refused with that key's name.
``max_skip_fraction``: with ``on_error: skip``, once a rank has read 100 samples
(:data:`loaders.plan_loader.MIN_READS_FOR_SKIP_CHECK`), more skipped samples than this fraction of
the samples it read stops the run with a DataError naming a few files (see
:mod:`loaders.plan_loader`).

Per source, the mixture keys ``name``, ``weight``, ``dup`` and ``fraction`` are taken off and
the rest goes to :func:`loaders.base.build_source`. Sources give either all ``dup`` (missing
ones count 1) or ``weight`` (missing ones count 1.0), never both.
"""
from __future__ import annotations

import importlib
import inspect
import numbers
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .base import SOURCE_MODULES, Source, build_source
from .crop import CropSpec
from .errors import ConfigError, DataError, check_keys, check_on_error
from .mixture import Mixture
from .plan_loader import DEFAULT_MAX_SKIP_FRACTION, DEFAULT_READ_TIMEOUT_S, check_read_timeout, check_skip_fraction

# SOURCE_MODULES (now in loaders.base) stays importable from here for older callers
__all__ = ["build_loader", "build_sources_and_mixture", "DATA_DEFAULTS", "BACKENDS", "DEVICE_BACKENDS",
           "SOURCE_MODULES"]

#: the ``data:`` keys and their defaults
DATA_DEFAULTS: Dict[str, object] = {
    "sources": None, "budget": None, "epoch_length": None, "seed": 0, "backend": "torch",
    "batch_size": 256, "num_workers": 2, "on_error": "raise", "image_size": 32,
    "crop_in_decode": True, "pin_memory": False, "backend_options": None,
    "read_timeout_s": DEFAULT_READ_TIMEOUT_S, "max_skip_fraction": DEFAULT_MAX_SKIP_FRACTION,
}
#: backend constructor arguments build_loader sets from ``data.`` keys (never backend_options)
_FROM_DATA_KEYS = {"sources": "sources", "mixture": "sources", "batch_size": "batch_size", "crops": "crop_in_decode",
                   "resize": "image_size", "rank": None, "world_size": None,
                   "num_workers": "num_workers", "seed": "seed", "on_error": "on_error", "pin_memory": "pin_memory",
                   "read_timeout_s": "read_timeout_s", "max_skip_fraction": "max_skip_fraction"}
MIXTURE_KEYS = ("name", "weight", "dup", "fraction")
#: backend name -> (module, class), imported only when chosen
BACKENDS: Dict[str, Tuple[str, str]] = {
    "torch": ("loaders.torch_backend", "TorchLoader"),
    "dali": ("loaders.dali_backend", "DaliLoader"),
    "ffcv": ("loaders.ffcv_backend", "FFCVLoader"),
    "resident": ("loaders.resident_backend", "ResidentLoader"),
}
#: backends that hold the data on the training device: they never crop while decoding and take
#: build_loader's ``device``
DEVICE_BACKENDS = ("resident",)


def _data_config(data_cfg: Mapping) -> Dict[str, object]:
    if not isinstance(data_cfg, Mapping):
        raise ConfigError(f"the data config must be a mapping, got {type(data_cfg).__name__}")
    check_keys(data_cfg, DATA_DEFAULTS, "data")
    cfg = {**DATA_DEFAULTS, **data_cfg}
    if not cfg["sources"] or not isinstance(cfg["sources"], Sequence) or isinstance(cfg["sources"], str):
        raise ConfigError("data.sources must be a non-empty list of source configs")
    return cfg


def build_sources_and_mixture(data_cfg: Mapping) -> Tuple[List[Source], Mixture]:
    """Sources (in config order) and their :class:`Mixture` from a ``data:`` mapping."""
    cfg = _data_config(data_cfg)
    sources, names, weights, dups, fractions = [], [], [], [], []
    for i, scfg in enumerate(cfg["sources"]):
        if not isinstance(scfg, Mapping):
            raise ConfigError(f"data.sources[{i}] must be a mapping, got {scfg!r}")
        scfg = dict(scfg)
        name = str(scfg.pop("name", f"{scfg.get('type', 'source')}{i}"))
        weights.append(scfg.pop("weight", None))
        dups.append(scfg.pop("dup", None))
        fractions.append(scfg.pop("fraction", None))
        where = f"data.sources[{i}] ('{name}')"
        try:
            src = build_source(scfg)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        except TypeError as e:  # a missing/wrong constructor argument
            raise ConfigError(f"{where}: {e}") from e
        src.name = name
        sources.append(src)
        names.append(name)
    has_w = [w is not None for w in weights]
    has_d = [d is not None for d in dups]
    if any(has_w) and any(has_d):
        raise ConfigError(f"data.sources mix 'weight' ({[n for n, h in zip(names, has_w) if h]}) and 'dup' "
                          f"({[n for n, h in zip(names, has_d) if h]}): use one mode for all sources")
    try:
        mixture = Mixture(
            [len(s) for s in sources],
            weights=[1.0 if w is None else w for w in weights] if any(has_w) else None,
            dups=[1 if d is None else d for d in dups] if any(has_d) else None,
            fractions=fractions, budget=cfg["budget"], epoch_length=cfg["epoch_length"],
            seed=cfg["seed"], names=names)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from e
    return sources, mixture


def build_loader(data_cfg: Mapping, *, crops: Optional[Sequence[CropSpec]] = None, rank: int = 0,
                 world_size: int = 1, device=None):
    """The backend loader for a ``data:`` mapping.

    ``crops`` (from ``Augment.crop_specs``) are done while decoding when ``crop_in_decode`` is
    true; otherwise the backend emits one view resized to ``image_size`` and the device crops.

    ``backend: resident`` (:mod:`loaders.resident_backend`) never gets crops (``crop_in_decode`` is
    ignored: it yields the full images, the engine crops them with ``crop=True``); ``image_size``
    is its resize for sources of mixed sizes. ``device`` (e.g. ``accelerator.device``) is where it
    holds the data; it goes to that backend only (the others ignore it) and may instead be given as
    ``backend_options: {device: cuda:0}`` (both given and different: a ConfigError). Default: CPU.
    """
    cfg = _checked(_data_config(data_cfg))
    backend = cfg["backend"]
    if backend not in BACKENDS:
        check_keys({backend: None}, BACKENDS, "data.backend values")
    options = cfg["backend_options"] or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"data.backend_options must be a mapping of keyword arguments, got {options!r}")
    options = dict(options)
    sources, mixture = build_sources_and_mixture(data_cfg)
    module, cls_name = BACKENDS[backend]
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as e:
        raise ConfigError(f"data.backend '{backend}' is unavailable: {e}") from e
    _check_options(cls, backend, options)
    use_crops = list(crops) if (crops and cfg["crop_in_decode"] and backend not in DEVICE_BACKENDS) else None
    if backend in DEVICE_BACKENDS and device is not None:
        given = options.get("device")
        if given is not None and _device_name(given) != _device_name(device):
            raise ConfigError(f"data.backend_options.device is {given!r} but the run trains on {device!r}: "
                              "remove data.backend_options.device")
        options["device"] = device
    try:
        return cls(sources, mixture, batch_size=cfg["batch_size"], crops=use_crops,
                   resize=None if use_crops else cfg["image_size"], rank=rank, world_size=world_size,
                   num_workers=cfg["num_workers"], seed=cfg["seed"], on_error=cfg["on_error"],
                   pin_memory=cfg["pin_memory"], read_timeout_s=cfg["read_timeout_s"],
                   max_skip_fraction=cfg["max_skip_fraction"], **options)
    except (ConfigError, DataError):
        raise
    except (TypeError, ValueError) as e:  # a bad option value: one line naming the backend
        raise ConfigError(f"data (backend '{backend}', backend_options {sorted(options)}): "
                          f"{' '.join(str(e).split())}") from e


def _checked(cfg: Dict[str, object]) -> Dict[str, object]:
    """The ``data:`` values every backend shares, checked (one-line ConfigErrors naming the key)."""
    check_on_error(cfg["on_error"], "data")
    for key in ("batch_size", "num_workers"):
        v = cfg[key]
        low = 1 if key == "batch_size" else 0
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            what = "a positive integer (samples per rank)" if key == "batch_size" else "an integer >= 0"
            raise ConfigError(f"data.{key} must be {what}, got {v!r}")
    cfg["read_timeout_s"] = check_read_timeout(cfg["read_timeout_s"])
    cfg["max_skip_fraction"] = check_skip_fraction(cfg["max_skip_fraction"])
    return cfg


def _check_options(cls, backend: str, options: Mapping) -> None:
    """``backend_options`` keys against the backend constructor's keyword arguments."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if n != "self" and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in options:
        if key in _FROM_DATA_KEYS and key in accepted:
            by = f"data.{_FROM_DATA_KEYS[key]}" if _FROM_DATA_KEYS[key] else "the launcher (torchrun/accelerate)"
            raise ConfigError(f"data.backend_options.{key}: set by {by}, not by backend_options")
    check_keys(options, [n for n in accepted if n not in _FROM_DATA_KEYS],
               f"data.backend_options (backend '{backend}')")


def _device_name(device) -> str:
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        return str(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)
