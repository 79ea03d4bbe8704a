"""The DALI executor of the augmentation ops: one view's recipe as DALI graph nodes.

It applies parameters drawn by :func:`loaders.augment.sampler.draw` (never DALI's RNG), so the
graph, the device engine and the OpenCV workers apply the same draw. The loader
(:mod:`loaders.dali_backend`) feeds, per view, the arrays of :func:`view_args` through
``fn.external_source`` and calls :func:`augment_view` on the view's uint8 crop.

Semantics: those of the engine (:mod:`loaders.augment.ops`, torchvision's), op by op, on float32
values in ``[0, 1]`` (the uint8 crop / 255; nothing is rounded between ops):

* **flip** at the end, in ``crop_mirror_normalize``: every op here commutes with a horizontal
  flip (point-wise ops, an image-wide mean, a symmetric blur kernel with symmetric borders);
* **colour jitter** in each sample's own random order: for each of the 4 positions the graph
  computes the candidates and keeps, per sample, the op ``jitter_order[i, pos]`` (0/1 weights
  computed on the host, so the selection is exact). Brightness ``clamp(x f)``, contrast
  ``clamp(f x + (1 - f) mean(luma(x)))`` (the per-image mean of the grayscale image,
  ``fn.reductions.mean``), saturation ``clamp(f x + (1 - f) luma(x))`` are one fused blend
  ``clamp(A x + Bc mean + Bs luma)`` per position; hue is torchvision's HSV rotation written
  in DALI arithmetic (not ``fn.hue``/``fn.hsv``, which rotate hue in YIQ space). Cost: the hue
  rotation and the luma run at all 4 positions, ~4x the work of one jitter pass (accepted:
  exactness of the per-sample order);
* **grayscale** luma ``(0.2989, 0.587, 0.114)``; **blur** ``fn.gaussian_blur`` with per-sample
  sigma and the kernel size of :func:`loaders.augment.ops.blur.kernel_size` (reflect-101 borders:
  torch's ``reflect``); **solarize** ``x >= 128/255 -> 1 - x``; **normalize** ``(x - mean) / std``.

Samples whose coin is off pass through bit-for-bit (``a * w + b * (1 - w)`` with ``w`` in {0, 1}).
Ops the graph lacks (:data:`GRAPH_OPS`; today RandAugment) are reported by :func:`lacking_ops`:
the loader then hands such views to the device engine as uint8 crops.

Shapes: the graph works on HWC per sample: uint8 ``[S, S, 3]`` in, float32 ``[3, S, S]`` out.
``nvidia.dali`` is imported inside the functions only.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

__all__ = ["GRAPH_OPS", "ARG_NAMES", "lacking_ops", "arg_names", "view_args", "augment_view", "LUMA"]

#: ops the graph executes (names of :mod:`loaders.augment.ops` modules)
GRAPH_OPS = ("crop", "flip", "jitter", "grayscale", "blur", "solarize", "normalize")
#: every per-sample array :func:`view_args` can return, in this order (:func:`arg_names`: a view's)
ARG_NAMES = ("coef", "hue", "gray", "blur", "sigma", "solarize", "flip")
#: torchvision's rgb_to_grayscale weights (the engine's)
LUMA = (0.2989, 0.587, 0.114)
_SOLARIZE_AT = np.float32(128.0 / 255.0)


def lacking_ops(spec) -> List[str]:
    """Names of the ops view ``spec`` uses that the graph cannot run (empty: all in the graph)."""
    from .augment import ops as O
    return [op.NAME for op in O.ORDER if op.NAME not in GRAPH_OPS and op.active(spec)]


def arg_names(spec) -> Tuple[str, ...]:
    """The :data:`ARG_NAMES` view ``spec``'s graph reads (the ops it does not use get none)."""
    used = {"coef": spec.jitter_p > 0, "hue": spec.jitter_p > 0 and spec.hue != 0, "gray": spec.grayscale > 0,
            "blur": spec.blur_p > 0, "sigma": spec.blur_p > 0, "solarize": spec.solarize > 0, "flip": True}
    return tuple(k for k in ARG_NAMES if used[k])


def view_args(p: Dict[str, np.ndarray], spec) -> List[np.ndarray]:
    """Per-sample graph inputs of one view from its drawn parameters ``p``
    (``ViewParams.numpy()``), those of :func:`arg_names` in its order.

    ``coef`` float32 ``[n, 4, 4]``: per jitter position ``(A, Bc, Bs, H)`` = the factor that
    multiplies ``x`` (the brightness/contrast/saturation factor of the op at that position, else
    1), the weights of the image mean (contrast: ``1 - f``) and of the luma (saturation:
    ``1 - f``), and 1 where the hue rotation runs there. Ops of strength 0 and samples whose
    jitter coin is off get the identity (as the engine skips them). ``hue`` float32 ``[n]``
    (turns); ``gray``/``blur``/``solarize`` float32 0/1 ``[n]``; ``sigma`` float32 ``[n]``;
    ``flip`` int32 ``[n]``.
    """
    n = len(p["flip"])
    f32 = np.float32
    coef = np.zeros((n, 4, 4), f32)
    coef[:, :, 0] = 1.0
    strengths = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
    if spec.jitter_p > 0:
        order = p["jitter_order"]
        fac = p["jitter_factors"].astype(f32)
        on = p["jitter_apply"].astype(bool)
        for pos in range(4):
            which = order[:, pos]
            for k in range(4):
                sel = on & (which == k) & (strengths[k] != 0)
                if k < 3:
                    coef[sel, pos, 0] = fac[sel, k]
                if k in (1, 2):
                    coef[sel, pos, k] = f32(1.0) - fac[sel, k]
                if k == 3:
                    coef[sel, pos, 3] = 1.0
        hue = fac[:, 3].copy()
    else:
        hue = np.zeros(n, f32)

    every = {"coef": coef, "hue": hue, "gray": p["gray"].astype(f32), "blur": p["blur"].astype(f32),
             "sigma": p["sigma"].astype(f32), "solarize": p["solarize"].astype(f32), "flip": p["flip"].astype(np.int32)}
    return [every[k] for k in arg_names(spec)]


