"""The full augmentation recipe inside the loader's workers, for CPU-only machines.

On a machine without a GPU the batched engine (:class:`loaders.augment.Augment`) runs in the
main process on the cores the workers leave, and becomes the bottleneck of the full recipe.
:class:`WorkerAugment` is the torch backend's ``worker_augment`` hook instead: a picklable
``f(views, seed_key) -> views`` that each DataLoader worker runs on its own uint8 crops, so
every core decodes *and* augments and the main process only receives finished views.

Parameters are the engine's, exactly: view ``v`` of the batch with key ``seed_key`` (the
backend's ``(seed, rank, first_item)``) draws from
``make_generator("cpu", augment.seed, step_for(seed_key), v)`` in the engine's order, so
``WorkerAugment(aug)(views, key)`` equals ``aug(batch, step=step_for(key), crop=False)`` up to
float32 rounding (tests/test_cpu_augment.py), is deterministic from the key, and does not
depend on the number of workers.

Two implementations of the same ops (``impl``):

* ``"cv2"`` -- per image with OpenCV on float32 HWC planes in ``[0, 255]``: OpenCV's kernels
  are SIMD, release the GIL and need no per-batch index/gather/scatter; brightness/contrast
  are one ``addWeighted`` each, saturation and grayscale one 3x3 ``cv2.transform`` with
  torchvision's luma weights, hue OpenCV's float HSV round trip (the same formulas and
  tie-breaks as torchvision's), blur a ``sepFilter2D`` with the engine's Gaussian taps cut to
  ``ceil(4 sigma)`` (the dropped tail weighs < 1e-4), normalisation one 3x4 ``cv2.transform``
  split straight into the ``[B, 3, S, S]`` output planes. Fastest at 224 px.
* ``"torch"`` -- the batched engine itself (``Augment.view``), one thread (in the workers it
  measured about half the cv2 path's rate even at 32 px).

``"auto"`` (default) picks cv2 for views of at least :data:`CV2_MIN_SIZE` px when OpenCV is
installed, torch otherwise; views with ops the cv2 path does not implement (solarize,
RandAugment, a resize) always use the engine.

``precision`` of the cv2 path: ``"float"`` (default; the engine's result up to float32 rounding)
or ``"uint8"``: the image stays uint8 between ops, rounded where an op is applied, as
torchvision's PIL pipeline (solo-learn's CPU path) rounds after every op; affine colour ops are
fused into one saturating ``cv2.transform`` per run, hue uses OpenCV's 8-bit HSV (H in 1/256
turn, like PIL's). Same parameters; against the engine the views differ by 0.4-0.5 levels of 255
on average (p99 ~3.5, worst pixels ~10 where a hue shift meets a saturated colour), and the
rate per view is ~1.4x the float path's at 224 px (~1.6x at 32 px) on the 2-core machine.

With the torch backend's shared-memory slab ring (:mod:`loaders.shm`) the hook writes its
output straight into a reused shared slot (``alloc``), and :meth:`WorkerAugment.finish`
normalises ``uint8`` output into recycled buffers: no fresh pages on either side.

Use::

    hook = WorkerAugment.from_preset("imagenet_simclr", output="uint8", precision="uint8")
    loader = TorchLoader(sources, mixture, batch_size=64, crops=hook.crop_specs,
                         worker_augment=hook, decoder="cv2")     # no flip=True: the hook flips
    for batch in loader:
        batch = hook.finish(batch)          # uint8 -> normalised float32 views (main process)
"""
from __future__ import annotations

import functools
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .augment import Augment, ViewSpec
from .augment import functional as AF
from .augment import params as P
from .errors import ConfigError

__all__ = ["WorkerAugment", "CV2_MIN_SIZE", "step_for", "cv2_view", "normalize_uint8"]

