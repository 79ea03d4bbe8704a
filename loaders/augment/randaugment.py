"""Batched RandAugment with per-sample number of firing ops, magnitude and probability.

The op pool and value ranges are BCL's (REFERENCE.md §3; its ``augment_list``): an op's value
is ``m / 30 * (max - min) + min``; geometric ops take a random sign, as there.

=============  ==============  =====================================================
op             (min, max)      value means
=============  ==============  =====================================================
shear_x/y      (0, 0.6)        shear factor (input x = x + v*y), about the top-left corner
translate_x/y  (0, 0.66)       fraction of the image width/height
rotate         (0, 60)         degrees, counter-clockwise about the centre
autocontrast   -               per-channel stretch to [0, 255]
invert         -               255 - x
equalize       -               per-channel histogram equalisation
solarize       (0, 110)        threshold on the uint8 scale (x >= v is inverted)
posterize      (4, 8)          bits kept (int(v), >= 1)
contrast       (0.1, 1.9)      blend factor with the mean luma
color          (0.1, 1.9)      blend factor with the per-pixel luma (saturation)
brightness     (0.1, 1.9)      blend factor with black
sharpness      (0.1, 1.9)      blend factor with the SMOOTH-filtered image
cutout         (0, 0.4)        square side as a fraction of the width, grey (125,123,114)
=============  ==============  =====================================================

Geometric ops use nearest sampling and black fill (PIL's defaults in the original code).

Per sample ``i`` and slot ``j < k_i``: op ~ U(pool), it fires with probability ``p_i``
and uses magnitude ``m_i``. With a BCL strength ``w_i`` in ``[0, 1]``: ``p_i = w_i`` and
``m_i = min_m + (max_m - min_m) * w_i`` (``num_ops = 1``, min 10) or
``m_i = min_m + (max_m - min_m) * w_i * U(0, 1)`` (``num_ops = 2``, min 5,
``scale_by_uniform``). Without a strength, a fixed ``magnitude`` and ``p`` are used.
``k_i`` is ``num_ops``, or drawn per sample from ``U{lo, ..., hi}`` when ``num_ops = [lo, hi]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from ..errors import ConfigError, check_keys
from . import functional as AF

__all__ = ["OPS", "DEFAULT_RANGES", "RandAugmentSpec", "RandAugmentParams", "RandAugmentDraw", "draw_randaugment",
           "finish_randaugment", "sample_randaugment", "apply_randaugment"]

#: op names, in pool order (an op id is an index into this tuple)
OPS: Tuple[str, ...] = (
    "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "autocontrast", "invert",
    "equalize", "solarize", "posterize", "contrast", "color", "brightness", "sharpness", "cutout",
)
#: BCL's value ranges (data/randaug.py ``augment_list``); ops without a value use (0, 1)
DEFAULT_RANGES: Dict[str, Tuple[float, float]] = {
    "shear_x": (0.0, 0.6), "shear_y": (0.0, 0.6), "translate_x": (0.0, 0.66),
    "translate_y": (0.0, 0.66), "rotate": (0.0, 60.0), "autocontrast": (0.0, 1.0),
    "invert": (0.0, 1.0), "equalize": (0.0, 1.0), "solarize": (0.0, 110.0), "posterize": (4.0, 8.0),
    "contrast": (0.1, 1.9), "color": (0.1, 1.9), "brightness": (0.1, 1.9), "sharpness": (0.1, 1.9),
    "cutout": (0.0, 0.4),
}
_SIGNED = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
_CUTOUT_FILL = (125 / 255, 123 / 255, 114 / 255)


@dataclass(frozen=True)
class RandAugmentSpec:
    """RandAugment settings of one view (see the module docstring)."""

    #: ops per sample: an int, or ``[lo, hi]`` for a per-sample count k_i ~ U{lo, ..., hi}
    num_ops: Union[int, Tuple[int, int]] = 1
    #: fixed magnitude in [0, max_magnitude] used when no strength is given; None = off then
    magnitude: Optional[float] = None
    #: per-op firing probability when no strength is given
    p: float = 1.0
    min_magnitude: float = 10.0
    max_magnitude: float = 30.0
    #: BCL-D (k = 2): m = min + (max - min) * w * U(0, 1)
    scale_by_uniform: bool = False
    ops: Tuple[str, ...] = OPS
    ranges: Mapping[str, Tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_RANGES))

    KEYS = ("num_ops", "magnitude", "p", "min_magnitude", "max_magnitude", "scale_by_uniform",
            "ops", "ranges")

    @property
    def ops_range(self) -> Tuple[int, int]:
        """(fewest, most) ops per sample."""
        k = self.num_ops
        return (int(k), int(k)) if isinstance(k, int) else (int(k[0]), int(k[1]))

    @classmethod
    def from_config(cls, cfg: Mapping, where: str = "randaugment") -> "RandAugmentSpec":
        check_keys(cfg, cls.KEYS, where)
        kw = dict(cfg)
        if isinstance(kw.get("num_ops"), (list, tuple)):
            kw["num_ops"] = tuple(int(x) for x in kw["num_ops"])
        if "ops" in kw:
            kw["ops"] = tuple(kw["ops"])
            check_keys({o: None for o in kw["ops"]}, OPS, f"{where}.ops")
        if "ranges" in kw:
            check_keys(kw["ranges"], OPS, f"{where}.ranges")
            ranges = dict(DEFAULT_RANGES)
            ranges.update({k: tuple(float(x) for x in v) for k, v in kw["ranges"].items()})
            kw["ranges"] = ranges
        spec = cls(**kw)
        lo, hi = spec.ops_range
        if not 1 <= lo <= hi:
            raise ConfigError(f"{where}.num_ops must be >= 1 (or [lo, hi] with 1 <= lo <= hi), got {spec.num_ops}")
        if not 0.0 <= spec.p <= 1.0:
            raise ConfigError(f"{where}.p must be in [0, 1], got {spec.p}")
        return spec


@dataclass
class RandAugmentParams:
    """Per-sample parameters: ``op`` ``int64 [B, k]`` (index into ``spec.ops``), ``fire``
    ``bool [B, k]``, ``value`` ``float32 [B, k]`` (signed op value), ``centre`` ``float32
    [B, k, 2]`` (cutout centre as a fraction of (height, width))."""

    op: torch.Tensor
    fire: torch.Tensor
    value: torch.Tensor
    centre: torch.Tensor


@dataclass
class RandAugmentDraw:
    """The strength-independent uniforms of RandAugment for ``n`` samples (drawn on the CPU by the
    sampler; :func:`finish_randaugment` turns them into :class:`RandAugmentParams` on the device of
    the per-sample strength, so a strength on the GPU needs no host sync): ``op`` ``int64 [n, k]``,
    ``u_fire`` ``float32 [n, k]``, ``u_mag`` ``float32 [n]``, ``sign`` ``float32 [n, k]`` (+-1),
    ``centre`` ``float32 [n, k, 2]``, ``k_i`` ``int64 [n, 1]`` (ops per sample) or None."""

    op: torch.Tensor
    u_fire: torch.Tensor
    u_mag: torch.Tensor
    sign: torch.Tensor
    centre: torch.Tensor
    k_i: Optional[torch.Tensor] = None


def draw_randaugment(n: int, spec: RandAugmentSpec, g: torch.Generator) -> RandAugmentDraw:
    """The uniforms of :func:`sample_randaugment`, in its order, on ``g``'s device."""
    dev = g.device
    lo, k = spec.ops_range
    op = torch.randint(0, len(spec.ops), (n, k), generator=g, device=dev)
    u_fire = torch.rand(n, k, generator=g, device=dev)
    u_mag = torch.rand(n, generator=g, device=dev)
    sign = torch.where(torch.rand(n, k, generator=g, device=dev) < 0.5, -1.0, 1.0)
    centre = torch.rand(n, k, 2, generator=g, device=dev)
    k_i = torch.randint(lo, k + 1, (n, 1), generator=g, device=dev) if lo < k else None
    return RandAugmentDraw(op=op, u_fire=u_fire, u_mag=u_mag, sign=sign, centre=centre, k_i=k_i)


