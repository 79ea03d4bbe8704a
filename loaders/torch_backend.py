"""The torch backend: DataLoader workers that read, decode, crop and collate whole batches.

Each worker builds complete batches (``IterableDataset`` + ``DataLoader(batch_size=None)``):
worker ``k`` of ``K`` makes the rank's batches ``b = k, k+K, k+2K, ...`` in order, and the
DataLoader's round-robin over workers hands them out as ``0, 1, 2, ...``: the same order and the
same pixels for any number of workers (``num_workers=0`` runs in-process).

Per-sample work in a worker is kept to the minimum the device cannot do: read, decode, one
random-resized-crop + resize per view (PIL's ``resize(box=...)`` crops and resamples in one
call with torchvision's filters), written into a preallocated ``uint8`` batch. Crop boxes of a
whole batch come from the one sampler (:func:`loaders.augment.sampler.draw_boxes`) with the
batch key ``batch_key(seed, rank, rank-stream position of the batch)``, so a resumed run draws
the same crops and the device engine would draw the same boxes for that key.
Flip, colour, blur, ... are done batched on the device by the augmentation engine, or the flip
here (``flip=True``: the sampler's flip op with the same key, p = 0.5).

``decoder="cv2"`` is the fast path (opt-in): OpenCV's libjpeg-turbo ``imdecode`` and
``cv2.resize``/``cv2.flip`` written straight into the batch (crops are numpy views; views come
out channels-last, as the FFCV backend's): 32 px, 2 views, CPU per sample here 45 us from JPEG
shards vs 182 us with PIL (21 vs 104 us from arrays). Same crop boxes, same flips; the
resampling differs slightly from torchvision's PIL filters: upscaling uses OpenCV's
bilinear/bicubic (bicubic a=-0.75 vs PIL's -0.5, 11-bit fixed point); reductions by less than
:data:`AREA_MIN_FACTOR` use the same filter (OpenCV's area filter costs ~5x the cubic one on
such non-integer factors: 480 vs 90 us for a 256 -> 224 px crop here, and PIL's antialiasing
changes little there), larger ones OpenCV's area filter instead of PIL's antialiased
bilinear/bicubic (tests bound the per-pixel mean difference).
JPEG bytes are decoded by simplejpeg when installed (pixel-identical to OpenCV and PIL, faster);
with crops, a JPEG much larger than its views is decoded at 1/2, 1/4 or 1/8 scale
(``reduced_decode``, default on; same boxes and flips, pixels within the bound :mod:`loaders.decode`
states; ``reduced_decode=False`` turns it off), and only the region its views cover is decoded
(``region_decode``, default on: rows below the views are never decoded; pixels identical to the
whole image decoded at that scale).
The default ``decoder="pil"`` is torchvision-exact.
"""
from __future__ import annotations

import functools
import io
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .augment.sampler import batch_key, draw_boxes, draw_flips
from .base import Source, decode_image
from .batch import Batch
from .crop import CropSpec
from .cv2_fork import serial_cv2_while_forking, set_cv2_threads
from .decode import LateDecodeError, ViewPlan, halve_to, lazy_jpeg
from .errors import ConfigError, DataError, SampleError, check_on_error
from .mixture import Mixture, Plan
from .plan_loader import (
    DEFAULT_MAX_SKIP_FRACTION,
    DEFAULT_READ_TIMEOUT_S,
    PlanLoader,
    TimedReader,
    one_line,
    sample_error,
)

__all__ = ["TorchLoader", "BatchMaker", "WorkerError"]

_DECODERS = ("pil", "cv2")
#: decoder="cv2": crops reduced by at least this factor (longer side) use OpenCV's area filter
AREA_MIN_FACTOR = 1.5
#: reduced_decode: crops of at least this many pixels a side (full resolution) that are reduced by
#: AREA_MIN_FACTOR or more are resampled by loaders.decode.halve_to instead of the area filter
#: (smaller crops are cheap for it; its 2x2 halvings would add a little blur there)
HALVE_MIN_PX = 128


def _pil_resample(name: str):
    return {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}[name]