#: smallest view side (px) for which ``impl="auto"`` uses OpenCV per image. Measured in the torch
#: loader's workers (2-core CPU machine, 2 workers, full SimCLR recipe): OpenCV 8.8k vs engine
#: 4.3k samples/s at 32 px, ~4x the engine per image at 224 px; so every size
CV2_MIN_SIZE = 1
_IMPLS = ("auto", "cv2", "torch")
_OUTPUTS = ("float", "uint8")
_PRECISIONS = ("float", "uint8")
#: blur taps beyond ceil(TAIL_SIGMAS * sigma) are dropped (their weight sums to < 1e-4)
TAIL_SIGMAS = 4.0
#: precision="uint8" cuts at 3 sigma and renormalises (the tail weighs 0.27%: under half a level
#: of 255 on the sharpest edge, below the op's own rounding; ~20% less blur time at 224 px)
TAIL_SIGMAS_U8 = 3.0


def step_for(seed_key: Sequence[int]) -> int:
    """The engine step a worker batch with ``seed_key`` (``(seed, rank, first_item)``) uses."""
    return P.mix_seed(*[int(k) for k in seed_key])


def _cv2():
    import cv2  # optional: only the cv2 implementation needs it
    return cv2


def _cv2_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("cv2") is not None


def _supported_by_cv2(spec: ViewSpec) -> bool:
    return spec.solarize == 0 and spec.randaugment is None


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
# (_affine_chain_u8), hue is OpenCV's uint8 HSV_FULL round trip, blur a uint8 sepFilter2D.
# A quarter of the float path's memory traffic and no conversion pass: ~1.7x its rate per view.

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


