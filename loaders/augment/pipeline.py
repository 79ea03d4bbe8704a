"""The augmentation engine: ``Augment(views, mean=..., std=...)`` and YAML presets.

One :class:`ViewSpec` per output view says what that view does, in torchvision's order:
random-resized-crop -> horizontal flip -> RandomApply(ColorJitter) -> RandomGrayscale ->
RandomApply(GaussianBlur) -> RandomSolarize -> RandAugment -> normalize.

Each op is defined once in :mod:`loaders.augment.ops` (its parameters, their sampling, its torch
executor). ``aug(batch, key=k)`` draws every parameter of the batch once with the sampler
(:func:`loaders.augment.sampler.draw`: one CPU generator per (seed, key, view, op)), moves them to
the batch's device and applies the ops' torch executors: the same seed and key give identical
views (also after a restart, without saving RNG state), every sample and every view gets its own
parameters, nothing depends on the number of data workers, and the OpenCV worker executor
(:mod:`loaders.cpu_augment`) and the DALI graph apply the very same draw. ``key`` defaults to
``batch.key`` (the backend's :func:`~loaders.augment.sampler.batch_key`); ``step=`` is accepted
as the key for older callers.

Presets are YAML files in ``configs/augment/{name}.yaml`` (a preset is data: write a new YAML
to add one)::

    mean: [0.4914, 0.4822, 0.4465]
    std: [0.2470, 0.2435, 0.2616]
    defaults: {size: 32, scale: [0.08, 1.0], jitter_p: 0.8, brightness: 0.8, ...}
    views:                      # each entry: ViewSpec keys overriding `defaults`, plus `count`
      - {count: 2}

``Augment.from_preset(name, **overrides)`` accepts any ViewSpec key (applied to every view),
``mean``/``std``/``seed``, and two ablation shortcuts of the AdaInf paper (Wang et al. 2024):
``crop_min_scale=s`` (scale = (s, max)) and ``jitter_strength=s``
(brightness, contrast, saturation, hue = s * (0.8, 0.8, 0.8, 0.2)).

Sizes keep a multi-crop preset's proportions: ``size=S`` scales every view by ``S / (the first
view's preset size)`` (``round(view_size * S / first_size)`` rounded half up, at least 1 px), so
DINO's 224 + 96 px at ``size=112`` becomes 112 + 48 px and a one-size preset is simply ``S``.
``global_size=G`` / ``local_size=L`` set the views whose preset size is the largest one
(global) / all the others (local) instead; they exclude ``size``. A view's blur kernel follows
its new size unless the preset fixes ``blur_kernel``.

The preset folder is :func:`loaders.config_files.config_root` ``/ "augment"``: the repository's
``configs/augment/`` in a checkout, the package data ``loaders/configs/augment/`` when installed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..batch import Batch
from ..config_files import config_root
from ..crop import CropSpec
from ..errors import ConfigError, check_keys
from . import ops as O
from . import sampler as S
from .randaugment import RandAugmentSpec
from .sampler import ViewParams

__all__ = ["ViewSpec", "Augment", "PRESET_DIR", "list_presets", "load_preset_config", "load_grid",
           "JITTER_BASE"]

#: the preset folder: configs/augment/ of the checkout, or of the installed package data
PRESET_DIR = config_root() / "augment"
#: the colour-jitter vector that ``jitter_strength`` scales (SimCLR's colour strength s = 1)
JITTER_BASE = (0.8, 0.8, 0.8, 0.2)
_INTERP = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class ViewSpec:
    """What one output view does. Probabilities are in [0, 1]; sizes in pixels.

    ``size``/``scale``/``ratio``/``interpolation``/``antialias``: random-resized-crop to
    ``size x size`` (torchvision's ``RandomResizedCrop``); ``flip``: horizontal-flip
    probability; ``jitter_p`` and ``brightness``/``contrast``/``saturation``/``hue``:
    ``RandomApply([ColorJitter(b, c, s, h)], p=jitter_p)``; ``grayscale``: RandomGrayscale
    probability; ``blur_p``/``blur_sigma``/``blur_kernel``: ``RandomApply([GaussianBlur(k,
    sigma)])`` with ``k = blur_kernel`` or, when None, :func:`~loaders.augment.functional.
    blur_kernel_size` of ``size`` (23 at 224 px, 5 at 32 px); ``solarize``: RandomSolarize(128)
    probability; ``randaugment``: :class:`RandAugmentSpec` or None; ``count``: how many views
    of this kind (multi-crop).
    """

    size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    antialias: bool = True
    flip: float = 0.5
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale: float = 0.0
    blur_p: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel: Optional[int] = None
    solarize: float = 0.0
    randaugment: Optional[RandAugmentSpec] = None
    count: int = 1

    def __post_init__(self):
        for name in ("flip", "jitter_p", "grayscale", "blur_p", "solarize"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"view key '{name}' is a probability in [0, 1], got {v}")
        if self.interpolation not in _INTERP:
            raise ConfigError(f"view key 'interpolation' must be one of {_INTERP}, got {self.interpolation!r}")
        if self.size <= 0 or self.count < 1:
            raise ConfigError(f"view size must be > 0 and count >= 1, got size={self.size} count={self.count}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"view key 'scale' must satisfy 0 < min <= max, got {self.scale}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"view key 'blur_sigma' must satisfy 0 < min <= max, got {self.blur_sigma}")
        if self.blur_kernel is not None and (self.blur_kernel < 1 or self.blur_kernel % 2 == 0):
            raise ConfigError(f"view key 'blur_kernel' must be odd and positive, got {self.blur_kernel}")
        O.jitter.ranges(self.brightness, self.contrast, self.saturation, self.hue)  # validates

    @property
    def crop_spec(self) -> CropSpec:
        return CropSpec(size=self.size, scale=tuple(self.scale), ratio=tuple(self.ratio),
                        interpolation=self.interpolation)

    def crop_spec_for(self, seed: int) -> CropSpec:
        """:attr:`crop_spec` carrying the augmentation ``seed`` its boxes are drawn with."""
        return dataclasses.replace(self.crop_spec, seed=int(seed))

    @property
    def kernel_size(self) -> int:
        return O.blur.kernel_size(self.size, self.blur_kernel)

    @classmethod
    def keys(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, cfg: Mapping, where: str = "view") -> "ViewSpec":
        check_keys(cfg, cls.keys(), where)
        kw = dict(cfg)
        for k in ("scale", "ratio", "blur_sigma"):
            if k in kw:
                kw[k] = tuple(float(x) for x in kw[k])
        ra = kw.get("randaugment")
        if ra is not None and not isinstance(ra, RandAugmentSpec):
            kw["randaugment"] = RandAugmentSpec.from_config(ra, f"{where}.randaugment")
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: {e}") from e


def list_presets() -> List[str]:
    """Names of the YAML presets in ``configs/augment/`` (grid files excluded)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("grid"))


