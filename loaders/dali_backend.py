"""DALI backend: the mixture's plan feeds a DALI pipeline that decodes, crops and (optionally) augments.

Reading order comes from :class:`loaders.mixture.Plan`: batch ``b`` of this rank is the list of
``(source, sample)`` pairs ``plan.batch(b)``; the loader reads those samples with
``source.read`` (encoded bytes, e.g. WebDataset shards through their offset index or ``.beton``
JPEGs, or uint8 arrays from npz/synthetic/CIFAR sources) and feeds them to DALI through
``fn.external_source``. Ratios, dup, fraction, budget, rank slices and exact resume are therefore
those of the mixture, identical to the torch backend.

Random parameters are never drawn by DALI's RNG (it restarts from its seed whenever a pipeline is
rebuilt, so a resumed run would not see an uninterrupted one's parameters). Chunk ``b`` has the
key :func:`loaders.augment.sampler.batch_key` ``(seed, rank, first item)`` (the torch backend's;
``Batch.key``), and the feeder draws the chunk's parameters ONCE through the sampler
(:func:`~loaders.augment.sampler.draw`, image sizes from the headers it already reads); they
enter the graph as per-sample arguments. So a batch is a pure function of its position across
restarts, thread counts and devices, and the graph, the device engine and the OpenCV workers
apply the very same draw (decoders and resize kernels may still differ by a grey level between
CPU and GPU).

``device_id``: ``None`` (default) builds a CPU pipeline (needs no GPU; what CI tests); an int,
or ``"auto"`` (:func:`local_device_id`: ``LOCAL_RANK``, else the current CUDA device), decodes on
that GPU (``device="mixed"``: nvJPEG) and runs the graph there, when CUDA is available. The
stream passes each rank its local device.

Modes (``Batch.stage`` says which):

* ``augment=None``: uint8 ``[B,3,S,S]`` crops per CropSpec (+ horizontal flip with ``flip=True``),
  stage ``"cropped"``; the device engine does the rest (``aug(batch, crop=False)``, key
  ``batch.key``). Without crops: whole images (``resize``/as-is), stage ``"raw"``.
* ``augment=<preset name | Augment>``: the recipe in the DALI graph (:mod:`loaders.dali_graph`:
  crop, flip, colour jitter in each sample's own order with contrast around the image mean, HSV
  hue, grayscale, blur, solarize, normalize: the engine's semantics, equal to the engine on the
  same crops to float rounding, tests/test_dali.py); views **float32 normalised**, stage
  ``"augmented"``. The crop is rounded to uint8 first, as the other backends' crops are. A recipe
  with an op the graph lacks (RandAugment) is not run in the graph: the loader yields the
  recipe's uint8 crops (stage ``"cropped"``, the sampler's boxes) for the device engine and
  warns once, naming the views and ops. ``graph=False`` asks for those crops directly.

DALI's own WebDataset reader (``fn.readers.webdataset``) reads shards sequentially with a
shuffle buffer and cannot weight or resume a mixture; it is offered only as the explicitly
named :func:`dali_webdataset_pipeline` for plain single-source throughput runs.

Errors and skips: the samples are read here, in Python, by ``num_workers`` threads
(:class:`~loaders.plan_loader.TimedReader`: each ``source.read`` bounded by ``read_timeout_s``),
and their image headers parsed, before DALI sees them. Under ``on_error="skip"`` a sample that
fails there (unreadable, timed out, no parsable header) is left out of its chunk and replaced by the
plan's next sample (:mod:`loaders.plan_loader`: whole batches, counted per source, the
``max_skip_fraction`` threshold); under ``"raise"`` a one-line :class:`SampleError` names the
file, the sample and the source. A file whose header parses but whose pixels DALI's decoder then
rejects fails the whole pipeline run (DALI has no per-sample error path): it is a
:class:`DataError`, also under ``skip``.

``nvidia.dali`` is imported only inside this module's functions; without it a clear ImportError
names the extra (``pip install 'fastssl[dali]'``).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .base import Source
from .batch import Batch
from .crop import CropSpec
from .dali_graph import arg_names, augment_view, lacking_ops, view_args
from .errors import ConfigError, DataError, SampleError
from .plan_loader import (
    DEFAULT_MAX_SKIP_FRACTION,
    DEFAULT_READ_TIMEOUT_S,
    PlanLoader,
    TimedReader,
    one_line,
    sample_error,
)

__all__ = ["DaliLoader", "PlanLoader", "local_device_id", "resolve_augment", "require_dali",
           "dali_webdataset_pipeline", "image_size"]

_DALI_HINT = "install the extra: pip install 'fastssl[dali]' (NVIDIA DALI, nvidia-dali-cuda130)"


def require_dali():
    """Import and return ``nvidia.dali`` or raise ImportError naming the extra to install."""
    try:
        import nvidia.dali as dali  # heavy; imported only when a DALI loader is built
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the DALI backend needs NVIDIA DALI ({e}); {_DALI_HINT}") from e
    return dali


# --------------------------------------------------------------------------------------------
# plan-driven reading shared by the DALI and FFCV backends
# --------------------------------------------------------------------------------------------

def image_size(data) -> Tuple[int, int]:
    """(height, width) of an encoded image from its header only (PIL reads no pixels), or of an array."""
    if isinstance(data, np.ndarray):
        return int(data.shape[0]), int(data.shape[1])
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return int(h), int(w)


def _yields_arrays(source: Source, reader: Optional[TimedReader] = None) -> bool:
    """Whether ``source.read`` returns decoded arrays (probes its first readable sample; reads
    bounded by ``reader``'s timeout)."""
    reader = reader or TimedReader()
    for i in range(min(len(source), 8)):
        r = reader.read_all([(source, i)])[0]
        if isinstance(r, SampleError):
            continue
        if isinstance(r, BaseException):
            raise r
        return isinstance(r[0], np.ndarray)
    return False


def _as_ppm(a: np.ndarray) -> np.ndarray:
    """A uint8 HWC array as PPM (P6) bytes: a 15-byte header + the raw pixels, decoded by DALI
    with a memcpy; lets arrays ride the encoded path when a mixture also holds JPEG sources."""
    h, w = a.shape[:2]
    head = np.frombuffer(f"P6\n{w} {h}\n255\n".encode(), np.uint8)
    return np.concatenate([head, np.ascontiguousarray(a, np.uint8).reshape(-1)])


# --------------------------------------------------------------------------------------------
# device and augmentation
# --------------------------------------------------------------------------------------------

def local_device_id() -> Optional[int]:
    """This process's CUDA device for DALI: ``LOCAL_RANK`` (torchrun/accelerate) when it names a
    visible device, else ``torch.cuda.current_device()``; None without CUDA (CPU pipeline)."""
    if not torch.cuda.is_available():
        return None
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.strip().lstrip("-").isdigit() and 0 <= int(local) < torch.cuda.device_count():
        return int(local)
    return int(torch.cuda.current_device())


def resolve_augment(augment):
    """``augment`` as an :class:`loaders.augment.Augment` (a preset name is loaded), or None."""
    if augment is None:
        return None
    from .augment import Augment  # the engine's preset schema (no heavy dependencies)
    if isinstance(augment, str):
        return Augment.from_preset(augment)
    if not isinstance(augment, Augment):
        raise ConfigError(f"DALI augment must be a preset name or an Augment, got {type(augment).__name__}")
    return augment


def _fallback_note(augment) -> Optional[str]:
    """Why the graph cannot run ``augment`` (views and ops), or None when it can."""
    lacking = {v: lacking_ops(s) for v, s in enumerate(augment.specs)}
    lacking = {v: ops for v, ops in lacking.items() if ops}
    if not lacking:
        return None
    what = "; ".join(f"view {v}: {', '.join(ops)}" for v, ops in lacking.items())
    return (f"dali loader: the DALI graph lacks ops this recipe uses ({what}); it yields uint8 crops "
            f"(stage 'cropped', the sampler's boxes) and the device engine applies the whole recipe")


# --------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------

class DaliLoader(PlanLoader):
    """DALI pipeline fed by the mixture's plan; yields :class:`~loaders.batch.Batch`.

    Shared Loader arguments (see :class:`PlanLoader`) plus, keyword-only:
    ``device_id`` (CUDA device of this rank; ``"auto"``: :func:`local_device_id`; ``None`` = CPU
    pipeline), ``augment`` (``None``: uint8 views; a preset name / :class:`~loaders.augment.Augment`:
    the recipe in the DALI graph, float32 normalised views, or uint8 crops when the graph lacks one
    of its ops), ``graph`` (False: with ``augment``, only its crops, at the sampler's boxes, for the
    device engine: stage ``"cropped"``), ``flip`` (without ``augment``: random horizontal flip
    p=0.5 per view, the sampler's flip coins), ``num_threads`` (DALI CPU threads, default
    ``max(1, num_workers)``), ``prefetch`` (batches DALI prepares ahead), ``drop_last``,
    ``read_timeout_s`` and ``max_skip_fraction`` (see :class:`PlanLoader`). ``num_workers``
    threads read samples from the sources.

    Views: ``[B, 3, S, S]`` per CropSpec (or per augment view), or one ``[B, 3, R, R]`` view
    resized to ``resize``, or the images as they are when all share one size. ``Batch.stage``:
    ``"augmented"`` (graph recipe), ``"cropped"`` (crops) or ``"raw"``; ``Batch.key``: the
    sampler's :func:`~loaders.augment.sampler.batch_key`. On the GPU path the views are CUDA
    tensors on ``device_id``; ``index``/``source``/``label`` stay on the CPU.
    """

    backend = "dali"

    def __init__(self, sources, mixture, *, batch_size, crops=None, resize=None, rank=0, world_size=1,
                 num_workers=2, seed=0, on_error="raise", pin_memory=False, device_id: Union[int, str, None] = None,
                 augment=None, graph: bool = True, flip: bool = False, num_threads: Optional[int] = None,
                 prefetch: int = 2, drop_last: bool = True, read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION):
        require_dali()
        self.augment = resolve_augment(augment)
        self.fallback = _fallback_note(self.augment) if self.augment is not None and graph else None
        if self.fallback:
            warnings.warn(self.fallback, stacklevel=2)  # once per loader: never silently
        self.in_graph = self.augment is not None and bool(graph) and self.fallback is None
        if self.augment is not None:
            if crops is not None and list(crops) != list(self.augment.crop_specs):
                raise ConfigError("dali loader: crops= and augment= disagree (the recipe's views set the crops: "
                                  "pass one of them, or crops=augment.crop_specs)")
            crops = self.augment.crop_specs
        super().__init__(sources, mixture, batch_size=batch_size, crops=crops, resize=resize, rank=rank,
                         world_size=world_size, num_workers=num_workers, seed=seed, on_error=on_error,
                         pin_memory=pin_memory, drop_last=drop_last, read_timeout_s=read_timeout_s,
                         max_skip_fraction=max_skip_fraction)
        self.stage = "augmented" if self.in_graph else ("cropped" if self.crops else "raw")
        self.flip = bool(flip)
        if device_id == "auto":
            device_id = local_device_id()
        elif isinstance(device_id, str):
            raise ConfigError(f"dali device_id must be an int, 'auto' or None, got {device_id!r}")
        self.gpu = device_id is not None and torch.cuda.is_available()
        self.device_id = int(device_id) if self.gpu else None
        self.num_threads = int(num_threads) if num_threads else max(1, self.num_workers)
        self.prefetch = max(1, int(prefetch))
        # arrays can skip the decoder when every source yields arrays (npz, CIFAR, synthetic)
        probe = TimedReader(self.read_timeout_s)
        self.raw = all(_yields_arrays(s, probe) for s in self.sources)
        self._failed: dict = {}  # chunk -> its failed (slot, reason) pairs, from the feed to _batches

    # -- per-chunk parameters ------------------------------------------------------------------
    def batch_key(self, plan, b: int) -> int:
        """The sampler's key of chunk ``b`` after ``plan``'s cursor (the torch backend's)."""
        from .augment.sampler import batch_key
        return batch_key(self.seed, plan.rank, plan.samples + b * plan.batch_size)

    def _view_inputs(self, plan, b: int, hw: np.ndarray) -> list:
        """Per view: roi start/end float32 [2] (+ the graph's :func:`~loaders.dali_graph.arg_names`
        arrays, or the flip int32) as per-sample lists for the n samples of chunk ``b`` with image
        sizes ``hw``. With ``augment`` the boxes come from the one :func:`~loaders.augment.sampler.draw`
        of the chunk (all ops in the graph, the crop op only otherwise)."""
        from .augment.sampler import draw
        n, key, out = len(hw), self.batch_key(plan, b), []
        params = None
        if self.augment is not None:
            ops = None if self.in_graph else ("crop",)
            params = draw(self.augment, n, key=key, sizes=torch.from_numpy(hw), ops=ops)
            boxes = [p.box.numpy() for p in params]
        else:
            boxes = self.crop_boxes(plan, b, hw[:, 0], hw[:, 1])
        flips = np.zeros((n, len(boxes)), bool)
        if self.flip and self.augment is None:  # with a recipe, its flip op flips (graph or engine)
            flips = self.flips(plan, b, n, len(boxes))   # the torch backend's draws (augment seed)
        for v, box in enumerate(boxes):
            start = box[:, :2].astype(np.float32)
            out += [list(start), list(start + box[:, 2:].astype(np.float32))]
            if self.in_graph:
                out += [list(a) for a in view_args(params[v].numpy(), self.augment.specs[v])]
            else:
                out.append(list(flips[:, v].astype(np.int32)))
        return out

    # -- the feed (runs in the thread that calls pipe.run) --------------------------------------
    def _feeder(self, plan):
        """Callable for ``fn.external_source``: each call returns the next plan chunk with a readable
        sample as per-sample lists (data, meta int64[5] = index, source, label, chunk, failed-in-chunk,
        and per view the inputs of :meth:`_view_inputs`); the chunk's failed slots go to
        ``self._failed`` (chunks where every sample failed are left out)."""
        reader = TimedReader(self.read_timeout_s, threads=max(1, self.num_workers))
        ids = self._batch_ids(plan)

        def feed():
            for b in ids:
                src, sample, index = plan.batch(b)
                data, labels, failed = self.read_samples(src, sample, reader)
                hw = self._header_sizes(data, src, sample, failed) if self.crops else None
                keep = np.ones(len(data), bool)
                keep[[k for k, _ in failed]] = False
                keep = np.flatnonzero(keep)
                if failed:
                    self._failed[b] = tuple(failed)
                if len(keep):
                    break
            else:
                raise StopIteration
            data = [data[k] for k in keep]
            n = len(keep)
            meta = np.stack([index[keep], src[keep], labels[keep], np.full(n, b), np.full(n, len(failed))], 1)
            if not self.raw:
                data = [_as_ppm(d) if isinstance(d, np.ndarray) else np.frombuffer(d, np.uint8) for d in data]
            out = [data, list(meta)]
            if self.crops:
                out += self._view_inputs(plan, b, hw[keep])
            else:  # one whole-image view: only the optional flip
                flips = self.flips(plan, b, n, 1) if self.flip else np.zeros((n, 1), bool)
                out.append(list(flips[:, 0].astype(np.int32)))
            return tuple(out)

        return feed

    def _header_sizes(self, data: list, src: np.ndarray, sample: np.ndarray, failed: list) -> np.ndarray:
        """int64 ``[n, 2]`` (height, width) per sample from arrays or image headers (0 where the
        read failed); an unparsable header is a sample failure (appended to ``failed``, or raised)."""
        hw = np.zeros((len(data), 2), np.int64)
        for k, d in enumerate(data):
            if d is None:
                continue
            try:
                hw[k] = image_size(d)
            except (OSError, ValueError, SyntaxError) as e:
                s, j = int(src[k]), int(sample[k])
                where = self.sources[s].describe(j)
                err = sample_error(SampleError(f"{where}: sample {j} has no readable image header ({e})",
                                               path=where, index=j), self.sources[s], j)
                if self.on_error == "raise":
                    raise err from None
                failed.append((k, str(err)))
                data[k] = None
        failed.sort()
        return hw

    # -- the graph -------------------------------------------------------------------------------
    def _feed_names(self, k: int) -> Tuple[str, ...]:
        """Names of view ``k``'s feed inputs (after its roi pair): the graph's arguments, or the flip."""
        return arg_names(self.augment.specs[k]) if self.in_graph else ("flip",)

    def _build(self, plan):
        dali = require_dali()
        from nvidia.dali import fn, types

        views = self._views_spec()
        names = [self._feed_names(k) for k in range(len(views))]
        per = [len(nm) + (2 if self.crops else 0) for nm in names]
        n_out = 2 + sum(per)
        layouts = ["HWC" if self.raw else ""] + [""] * (n_out - 1)
        interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}
        specs = self.augment.specs if self.augment is not None else [None] * len(views)

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                           device_id=self.device_id, seed=self.seed * 1000003 + self.rank,
                           prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipe():
            ins = list(fn.external_source(source=self._feeder(plan), num_outputs=n_out, batch=True,
                                          layout=layouts, no_copy=False))
            data, meta, rest = ins[0], ins[1], ins[2:]
            if self.raw:
                img = data.gpu() if self.gpu else data
            else:
                img = fn.decoders.image(data, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            outs = [meta]
            for k, (size, crop) in enumerate(views):
                args = rest[sum(per[:k]):sum(per[:k + 1])]
                if crop is not None:
                    antialias = getattr(specs[k], "antialias", True)
                    v = fn.resize(img, size=[size, size], roi_start=args[0], roi_end=args[1], roi_relative=False,
                                  interp_type=interp[crop.interpolation], antialias=antialias)
                    args = args[2:]
                elif size:
                    v = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
                else:
                    v = img
                if self.in_graph:
                    v = augment_view(v, dict(zip(names[k], args)), specs[k], self.augment.mean,
                                     self.augment.std, on_gpu=self.gpu)
                else:
                    v = fn.crop_mirror_normalize(v, dtype=types.UINT8, output_layout="CHW", mirror=args[0])
                outs.append(v)
            return tuple(outs)

        p = pipe()
        p.build()
        return p

    # -- iteration -------------------------------------------------------------------------------
    def _to_torch(self, tl) -> torch.Tensor:
        try:
            t = tl.as_tensor()
        except RuntimeError as e:
            raise DataError("dali loader: images of different sizes in one batch; pass crops or resize "
                            f"({e})") from e
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            dtype = torch.float32 if self.in_graph else torch.uint8
            out = torch.empty(t.shape(), dtype=dtype, device=f"cuda:{self.device_id}")
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
            return out
        return torch.from_numpy(np.array(t))  # copy: DALI reuses its output buffers

    def _batches(self, plan):
        if plan.num_batches == 0:
            return
        self._failed = {}
        pipe = self._build(plan)
        try:
            while True:
                try:
                    outs = pipe.run()
                except StopIteration:
                    return
                except RuntimeError as e:  # e.g. pixels DALI's decoder rejects: no per-sample recovery
                    raise DataError(f"dali loader: the DALI pipeline failed ({one_line(e, 240)})") from e
                meta = np.array(outs[0].as_tensor())
                views = [self._to_torch(o) for o in outs[1:]]
                if self.pin_memory and not self.gpu and torch.cuda.is_available():
                    views = [v.pin_memory() for v in views]
                m = torch.from_numpy(meta)
                b = int(meta[0, 3])
                yield Batch(views=views, index=m[:, 0].clone(), source=m[:, 1].clone(), label=m[:, 2].clone(),
                            skipped=int(meta[0, 4]), stage=self.stage, key=self.batch_key(plan, b),
                            meta={"backend": "dali", "batch": b, "failed": self._failed.pop(b, ())})
        finally:
            del pipe


def dali_webdataset_pipeline(paths: Sequence[str], index_paths: Optional[Sequence[str]] = None, *,
                             batch_size: int, crop: CropSpec, ext: str = "jpg", device_id: Optional[int] = None,
                             num_threads: int = 2, seed: int = 0, shuffle_buffer: int = 1024):
    """DALI's own sequential WebDataset reader + decode + random-resized-crop + flip, uint8 CHW.

    Throughput baseline only: it reads the shards in order through a shuffle buffer, draws crops
    with DALI's RNG, knows nothing of mixture weights, rank slices or resume. Use
    :class:`DaliLoader` (plan-driven) for training. Returns a built DALI pipeline whose
    ``run()`` gives ``(images uint8 [B,3,S,S], labels)``.
    """
    dali = require_dali()
    from nvidia.dali import fn, types
    gpu = device_id is not None and torch.cuda.is_available()

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id if gpu else None,
                       seed=seed)
    def pipe():
        img, cls = fn.readers.webdataset(paths=list(paths), index_paths=list(index_paths) if index_paths else None,
                                         ext=[ext, "cls"], missing_component_behavior="error",
                                         random_shuffle=shuffle_buffer > 0, initial_fill=max(1, shuffle_buffer),
                                         name="reader")
        img = fn.decoders.image_random_crop(img, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                            random_area=list(crop.scale), random_aspect_ratio=list(crop.ratio))
        img = fn.resize(img, size=[crop.size, crop.size], antialias=True)
        img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="CHW",
                                       mirror=fn.random.coin_flip(probability=0.5))
        return img, cls

    p = pipe()
    p.build()
    return p