# ------------------------------------------------------------------------------------------------
# graph pieces (DALI DataNodes in, DataNodes out; x: float32 HWC in [0, 1])
# ------------------------------------------------------------------------------------------------

def _select(w, a, b):
    """``a`` where the per-sample 0/1 weight ``w`` is 1, else ``b`` (exact)."""
    return a * w + b * (1.0 - w)


def _planes(x):
    return x[:, :, 0], x[:, :, 1], x[:, :, 2]


def _luma(r, g, b):
    """HW luma plane."""
    return r * LUMA[0] + g * LUMA[1] + b * LUMA[2]


def _hue_hsv(x, shift):
    """torchvision's ``adjust_hue`` (HSV rotation by ``shift`` turns) in DALI arithmetic."""
    from nvidia.dali import fn
    from nvidia.dali import math as dmath
    r, g, b = _planes(x)
    maxc = dmath.max(dmath.max(r, g), b)
    minc = dmath.min(dmath.min(r, g), b)
    chroma = maxc - minc
    has = chroma > 0.0
    safe = _select(has, chroma, 1.0)
    is_r = maxc == r
    is_g = (maxc == g) * (1.0 - is_r)   # r wins ties, then g (torchvision's case order)
    h = _select(is_r, (g - b) / safe, _select(is_g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = _mod6(h + shift * 6.0)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = _mod6(h + n)
        ramp = dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)
        out.append(dmath.clamp(maxc - chroma * ramp, 0.0, 1.0))
    return fn.stack(*out, axis=2)


def _mod6(v):
    """``v mod 6`` in ``[0, 6)`` (torch.remainder's sign convention)."""
    from nvidia.dali import math as dmath
    return v - dmath.floor(v * (1.0 / 6.0)) * 6.0


def _jitter(x, coef, hue, spec):
    """Four positions; at each, every sample runs its own op (or none) of ColorJitter."""
    from nvidia.dali import fn
    from nvidia.dali import math as dmath
    use_c, use_s, use_h = spec.contrast != 0, spec.saturation != 0, spec.hue != 0
    for pos in range(4):
        lin = x * coef[pos, 0]
        if use_c or use_s:
            luma = fn.expand_dims(_luma(*_planes(x)), axes=[2])
            if use_c:
                lin = lin + fn.reductions.mean(luma) * coef[pos, 1]
            if use_s:
                lin = lin + luma * coef[pos, 2]
        lin = dmath.clamp(lin, 0.0, 1.0)
        x = _select(coef[pos, 3], _hue_hsv(x, hue), lin) if use_h else lin
    return x


def augment_view(v, args: dict, spec, mean, std, *, on_gpu: bool = False):
    """The recipe of view ``spec`` on its uint8 HWC crop ``v`` (a DataNode) with the per-sample
    inputs ``args`` (:func:`arg_names` -> DataNode, on the CPU); returns float32 CHW normalised."""
    from nvidia.dali import fn, types

    from .augment.ops import blur as blur_op
    cpu, moved = args, {}

    def dev(name):  # arithmetic operands live where the image does
        if name not in moved:
            moved[name] = cpu[name].gpu() if on_gpu else cpu[name]
        return moved[name]

    x = fn.cast(v, dtype=types.FLOAT) * (1.0 / 255.0)
    if spec.jitter_p > 0:
        x = _jitter(x, dev("coef"), dev("hue") if spec.hue != 0 else None, spec)
    if spec.grayscale > 0:
        luma = fn.expand_dims(_luma(*_planes(x)), axes=[2])
        x = _select(dev("gray"), fn.cat(luma, luma, luma, axis=2), x)
    if spec.blur_p > 0:
        k = blur_op.kernel_size(spec.size, spec.blur_kernel)
        blurred = fn.gaussian_blur(x, sigma=cpu["sigma"], window_size=k, dtype=types.FLOAT)
        x = _select(dev("blur"), blurred, x)
    if spec.solarize > 0:
        hit = (x >= float(_SOLARIZE_AT)) * dev("solarize")
        x = _select(hit, 1.0 - x, x)
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mirror=cpu["flip"],
                                    mean=[float(m) for m in mean], std=[float(s) for s in std])
