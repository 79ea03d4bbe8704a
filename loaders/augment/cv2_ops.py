"""OpenCV per-image colour/blur kernels of the worker-augment path (:mod:`loaders.cpu_augment`).

Float kernels (``_brightness`` .. ``_blur``) take and return one float32 HWC RGB image
``[H, W, 3]`` with values in ``[0, 255]`` (the engine's ``[0, 1]`` scaled by 255). uint8
kernels (``_hue_u8``, ``_affine_chain_u8``, ``_transform_u8``) take and return uint8 HWC RGB
``[H, W, 3]``, rounded and saturated where an op is applied. ``_blur_taps`` turns the engine's
per-sample sigmas ``float [B]`` into float32 1-D taps; ``normalize_uint8`` maps uint8
``[B, 3, H, W]`` to normalised float32 ``[B, 3, H, W]``. Every ``cv2`` argument is the imported
OpenCV module (optional dependency: the caller imports it).

With numba installed (the ``ffcv`` extra) two entry points run compiled kernels instead:
``_affine_chain_u8`` the fused float32 colour chain (:mod:`.fused_colour`: the engine's result
rounded once, exact hue), ``_colour_view_u8`` flip + chain + planar (uint8 or normalised float32)
store in that one pass, and ``normalize_uint8`` one vectorised pass (:mod:`.fused_normalize`).
At 224 px (profile: ``python -m benchmarks.profile_worker``) the colour chain takes ~1.9x less
CPU time and the normalisation ~1.6x less; at 32 px ~3x and ~3x. ``_USE_FUSED[0] = False``
(or the environment variable ``LOADERS_NO_NUMBA=1``) selects the OpenCV kernels (tests, A/B).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from . import functional as AF

__all__ = ["normalize_uint8", "TAIL_SIGMAS", "TAIL_SIGMAS_U8"]

#: blur taps beyond ceil(TAIL_SIGMAS * sigma) are dropped (their weight sums to < 1e-4)
TAIL_SIGMAS = 4.0
#: precision="uint8" cuts at 3 sigma and renormalises (the tail weighs 0.27%: under half a level
#: of 255 on the sharpest edge, below the op's own rounding; ~20% less blur time at 224 px)
TAIL_SIGMAS_U8 = 3.0


def _cv2_available() -> bool:
    return importlib.util.find_spec("cv2") is not None


def _cv2():
    import cv2  # optional: only the cv2 kernels need it
    return cv2


# ------------------------------------------------------------------------ OpenCV ops (one image)
# Every op takes and returns a float32 HWC RGB image with values in [0, 255] (the engine's [0, 1]
# scaled by 255: no 1/255 pass; the scale is folded into the final normalisation).

def _clamp(cv2, x: np.ndarray) -> np.ndarray:
    # two threshold passes (~15 us each at 224 px) beat np.clip and cv2.min/max
    cv2.threshold(x, 255.0, 0.0, cv2.THRESH_TRUNC, dst=x)
    cv2.threshold(x, 0.0, 0.0, cv2.THRESH_TOZERO, dst=x)
    return x


_LUMA = np.asarray(AF._LUMA, dtype=np.float32)
_GRAY_M = np.tile(_LUMA, (3, 1))                       # 3x3: every output channel = luma


def _brightness(cv2, x, f: float):
    # f >= 0: only the upper clamp can bind
    return cv2.threshold(cv2.addWeighted(x, f, x, 0.0, 0.0), 255.0, 0.0, cv2.THRESH_TRUNC)[1]


def _contrast(cv2, x, f: float):
    m = cv2.mean(x)                                     # per-channel means (float64)
    mean = float(_LUMA[0] * m[0] + _LUMA[1] * m[1] + _LUMA[2] * m[2])  # mean luma (linear)
    return _clamp(cv2, cv2.addWeighted(x, f, x, 0.0, (1.0 - f) * mean))


def _saturation(cv2, x, f: float):
    # f * x + (1 - f) * gray(x) is one colour matrix: f * I + (1 - f) * luma rows
    m = (np.eye(3, dtype=np.float32) * f + _GRAY_M * (1.0 - f)).astype(np.float32)
    return _clamp(cv2, cv2.transform(x, m))


def _hue(cv2, x, shift: float):
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)            # H in degrees [0, 360), S in [0, 1], V as x
    # OpenCV's float HSV2RGB wraps hues >= 360 (not negative ones): shift by (shift mod 1) turns
    hsv = cv2.add(hsv, ((shift % 1.0) * 360.0, 0.0, 0.0, 0.0))
    # no clamp: HSV2RGB of S in [0, 1] gives values in [0, V] (the engine's clamp is a no-op here)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _grayscale(cv2, x):
    return cv2.transform(x, _GRAY_M)


def _blur(cv2, x, taps: np.ndarray):
    return cv2.sepFilter2D(x, -1, taps, taps, borderType=cv2.BORDER_REFLECT_101)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


# ------------------------------------------------------------------------ OpenCV ops on uint8
# precision="uint8": the image stays uint8 HWC RGB between ops, rounded and saturated where an
# op is applied (as torchvision's PIL path rounds after every PIL op): brightness, contrast,
# saturation and grayscale compose into one saturating 3x4 cv2.transform per run
# (_affine_chain_u8_cv2), hue is OpenCV's uint8 HSV_FULL round trip, blur a uint8 sepFilter2D.
# A quarter of the float path's memory traffic and no conversion pass: ~1.7x its rate per view.
# (_affine_chain_u8 runs the fused numba chain instead when numba is installed.)

def _hue_u8(cv2, x, shift: float):
    # OpenCV's uint8 HSV_FULL: H in 1/256 turns, so the shift is rounded to 1/256 turn (1.4 deg)
    k = int(round((shift % 1.0) * 256.0)) % 256
    if k == 0:
        return x          # a zero shift (after rounding) is the identity, as in the engine
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    # (h + k) mod 256 on the H bytes: one contiguous uint8 add (numpy wraps) of the row pattern
    # (k, 0, 0, k, 0, 0, ...): ~2x faster than a strided add on hsv[..., 0]
    rows = hsv.reshape(hsv.shape[0], -1)
    np.add(rows, _hue_pattern(hsv.shape[1], k), out=rows)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


@functools.lru_cache(maxsize=64)
def _hue_pattern(width: int, k: int) -> np.ndarray:
    p = np.zeros((width, 3), np.uint8)
    p[:, 0] = k
    p.flags.writeable = False
    return p.reshape(-1)


_I3 = np.eye(3)
_GRAY_M64 = _GRAY_M.astype(np.float64)
_LUMA64 = _LUMA.astype(np.float64)


def _transform_u8(cv2, x, A: np.ndarray, c: np.ndarray):
    """``A x + c`` per pixel (3x3 ``A``, 3-vector ``c``), rounded and saturated to uint8."""
    return cv2.transform(x, np.hstack([A, c[:, None]]).astype(np.float32))


def _fused_chain():
    """:func:`loaders.augment.fused_colour.colour_chain_u8` when numba is installed, else None
    (tests set ``_USE_FUSED[0] = False`` to run the OpenCV chain and normalisation)."""
    return _fused_import() if _USE_FUSED[0] else None


#: [False]: the OpenCV kernels even with numba installed (env ``LOADERS_NO_NUMBA=1``: A/B runs)
_USE_FUSED = [os.environ.get("LOADERS_NO_NUMBA", "") in ("", "0")]
#: [False]: the fused chain alone, flip and split by OpenCV (A/B of the one-pass view: profile_worker)
_USE_FUSED_VIEW = [True]


@functools.lru_cache(maxsize=1)
def _numba_available() -> bool:
    """numba is installed and imports (a broken install falls back to the OpenCV kernels)."""
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        import numba  # noqa: F401  (optional: the fast/ffcv extras)
    except Exception:  # numba raises ImportError or its own errors on a numpy it does not support
        return False
    return True


@functools.lru_cache(maxsize=1)
def _fused_import():
    if not _numba_available():
        return None
    from .fused_colour import colour_chain_u8
    return colour_chain_u8


def _affine_chain_u8(cv2, x, ops):
    """Brightness, contrast, saturation, hue and grayscale in the given order on uint8 ``x``;
    ``ops``: ``(k, f)`` pairs with ``k`` 0..3 the jitter op (factor ``f``) or 4 for grayscale.

    With numba installed: the fused float32 chain of :mod:`.fused_colour` (the engine's result
    rounded once: within 0.5 level of 255 of it, exact hue; ~2x faster at 224 px); otherwise
    the OpenCV chain :func:`_affine_chain_u8_cv2`.
    """
    fused = _fused_chain()
    return fused(x, ops) if fused is not None else _affine_chain_u8_cv2(cv2, x, ops)


def _fused_view():
    """:func:`loaders.augment.fused_colour.colour_view_u8` when the numba kernels are on, else None."""
    if not (_USE_FUSED[0] and _USE_FUSED_VIEW[0] and _fused_import() is not None):
        return None
    return _fused_view_import()


@functools.lru_cache(maxsize=1)
def _fused_view_import():
    from .fused_colour import colour_view_u8
    return colour_view_u8


def _colour_view_u8(cv2, x, ops, flip: bool, planes=None, norm=None):
    """Flip, then the colour chain ``ops`` (:func:`_affine_chain_u8`) of uint8 HWC ``x``; into
    ``planes`` (``uint8 [3, H, W]``, or ``float32`` normalised by ``norm`` = scale[3] + offset[3])
    when given, else returned as uint8 HWC. With numba one pass (flip in the load, the planar
    store in the rounding); without it ``cv2.flip``, the OpenCV chain and a split."""
    fused = _fused_view()
    # no colour op and uint8 out: cv2.flip + cv2.split move bytes without the float tile (~1.3x faster)
    if fused is not None and (ops or (planes is not None and planes.dtype != np.uint8)):
        return fused(x, ops, flip, planes=planes, norm=norm)
    if flip:
        x = cv2.flip(x, 1)
    if ops:
        x = _affine_chain_u8(cv2, x, ops)
    if planes is None:
        return x
    if planes.dtype == np.uint8:
        cv2.split(x, [planes[0], planes[1], planes[2]])
    else:
        m = np.zeros((3, 4), np.float32)
        m[[0, 1, 2], [0, 1, 2]], m[:, 3] = norm[:3], norm[3:]
        cv2.split(cv2.transform(x.astype(np.float32), m), [planes[0], planes[1], planes[2]])
    return planes


def _blur_is_identity(taps: np.ndarray) -> bool:
    """A uint8 blur with these (normalised) taps returns its input: the 2-D kernel's off-centre
    weight ``1 - w0^2`` times the largest difference (255) stays under half a level, so every
    rounded output is the centre pixel (sigma below ~0.27 px)."""
    c = float(taps[len(taps) // 2])
    return 255.0 * (1.0 - c * c) < 0.49


def _affine_chain_u8_cv2(cv2, x, ops):
    """:func:`_affine_chain_u8` with OpenCV: rounds per applied run, hue in 8-bit HSV.

    Brightness, contrast, saturation and grayscale are affine colour maps ``x -> A x + b``:
    consecutive ones compose into one 3x4 matrix and run as one saturating ``cv2.transform``. A
    pending map is applied (rounded, saturated) before hue, and right after any op with a factor
    > 1 (the only ones whose clamp to [0, 255] can bind: with f <= 1 each map is a convex
    combination of in-range values), so the clamps fall exactly where the engine's do. Contrast
    needs the mean luma of the current image: that of the last applied image pushed through the
    pending map (exact while no clamp intervened). Fewer roundings than one transform per op.
    """
    A, c = None, None                 # pending map (float64 3x3, 3), None = identity
    mean = None                       # per-channel mean of the last applied x (lazily)
    for k, f in ops:
        if k == 3:
            if A is not None:
                x, A, c, mean = _transform_u8(cv2, x, A, c), None, None, None
            x2 = _hue_u8(cv2, x, f)
            if x2 is not x:
                x, mean = x2, None
            continue
        if k == 0:
            Ak, ck = f * _I3, np.zeros(3)
        elif k == 1:
            if mean is None:
                mean = np.asarray(cv2.mean(x)[:3], np.float64)
            cur = mean if A is None else A @ mean + c
            Ak, ck = f * _I3, np.full(3, (1.0 - f) * float(_LUMA64 @ cur))
        elif k == 2:
            Ak, ck = f * _I3 + (1.0 - f) * _GRAY_M64, np.zeros(3)
        else:
            Ak, ck = _GRAY_M64, np.zeros(3)
        A, c = (Ak, ck) if A is None else (Ak @ A, Ak @ c + ck)
        if k != 4 and f > 1.0:        # the clamp may bind: apply now (transform saturates)
            x, A, c, mean = _transform_u8(cv2, x, A, c), None, None, None
    return x if A is None else _transform_u8(cv2, x, A, c)


def _blur_taps(sigma: torch.Tensor, kernel_size: int, tail: float = TAIL_SIGMAS,
               renormalize: bool = False) -> List[np.ndarray]:
    """The engine's Gaussian taps per sample cut to ``ceil(tail * sigma)`` each side: the blur op's
    one rule (:func:`loaders.augment.ops.blur.taps`) with this executor's default cut."""
    from .ops import blur as blur_op
    return blur_op.taps(sigma, kernel_size, tail, renormalize)