def finish_randaugment(d: RandAugmentDraw, spec: RandAugmentSpec, *, strength: Optional[torch.Tensor]
                       ) -> Optional[RandAugmentParams]:
    """Per-sample parameters from the draw ``d`` and ``strength`` ``float32 [n]`` in [0, 1] (on the
    strength's device; ``d`` is moved there); None when nothing can fire (no strength and no fixed
    magnitude)."""
    if strength is None and spec.magnitude is None:
        return None
    dev = strength.device if strength is not None else d.op.device
    if d.op.device != dev:
        d = RandAugmentDraw(**{f: (None if getattr(d, f) is None else getattr(d, f).to(dev, non_blocking=True))
                               for f in ("op", "u_fire", "u_mag", "sign", "centre", "k_i")})
    n, k = d.op.shape
    if strength is not None:
        w = strength.to(dtype=torch.float32).reshape(n).clamp(0.0, 1.0)
        span = spec.max_magnitude - spec.min_magnitude
        m = spec.min_magnitude + span * w * (d.u_mag if spec.scale_by_uniform else 1.0)
        prob = w.unsqueeze(1)
    else:
        m = torch.full((n,), float(spec.magnitude), device=dev)
        prob = torch.full((n, 1), float(spec.p), device=dev)
    fire = d.u_fire < prob
    if d.k_i is not None:   # per-sample number of ops: slots j >= k_i never fire
        fire = fire & (torch.arange(k, device=dev).unsqueeze(0) < d.k_i)
    lo = torch.tensor([spec.ranges[o][0] for o in spec.ops], device=dev)
    hi = torch.tensor([spec.ranges[o][1] for o in spec.ops], device=dev)
    value = m.unsqueeze(1) / 30.0 * (hi[d.op] - lo[d.op]) + lo[d.op]
    signed = torch.tensor([o in _SIGNED for o in spec.ops], device=dev)[d.op]
    value = torch.where(signed, value * d.sign, value)
    return RandAugmentParams(op=d.op, fire=fire, value=value, centre=d.centre)


