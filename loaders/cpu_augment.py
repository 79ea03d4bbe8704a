"""The full augmentation recipe inside the loader's workers, for CPU-only machines.

On a machine without a GPU the batched engine (:class:`loaders.augment.Augment`) runs in the
main process on the cores the workers leave, and becomes the bottleneck of the full recipe.
:class:`WorkerAugment` is the torch backend's ``worker_augment`` hook instead: a picklable
``f(views, seed_key) -> views`` that each DataLoader worker runs on its own uint8 crops, so
every core decodes *and* augments and the main process only receives finished views.

Parameters are the engine's by construction: the hook draws nothing itself. For the batch with
key ``seed_key`` (:func:`loaders.augment.sampler.batch_key`, or the ``(seed, rank, first_item)``
tuple it hashes) it takes :func:`loaders.augment.sampler.draw`'s :class:`ViewParams`, the same
draw the device engine and the DALI graph consume, so ``WorkerAugment(aug)(views, key)`` equals
``aug(batch, key=key, crop=False)`` up to float32 rounding (tests/test_cpu_augment.py), is
deterministic from the key, and does not depend on the number of workers.

The OpenCV executor declares the ops it implements (:data:`CV2_OPS`: flip, jitter, grayscale,
blur, normalize; the crop is the decoder's). A view that needs another op (solarize,
RandAugment: they come after every OpenCV op in :data:`loaders.augment.ops.ORDER`) is split
with ``output="uint8"`` (what the stream uses): the worker runs the ops it supports and returns
the view as ``uint8`` 0..255, NOT normalised; the lacking ops (:meth:`WorkerAugment.pending_ops`,
static per recipe: :func:`tail_ops`) run on the device, in :meth:`WorkerAugment.finish` /
:meth:`WorkerAugment.tail` (``uint8 -> float [0, 1]``, the ops' torch executors with the
parameters :func:`loaders.augment.sampler.draw_view` draws for the same key and view, i.e.
exactly the engine's, then normalise; a per-sample RandAugment ``strength`` is applied there
too). With ``output="float"`` (or lacking ops that are not a suffix of the recipe) the whole
view runs the torch executors in the worker instead, with the same parameters. Either way the
hook says so once per process (a warning naming the views and ops), or once in all when the
consumer calls :meth:`WorkerAugment.warn_once` before the workers start (the stream does).

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
RandAugment, a resize) use the engine, unless those ops are left to the device (above).

``precision`` of the cv2 path: ``"float"`` (default; the engine's result up to float32 rounding)
or ``"uint8"``: the image stays uint8 between the executor's steps. With numba installed the
flip and the colour chain are one fused float32 pass rounded once
(:func:`loaders.augment.fused_colour.colour_view_u8`: exact hue; the flip is folded into the
pass's load, and a view that is not blurred is stored straight into its ``[3, S, S]`` output
planes, uint8 or normalised float32, with no flip/split passes); a blurred view goes through
OpenCV's uint8 ``sepFilter2D`` (taps cut at 3 sigma and renormalised; skipped where sigma is so
small that the rounded blur is the identity). Views are within ~0.23 levels of 255 of the
engine on average, < 1 level at worst, blur's own rounding included. Without numba the OpenCV
chain runs (affine runs fused into one saturating ``cv2.transform``, hue in OpenCV's 8-bit HSV:
~0.5 levels on average, worst ~10-20 where a hue shift meets a saturated colour).

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

import dataclasses
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .augment import Augment, ViewSpec
from .augment import functional as AF
from .augment import ops as O
from .augment import sampler as S
from .augment.cv2_ops import (  # noqa: F401  (the kernels, re-exported under their old names)
    _GRAY_M,
    _JITTER_OPS,
    _LUMA,
    TAIL_SIGMAS,
    TAIL_SIGMAS_U8,
    _affine_chain_u8,
    _blur,
    _blur_is_identity,
    _blur_taps,
    _brightness,
    _clamp,
    _colour_view_u8,
    _contrast,
    _grayscale,
    _hue,
    _hue_pattern,
    _hue_u8,
    _saturation,
    _transform_u8,
    normalize_uint8,
)
from .augment.sampler import ViewParams
from .cv2_fork import set_cv2_threads
from .errors import ConfigError

__all__ = ["WorkerAugment", "CV2_MIN_SIZE", "CV2_OPS", "missing_ops", "tail_ops", "strength_on_device", "step_for",
           "cv2_view", "normalize_uint8"]

#: ops the OpenCV executor implements (crop-in-decode does the crop before it)
CV2_OPS = ("flip", "jitter", "grayscale", "blur", "normalize")

#: smallest view side (px) for which ``impl="auto"`` uses OpenCV per image. Measured in the torch
#: loader's workers (2-core CPU machine, 2 workers, full SimCLR recipe): OpenCV 8.8k vs engine
#: 4.3k samples/s at 32 px, ~4x the engine per image at 224 px; so every size
CV2_MIN_SIZE = 1
_IMPLS = ("auto", "cv2", "torch")
_OUTPUTS = ("float", "uint8")
_PRECISIONS = ("float", "uint8")


def step_for(seed_key) -> int:
    """The batch key of ``seed_key``: an int key as is, a ``(seed, rank, first_item)`` tuple hashed
    by :func:`loaders.augment.sampler.batch_key`."""
    if isinstance(seed_key, (int, np.integer)):
        return int(seed_key)
    return S.batch_key(*[int(k) for k in seed_key])


def _cv2():
    import cv2  # optional: only the cv2 implementation needs it
    return cv2


def _cv2_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("cv2") is not None


def missing_ops(spec: ViewSpec) -> List[str]:
    """Names of the ops view ``spec`` uses that the OpenCV executor lacks (empty: it runs them all)."""
    return [op.NAME for op in O.ORDER[1:] if op.active(spec) and op.NAME not in CV2_OPS]


def _supported_by_cv2(spec: ViewSpec) -> bool:
    return not missing_ops(spec)


#: how to switch off each op the OpenCV executor lacks in a view spec (the worker's part of a split view)
_OFF = {"solarize": {"solarize": 0.0}, "randaugment": {"randaugment": None}}


def tail_ops(spec: ViewSpec) -> Tuple[str, ...]:
    """The ops of view ``spec`` the OpenCV executor lacks, when they are the last active ops before
    normalize (so the worker can do the rest and the device these): ``()`` when it lacks none or
    when they are not such a suffix (then the whole view runs the torch executors in the worker)."""
    missing = missing_ops(spec)
    active = [op.NAME for op in O.ORDER[1:-1] if op.active(spec)]
    if not missing or active[len(active) - len(missing):] != missing or any(m not in _OFF for m in missing):
        return ()
    return tuple(missing)


def strength_on_device(augment: Augment) -> bool:
    """Whether with :class:`WorkerAugment` ``(augment, output="uint8")`` every strength-dependent op
    (RandAugment) of ``augment``'s views runs on the device, so a per-sample strength can still be
    applied there."""
    return all("randaugment" in tail_ops(s) for s in augment.specs if O.randaugment.active(s))


def cv2_view(img: torch.Tensor, spec: ViewSpec, params: ViewParams, *, mean: Sequence[float],
             std: Sequence[float], out: Optional[torch.Tensor] = None, normalize: bool = True,
             precision: str = "float") -> torch.Tensor:
    """The OpenCV executor of one view, per image: ``img`` ``uint8 [B,3,S,S]`` (already cropped to
    ``spec.size``) -> ``float32 [B,3,S,S]`` normalised (written into ``out`` if given), applying
    the drawn ``params`` (:class:`~loaders.augment.sampler.ViewParams`), so with
    ``precision="float"`` the result equals the engine's on the same params up to float32 rounding.

    ``normalize=False``: the augmented image rounded once to ``uint8 [B,3,S,S]`` instead
    (0..255, not normalised; :func:`normalize_uint8` finishes it).

    ``precision="uint8"``: the image stays uint8 between steps (module docstring: with numba the
    flip and colour chain are one pass rounded once, stored straight into ``out``'s planes when
    no blur follows); the same parameters, ~2x faster per view than ``"float"``. The difference
    from the engine is < 1 level of 255 with numba, a few levels (hue) without (tests bound both).
    """
    cv2 = _cv2()
    if precision not in _PRECISIONS:
        raise ValueError(f"cv2_view precision must be one of {_PRECISIONS}, got {precision!r}")
    u8 = precision == "uint8"
    B, C, H, W = img.shape
    if C != 3 or H != spec.size or W != spec.size:
        raise ValueError(f"cv2_view needs uint8 [B,3,{spec.size},{spec.size}] crops, got {tuple(img.shape)}")
    if missing_ops(spec):
        raise ValueError(f"cv2_view does not implement {', '.join(missing_ops(spec))}; use the engine (impl='torch')")
    if params.flip is None or params.flip.shape[0] != B:
        raise ValueError(f"cv2_view needs ViewParams drawn for {B} samples")
    taps = None
    if spec.blur_p > 0 and params.blur.any():
        # taps of the blurred samples only (per-sample Python: ~half the cost of all of them)
        k, on = spec.kernel_size, params.blur.nonzero().flatten().tolist()
        taps = [None] * B
        for i, t in zip(on, O.blur.taps(params.sigma[params.blur], k, TAIL_SIGMAS_U8, renormalize=True) if u8
                        else O.blur.taps(params.sigma[params.blur], k, TAIL_SIGMAS)):
            taps[i] = t
    # normalisation (x / 255 - mean) / std: scale and offset per channel
    scale = [1.0 / (255.0 * s) for s in std]
    offset = [-m / s for m, s in zip(mean, std)]
    if out is None:
        out = torch.empty(B, 3, H, W, dtype=torch.float32 if normalize else torch.uint8)
    dst = out.numpy()
    hwc = img.permute(0, 2, 3, 1)
    # channels-last input (the torch backend's decoder="cv2" views) is read in place; planar
    # input is merged per image (cv2.merge: ~50x faster than numpy's strided transpose copy)
    planar = not hwc.is_contiguous()
    src = img.contiguous().numpy() if planar else hwc.numpy()
    run = _image_u8 if u8 else _image_float
    job = _Job(spec, params, taps, scale + offset, normalize)
    for i in range(B):
        x = cv2.merge([src[i, 0], src[i, 1], src[i, 2]]) if planar else src[i]
        run(cv2, x, i, job, dst[i])
    return out


class _Job:
    """One view's per-sample parameters as Python lists (one ``tolist`` per batch, not per image)."""

    def __init__(self, spec: ViewSpec, params: ViewParams, taps, norm: List[float], normalize: bool):
        self.flip = params.flip.tolist() if spec.flip > 0 else None
        self.gray = params.gray.tolist() if spec.grayscale > 0 else None
        self.blur = params.blur.tolist() if taps is not None else None
        self.taps = taps
        self.jitter = spec.jitter_p > 0
        self.apply = params.jitter_apply.tolist()
        self.order, self.factors = params.jitter_order.tolist(), params.jitter_factors.tolist()
        self.strengths = O.jitter.strengths(spec)
        self.norm = norm                 # scale[3] + offset[3]
        self.norm_m = np.zeros((3, 4), np.float32)   # the same as one 3x4 colour matrix (float path)
        self.norm_m[[0, 1, 2], [0, 1, 2]], self.norm_m[:, 3] = norm[:3], norm[3:]
        self.normalize = normalize

    def ops(self, i: int) -> List[Tuple[int, float]]:
        """Sample ``i``'s colour chain as ``(k, f)`` pairs (jitter ops in the drawn order, 4: grayscale)."""
        f = self.factors[i]
        ops = [(k, f[k]) for k in self.order[i] if self.strengths[k] != 0] if self.jitter and self.apply[i] else []
        if self.gray is not None and self.gray[i]:
            ops.append((4, 1.0))
        return ops


