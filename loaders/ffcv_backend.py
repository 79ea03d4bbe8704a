"""FFCV backend: ``.beton`` files read in the mixture's order, decoded once, cropped per view.

Why not ``ffcv.loader.Loader`` itself: it reads one file, splits its traversal order into
fixed chunks and gives its decoders only the sample ids of a batch. A mixture needs several
files interleaved by the plan, and the crop boxes of batch ``b`` must be a function of the
batch's position (the one sampler, ``loaders.augment.sampler.draw_boxes``, with the batch key
of ``(seed, rank, position)``, shared with the torch and DALI backends and the device engine)
for exact resume; neither fits the Loader's ``TraversalOrder`` + ``Operation`` interfaces (an
Operation cannot receive per-batch parameters). So this module keeps FFCV's file format,
reader and execution model and drives it by the plan:

* the files are memory mapped (FFCV's ``os_cache`` mode; the page cache holds hot data);
* ``num_workers`` Python threads each build whole batches (thread ``k``: batches ``k, k+K, ...``,
  handed out in plan order); per batch one serial numba kernel (``nogil``: threads run in
  parallel) calls FFCV's compiled turbojpeg decoder (``ffcv.libffcv.imdecode``) **once per sample** into a
  reused scratch buffer (at 1/2, 1/4 or 1/8 scale when every view of the sample allows it:
  :mod:`loaders.decode`, ``reduced_decode``) and then cuts every view's crop with FFCV's OpenCV crop+resize
  (``ffcv.libffcv.resize_crop``, area interpolation) straight into the batch, plus the flips;
  raw-mode samples are cropped from the map without a copy;
* samples from several files are grouped per file (one kernel call per file in the batch);
* about ``prefetch`` batches are kept ready ahead (``num_workers`` 0/1 with ``prefetch`` 1: no
  thread, batches made in the caller). ``make_batch(parallel=True)`` keeps the ``prange`` kernel.

Views are ``uint8 [B, 3, S, S]`` tensors in channels-last memory (a permuted view of the
``[B, S, S, 3]`` batch buffer, no copy: ``.contiguous()`` if a consumer needs NCHW memory).
Colour augmentation is the device engine's job (``aug(batch, step=..., crop=False)``).
Crop interpolation is OpenCV's area filter whatever ``CropSpec.interpolation`` says.

Errors and skips: samples the writer could not encode (marked in the file) and JPEGs the kernel
cannot decode fail per sample. Under ``on_error="skip"`` they are left out of their chunk and
replaced by the plan's next samples (:mod:`loaders.plan_loader`: whole batches, per-source counts,
the ``max_skip_fraction`` threshold); under ``"raise"`` a one-line :class:`SampleError` names the
file, the sample and the source. **``read_timeout_s`` is not honoured here**: the samples are
read from the memory map inside the compiled kernel (page faults, no ``source.read`` call), so a
hung mount blocks that decode thread in the kernel where no timeout can reach it; the argument is
accepted and ignored (keep ``.beton`` files on local disks).

FFCV's own Loader stays available for single-file throughput baselines:
:func:`ffcv_native_loader` (``RandomResizedCropRGBImageDecoder`` + flip, FFCV's RNG, no mixture).
"""
from __future__ import annotations

import itertools
import queue
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Source
from .batch import Batch
from .beton import BetonSource, require_ffcv
from .crop import CropSpec
from .decode import choose_denominators, map_boxes
from .errors import ConfigError, DataError, SampleError
from .plan_loader import DEFAULT_MAX_SKIP_FRACTION, DEFAULT_READ_TIMEOUT_S, PlanLoader, sample_error

__all__ = ["FFCVLoader", "ffcv_native_loader", "decode_views_kernel"]

_KERNELS = {}