def _open(data: Union[bytes, np.ndarray], source: Source, index: int):
    """Decoded sample as a uint8 HWC array (array sources) or an RGB PIL image (encoded bytes).

    Speed: encoded images stay PIL images (no ``Image -> ndarray -> Image`` round trip before
    the crop); valid arrays pass straight through, and ``source.describe`` (a string per call)
    runs only on errors. Raises :class:`SampleError` naming the sample for corrupt data.
    """
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and data.ndim == 3 and data.shape[2] == 3:
            return data
        return decode_image(data, path=source.describe(index), index=index)  # raises, naming it
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        return im
    except Exception as e:  # PIL raises many types for corrupt data
        where = source.describe(index)
        raise SampleError(f"{where}: sample {index} cannot be decoded ({type(e).__name__}: {e})",
                          path=where, index=index) from e


def _open_cv2(data: Union[bytes, np.ndarray], source: Source, index: int) -> np.ndarray:
    """Decoded sample as a uint8 RGB HWC array via OpenCV (arrays pass through); raises
    :class:`SampleError` naming the sample for corrupt data."""
    import cv2
    if isinstance(data, np.ndarray):
        return _open(data, source, index)
    simplejpeg, imread_rgb = _fast_decoders()
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        # JPEG: simplejpeg's libjpeg-turbo decodes straight to RGB, pixel-identical to
        # cv2.imdecode and PIL (same libjpeg-turbo ISLOW path; tests compare), 10-30% faster here
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except (ValueError, RuntimeError):
            pass  # CMYK, arithmetic coding, ...: OpenCV below decodes or names the error
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), imread_rgb or cv2.IMREAD_COLOR)  # gray/alpha -> 3 ch
        err = None
    except cv2.error as e:
        img, err = None, e
    if img is None:
        where = source.describe(index)
        raise SampleError(f"{where}: sample {index} cannot be decoded (cv2.imdecode: {err or 'not an image'})",
                          path=where, index=index)
    return img if imread_rgb else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _open_cv2_lazy(data: Union[bytes, np.ndarray], source: Source, index: int):
    """JPEG bytes stay encoded (:class:`loaders.decode.Encoded`: the header's size), decoded later
    at the scale all the sample's crops allow (reduced decode); anything else as :func:`_open_cv2`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        enc = lazy_jpeg(data)
        if enc is not None:
            return enc
    return _open_cv2(data, source, index)


@functools.lru_cache(maxsize=1)
def _fast_decoders():
    """(simplejpeg module or None, OpenCV >= 4.11's decode-to-RGB flag or None), looked up once."""
    try:
        import simplejpeg  # optional (extra "fast"): the cv2 decoder's JPEG path
    except ImportError:
        simplejpeg = None
    import cv2
    return simplejpeg, getattr(cv2, "IMREAD_COLOR_RGB", None)


def _size(img) -> tuple:
    """(height, width) of an array or PIL image."""
    if isinstance(img, np.ndarray):
        return img.shape[0], img.shape[1]
    return img.size[1], img.size[0]


def _as_pil(img):
    if isinstance(img, np.ndarray):
        return Image.fromarray(img)
    return img


def _hwc_to_batch(out: np.ndarray, alloc=None) -> torch.Tensor:
    """uint8 [B,H,W,3] -> contiguous uint8 [B,3,H,W] (in memory from ``alloc(shape, dtype)`` if given).

    Speed: one batched copy beats B strided per-sample copies; numpy's single-threaded
    transpose copy is ~3x faster than torch's ``permute().contiguous()`` on uint8 here and
    never competes for cores with intra-op threads (20x slower in-process on a busy machine).
    """
    if alloc is not None:
        dst = alloc((out.shape[0], out.shape[3], out.shape[1], out.shape[2]), torch.uint8)
        np.copyto(dst.numpy(), out.transpose(0, 3, 1, 2))
        return dst
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


class BatchMaker:
    """Builds the rank's batch ``b`` (counted from the plan's cursor) as a uint8 :class:`Batch`.

    Picklable (sources open files lazily), so DataLoader workers get their own copy. Also
    usable on its own, in-process: ``BatchMaker(...)(b)``.

    ``worker_augment``: optional picklable ``f(views, seed_key) -> views`` applied to the batch's
    uint8 ``[B,3,H,W]`` views after cropping (in the worker, so CPU colour augmentation runs on
    every worker core). ``seed_key = (seed, rank, first_item)`` identifies the batch by its
    rank-stream position (``first_item`` = rank-stream index of the batch's first sample), so
    whatever ``f`` draws from it does not depend on the number of workers and is reproduced on
    resume. ``f`` may return float views; they replace ``Batch.views``.

    ``decoder``: ``"pil"`` (torchvision-exact) or ``"cv2"`` (fast path, see the module doc);
    ``flip``: random horizontal flip (p=0.5 per sample and view) while cropping;
    ``read_timeout_s``: bound on each ``source.read`` (:class:`~loaders.plan_loader.TimedReader`).

    Under ``on_error="skip"`` a sample that fails is left out of the batch and listed in
    ``meta["failed"]`` as ``(slot, one-line reason)``; the loader replaces it (see
    :mod:`loaders.plan_loader`). Under ``"raise"`` its :class:`SampleError` names the file, the
    sample and the source on one line.
    """

    def __init__(self, sources: Sequence[Source], plan: Plan, *, crops: Optional[Sequence[CropSpec]] = None,
                 resize: Optional[int] = None, seed: int = 0, on_error: str = "raise",
                 worker_augment: Optional[Callable[[List[torch.Tensor], Tuple[int, int, int]],
                                                   List[torch.Tensor]]] = None,
                 decoder: str = "pil", flip: bool = False, read_timeout_s: Optional[float] = None,
                 reduced_decode: bool = True, region_decode: bool = True):
        if decoder not in _DECODERS:
            raise ValueError(f"decoder must be one of {_DECODERS}, got {decoder!r}")
        self.sources = list(sources)
        self.plan = plan
        self.crops = list(crops) if crops else None
        self.resize = resize
        self.seed = int(seed)
        self.on_error = check_on_error(on_error, "torch loader")
        self.worker_augment = worker_augment
        self.decoder = decoder
        self.flip = bool(flip)
        self.reduced_decode = bool(reduced_decode)  # decoder="cv2" with crops only
        self.region_decode = bool(region_decode)    # with reduced_decode: only the views' region
        self._cv2_ready = False
        self.ring = None    # a SlabRing (set by TorchLoader before its workers fork)
        self._scratch = _Scratch()  # crop buffers reused across batches when a hook consumes them
        self.worker = 0     # this worker's id (set by _BatchStream in the worker)
        self.reader = TimedReader(read_timeout_s)  # threads made lazily in the reading process

    def __getstate__(self):
        d = dict(self.__dict__)
        d["ring"] = None    # shared by fork only; a pickled maker writes ordinary tensors
        d["_scratch"] = _Scratch()
        return d

    def __call__(self, b: int) -> Union[Batch, "_SlabBatch"]:
        writer = self.ring.writer(self.worker) if self.ring is not None else None
        try:
            out = self._make(b, writer)
        except BaseException:
            if writer is not None:
                self.ring.release(writer.slot)
            raise
        if writer is None:
            return out
        ref = writer.ref(out.views)
        if ref is None:
            # a view outside the slot (a fresh tensor from the hook, or the slot was too small):
            # send ordinary tensors; copies of the in-slot ones, as the slot is reused at once
            out = out.with_views([v.clone() if writer.offset(v) is not None else v for v in out.views])
            self.ring.release(writer.slot)
            return out
        return _SlabBatch(ref, out.index, out.source, out.label, out.skipped, out.meta, out.stage, out.key)

    def _read_decode(self, src: np.ndarray, smp: np.ndarray, lazy: bool = False):
        """Read (bounded by the timeout) and decode the chunk's samples: (images, kept slots,
        labels, failed ``(slot, reason)``); under ``on_error="raise"`` the first failure raises."""
        if self.decoder == "cv2" and not self._cv2_ready:
            set_cv2_threads(1)  # one worker per core: no nested OpenCV threads (fork-safe: loaders.cv2_fork)
            self._cv2_ready = True
        open_ = (_open_cv2_lazy if lazy else _open_cv2) if self.decoder == "cv2" else _open
        calls = [(self.sources[s], j) for s, j in zip(src.tolist(), smp.tolist())]
        got = self.reader.read_all(calls)
        images, keep, labels, failed = [], [], [], []
        for i, ((source, j), r) in enumerate(zip(calls, got)):
            try:
                if isinstance(r, BaseException):
                    raise r
                img = open_(r[0], source, j)
            except SampleError as e:
                err = sample_error(e, source, j)
                if self.on_error == "raise":
                    raise err from None
                failed.append((i, str(err)))
                continue
            images.append(img)
            keep.append(i)
            labels.append(r[1])
        return images, np.asarray(keep, dtype=np.int64), labels, failed

    def _empty(self, meta: dict) -> Batch:
        """A chunk whose every sample failed: no rows (its failures in ``meta``)."""
        sizes = [(c.size, c.size) for c in self.crops] if self.crops else [(self.resize or 1, self.resize or 1)]
        none = torch.empty(0, dtype=torch.int64)
        return Batch(views=[torch.empty((0, 3, h, w), dtype=torch.uint8) for h, w in sizes], index=none,
                     source=none.clone(), label=none.clone(), skipped=len(meta["failed"]), meta=meta)

    def _make(self, b: int, writer=None, reduce: bool = True) -> Batch:
        src, smp, gid = self.plan.batch(b)
        first_item = int(self.plan.samples + b * self.plan.batch_size)
        lazy = reduce and self.reduced_decode and self.decoder == "cv2" and self.crops is not None
        images, keep, labels, failed = self._read_decode(src, smp, lazy=lazy)
        meta = {"batch": b, "failed": tuple(failed)}
        if not images:
            return self._empty(meta)
        skipped = len(failed)
        if self.crops is not None:
            key = batch_key(self.seed, self.plan.rank, first_item)
            flips = self._flips(first_item, len(images), len(self.crops))
            crop = self._crop_views_cv2 if self.decoder == "cv2" else self._crop_views
            # the crops are the output unless a hook follows: then they are scratch and the hook
            # writes its output to the slot (if it can)
            if self.worker_augment is None:
                alloc = writer
            else:
                alloc = self._scratch
                alloc.rewind()
            try:
                views = crop(images, key, flips, alloc=alloc)
            except LateDecodeError:  # a JPEG whose header read but whose data did not: the chunk again,
                return self._make(b, writer, reduce=False)  # unreduced (that path names or skips it)
        else:
            views = [self._resize_view(images, src[keep], smp[keep])]
            if self.flip:
                views = [_flip_rows(views[0], self._flips(first_item, len(images), 1)[:, 0])]
        key = batch_key(self.seed, self.plan.rank, first_item)
        stage = "raw" if self.crops is None else "cropped"
        if self.worker_augment is not None:
            if writer is not None and getattr(self.worker_augment, "accepts_alloc", False):
                views = list(self.worker_augment(views, key, alloc=writer))
            else:
                views = list(self.worker_augment(views, key))
            if self._scratch.holds(views):
                self._scratch = _Scratch()   # the hook returned the crops: never overwrite them
            stage = "augmented-uint8" if views[0].dtype == torch.uint8 else "augmented"
        return Batch(views=views, index=torch.from_numpy(gid[keep]), source=torch.from_numpy(src[keep]),
                     label=torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)), skipped=skipped,
                     meta=meta, stage=stage, key=key)

    def _flips(self, first_item: int, n: int, views: int) -> Optional[np.ndarray]:
        """bool ``[n, views]`` flip draws of the batch (its own generator: the crop boxes do not
        change with ``flip``), or None without ``flip``."""
        if not self.flip:
            return None
        seed = self.crops[0].seed if self.crops else 0
        return draw_flips(n, views, key=batch_key(self.seed, self.plan.rank, first_item), seed=seed)

    def _crop_views_cv2(self, images: List[np.ndarray], key: int,
                        flips: Optional[np.ndarray] = None, alloc=None) -> List[torch.Tensor]:
        """The fast path: ``cv2.resize`` per crop (bilinear/bicubic up, area down) and ``cv2.flip``
        written straight into the preallocated ``[B,S,S,3]`` batch; views are ``[B,3,S,S]``
        permuted views of it (channels-last memory).

        ``images`` may hold :class:`loaders.decode.Encoded` JPEGs (reduced decode): every view's
        boxes are drawn on the full sizes first, then each sample is decoded at the smallest scale
        its views allow, only the region its views cover (``region_decode``), and its views cut from
        that (:class:`loaders.decode.ViewPlan`). Samples are done one at a time, so a region lives
        in one reused buffer while its views are resized."""
        import cv2
        n = len(images)
        hw = np.asarray([im.shape[:2] for im in images], dtype=np.int64).reshape(n, 2)
        all_boxes = draw_boxes(self.crops, hw, key=key)
        # reduced_decode: a crop of >= HALVE_MIN_PX a side reduced by >= AREA_MIN_FACTOR is resampled by
        # 2x2 halvings (loaders.decode.halve_to: no slow non-integer area filter); others as before
        halve = [((np.maximum(b[:, 2], b[:, 3]) >= AREA_MIN_FACTOR * c.size)
                  & (np.minimum(b[:, 2], b[:, 3]) >= HALVE_MIN_PX) & self.reduced_decode
                  & (c.interpolation != "nearest")).tolist() for b, c in zip(all_boxes, self.crops)]
        plan = ViewPlan(images, all_boxes, [(c.size, c.size) for c in self.crops], region=self.region_decode)
        outs, rules = [], []
        for spec in self.crops:
            up = cv2.INTER_CUBIC if spec.interpolation == "bicubic" else (
                cv2.INTER_NEAREST if spec.interpolation == "nearest" else cv2.INTER_LINEAR)
            down = cv2.INTER_NEAREST if spec.interpolation == "nearest" else cv2.INTER_AREA
            S = spec.size
            outs.append(alloc((n, S, S, 3), torch.uint8).numpy() if alloc is not None
                        else np.empty((n, S, S, 3), np.uint8))
            rules.append((S, up, down))
        fl = flips.tolist() if flips is not None else [[False] * len(self.crops)] * n
        for i in range(n):
            img, boxes = plan.sample(i)
            for v, ((top, left, h, w), (S, up, down)) in enumerate(zip(boxes, rules)):
                crop = img[top:top + h, left:left + w]  # a view: cv2 reads the ROI in place
                o = outs[v][i]
                if h != S or w != S:  # resample straight into the batch (dst= of the exact shape)
                    if halve[v][i]:
                        halve_to(crop, o, up, AREA_MIN_FACTOR)
                    else:
                        cv2.resize(crop, (S, S), dst=o, interpolation=down if max(h, w) >= AREA_MIN_FACTOR * S else up)
                else:
                    o[...] = crop
                if fl[i][v]:
                    cv2.flip(o, 1, dst=o)
        # channels-last memory, no transpose copy (~5 us/sample at 32 px): a permuted view, as
        # the FFCV backend yields; the device engine reads either layout
        return [torch.from_numpy(o).permute(0, 3, 1, 2) for o in outs]

    def _crop_views(self, images: List, key: int,
                    flips: Optional[np.ndarray] = None, alloc=None) -> List[torch.Tensor]:
        n = len(images)
        hw = np.asarray([_size(im) for im in images], dtype=np.int64).reshape(n, 2)
        views = []
        for spec, boxes in zip(self.crops, draw_boxes(self.crops, hw, key=key)):
            S = spec.size
            resample = _pil_resample(spec.interpolation)
            out = np.empty((n, S, S, 3), np.uint8)  # preallocated; filled in place
            flat = out.reshape(n, S * S * 3)
            for i, (top, left, h, w) in enumerate(boxes.tolist()):
                img = images[i]
                # crop, then resize (torchvision's resized_crop exactly; PIL's resize(box=) would
                # let the filter read pixels outside the box). Arrays are sliced before the PIL
                # conversion, so only the crop is converted.
                if isinstance(img, np.ndarray):
                    crop = img[top:top + h, left:left + w]
                    if h == S and w == S:
                        out[i] = crop  # no resample needed: exact copy
                        continue
                    # speed: frombuffer/tobytes skip PIL's __array_interface__ handling (~30% of a
                    # 32 px view's cost in fromarray/asarray)
                    crop = Image.frombuffer("RGB", (w, h), np.ascontiguousarray(crop), "raw", "RGB", 0, 1)
                else:
                    crop = img.crop((left, top, left + w, top + h))
                flat[i] = np.frombuffer(crop.resize((S, S), resample).tobytes(), np.uint8)
            if flips is not None:
                f = flips[:, len(views)]
                out[f] = out[f][:, :, ::-1]  # batched: one masked copy per view
            views.append(_hwc_to_batch(out, alloc))
        return views

    def _resize_view(self, images: List, src: np.ndarray, smp: np.ndarray) -> torch.Tensor:
        n = len(images)
        if self.resize is not None:
            S = (int(self.resize), int(self.resize))
        else:
            S = _size(images[0])  # n > 0: an all-failed chunk never gets here
        out = np.empty((n, S[0], S[1], 3), np.uint8)
        resample = _pil_resample("bilinear")
        for i in range(n):
            img = images[i]
            hw = _size(img)
            if hw == S:
                out[i] = np.asarray(img)
            elif self.resize is None:
                s, j = int(src[i]), int(smp[i])
                raise DataError(f"{self.sources[s].describe(j)} is {hw[0]}x{hw[1]} but the batch's first image is "
                                f"{S[0]}x{S[1]}: set a resize (data.image_size) or crops")
            else:
                out[i] = np.asarray(_as_pil(img).resize((S[1], S[0]), resample))
        return _hwc_to_batch(out)