def _image_u8(cv2, x: np.ndarray, i: int, job: _Job, planes: np.ndarray) -> None:
    """``precision="uint8"``: flip + colour chain in one pass (numba) written straight into the
    output planes when no blur follows; else into an HWC image, blurred (uint8 ``sepFilter2D``),
    then split (uint8) or normalised (float) into the planes."""
    flip = job.flip is not None and bool(job.flip[i])
    norm = job.norm if job.normalize else None
    taps = job.taps[i] if job.blur is not None and job.blur[i] else None
    if taps is not None and _blur_is_identity(taps):
        taps = None                       # sigma so small that the rounded blur is the identity
    if taps is None:
        _colour_view_u8(cv2, x, job.ops(i), flip, planes=planes, norm=norm)
        return
    x = _blur(cv2, _colour_view_u8(cv2, x, job.ops(i), flip), taps)
    if norm is None:
        cv2.split(x, [planes[0], planes[1], planes[2]])
    else:
        _colour_view_u8(cv2, x, [], False, planes=planes, norm=norm)


def _image_float(cv2, x: np.ndarray, i: int, job: _Job, planes: np.ndarray) -> None:
    """``precision="float"``: the float32 OpenCV ops on ``[0, 255]`` HWC, then normalisation as
    one 3x4 ``cv2.transform`` split straight into the planes (or rounded to uint8)."""
    x = x.astype(np.float32)
    if job.flip is not None and job.flip[i]:
        x = cv2.flip(x, 1)
    if job.jitter and job.apply[i]:
        for k in job.order[i]:
            if job.strengths[k] != 0:
                x = _JITTER_OPS[k](cv2, x, job.factors[i][k])
    if job.gray is not None and job.gray[i]:
        x = _grayscale(cv2, x)
    if job.blur is not None and job.blur[i]:
        x = _blur(cv2, x, job.taps[i])
    dst = [planes[0], planes[1], planes[2]]
    if job.normalize:
        cv2.split(cv2.transform(x, job.norm_m), dst)
    else:
        # float values are in [0, 255]: convertScaleAbs is round-and-saturate to uint8 here
        cv2.split(cv2.convertScaleAbs(x), dst)


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
    (``output="uint8"``: ``uint8 [B,3,S,S]``, which ``finish`` normalises; a view with
    :meth:`pending_ops` is returned before those ops, which ``finish`` / :meth:`tail` apply).
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
        self._warned = False    # the fallback warning is given once (per process, or by the consumer: warn_once)
        # per view: the ops left to the device (static per recipe) and the spec the worker runs
        split = output == "uint8" and impl != "torch"
        self._pending = tuple(tail_ops(s) if split else () for s in augment.specs)
        self._head = [dataclasses.replace(s, **{k: v for m in p for k, v in _OFF[m].items()}) if p else s
                      for s, p in zip(augment.specs, self._pending)]
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

    def pending_ops(self, view: Optional[int] = None):
        """The ops of output view ``view`` that the worker leaves to the consumer (:meth:`finish` /
        :meth:`tail`, on the device), e.g. ``("solarize",)``; ``()`` for a view the worker finishes.
        ``view=None``: the tuple of all views'. Static per recipe (it needs no batch)."""
        return self._pending if view is None else self._pending[view]

    def tail(self, view: int, img: torch.Tensor, *, key: int, strength: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The device side of a split view: the worker's ``uint8 [B,3,S,S]`` of output view ``view``
        (on any device) -> ``float32 [B,3,S,S]`` in ``[0, 1]``, NOT normalised, after the view's
        :meth:`pending_ops` with the parameters drawn for batch key ``key`` (the engine's draw);
        ``strength``: ``float32 [B]`` per-sample RandAugment strength or None."""
        spec, ops = self.augment.specs[view], self._pending[view]
        x = O.crop.apply(img, ViewParams(), spec)        # already cropped: uint8 -> float [0, 1]
        if not ops:
            return x
        params = S.draw_view(spec, img.shape[0], key=int(key), view=view, seed=self.augment.seed,
                             ops=ops).to(img.device)
        for name in ops:
            x = O.BY_NAME[name].apply(x, params, spec, strength=strength)
        return x

    def finish(self, batch, *, strength: Optional[torch.Tensor] = None, key: Optional[int] = None):
        """The consumer's side: a :class:`~loaders.batch.Batch` (or list of views) from the hook
        -> normalised ``float32`` views (``output="uint8"``: one fused normalise per view, after
        :meth:`tail` for views with :meth:`pending_ops`; ``"float"``: returned as is).

        ``key``: the batch key (default ``batch.key``; needed only when a view has pending ops);
        ``strength``: per-sample RandAugment strength ``float32 [B]`` for the pending ops.
        The float views of views without pending ops come from a :class:`~loaders.shm.BufferPool`
        of this process: memory of earlier batches is reused once nothing references them any
        more (a batch that is kept stays valid), so a steady loop writes into pages that are
        already mapped."""
        views = batch.views if hasattr(batch, "views") else list(batch)
        if all(v.dtype == torch.float32 for v in views):
            return batch
        if self._pool is None:
            from .shm import BufferPool
            self._pool = BufferPool()
        key = getattr(batch, "key", None) if key is None else key
        if key is None and any(self._pending):
            raise ValueError(f"WorkerAugment.finish: views with pending ops {self._pending} need the batch key "
                             f"(batch.key or key=)")
        mean, std = self.augment.mean, self.augment.std
        out = []
        for i, v in enumerate(views):
            if v.dtype != torch.uint8:
                out.append(v)
            elif self._pending[i]:   # the ops left to the device, then normalise
                out.append(AF.normalize(self.tail(i, v, key=key, strength=strength), mean, std))
            else:
                out.append(normalize_uint8(v, mean, std, out=self._pool.empty(v.shape) if v.device.type == "cpu"
                                           else None))
        if not hasattr(batch, "with_views"):
            return out
        return batch.with_views(out, stage="augmented") if hasattr(batch, "stage") else batch.with_views(out)

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

    def warn_once(self, *, quiet: bool = False) -> None:
        """Say once which views' ops the OpenCV executor lacks: where split, those ops run on the
        device; else the whole view runs the torch executors in the worker. Called by the hook in
        each process that has not said it yet; a consumer that calls it before the workers start
        (the stream does) says it once for all of them (``quiet=True``: only mark it said)."""
        if self._warned or self.impl == "torch":
            return
        if quiet:
            self._warned = True
            return
        self._warned = True
        lacking = {v: missing_ops(s) for v, s in enumerate(self.augment.specs) if missing_ops(s)}
        device = "; ".join(f"view {v}: {', '.join(m)}" for v, m in lacking.items() if self._pending[v])
        worker = "; ".join(f"view {v}: {', '.join(m)}" for v, m in lacking.items() if not self._pending[v])
        if device:
            warnings.warn(f"WorkerAugment: the OpenCV executor lacks {device}: those ops run on the device "
                          f"(after the workers' uint8 output, same parameters)", stacklevel=3)
        if worker:
            warnings.warn(f"WorkerAugment: the OpenCV executor lacks {worker}: those views run the torch "
                          f"executors in the worker (same parameters)", stacklevel=3)

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
            set_cv2_threads(self.threads)   # fork-safe in a worker (loaders.cv2_fork)

    def __call__(self, views: Sequence[torch.Tensor], seed_key: Tuple[int, ...], alloc=None) -> List[torch.Tensor]:
        """``alloc``: optional ``alloc(shape, dtype) -> tensor`` for the cv2 path's outputs (the
        torch backend passes a :class:`~loaders.shm.SlabWriter`); default: fresh tensors, in
        shared memory inside a DataLoader worker."""
        aug = self.augment
        if len(views) != aug.num_views:
            raise ValueError(f"WorkerAugment with {aug.num_views} views got {len(views)} crops: build the loader "
                             f"with crops=worker_augment.crop_specs")
        self._setup_process()
        self.warn_once()
        key = step_for(seed_key)
        params = S.draw(aug, views[0].shape[0], key=key)
        in_worker = self.share_memory and torch.utils.data.get_worker_info() is not None
        out = []
        for v, (img, spec) in enumerate(zip(views, self._head)):   # a split view: its worker part
            if img.dtype != torch.uint8 or img.dim() != 4:
                raise ValueError(f"WorkerAugment view {v}: expected uint8 [B,3,H,W] crops, got {img.dtype} "
                                 f"{tuple(img.shape)}")
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
                out.append(cv2_view(img, spec, params[v], mean=aug.mean, std=aug.std, out=dst, normalize=not as_u8,
                                    precision=self.precision))
            else:
                x = aug.view(img, spec, params[v])      # the torch executors, same params (no pending ops)
                if as_u8:  # undo the normalisation, round once
                    m = torch.tensor(aug.mean).reshape(1, 3, 1, 1)
                    sd = torch.tensor(aug.std).reshape(1, 3, 1, 1)
                    x = torch.addcmul(m, x, sd).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
                out.append(x)
        return out