def _affine_chain_u8(cv2, x, ops):
    """Brightness, contrast, saturation, hue and grayscale in the given order on uint8 ``x``;
    ``ops``: ``(k, f)`` pairs with ``k`` 0..3 the jitter op (factor ``f``) or 4 for grayscale.

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
    """The engine's normalised Gaussian taps (``gaussian_kernel1d``) per sample, cut to the
    central ``2 * min(half, ceil(tail * sigma)) + 1`` (speed: ~2.5x fewer taps on average for a
    23-tap kernel; at the default 4 sigma the dropped taps weigh < 1e-4 of the sum), rescaled to
    sum to 1 with ``renormalize``."""
    k = AF.gaussian_kernel1d(sigma, kernel_size).numpy()
    half = kernel_size // 2
    out = []
    for row, s in zip(k, sigma.tolist()):
        r = min(half, int(math.ceil(tail * s)))
        t = row[half - r:half + r + 1].astype(np.float64)
        out.append(np.ascontiguousarray(t / t.sum() if renormalize else t, dtype=np.float32))
    return out


def cv2_view(img: torch.Tensor, spec: ViewSpec, *, g: torch.Generator, mean: Sequence[float],
             std: Sequence[float], out: Optional[torch.Tensor] = None, normalize: bool = True,
             precision: str = "float") -> torch.Tensor:
    """One view of the recipe with OpenCV, per image: ``img`` ``uint8 [B,3,S,S]`` (already
    cropped to ``spec.size``) -> ``float32 [B,3,S,S]`` normalised (written into ``out`` if
    given). Parameters are drawn from ``g`` exactly as :meth:`Augment.view` (``crop=False``)
    draws them, so with ``precision="float"`` the result equals the engine's up to float32
    rounding.

    ``normalize=False``: the augmented image rounded once to ``uint8 [B,3,S,S]`` instead
    (0..255, not normalised; :func:`normalize_uint8` finishes it).

    ``precision="uint8"``: every op works on uint8 and rounds once (as torchvision's PIL ops
    do), hue shifts are rounded to 1/256 turn; the same parameters, ~1.7x faster per view. The
    difference from the engine is a few levels of 255 where ops chain (tests bound its mean and
    tail).
    """
    cv2 = _cv2()
    if precision not in _PRECISIONS:
        raise ValueError(f"cv2_view precision must be one of {_PRECISIONS}, got {precision!r}")
    u8 = precision == "uint8"
    B, C, H, W = img.shape
    if C != 3 or H != spec.size or W != spec.size:
        raise ValueError(f"cv2_view needs uint8 [B,3,{spec.size},{spec.size}] crops, got {tuple(img.shape)}")
    if not _supported_by_cv2(spec):
        raise ValueError("cv2_view does not implement solarize or RandAugment; use the engine (impl='torch')")
    # the engine's draws, in the engine's order (Augment.view, crop=False)
    flip = P.bernoulli(B, spec.flip, g).tolist()
    jit = P.sample_jitter(B, brightness=spec.brightness, contrast=spec.contrast, saturation=spec.saturation,
                          hue=spec.hue, p=spec.jitter_p, g=g)
    gray = P.bernoulli(B, spec.grayscale, g).tolist()
    blur = P.bernoulli(B, spec.blur_p, g).tolist()
    sigma = P.uniform(B, spec.blur_sigma[0], spec.blur_sigma[1], g)
    P.bernoulli(B, spec.solarize, g)                    # drawn by the engine too (keeps the stream aligned)
    strengths = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
    apply, order, factors = jit.apply.tolist(), jit.order.tolist(), jit.factors.tolist()
    taps = None
    if spec.blur_p > 0 and any(blur):
        taps = (_blur_taps(sigma, spec.kernel_size, TAIL_SIGMAS_U8, renormalize=True) if u8
                else _blur_taps(sigma, spec.kernel_size))
    # normalisation (x / 255 - mean) / std as one 3x4 affine colour matrix (one pass), then a
    # split straight into the output planes: ~1.5x faster than split + one addWeighted per plane
    norm = np.zeros((3, 4), np.float32)
    for c in range(3):
        norm[c, c] = 1.0 / (255.0 * std[c])
        norm[c, 3] = -mean[c] / std[c]
    if out is None:
        out = torch.empty(B, 3, H, W, dtype=torch.float32 if normalize else torch.uint8)
    dst = out.numpy()
    hwc = img.permute(0, 2, 3, 1)
    # channels-last input (the torch backend's decoder="cv2" views) is read in place; planar
    # input is merged per image (cv2.merge: ~50x faster than numpy's strided transpose copy)
    src = hwc.numpy() if hwc.is_contiguous() else img.contiguous().numpy()
    planar = not hwc.is_contiguous()
    for i in range(B):
        x = cv2.merge([src[i, 0], src[i, 1], src[i, 2]]) if planar else src[i]
        if not u8:
            x = x.astype(np.float32)
        if spec.flip > 0 and flip[i]:
            x = cv2.flip(x, 1)
        if u8:
            ops = [(k, factors[i][k]) for k in order[i] if strengths[k] != 0] if spec.jitter_p > 0 and apply[i] else []
            if spec.grayscale > 0 and gray[i]:
                ops.append((4, 1.0))
            if ops:
                x = _affine_chain_u8(cv2, x, ops)
        elif spec.jitter_p > 0 and apply[i]:
            for k in order[i]:
                if strengths[k] != 0:
                    x = _JITTER_OPS[k](cv2, x, factors[i][k])
        if not u8 and spec.grayscale > 0 and gray[i]:
            x = _grayscale(cv2, x)
        if taps is not None and blur[i]:
            x = _blur(cv2, x, taps[i])          # uint8 in -> uint8 out (rounded) when u8
        planes = [dst[i, 0], dst[i, 1], dst[i, 2]]
        if normalize:
            cv2.split(cv2.transform(x.astype(np.float32) if u8 else x, norm), planes)
        else:
            # float values are in [0, 255]: convertScaleAbs is round-and-saturate to uint8 here
            cv2.split(x if u8 else cv2.convertScaleAbs(x), planes)
    return out


def normalize_uint8(img: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``uint8 [B,3,H,W]`` (0..255) -> ``float32`` ``(img / 255 - mean) / std`` in one fused pass
    (into ``out`` if given).

    Contiguous CPU input with OpenCV installed: one ``cv2.addWeighted`` per channel over the
    ``[B, H*W]`` strided plane stack (reads uint8, writes float32 once: ~2x torch's
    convert-then-``addcmul`` here); otherwise torch.
    """
    B, C = img.shape[:2]
    if out is None:
        out = torch.empty(img.shape, dtype=torch.float32, device=img.device)
    if (img.device.type == "cpu" and img.dtype == torch.uint8 and img.dim() == 4 and C == len(mean)
            and img.is_contiguous() and out.is_contiguous() and img.numel() > 0 and _cv2_available()):
        cv2 = _cv2()
        src = img.numpy().reshape(B, C, -1)
        dst = out.numpy().reshape(B, C, -1)
        for c in range(C):
            # [B, H*W] planes with row stride C*H*W: cv2 writes into dst in place
            cv2.addWeighted(src[:, c], 1.0 / (255.0 * std[c]), src[:, c], 0.0, -mean[c] / std[c], dst=dst[:, c],
                            dtype=cv2.CV_32F)
        return out
    kw = dict(dtype=torch.float32, device=img.device)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], **kw).reshape(1, 3, 1, 1)
    offset = torch.tensor([-m / s for m, s in zip(mean, std)], **kw).reshape(1, 3, 1, 1)
    out.copy_(img)
    return torch.addcmul(offset, out, scale, out=out)