def sample_randaugment(n: int, spec: RandAugmentSpec, *, strength: Optional[torch.Tensor],
                       g: torch.Generator) -> Optional[RandAugmentParams]:
    """Draw RandAugment parameters for ``n`` samples; None when nothing can fire (no strength and
    no fixed magnitude)."""
    if strength is None and spec.magnitude is None:
        return None
    if strength is not None:
        strength = strength.to(g.device)
    return finish_randaugment(draw_randaugment(n, spec, g), spec, strength=strength)


def _inverse_affine(name: str, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Inverse maps ``[n, 2, 3]`` (output -> input pixel coordinates) of a geometric op."""
    n = v.shape[0]
    A = torch.zeros(n, 2, 3, device=v.device)
    A[:, 0, 0] = 1.0
    A[:, 1, 1] = 1.0
    if name == "shear_x":          # PIL (1, v, 0, 0, 1, 0): about the top-left corner
        A[:, 0, 1] = v
    elif name == "shear_y":
        A[:, 1, 0] = v
    elif name == "translate_x":    # PIL (1, 0, v*W, 0, 1, 0)
        A[:, 0, 2] = v * W
    elif name == "translate_y":
        A[:, 1, 2] = v * H
    elif name == "rotate":         # counter-clockwise by v degrees about the centre (PIL rotate)
        a = torch.deg2rad(v)
        c, s = torch.cos(a), torch.sin(a)
        cx, cy = W * 0.5, H * 0.5
        A[:, 0, 0], A[:, 0, 1] = c, -s
        A[:, 1, 0], A[:, 1, 1] = s, c
        A[:, 0, 2] = cx - c * cx + s * cy
        A[:, 1, 2] = cy - s * cx - c * cy
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(name)
    return A


def apply_op(img: torch.Tensor, name: str, value: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Apply pool op ``name`` to every sample of ``img`` (``float [n,3,H,W]`` in [0, 1]) with
    per-sample ``value`` ``[n]`` (see the module table) and cutout ``centre`` ``[n, 2]``."""
    n, _, H, W = img.shape
    if name in _SIGNED:
        return AF.affine(img, _inverse_affine(name, value, H, W), fill=0.0)
    if name == "autocontrast":
        return AF.autocontrast(img)
    if name == "invert":
        return AF.invert(img)
    if name == "equalize":
        return AF.equalize(img)
    if name == "solarize":
        return AF.solarize(img, value / 255.0)
    if name == "posterize":
        return AF.posterize(img, torch.floor(value).clamp(min=1.0))
    if name == "contrast":
        return AF.adjust_contrast(img, value)
    if name == "color":
        return AF.adjust_saturation(img, value)
    if name == "brightness":
        return AF.adjust_brightness(img, value)
    if name == "sharpness":
        return AF.adjust_sharpness(img, value)
    if name == "cutout":
        side = value * W
        y0 = torch.floor((centre[:, 0] * H - side / 2).clamp(min=0))
        x0 = torch.floor((centre[:, 1] * W - side / 2).clamp(min=0))
        y1 = torch.minimum(torch.full_like(y0, H), y0 + side).floor()
        x1 = torch.minimum(torch.full_like(x0, W), x0 + side).floor()
        boxes = torch.stack([y0, x0, y1, x1], dim=1)
        out = AF.cutout(img, boxes, _CUTOUT_FILL)
        return torch.where((side > 0).reshape(-1, 1, 1, 1), out, img)
    raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(OPS)}")


def apply_randaugment(img: torch.Tensor, spec: RandAugmentSpec,
                      params: Optional[RandAugmentParams]) -> torch.Tensor:
    """Apply the sampled ops slot by slot; samples whose op does not fire are untouched."""
    if params is None:
        return img
    for j in range(params.op.shape[1]):
        op, fire = params.op[:, j], params.fire[:, j]
        for o, name in enumerate(spec.ops):
            mask = fire & (op == o)
            img = AF.masked_apply(
                img, mask, lambda x, v, c, _name=name: apply_op(x, _name, v, c),
                params.value[:, j], params.centre[:, j], inplace=True)
    return img