def normalize_uint8(img: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``uint8 [B,3,H,W]`` (0..255) -> ``float32`` ``(img / 255 - mean) / std`` in one fused pass
    (into ``out`` if given).

    Contiguous CPU input: with numba installed one vectorised pass
    (:mod:`.fused_normalize`, ~1.8x the OpenCV path at 224 px); else, with OpenCV, one
    ``cv2.addWeighted`` per channel over the ``[B, H*W]`` strided plane stack (reads uint8,
    writes float32 once: ~2x torch's convert-then-``addcmul`` here); otherwise torch.
    """
    B, C = img.shape[:2]
    if out is None:
        out = torch.empty(img.shape, dtype=torch.float32, device=img.device)
    fast = (img.device.type == "cpu" and img.dtype == torch.uint8 and img.dim() == 4 and C == len(mean)
            and out.dtype == torch.float32 and img.is_contiguous() and out.is_contiguous() and img.numel() > 0)
    if fast and _USE_FUSED[0] and _numba_available():
        from .fused_normalize import normalize_into
        normalize_into(img.numpy(), out.numpy(), [1.0 / (255.0 * s) for s in std],
                       [-m / s for m, s in zip(mean, std)])
        return out
    if fast and _cv2_available():
        cv2 = _cv2()
        src = img.numpy().reshape(B, C, -1)
        dst = out.numpy().reshape(B, C, -1)
        for c in range(C):
            # [B, H*W] planes with row stride C*H*W: cv2 writes into dst in place
            cv2.addWeighted(src[:, c], 1.0 / (255.0 * std[c]), src[:, c], 0.0, -mean[c] / std[c], dst=dst[:, c],
                            dtype=cv2.CV_32F)
        return out
    from .functional import normalize_constants
    offset, scale = normalize_constants(mean, std, img.device, from_uint8=True)
    out.copy_(img)
    return torch.addcmul(offset, out, scale, out=out)