def _flip_rows(view: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
    """``view`` [B,3,H,W] with the rows where ``flips`` [B] mirrored horizontally."""
    m = torch.from_numpy(flips)
    if bool(m.any()):
        view = view.clone()
        view[m] = view[m].flip(-1)
    return view


class _Scratch:
    """Crop buffers reused from batch to batch when a worker hook consumes the crops (and writes
    its output elsewhere): a fresh 64 x 224 px view costs ~1 ms of page faults per batch.
    ``alloc(shape, dtype)`` hands out the buffers in call order (``rewind()`` per batch)."""

    def __init__(self):
        self.bufs: List[torch.Tensor] = []
        self.i = 0

    def rewind(self) -> None:
        self.i = 0

    def __call__(self, shape, dtype=torch.uint8) -> torch.Tensor:
        shape = tuple(int(x) for x in shape)
        if self.i < len(self.bufs) and self.bufs[self.i].shape == shape and self.bufs[self.i].dtype == dtype:
            t = self.bufs[self.i]
        else:
            t = torch.empty(shape, dtype=dtype)
            self.bufs[self.i:self.i + 1] = [t]
        self.i += 1
        return t

    def holds(self, views: Sequence[torch.Tensor]) -> bool:
        """True if any of ``views`` shares storage with one of the buffers (a view of it)."""
        mine = {b.untyped_storage().data_ptr() for b in self.bufs}
        return any(v.untyped_storage().data_ptr() in mine for v in views)


class _SlabBatch:
    """What a worker sends for a batch whose views are in a slab slot: the slot's
    :class:`~loaders.shm.SlabRef` and the small per-sample tensors."""

    __slots__ = ("ref", "index", "source", "label", "skipped", "meta", "stage", "key")

    def __init__(self, ref, index, source, label, skipped, meta, stage="raw", key=None):
        self.ref, self.index, self.source, self.label, self.skipped = ref, index, source, label, skipped
        self.meta, self.stage, self.key = meta, stage, key

    def open(self, ring) -> Batch:
        return Batch(views=ring.open(self.ref), index=self.index, source=self.source, label=self.label,
                     skipped=self.skipped, meta=self.meta, stage=self.stage, key=self.key)


class WorkerError:
    """A data error met while building chunk ``batch`` (in a DataLoader worker or in-process):
    a small picklable record instead of the exception, so the main process re-raises it as the
    same class with the same one-line message (no worker traceback text in it)."""

    __slots__ = ("kind", "message", "path", "index", "batch")

    def __init__(self, e: DataError, batch: int):
        self.kind = "sample" if isinstance(e, SampleError) else "data"
        self.message = one_line(e)
        self.path, self.index = getattr(e, "path", ""), getattr(e, "index", -1)
        self.batch = batch

    def throw(self):
        if self.kind == "sample":
            raise SampleError(self.message, path=self.path, index=self.index)
        raise DataError(self.message)


class _BatchStream(torch.utils.data.IterableDataset):
    """Worker ``k`` of ``K`` yields batches ``k, k+K, ...`` (< ``num_batches``; forever if None)."""

    def __init__(self, maker: BatchMaker, num_batches: Optional[int]):
        super().__init__()
        self.maker = maker
        self.num_batches = num_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        b, step = (0, 1) if info is None else (info.id, info.num_workers)
        self.maker.worker = b
        while self.num_batches is None or b < self.num_batches:
            try:
                item = self.maker(b)
            except DataError as e:  # SampleError included: sent as a record, re-raised by the loader
                yield WorkerError(e, b)
                return
            yield item
            b += step


class TorchLoader(PlanLoader):
    """Iterate uint8 :class:`Batch` es of one rank's plan with DataLoader workers.

    Args:
        sources: one :class:`Source` per mixture source, in the mixture's order.
        mixture: the sample order.
        batch_size: samples per batch on this rank.
        crops: one :class:`CropSpec` per output view (random-resized-crop while decoding);
            ``None``: one view, resized to ``resize`` (or as-is if all images share a size).
        resize: output side when ``crops`` is None.
        rank, world_size: this process's slice of the stream.
        num_workers: DataLoader workers (0 = in-process).
        seed: seed of the crop parameters.
        on_error: ``"raise"`` (a one-line :class:`SampleError` naming the file, the sample and
            its source reaches the caller, also from a worker) or ``"skip"`` (the sample is
            replaced by the next one of the rank's plan and counted in ``skipped``; see
            :mod:`loaders.plan_loader` for the rule and the ``max_skip_fraction`` threshold).
        pin_memory, prefetch_factor: passed to the DataLoader.
        drop_last: drop a final partial batch of a finite plan.
        timeout: the DataLoader's own ``timeout`` (seconds to wait for a batch from the workers;
            0 = forever; with workers only); exceeded, it is a :class:`DataError`.
        read_timeout_s: bound on each sample's ``source.read`` in the workers (None/0: none).
        max_skip_fraction: see :class:`~loaders.plan_loader.PlanLoader`.
        worker_augment: optional picklable ``f(views, seed_key) -> views`` run in the worker on
            every batch's uint8 views after cropping (see :class:`BatchMaker`); stable signature.
        decoder: ``"pil"`` (default, torchvision-exact crops) or ``"cv2"`` (OpenCV decode and
            resize: the fast path; slightly different resampling, see the module doc).
        flip: random horizontal flip (p=0.5 per sample and view) done while cropping (then
            ``loader.flip`` is True and the device engine need not flip).
        shared_slots: slots per worker of the shared-memory slab ring (:mod:`loaders.shm`):
            workers write each batch's views into a reused shared slot instead of a fresh
            segment, and the main process reads them in place; a slot returns to its worker when
            the batch's tensors are garbage-collected (keeping a batch keeps it valid). ``0``
            turns it off; default ``prefetch_factor + 2`` (enough that a consumer that drops each
            batch before the next but one never finds them all held); it is off anyway without
            workers, without ``crops``, with ``pin_memory`` or under a non-fork start method.
        reduced_decode: with ``decoder="cv2"`` and ``crops`` (default True): a JPEG much larger than
            its views is decoded at 1/2, 1/4 or 1/8 scale (the smallest that keeps every view's box
            at or above its output size); the crop boxes and flips do not change, the pixels differ
            from full decode + resize within the bound :mod:`loaders.decode` states. ``False``: full
            decode (pixel-identical to before). Ignored by ``decoder="pil"`` (torchvision-exact).
        region_decode: with ``reduced_decode`` (default True): decode only the rows and columns
            the sample's views cover, at that scale (:func:`loaders.decode.decode_region`; rows
            below the views are never decoded); the views' pixels equal those of the whole image
            decoded at the same scale. Needs the ``loaders._jpeg_region`` extension that
            ``pip install`` builds against the system libjpeg; without it, whole images.

    Validation, the cursor, ``len``, ``skipped`` and ``state_dict``/``load_state_dict`` come from
    :class:`~loaders.plan_loader.PlanLoader`: ``len(loader)`` is the number of batches left, and
    ``state_dict()`` taken between batches resumes (``load_state_dict`` before iterating) at
    exactly the next sample.
    """

    backend = "torch"

    def __init__(self, sources: Sequence[Source], mixture: Mixture, *, batch_size: int,
                 crops: Optional[Sequence[CropSpec]] = None, resize: Optional[int] = None, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, seed: int = 0, on_error: str = "raise",
                 pin_memory: bool = False, prefetch_factor: int = 2, drop_last: bool = True,
                 worker_augment: Optional[Callable] = None, decoder: str = "pil", flip: bool = False,
                 shared_slots: Optional[int] = None, timeout: float = 0,
                 read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION, reduced_decode: bool = True,
                 region_decode: bool = True):
        if decoder not in _DECODERS:
            raise ValueError(f"decoder must be one of {_DECODERS}, got {decoder!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ConfigError(f"torch loader: timeout must be a number of seconds >= 0 (0 = wait forever), "
                              f"got {timeout!r}")
        if decoder == "cv2":
            try:
                import cv2  # noqa: F401
            except ImportError as e:
                raise ValueError(f"decoder='cv2' needs OpenCV (pip install opencv-python-headless): {e}") from e
        if worker_augment is not None and not callable(worker_augment):
            raise ValueError(f"worker_augment must be callable f(views, seed_key) -> views, got {worker_augment!r}")
        super().__init__(sources, mixture, batch_size=batch_size, crops=crops, resize=resize, rank=rank,
                         world_size=world_size, num_workers=num_workers, seed=seed, on_error=on_error,
                         pin_memory=pin_memory, drop_last=drop_last, read_timeout_s=read_timeout_s,
                         max_skip_fraction=max_skip_fraction)
        self.prefetch_factor = prefetch_factor
        self.timeout = float(timeout)
        self.worker_augment = worker_augment
        self.decoder = decoder
        self.flip = bool(flip)
        self.reduced_decode = bool(reduced_decode)
        self.region_decode = bool(region_decode)
        if shared_slots is None:
            # in flight per worker: prefetch_factor batches, the one being received and the one
            # the consumer still holds while asking for the next
            shared_slots = prefetch_factor + 2
        if not isinstance(shared_slots, int) or shared_slots < 0:
            raise ValueError(f"shared_slots must be an integer >= 0, got {shared_slots!r}")
        self.shared_slots = shared_slots
        self.ring = None  # the last iteration's SlabRing (None when off)

    def _make_ring(self):
        """A :class:`~loaders.shm.SlabRing` sized for one batch's output views, or None when off."""
        from .shm import SlabRing, ring_supported
        if (self.shared_slots == 0 or self.num_workers == 0 or not self.crops or self.pin_memory
                or not ring_supported()):
            return None
        # bytes per sample of the views the workers return: uint8 crops, or what the hook makes
        # (WorkerAugment says its output dtype; an unknown hook is assumed float32)
        itemsize = 1 if self.worker_augment is None else int(getattr(self.worker_augment, "output_itemsize", 4))
        per_sample = sum(3 * c.size * c.size * itemsize + 64 for c in self.crops)
        return SlabRing(self.num_workers, self.shared_slots, self.batch_size * per_sample)

    def _batches(self, plan):
        """Chunks of ``plan`` in order, built whole by the workers (or in-process); a worker's
        data error arrives as a :class:`WorkerError` and is re-raised here."""
        maker = BatchMaker(self.sources, plan, crops=self.crops, resize=self.resize, seed=self.seed,
                           on_error=self.on_error, worker_augment=self.worker_augment, decoder=self.decoder,
                           flip=self.flip, read_timeout_s=self.read_timeout_s, reduced_decode=self.reduced_decode,
                           region_decode=self.region_decode)
        ring = maker.ring = self.ring = self._make_ring()
        stream = _BatchStream(maker, plan.num_batches)
        if self.num_workers == 0:
            it = iter(stream)
        else:
            # its own generator: starting the iterator then draws no number from the process's global
            # RNG (a resumed trainer restores that RNG before the first batch; a draw here would
            # shift every later one). Workers draw their randomness from the batch keys anyway.
            dl = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor, persistent_workers=False, timeout=self.timeout,
                generator=torch.Generator().manual_seed(self.seed))
            with serial_cv2_while_forking():   # iter() forks the workers: loaders.cv2_fork
                it = iter(dl)
        try:
            while True:
                try:
                    item = next(it)
                except StopIteration:
                    return
                except RuntimeError as e:
                    if self.timeout and "timed out" in str(e):
                        raise DataError(f"torch loader: no batch from the DataLoader workers within "
                                        f"data.backend_options.timeout={self.timeout:g} s") from None
                    raise
                if isinstance(item, WorkerError):
                    item.throw()
                if isinstance(item, _SlabBatch):
                    item = item.open(ring)
                if self.num_workers == 0 and self.pin_memory:
                    item = item.pin_memory()
                yield item
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