def load_preset_config(name: str) -> Dict[str, Any]:
    """The mapping stored in ``configs/augment/{name}.yaml``."""
    import yaml
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        check_keys({name: None}, list_presets(), f"augmentation presets ({PRESET_DIR})")
        raise ConfigError(f"augmentation preset file {path} does not exist")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    return cfg


def load_grid(name: str) -> Dict[str, Any]:
    """An ablation grid from ``configs/augment/grids.yaml``: ``{"preset": ..., "override": key,
    "values": [...]}``; build each point with ``Augment.from_preset(preset, **{key: value})``."""
    grids = load_preset_config("grids")
    if name not in grids:
        check_keys({name: None}, grids, f"{PRESET_DIR / 'grids.yaml'}")
    return grids[name]


_TOP_KEYS = ("mean", "std", "seed", "defaults", "views", "description", "reference")


class Augment:
    """Batched per-sample augmentation of uint8 ``Batch`` views on their device.

    ``views``: one :class:`ViewSpec` per kind of output view (``count`` expands it);
    ``mean``/``std``: per-channel normalisation on the ``[0, 1]`` scale; ``seed``: base seed.
    """

    def __init__(self, views: Sequence[ViewSpec], *, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0):
        if not views:
            raise ConfigError("Augment needs at least one view")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean/std must have 3 values and std > 0, got mean={mean} std={std}")
        self.specs: List[ViewSpec] = [v for v in views for _ in range(v.count)]
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = int(seed)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: Mapping, *, where: str = "augment") -> "Augment":
        """Build from a mapping with keys ``mean``, ``std``, ``seed``, ``defaults``, ``views``."""
        check_keys(cfg, _TOP_KEYS, where)
        for k in ("mean", "std"):
            if k not in cfg:
                raise ConfigError(f"{where}: missing key '{k}'")
        defaults = dict(cfg.get("defaults") or {})
        check_keys({k: v for k, v in defaults.items()}, ViewSpec.keys(), f"{where}.defaults")
        entries = cfg.get("views") or [{}]
        views = []
        for i, entry in enumerate(entries):
            merged = {**defaults, **(entry or {})}
            views.append(ViewSpec.from_config(merged, f"{where}.views[{i}]"))
        return cls(views, mean=cfg["mean"], std=cfg["std"], seed=int(cfg.get("seed", 0)))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Augment":
        """Load ``configs/augment/{name}.yaml`` and apply ``overrides`` (see module docstring)."""
        cfg = load_preset_config(name)
        return cls.from_config(apply_overrides(cfg, overrides, where=f"preset '{name}' overrides"),
                               where=f"{PRESET_DIR / (name + '.yaml')}")

    # ------------------------------------------------------------------ properties

    @property
    def num_views(self) -> int:
        return len(self.specs)

    @property
    def crop_specs(self) -> List[CropSpec]:
        """One :class:`~loaders.crop.CropSpec` per output view, for backends that crop while decoding."""
        return [s.crop_spec_for(self.seed) for s in self.specs]

    def __repr__(self) -> str:
        return f"Augment(num_views={self.num_views}, sizes={[s.size for s in self.specs]}, seed={self.seed})"

    # ------------------------------------------------------------------ the engine

    def view(self, img: torch.Tensor, spec: ViewSpec, params: ViewParams,
             strength: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Augment one view: ``img`` ``uint8 [B,3,H,W]`` -> ``float32 [B,3,size,size]`` normalised,
        with the drawn ``params`` (:class:`~loaders.augment.sampler.ViewParams`; ``box`` None: the
        input is already cropped; ``strength``: ``float32 [B]`` for RandAugment views). Runs each
        active op's torch executor in :data:`loaders.augment.ops.ORDER`."""
        params = params.to(img.device)
        x = O.crop.apply(img, params, spec)
        for op in O.ORDER[1:-1]:
            if op.active(spec):
                x = op.apply(x, params, spec, strength=strength)
        return O.normalize.apply(x, params, spec, mean=self.mean, std=self.std)

    def draw(self, n: int, *, key: int, sizes=None, ops=None) -> List[ViewParams]:
        """:func:`loaders.augment.sampler.draw` for this engine."""
        return S.draw(self, n, key=key, sizes=sizes, ops=ops)

    def __call__(self, batch: Batch, *, key: Optional[int] = None, step: Optional[int] = None,
                 strength: Optional[torch.Tensor] = None, crop: bool = True,
                 params: Optional[Sequence[ViewParams]] = None) -> Batch:
        """Augment ``batch`` (uint8 views) with the parameters of batch key ``key``.

        ``key``: default ``batch.key``; ``step=`` is the same thing under its old name.
        Input views: 1 -> every output view is derived from it; ``num_views`` -> one to one.
        ``strength``: ``float [B]`` in [0, 1] for RandAugment views (BCL), None otherwise.
        ``crop=False``: the input views are already cropped (crop-in-decode; one per output view).
        ``params``: parameters drawn already (one per view; e.g. the boxes a worker used).
        Returns a Batch with ``num_views`` ``float32`` normalised views on the batch's device,
        ``stage="augmented"``. A batch whose ``stage`` says it is augmented is refused.
        """
        stage = getattr(batch, "stage", "raw")
        if stage.startswith("augmented"):
            raise ValueError(f"Augment got a batch with stage={stage!r}: it was augmented already "
                             f"(in the loader workers or the DALI graph); do not augment it twice")
        key = _pick_key(key, step, batch)
        n_in = len(batch.views)
        if crop:
            if n_in not in (1, self.num_views):
                raise ValueError(f"Augment with {self.num_views} views got a batch with {n_in} views "
                                 f"(expected 1 or {self.num_views})")
        elif n_in != self.num_views:
            raise ValueError(f"Augment(crop=False) needs one pre-cropped input view per output view: "
                             f"{self.num_views} expected, got {n_in}")
        B = len(batch)
        if strength is not None:
            strength = torch.as_tensor(strength, dtype=torch.float32).reshape(-1)
            if strength.shape[0] != B:
                raise ValueError(f"strength has {strength.shape[0]} values for a batch of {B}")
        if params is None:
            sizes = None
            if crop:
                H, W = batch.views[0].shape[-2:]
                sizes = torch.tensor([[H, W]], dtype=torch.int64).expand(B, 2)
            params = self.draw(B, key=key, sizes=sizes)
        out = [self.view(batch.views[v if n_in > 1 else 0], spec, params[v], strength)
               for v, spec in enumerate(self.specs)]
        res = batch.with_views(out)
        if hasattr(res, "stage"):
            res = dataclasses.replace(res, stage="augmented", key=key)
        return res


def _pick_key(key, step, batch) -> int:
    """The batch key: ``key``, else ``step`` (its old name), else ``batch.key``."""
    if key is not None and step is not None and int(key) != int(step):
        raise ValueError(f"Augment got key={key} and step={step}; give one of them")
    k = key if key is not None else step if step is not None else getattr(batch, "key", None)
    if k is None:
        raise ValueError("Augment needs the batch key: aug(batch, key=...) or a Batch with .key set "
                         "(loaders.augment.sampler.batch_key)")
    return int(k)


def apply_overrides(cfg: Mapping, overrides: Mapping, *, where: str = "overrides") -> Dict[str, Any]:
    """A copy of preset ``cfg`` with ``overrides`` applied (see the module docstring)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    allowed = ("mean", "std", "seed", "crop_min_scale", "jitter_strength", "global_size", "local_size",
               *ViewSpec.keys())
    check_keys(overrides, allowed, where)
    ov = dict(overrides)
    sizes = {k: ov.pop(k) for k in _SIZE_KEYS if k in ov}
    view_ov: Dict[str, Any] = {}
    for k in ("mean", "std", "seed"):
        if k in ov:
            cfg[k] = ov.pop(k)
    if "crop_min_scale" in ov:
        s = float(ov.pop("crop_min_scale"))
        view_ov["_crop_min_scale"] = s
    if "jitter_strength" in ov:
        s = float(ov.pop("jitter_strength"))
        for key, base in zip(("brightness", "contrast", "saturation", "hue"), JITTER_BASE):
            view_ov[key] = s * base
    view_ov.update(ov)
    if not view_ov and not sizes:
        return cfg
    defaults = dict(cfg.get("defaults") or {})
    views = [dict(v or {}) for v in (cfg.get("views") or [{}])]

    def patch(d: Dict[str, Any]) -> None:
        for k, v in view_ov.items():
            if k == "_crop_min_scale":
                hi = (d.get("scale") or defaults.get("scale") or (0.08, 1.0))[1]
                d["scale"] = [v, hi]
            else:
                d[k] = v

    patch(defaults)
    for v in views:
        # a view only needs patching where it overrides the defaults itself
        if any(k in v for k in view_ov) or ("_crop_min_scale" in view_ov and "scale" in v):
            patch(v)
    if sizes:
        _resize_views(defaults, views, sizes, where)
    cfg["defaults"], cfg["views"] = defaults, views
    return cfg


_SIZE_KEYS = ("size", "global_size", "local_size")


def _resize_views(defaults: Dict[str, Any], views: List[Dict[str, Any]], sizes: Mapping[str, Any],
                  where: str) -> None:
    """Give every view entry an explicit size from ``size`` (scaled by the first view) or from
    ``global_size`` / ``local_size`` (views at the preset's largest size / the others)."""
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: '{k}' must be a positive number of pixels, got {v!r}")
    if "size" in sizes and len(sizes) > 1:
        raise ConfigError(f"{where}: give either 'size' or 'global_size'/'local_size', not both")
    default = defaults.get("size", ViewSpec.size)
    preset = [int(v.get("size", default)) for v in views]
    largest = max(preset)
    if "size" in sizes:
        new = [max(1, math.floor(p * sizes["size"] / preset[0] + 0.5)) for p in preset]
    else:
        if "local_size" in sizes and min(preset) == largest:
            raise ConfigError(f"{where}: 'local_size' needs local views smaller than the global ones, "
                              f"but every view is {largest} px (use 'size' or 'global_size')")
        new = [sizes.get("global_size" if p == largest else "local_size", p) for p in preset]
    for v, n in zip(views, new):
        v["size"] = n
