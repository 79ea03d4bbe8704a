"""DALI backend: the mixture's plan feeds a DALI pipeline that decodes, crops and (optionally) augments.

Reading order comes from :class:`loaders.mixture.Plan`: batch ``b`` of this rank is the list of
``(source, sample)`` pairs ``plan.batch(b)``; the loader reads those samples with
``source.read`` (encoded bytes, e.g. WebDataset shards through their offset index or ``.beton``
JPEGs, or uint8 arrays from npz/synthetic/CIFAR sources) and feeds them to DALI through
``fn.external_source``. Ratios, dup, fraction, budget, rank slices and exact resume are therefore
those of the mixture, identical to the torch backend.

Random parameters are drawn in numpy, not by DALI's RNG: crop boxes with
:func:`loaders.crop.rrc_params` from ``numpy.random.default_rng([seed, rank, b])`` (the torch
backend's stream, so both backends cut the same boxes), and flips/colour parameters from
``default_rng([seed, rank, b, 1])``. They enter the graph as per-sample arguments. DALI's own
RNG operators are seeded per pipeline but restart from their seed whenever a pipeline is
rebuilt, so a resumed run would not see the parameters of an uninterrupted one; drawing them
here makes batch ``b`` a pure function of ``(seed, rank, b)`` across restarts, thread counts and
devices (decoders and resize kernels may still differ by a grey level between CPU and GPU).

Decoding runs on the GPU (``device="mixed"``: nvJPEG) when ``device_id`` is given and CUDA is
available, on CPU otherwise (``device_id=None`` pipelines need no GPU; that is what CI tests).

Modes:

* ``augment=None``: uint8 ``[B,3,S,S]`` crops (decode + random-resized-crop per view,
  + horizontal flip with ``flip=True``); the device augmentation engine does the rest
  (``aug(batch, step=..., crop=False)``).
* ``augment=<preset name | Augment | list[ViewRecipe]>``: the full recipe in the DALI graph
  (crop, flip, colour jitter, grayscale, Gaussian blur, solarize, normalize); the Batch's views
  are then **float32 normalised** ``[B,3,S,S]``. Differences from the engine: DALI's
  ``color_twist`` applies brightness/contrast/saturation/hue in a fixed order (torchvision
  draws a random order), its contrast pivots on mid-grey instead of the image mean; ops DALI
  lacks (RandAugment, equalize) are not run here: :func:`recipes_from_augment` refuses such a
  preset, run it with ``augment=None`` and the engine instead.

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
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Source
from .batch import Batch
from .crop import CropSpec
from .errors import ConfigError, DataError, SampleError
from .plan_loader import (
    DEFAULT_MAX_SKIP_FRACTION,
    DEFAULT_READ_TIMEOUT_S,
    PlanLoader,
    TimedReader,
    one_line,
    sample_error,
)

__all__ = ["DaliLoader", "PlanLoader", "ViewRecipe", "recipes_from_augment", "require_dali",
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
# augmentation recipe (what the DALI graph can do)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewRecipe:
    """One output view's augmentation in the DALI graph, torchvision/solo-learn semantics.

    ``crop`` random-resized-crop; ``flip`` probability; colour jitter applied with probability
    ``jitter`` and strengths ``brightness``/``contrast``/``saturation`` (factor ~ U(1-x, 1+x))
    and ``hue`` (shift ~ U(-x, x) of a full turn); ``gray`` probability; Gaussian blur with
    probability ``blur``, sigma ~ U(``blur_sigma``) pixels, window ``blur_kernel`` (0: the
    engine's ``blur_kernel_size`` of the crop size); ``solarize`` probability (pixels >= 128 inverted); ``mean``/``std``
    in [0, 1] units for the final normalisation.
    """

    crop: CropSpec
    flip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray: float = 0.2
    blur: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 0
    solarize: float = 0.0
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)

    def kernel(self) -> int:
        if self.blur_kernel:
            return int(self.blur_kernel)
        return max(3, 2 * int(round(self.crop.size * 11.0 / 224.0)) + 1)  # the engine's rule


def recipes_from_augment(augment) -> List[ViewRecipe]:
    """Map the engine's augmentation to DALI view recipes.

    ``augment``: a preset name (``configs/augment/{name}.yaml``), an
    :class:`loaders.augment.Augment` (one recipe per output view, ``count`` expanded) or a list
    of :class:`ViewRecipe`. A view with RandAugment raises ConfigError: DALI lacks its ops, so run
    that preset with ``augment=None`` and the engine after the loader.
    """
    if isinstance(augment, (list, tuple)) and all(isinstance(r, ViewRecipe) for r in augment):
        return list(augment)
    from .augment import Augment  # the engine's preset schema (no heavy dependencies)
    if isinstance(augment, str):
        augment = Augment.from_preset(augment)
    if not isinstance(augment, Augment):
        raise ConfigError(f"DALI augment must be a preset name, an Augment or a list of ViewRecipe, "
                          f"got {type(augment).__name__}")
    recipes = []
    for k, v in enumerate(augment.specs):
        if v.randaugment is not None:
            raise ConfigError(f"view {k} uses RandAugment, which the DALI graph lacks: build the DALI loader "
                              f"with augment=None and run the engine after it (aug(batch, step=..., crop=False))")
        recipes.append(ViewRecipe(
            crop=v.crop_spec, flip=v.flip, jitter=v.jitter_p, brightness=v.brightness, contrast=v.contrast,
            saturation=v.saturation, hue=v.hue, gray=v.grayscale, blur=v.blur_p,
            blur_sigma=tuple(v.blur_sigma), blur_kernel=v.kernel_size, solarize=v.solarize,
            mean=augment.mean, std=augment.std))
    return recipes


def _draw_recipe_params(rng: np.random.Generator, r: ViewRecipe, n: int) -> dict:
    """Per-sample parameters of one view (numpy, batched): colour factors (identity where the
    jitter does not fire), saturation 0 where grayscale fires, blur sigma and flags."""
    fire = rng.random(n) < r.jitter
    u = rng.random((n, 4))
    b = np.where(fire, 1 + r.brightness * (2 * u[:, 0] - 1), 1.0)
    c = np.where(fire, 1 + r.contrast * (2 * u[:, 1] - 1), 1.0)
    s = np.where(fire, 1 + r.saturation * (2 * u[:, 2] - 1), 1.0)
    h = np.where(fire, r.hue * (2 * u[:, 3] - 1) * 360.0, 0.0)  # DALI's hue is in degrees
    gray = rng.random(n) < r.gray
    # gray after jitter: in YIQ space a zero saturation keeps luma (0.299, 0.587, 0.114) only
    s = np.where(gray, 0.0, np.maximum(s, 0.0))
    blur = rng.random(n) < r.blur
    sigma = rng.uniform(r.blur_sigma[0], r.blur_sigma[1], n)
    sol = rng.random(n) < r.solarize
    flip = rng.random(n) < r.flip
    f32 = np.float32
    return {"brightness": np.maximum(b, 0).astype(f32), "contrast": np.maximum(c, 0).astype(f32),
            "saturation": s.astype(f32), "hue": h.astype(f32), "blur": blur.astype(np.uint8),
            "sigma": sigma.astype(f32), "solarize": sol.astype(np.uint8), "flip": flip.astype(np.int32)}


def _recipe_keys(r: ViewRecipe) -> Tuple[str, ...]:
    """The per-sample parameters view recipe ``r`` feeds to the graph (unused ops send none)."""
    keys = ("brightness", "contrast", "saturation", "hue")
    keys += ("blur", "sigma") if r.blur > 0 else ()
    keys += ("solarize",) if r.solarize > 0 else ()
    return keys + ("flip",)


# --------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------

class DaliLoader(PlanLoader):
    """DALI pipeline fed by the mixture's plan; yields :class:`~loaders.batch.Batch`.

    Shared Loader arguments (see :class:`PlanLoader`) plus, keyword-only:
    ``device_id`` (CUDA device of this rank; ``None`` = CPU pipeline), ``augment`` (``None``:
    uint8 views; a preset name / Augment / list of :class:`ViewRecipe`: the full recipe in DALI,
    float32 normalised views), ``flip`` (uint8 mode: random horizontal flip p=0.5 per view),
    ``num_threads`` (DALI CPU threads, default ``max(1, num_workers)``), ``prefetch`` (batches
    DALI prepares ahead), ``drop_last``, ``read_timeout_s`` and ``max_skip_fraction`` (see
    :class:`PlanLoader`). ``num_workers`` threads read samples from the sources.

    Views: ``[B, 3, S, S]`` per CropSpec (or per recipe), or one ``[B, 3, R, R]`` view resized to
    ``resize``, or the images as they are when all share one size. On the GPU path the views are
    CUDA tensors on ``device_id``; ``index``/``source``/``label`` stay on the CPU.
    """

    backend = "dali"

    def __init__(self, sources, mixture, *, batch_size, crops=None, resize=None, rank=0, world_size=1,
                 num_workers=2, seed=0, on_error="raise", pin_memory=False, device_id: Optional[int] = None,
                 augment=None, flip: bool = False, num_threads: Optional[int] = None, prefetch: int = 2,
                 drop_last: bool = True, read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION):
        require_dali()
        self.recipes = recipes_from_augment(augment) if augment is not None else None
        if self.recipes is not None:
            crops = [r.crop for r in self.recipes]
        super().__init__(sources, mixture, batch_size=batch_size, crops=crops, resize=resize, rank=rank,
                         world_size=world_size, num_workers=num_workers, seed=seed, on_error=on_error,
                         pin_memory=pin_memory, drop_last=drop_last, read_timeout_s=read_timeout_s,
                         max_skip_fraction=max_skip_fraction)
        self.flip = bool(flip)
        self.gpu = device_id is not None and torch.cuda.is_available()
        self.device_id = int(device_id) if self.gpu else None
        self.num_threads = int(num_threads) if num_threads else max(1, self.num_workers)
        self.prefetch = max(1, int(prefetch))
        # arrays can skip the decoder when every source yields arrays (npz, CIFAR, synthetic)
        probe = TimedReader(self.read_timeout_s)
        self.raw = all(_yields_arrays(s, probe) for s in self.sources)
        self._failed: dict = {}  # chunk -> its failed (slot, reason) pairs, from the feed to _batches

    # -- the feed (runs in the thread that calls pipe.run) --------------------------------------
    def _feeder(self, plan):
        """Callable for ``fn.external_source``: each call returns the next plan chunk with a readable
        sample as per-sample lists (data, meta int64[5] = index, source, label, chunk, failed-in-chunk,
        and per view roi start/end float32[2] (+ recipe parameters)); the chunk's failed slots go
        to ``self._failed`` (chunks where every sample failed are left out)."""
        reader = TimedReader(self.read_timeout_s, threads=max(1, self.num_workers))
        ids = self._batch_ids(plan)
        views = self._views_spec()

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
                hw = hw[keep]
                boxes = self.crop_boxes(plan, b, hw[:, 0], hw[:, 1])
                for box in boxes:
                    start = box[:, :2].astype(np.float32)
                    out += [list(start), list(start + box[:, 2:].astype(np.float32))]
            rng = self.aux_rng(plan, b)
            if self.recipes is not None:
                for r in self.recipes:
                    p = _draw_recipe_params(rng, r, n)
                    out += [list(p[k]) for k in _recipe_keys(r)]
            else:
                for _ in views:
                    fl = (rng.random(n) < 0.5) if self.flip else np.zeros(n, bool)
                    out.append(list(fl.astype(np.int32)))
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
    def _build(self, plan):
        dali = require_dali()
        from nvidia.dali import fn, types

        views = self._views_spec()
        n_out = 2 + (2 * len(views) if self.crops else 0) + \
            (sum(len(_recipe_keys(r)) for r in self.recipes) if self.recipes is not None else len(views))
        layouts = ["HWC" if self.raw else ""] + [""] * (n_out - 1)
        interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                           device_id=self.device_id, seed=self.seed * 1000003 + self.rank,
                           prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipe():
            ins = list(fn.external_source(source=self._feeder(plan), num_outputs=n_out, batch=True,
                                          layout=layouts, no_copy=False))
            data, meta = ins[0], ins[1]
            rest = ins[2:]
            if self.raw:
                img = data.gpu() if self.gpu else data
            else:
                img = fn.decoders.image(data, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            outs = [meta]
            for k, (size, spec) in enumerate(views):
                if spec is not None:
                    start, end = rest[2 * k], rest[2 * k + 1]
                    v = fn.resize(img, size=[size, size], roi_start=start, roi_end=end, roi_relative=False,
                                  interp_type=interp[spec.interpolation], antialias=True)
                elif size:
                    v = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
                else:
                    v = img
                base = 2 * len(views) if self.crops else 0
                if self.recipes is not None:
                    r = self.recipes[k]
                    first = base + sum(len(_recipe_keys(q)) for q in self.recipes[:k])
                    p = dict(zip(_recipe_keys(r), rest[first:first + len(_recipe_keys(r))]))
                    v = fn.color_twist(v, brightness=p["brightness"], contrast=p["contrast"],
                                       saturation=p["saturation"], hue=p["hue"])
                    if r.blur > 0:
                        w = r.kernel()
                        blurred = fn.gaussian_blur(v, sigma=p["sigma"], window_size=w)
                        bf = p["blur"]
                        # per-sample select without conditionals: flags are 0/1
                        v = fn.cast(blurred * bf + v * (1 - bf), dtype=types.UINT8)
                    if r.solarize > 0:
                        high = fn.cast(v >= 128, dtype=types.UINT8)
                        v = v ^ (high * p["solarize"] * 255)  # 255 - x == x XOR 255 for uint8
                    v = fn.crop_mirror_normalize(v, dtype=types.FLOAT, output_layout="CHW", mirror=p["flip"],
                                                 mean=[255 * m for m in r.mean], std=[255 * s for s in r.std])
                else:
                    v = fn.crop_mirror_normalize(v, dtype=types.UINT8, output_layout="CHW", mirror=rest[base + k])
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
            dtype = torch.uint8 if self.recipes is None else torch.float32
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
                            skipped=int(meta[0, 4]),
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