# ------------------------------------------------------------------------ the worker hook

class WorkerAugment:
    """The ``worker_augment`` hook of the torch backend: the rest of ``augment``'s recipe on
    the worker's uint8 crops.

    ``augment``: the engine whose recipe (views, parameters, mean/std, seed) is applied;
    ``impl``: ``"auto" | "cv2" | "torch"`` (module docstring); ``threads``: OpenCV/torch
    threads in the calling process (1: one worker per core, no nested threads);
    ``share_memory``: allocate the outputs in shared memory when running inside a
    DataLoader worker, so sending them to the main process copies nothing (a 64 x 2 x 224 px
    float batch is 77 MB); ``output``: ``"float"`` (normalised ``float32``, the engine's
    output) or ``"uint8"`` (the augmented image rounded once to 0..255; the consumer calls
    :meth:`finish`); ``precision``: ``"float"`` or ``"uint8"`` for the cv2 path (module
    docstring). Speed: on the 2-core CPU machine moving float32 224 px views from the workers
    to the main process in fresh shared segments alone capped the loader at ~680 samples/s,
    uint8 at ~3500 samples/s; ``uint8`` keeps the workers' output 4x smaller.

    ``hook(views, seed_key)``: ``views`` -- one ``uint8 [B,3,S,S]`` crop per output view
    (crop-in-decode with ``augment.crop_specs``); returns ``float32 [B,3,S,S]`` normalised views
    (``output="uint8"``: ``uint8 [B,3,S,S]``, which ``finish`` normalises).
    """

    def __init__(self, augment: Augment, *, impl: str = "auto", threads: int = 1, share_memory: bool = True,
                 output: str = "float", precision: str = "float"):
        if not isinstance(augment, Augment):
            raise ConfigError(f"WorkerAugment needs an Augment, got {type(augment).__name__}")
        if impl not in _IMPLS:
            raise ConfigError(f"WorkerAugment impl must be one of {_IMPLS}, got {impl!r}")
        if impl == "cv2" and not _cv2_available():
            raise ConfigError("WorkerAugment(impl='cv2') needs OpenCV: pip install opencv-python-headless")
        if output not in _OUTPUTS:
            raise ConfigError(f"WorkerAugment output must be one of {_OUTPUTS}, got {output!r}")
        if precision not in _PRECISIONS:
            raise ConfigError(f"WorkerAugment precision must be one of {_PRECISIONS}, got {precision!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"WorkerAugment threads must be an integer >= 1, got {threads!r}")
        self.augment = augment
        self.impl = impl
        self.threads = threads
        self.share_memory = bool(share_memory)
        self.output = output
        self.precision = precision
        self._pool = None   # BufferPool of finish() (main process)
        self._pid: Optional[int] = None     # process whose thread counts were set

    @classmethod
    def from_preset(cls, name: str, *, impl: str = "auto", threads: int = 1, share_memory: bool = True,
                    output: str = "float", precision: str = "float", **overrides) -> "WorkerAugment":
        """``WorkerAugment(Augment.from_preset(name, **overrides), ...)``."""
        return cls(Augment.from_preset(name, **overrides), impl=impl, threads=threads, share_memory=share_memory,
                   output=output, precision=precision)

    #: the hook takes ``alloc=`` (the torch backend then passes a shared-memory slot writer)
    accepts_alloc = True

    @property
    def output_itemsize(self) -> int:
        """Bytes per value of the views the hook returns (1 for ``output="uint8"``, else 4)."""
        return 1 if self.output == "uint8" else 4

    def finish(self, batch):
        """The consumer's side: a :class:`~loaders.batch.Batch` (or list of views) from the hook
        -> normalised ``float32`` views (``output="uint8"``: one fused normalise per view;
        ``"float"``: returned as is).

        The float views come from a :class:`~loaders.shm.BufferPool` of this process: memory of
        earlier batches is reused once nothing references them any more (a batch that is kept
        stays valid), so a steady loop writes into pages that are already mapped."""
        views = batch.views if hasattr(batch, "views") else list(batch)
        if all(v.dtype == torch.float32 for v in views):
            return batch
        if self._pool is None:
            from .shm import BufferPool
            self._pool = BufferPool()
        out = [normalize_uint8(v, self.augment.mean, self.augment.std,
                               out=self._pool.empty(v.shape) if v.device.type == "cpu" else None)
               if v.dtype == torch.uint8 else v for v in views]
        return batch.with_views(out) if hasattr(batch, "with_views") else out

    @property
    def crop_specs(self):
        """The crops the loader must make while decoding (one per output view)."""
        return self.augment.crop_specs

    def impl_for(self, spec: ViewSpec) -> str:
        """``"cv2"`` or ``"torch"``: what runs view ``spec``."""
        if not _supported_by_cv2(spec) or self.impl == "torch":
            return "torch"
        if self.impl == "cv2":
            return "cv2"
        return "cv2" if spec.size >= CV2_MIN_SIZE and _cv2_available() else "torch"

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_pid"] = None  # a worker sets its own thread counts
        d["_pool"] = None
        return d

    def _setup_process(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if _cv2_available():
            _cv2().setNumThreads(self.threads)

    def __call__(self, views: Sequence[torch.Tensor], seed_key: Tuple[int, ...], alloc=None) -> List[torch.Tensor]:
        """``alloc``: optional ``alloc(shape, dtype) -> tensor`` for the cv2 path's outputs (the
        torch backend passes a :class:`~loaders.shm.SlabWriter`); default: fresh tensors, in
        shared memory inside a DataLoader worker."""
        aug = self.augment
        if len(views) != aug.num_views:
            raise ValueError(f"WorkerAugment with {aug.num_views} views got {len(views)} crops: build the loader "
                             f"with crops=worker_augment.crop_specs")
        self._setup_process()
        step = step_for(seed_key)
        in_worker = self.share_memory and torch.utils.data.get_worker_info() is not None
        out = []
        for v, (img, spec) in enumerate(zip(views, aug.specs)):
            if img.dtype != torch.uint8 or img.dim() != 4:
                raise ValueError(f"WorkerAugment view {v}: expected uint8 [B,3,H,W] crops, got {img.dtype} "
                                 f"{tuple(img.shape)}")
            g = P.make_generator("cpu", aug.seed, step, v)
            B, C, H, W = img.shape
            as_u8 = self.output == "uint8"
            if self.impl_for(spec) == "cv2" and H == spec.size and W == spec.size:
                dtype = torch.uint8 if as_u8 else torch.float32
                if alloc is not None:
                    dst = alloc((B, C, H, W), dtype)
                else:
                    dst = torch.empty(B, C, H, W, dtype=dtype)
                    if in_worker:
                        dst.share_memory_()  # filled in place; the worker -> main transfer then copies nothing
                out.append(cv2_view(img, spec, g=g, mean=aug.mean, std=aug.std, out=dst, normalize=not as_u8,
                                    precision=self.precision))
            else:
                x = aug.view(img, spec, g=g, crop=False)
                if as_u8:  # undo the normalisation, round once
                    m = torch.tensor(aug.mean).reshape(1, 3, 1, 1)
                    sd = torch.tensor(aug.std).reshape(1, 3, 1, 1)
                    x = torch.addcmul(m, x, sd).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
                out.append(x)
        return out