def decode_views_kernel(parallel: bool = True):
    """The compiled batch kernel (built once per process and variant; numba compile ~seconds).

    ``parallel=True``: ``prange`` over the samples on numba's thread pool (one batch at a time);
    ``parallel=False``: a serial kernel for the batch-per-thread mode, where several Python
    threads each run it on their own batch (it releases the GIL).

    ``kernel(mm, ptr, size, mode, height, width, rows, boxes, flips, out, offsets, out_h, out_w,
    scratch, status, denom)``: for each of the ``n`` samples of one file (``ptr``/``size``/``mode``/
    ``height``/``width``/``denom`` ``[n]``), decode once into ``scratch[i]`` (JPEGs at scale
    ``1/denom[i]``: ``ceil(h/d) x ceil(w/d)``, boxes already mapped onto it) then, for each view ``v``,
    crop ``boxes[i, v]`` = (top, left, h, w) and resize to ``out_h[v] x out_w[v]`` into the
    flat ``out`` buffer at ``offsets[v] + rows[i] * out_h[v] * out_w[v] * 3``, flipping
    horizontally where ``flips[i, v]``. ``status[rows[i]]`` is set to 1 when decoding fails.
    """
    parallel = bool(parallel)
    if parallel in _KERNELS:
        return _KERNELS[parallel]
    require_ffcv()
    import numba
    from ffcv.libffcv import imdecode, resize_crop

    imdecode_c = numba.njit(nogil=True)(imdecode)
    resize_crop_c = numba.njit(nogil=True)(resize_crop)

    @numba.njit(nogil=True, parallel=parallel)
    def kernel(mm, ptr, size, mode, height, width, rows, boxes, flips, out, offsets, out_h, out_w, scratch,
               status, denom):
        n = ptr.shape[0]
        V = offsets.shape[0]
        for i in numba.prange(n):
            h = np.int64(height[i])
            w = np.int64(width[i])
            data = mm[ptr[i]:ptr[i] + size[i]]
            if mode[i] == 0:  # JPEG: decode the whole image once, crop every view from it
                d = np.int64(denom[i])  # reduced decode: libjpeg's scaled IDCT, ceil(h/d) x ceil(w/d)
                hs = (h + d - 1) // d
                ws = (w + d - 1) // d
                buf = scratch[i % scratch.shape[0], :hs * ws * 3]  # serial kernel: one scratch row
                rc = imdecode_c(data, buf, h, w, h, w, 0, 0, 1, d, False, False)
                if rc != 0:
                    status[rows[i]] = 1
                    continue
                img = buf.reshape(hs, ws, 3)
            else:  # raw HWC bytes straight from the memory map
                img = data[:h * w * 3].reshape(h, w, 3)
            for v in range(V):
                oh = out_h[v]
                ow = out_w[v]
                start = offsets[v] + rows[i] * oh * ow * 3
                dst = out[start:start + oh * ow * 3].reshape(oh, ow, 3)
                t = boxes[i, v, 0]
                left = boxes[i, v, 1]
                resize_crop_c(img, t, t + boxes[i, v, 2], left, left + boxes[i, v, 3], dst)
                if flips[i, v]:
                    for r in range(oh):
                        for c in range(ow // 2):
                            for ch in range(3):
                                tmp = dst[r, c, ch]
                                dst[r, c, ch] = dst[r, ow - 1 - c, ch]
                                dst[r, ow - 1 - c, ch] = tmp

    _KERNELS[parallel] = kernel
    return kernel


class FFCVLoader(PlanLoader):
    """Plan-driven loader over ``.beton`` sources (:class:`~loaders.beton.BetonSource`).

    Shared Loader arguments (see :class:`~loaders.plan_loader.PlanLoader`) plus keyword-only
    ``flip`` (random horizontal flip p=0.5 per view, drawn with the batch's own generator, for a
    "crop+flip only" pipeline), ``prefetch`` (batches prepared ahead by the decode threads),
    ``drop_last`` and ``max_skip_fraction`` (see :class:`PlanLoader`); ``read_timeout_s`` is
    accepted and ignored (see the module doc). ``num_workers`` is the number of decode threads
    (each builds whole chunks; 0 or 1 = one). ``reduced_decode`` (default True, with ``crops``): a
    JPEG much larger than its views is decoded at 1/2, 1/4 or 1/8 scale (:mod:`loaders.decode`:
    same boxes and flips, mapped onto the reduced image); ``False``: always full decode.
    """

    backend = "ffcv"

    def __init__(self, sources: Sequence[Source], mixture, *, batch_size, crops=None, resize=None, rank=0,
                 world_size=1, num_workers=2, seed=0, on_error="raise", pin_memory=False, flip: bool = False,
                 prefetch: int = 2, drop_last: bool = True, read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION, reduced_decode: bool = True):
        require_ffcv()
        bad = [f"{getattr(s, 'name', '?')} ({type(s).__name__})" for s in sources if not isinstance(s, BetonSource)]
        if bad:
            raise ConfigError(f"the ffcv backend reads .beton sources only; not: {', '.join(bad)} "
                              f"(convert with `fastssl data beton` / loaders.beton.to_beton, or use backend "
                              f"torch or dali)")
        super().__init__(sources, mixture, batch_size=batch_size, crops=crops, resize=resize, rank=rank,
                         world_size=world_size, num_workers=num_workers, seed=seed, on_error=on_error,
                         pin_memory=pin_memory, drop_last=drop_last, read_timeout_s=read_timeout_s,
                         max_skip_fraction=max_skip_fraction)
        self.flip = bool(flip)
        self.reduced_decode = bool(reduced_decode)
        self.prefetch = max(1, int(prefetch))
        files = [s.file for s in self.sources]
        # scratch for one decoded image (the serial kernel decodes one at a time; the prange
        # kernel of make_batch(parallel=True) gets one row per batch row): allocated lazily, reused
        self._max_pixels = max(int((f.height * f.width).max()) for f in files)
        self._scratch_rows = None

    @classmethod
    def from_paths(cls, paths: Sequence[str], *, batch_size: int, budget: Optional[int] = None,
                   weights: Optional[Sequence[float]] = None, seed: int = 0, **kwargs) -> "FFCVLoader":
        """Loader straight from ``.beton`` paths (benchmarks): one source per file, a mixture by
        ``weights`` (default: every sample once per epoch), ``budget`` images (default one pass)."""
        from .mixture import Mixture
        sources = [BetonSource(p) for p in paths]
        sizes = [len(s) for s in sources]
        mix = Mixture(sizes, weights=weights, budget=budget if budget is not None else sum(sizes), seed=seed,
                      names=[s.name for s in sources])
        return cls(sources, mix, batch_size=batch_size, seed=seed, **kwargs)

    @property
    def _scratch(self) -> np.ndarray:
        """Decode buffer of the prange kernel: one row per batch row (made on first use)."""
        if self._scratch_rows is None:
            self._scratch_rows = np.empty((self.batch_size, self._max_pixels * 3), np.uint8)
        return self._scratch_rows

    # -- one batch -------------------------------------------------------------------------------
    def _view_shapes(self, heights: np.ndarray, widths: np.ndarray, where: str) -> List[Tuple[int, int]]:
        if self.crops:
            return [(c.size, c.size) for c in self.crops]
        if self.resize:
            return [(self.resize, self.resize)]
        if len(heights) and ((heights != heights[0]).any() or (widths != widths[0]).any()):
            k = int(np.flatnonzero((heights != heights[0]) | (widths != widths[0]))[0])
            raise DataError(f"{where}: images of different sizes ({heights[0]}x{widths[0]} and "
                            f"{heights[k]}x{widths[k]}) in one batch: set a resize (data.image_size) or crops")
        return [(int(heights[0]), int(widths[0]))] if len(heights) else [(1, 1)]

    def make_batch(self, plan, b: int, *, parallel: bool = False, scratch: Optional[np.ndarray] = None
                   ) -> Batch:
        """Chunk ``b`` after ``plan``'s cursor: its readable samples, the others listed in
        ``meta["failed"]`` (``on_error="skip"``; no rows at all when every sample failed).

        ``parallel``: decode with the ``prange`` kernel on numba's threads, else (default) with the
        serial kernel on the calling thread; ``scratch``: decode buffer ``uint8 [rows,
        max_pixels*3]`` (default: the loader's own, one row per batch sample).
        """
        src_all, sample_all, index = plan.batch(b)
        files = [s.file for s in self.sources]
        # writer-marked bad samples (index field -1) are known before decoding
        bad = np.zeros(len(src_all), bool)
        for s in np.unique(src_all):  # vectorised per file, no per-sample Python
            sel = src_all == s
            bad[sel] = files[s].sample_index[sample_all[sel]] < 0
        failed = self._failures(np.flatnonzero(bad), src_all, sample_all,
                                "the sample could not be decoded when the file was written")
        keep = np.flatnonzero(~bad)
        src, sample, index = src_all[keep], sample_all[keep], index[keep]
        n = len(src)
        if n == 0:
            return self._no_rows(b, failed)
        heights = np.empty(n, np.int64)
        widths = np.empty(n, np.int64)
        for s in np.unique(src):  # metadata gathers, vectorised per file
            sel = src == s
            heights[sel] = files[s].height[sample[sel]]
            widths[sel] = files[s].width[sample[sel]]
        shapes = self._view_shapes(heights, widths, f"ffcv batch {b}")
        V = len(shapes)
        if self.crops:
            boxes = np.stack(self.crop_boxes(plan, b, heights, widths), axis=1)  # [n, V, 4]
        else:  # the whole image, resized (or copied when the size already matches)
            boxes = np.zeros((n, V, 4), np.int64)
            boxes[:, :, 2] = heights[:, None]
            boxes[:, :, 3] = widths[:, None]
        flips = self.flips(plan, b, n, V) if self.flip else np.zeros((n, V), bool)
        denom, boxes = self._reduce(boxes, shapes, files, src, sample, heights, widths)
        out_h = np.array([h for h, _ in shapes], np.int64)
        out_w = np.array([w for _, w in shapes], np.int64)
        per = out_h * out_w * 3 * n
        offsets = np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64)
        # a fresh output per batch (np.empty: no zeroing): the yielded tensors stay valid while the
        # next batch is decoded; only the scratch buffer is reused
        out = np.empty(int(per.sum()), np.uint8)
        status = np.zeros(n, np.uint8)
        kernel = decode_views_kernel(parallel)
        if scratch is None:
            scratch = self._scratch if parallel else np.empty((1, self._max_pixels * 3), np.uint8)
        for s in np.unique(src):
            rows = np.flatnonzero(src == s)
            f = files[s]
            idx = sample[rows]
            kernel(np.asarray(f.mmap), f.data_ptr[idx], f.data_size[idx], f.mode[idx], heights[rows], widths[rows],
                   rows.astype(np.int64), np.ascontiguousarray(boxes[rows]), flips[rows].astype(np.uint8), out,
                   offsets, out_h, out_w, scratch, status, denom[rows])
        undecodable = np.flatnonzero(status)
        failed = sorted(failed + self._failures(keep[undecodable], src_all, sample_all, "JPEG data cannot be decoded"))
        ok = status == 0
        labels = np.empty(n, np.int64)
        for s in np.unique(src):
            sel = src == s
            labels[sel] = files[s].labels[sample[sel]]
        views = []
        for v, (h, w) in enumerate(shapes):
            arr = out[offsets[v]:offsets[v] + per[v]].reshape(n, h, w, 3)
            t = torch.from_numpy(arr)
            if len(undecodable):
                t = t[torch.from_numpy(ok)]
            views.append(t.permute(0, 3, 1, 2))
        if int(ok.sum()) == 0:
            return self._no_rows(b, failed)
        batch = Batch(views=views, index=torch.from_numpy(index[ok]), source=torch.from_numpy(src[ok]),
                      label=torch.from_numpy(labels[ok]), skipped=len(failed),
                      meta={"backend": "ffcv", "batch": b, "failed": tuple(failed)},
                      stage="cropped" if self.crops else "raw", key=self.batch_key(plan, b))
        return batch.pin_memory() if self.pin_memory and torch.cuda.is_available() else batch

    def _reduce(self, boxes: np.ndarray, shapes, files, src, sample, heights, widths):
        """(denominators ``int64 [n]``, boxes ``[n, V, 4]`` mapped onto the reduced images): JPEG
        samples decode at the smallest scale all their views allow (:mod:`loaders.decode`); raw
        samples, and everything without crops or with ``reduced_decode=False``, at full size."""
        n, V = boxes.shape[0], boxes.shape[1]
        if not (self.crops and self.reduced_decode):
            return np.ones(n, np.int64), boxes
        jpeg = np.empty(n, bool)
        for s in np.unique(src):
            sel = src == s
            jpeg[sel] = files[s].mode[sample[sel]] == 0
        per_view = [boxes[:, v] for v in range(V)]
        d = choose_denominators(per_view, shapes, allowed=jpeg)
        if (d == 1).all():
            return d, boxes
        return d, np.stack([map_boxes(b, d, heights, widths) for b in per_view], axis=1)

    def _failures(self, slots: np.ndarray, src: np.ndarray, sample: np.ndarray, why: str) -> list:
        """``(slot, one-line reason)`` for the chunk's failed ``slots``; under ``on_error="raise"``
        the first one raises as a one-line SampleError naming the file, the sample and the source."""
        out = []
        for k in slots.tolist():
            source, j = self.sources[int(src[k])], int(sample[k])
            err = sample_error(SampleError(f"{source.describe(j)}: {why}", path=str(source.path), index=j),
                               source, j)
            if self.on_error == "raise":
                raise err from None
            out.append((int(k), str(err)))
        return out

    @staticmethod
    def _no_rows(b: int, failed: list) -> Batch:
        none = torch.empty(0, dtype=torch.int64)
        return Batch(views=[torch.empty(0, 3, 1, 1, dtype=torch.uint8)], index=none, source=none.clone(),
                     label=none.clone(), skipped=len(failed), meta={"backend": "ffcv", "batch": b,
                                                                      "failed": tuple(failed)})

    # -- iteration ---------------------------------------------------------------------------------
    def _batches(self, plan):
        """Batches in plan order: batch-per-thread (below) on ``max(1, num_workers)`` threads;
        one worker with ``prefetch`` 1 runs in the calling thread (deterministic stack traces)."""
        if self.num_workers <= 1 and self.prefetch <= 1:
            for b in self._batch_ids(plan):
                yield self.make_batch(plan, b)
            return
        yield from self._batches_threads(plan, max(1, self.num_workers))

    def _batches_threads(self, plan, workers: int):
        """``workers`` Python threads; thread ``k`` builds batches ``k, k+K, ...`` whole (plan
        lookup, crop boxes, serial decode kernel, assembly) into its own queue, and the consumer
        takes them round-robin: plan order, whatever the thread count.

        Speed: one batch per thread instead of one ``prange`` kernel per batch. With ``prange``
        the per-batch Python (plan lookup, crop boxes, views: ~2 ms at 256 x 32 px) ran on one
        core while the other idled, and every batch ended in a join barrier; here a thread's
        Python overlaps the other threads' kernels (which release the GIL): at 32 px on the
        shared 2-core machine ~1.1x the samples/s of the prange loop (median of 4 A/B rounds).
        """
        K = max(1, int(workers))
        depth = max(1, -(-self.prefetch // K))  # ceil: about `prefetch` batches ready in total
        queues = [queue.Queue(depth) for _ in range(K)]
        stop = threading.Event()
        row = self._max_pixels * 3

        def produce(k: int):
            scratch = np.empty((1, row), np.uint8)  # the serial kernel decodes one image at a time
            try:
                for b in itertools.islice(self._batch_ids(plan), k, None, K):
                    if stop.is_set():
                        return
                    item = self.make_batch(plan, b, parallel=False, scratch=scratch)
                    while not stop.is_set():
                        try:
                            queues[k].put(("batch", item, b), timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except Exception as e:  # handed to the consumer, which re-raises it in its thread
                queues[k].put(("error", e, None))

        threads = [threading.Thread(target=produce, args=(k,), name=f"ffcv-loader-{k}", daemon=True)
                   for k in range(K)]
        for th in threads:
            th.start()
        try:
            for b in self._batch_ids(plan):
                q, th = queues[b % K], threads[b % K]
                while True:
                    try:
                        kind, item, got = q.get(timeout=0.5)
                        break
                    except queue.Empty:
                        if not th.is_alive() and q.empty():
                            raise RuntimeError(f"ffcv loader thread {b % K} stopped before batch {b}")
                if kind == "error":
                    raise item
                yield item
        finally:
            stop.set()
            for th, q in zip(threads, queues):
                while th.is_alive():  # unblock a producer waiting on a full queue
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                    th.join(timeout=0.05)


def ffcv_native_loader(path: str, *, batch_size: int, crop: CropSpec, num_workers: int = 2, seed: int = 0,
                       order: str = "random", flip: bool = True, distributed: bool = False, drop_last: bool = True):
    """FFCV's own ``Loader`` on one ``.beton`` (single file; FFCV's RNG; no mixture, no resume).

    Throughput baseline: ``RandomResizedCropRGBImageDecoder`` (+ ``RandomHorizontalFlip``),
    ``ToTensor``/``ToTorchImage`` -> uint8 ``[B, 3, S, S]``. Iterating yields ``(images, labels)``.
    """
    require_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    image = [RandomResizedCropRGBImageDecoder((crop.size, crop.size), scale=tuple(crop.scale),
                                              ratio=tuple(crop.ratio))]
    if flip:
        image.append(RandomHorizontalFlip())
    image += [ToTensor(), ToTorchImage()]
    orders = {"random": OrderOption.RANDOM, "sequential": OrderOption.SEQUENTIAL}
    if order not in orders:
        raise ConfigError(f"ffcv_native_loader: order must be one of {sorted(orders)}, got {order!r}")
    f = BetonSource(path).file  # validates the file; other fields (e.g. index) are not decoded
    from ffcv.reader import Reader
    names = Reader(str(path)).field_names
    pipelines = {name: None for name in names}
    pipelines[f.image_field] = image
    if "label" in names:
        pipelines["label"] = [IntDecoder(), ToTensor(), Squeeze()]
    return Loader(str(Path(path)), batch_size=batch_size, num_workers=max(1, num_workers), order=orders[order],
                  seed=seed, pipelines=pipelines, distributed=distributed, drop_last=drop_last)
