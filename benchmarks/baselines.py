"""The pipelines our loaders are measured against, on the same images and cores.

* :func:`torchvision_simclr` -- the plain PyTorch path (what solo-learn runs without DALI):
  ``ImageFolder`` + PIL + torchvision transforms doing the whole SimCLR recipe per sample in
  ``DataLoader`` workers, then the default collate.
* :func:`decode_only` -- JPEG decode alone on all cores with the fastest decoder installed
  (simplejpeg, else OpenCV, both libjpeg-turbo; else torchvision): no reading from disk, no crop,
  no collate.
* :func:`dali_cpu_simclr` -- DALI's CPU pipeline doing the full SimCLR recipe (the solo-learn
  DALI path, CPU mode).
* :func:`ffcv_crop_flip` -- FFCV's own loader: random-resized-crop fused with the JPEG decode,
  plus flip; uint8 views (the GPU-feeding path FFCV users run).

Every factory returns an endless iterator of ``(views, batch_size)``, so the harness measures
steady state (workers already started) and the caller closes it with :func:`close`.
"""
from __future__ import annotations

import io
import math
import random
from typing import Iterator, List, Sequence, Tuple

import numpy as np

__all__ = ["SIMCLR", "torchvision_simclr", "decode_only", "fastest_decoder", "dali_cpu_simclr", "ffcv_crop_flip",
           "blur_kernel", "close"]

#: the ``symmetric`` preset's numbers (REFERENCE.md section 1), used by every baseline's recipe
SIMCLR = dict(scale=(0.08, 1.0), jitter_p=0.8, jitter=(0.8, 0.8, 0.8, 0.2), gray_p=0.2, blur_p=0.5,
              blur_sigma=(0.1, 2.0), flip_p=0.5,
              mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def blur_kernel(size: int) -> int:
    """Odd Gaussian-blur window of about 10% of the view side (SimCLR's choice), at least 3."""
    k = max(3, int(round(size * 0.1)))
    return k if k % 2 == 1 else k + 1


# ----------------------------------------------------------------------------- torchvision
class _PILBlur:
    """Gaussian blur with sigma ~ U(0.1, 2) px via PIL's filter, applied with probability p (solo-learn style)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class _Views:
    def __init__(self, transform, views: int):
        self.transform, self.views = transform, views

    def __call__(self, img):
        return [self.transform(img) for _ in range(self.views)]


class _Endless:
    """Yields ``n`` random indices forever (with replacement): a steady stream for timing."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            yield from rng.integers(0, self.n, 4096).tolist()


def simclr_transform(size: int, *, interpolation: str = "bicubic"):
    """torchvision's per-sample SimCLR ``symmetric`` recipe: PIL image -> float32 [3, size, size]."""
    import torchvision.transforms as T
    c = SIMCLR
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([
        T.RandomResizedCrop(size, scale=c["scale"], interpolation=interp),
        T.RandomHorizontalFlip(c["flip_p"]),
        T.RandomApply([T.ColorJitter(*c["jitter"])], p=c["jitter_p"]),
        T.RandomGrayscale(c["gray_p"]),
        T.RandomApply([_PILBlur(c["blur_sigma"])], p=c["blur_p"]),
        T.ToTensor(),
        T.Normalize(c["mean"], c["std"]),
    ])


def torchvision_simclr(folder: str, *, size: int, batch_size: int, num_workers: int, views: int = 2,
                       interpolation: str = "bicubic") -> Iterator[Tuple[List, int]]:
    """The torchvision DataLoader baseline over an ImageFolder; yields ``(views, batch_size)``."""
    import torch
    import torchvision
    ds = torchvision.datasets.ImageFolder(folder, transform=_Views(simclr_transform(size, interpolation=interpolation),
                                                                  views))
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=_Endless(len(ds)),
                                     num_workers=num_workers, drop_last=True,
                                     persistent_workers=num_workers > 0)
    for v, _ in dl:
        yield v, int(v[0].shape[0])


# ----------------------------------------------------------------------------- decode ceiling
def fastest_decoder() -> str:
    """``simplejpeg`` (libjpeg-turbo straight to RGB: 10-30% faster than OpenCV here, and what the
    torch backend's cv2 path decodes JPEGs with) when installed, else ``cv2`` (OpenCV's
    ``imdecode``: on 32 px JPEGs about 5x PIL per core here), else ``torchvision``
    (``torchvision.io.decode_jpeg``, batched)."""
    import importlib.util
    for name in ("simplejpeg", "cv2"):
        if importlib.util.find_spec(name) is not None:
            return name
    return "torchvision"


def _decode_chunk(args) -> int:
    blobs, decoder = args
    if decoder == "simplejpeg":
        import simplejpeg
        for b in blobs:
            simplejpeg.decode_jpeg(b, colorspace="RGB")
    elif decoder == "cv2":
        import cv2
        cv2.setNumThreads(1)  # one process per core: no nested threads
        for b in blobs:
            if cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) is None:
                raise ValueError("cv2.imdecode could not decode a benchmark JPEG")
    elif decoder == "torchvision":
        import torch
        from torchvision.io import decode_jpeg
        torch.set_num_threads(1)
        decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs])
    elif decoder == "pil":
        from PIL import Image
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                im.load()  # the decode; RGB JPEGs need no convert
    else:
        raise ValueError(f"unknown decoder {decoder!r} (simplejpeg | cv2 | torchvision | pil)")
    return len(blobs)


#: decode_only's chunks, inherited by its forked workers (never pickled per task)
_SHARED_CHUNKS: dict = {}


def _decode_shared(args) -> int:
    key, decoder = args
    return _decode_chunk((_SHARED_CHUNKS[key], decoder))


def decode_only(blobs: Sequence[bytes], *, workers: int, per_worker: int = 256,
                decoder: str = "auto") -> Iterator[Tuple[None, int]]:
    """The decode-only ceiling: JPEG decode of in-memory ``blobs`` on ``workers`` processes.

    ``decoder``: ``auto`` (:func:`fastest_decoder`), ``simplejpeg``, ``cv2``, ``torchvision`` or ``pil``. Endless;
    each step yields ``(None, per_worker)`` when one worker has decoded a chunk of ``per_worker``
    images. No read from disk, no crop, no collate, no copy back: a loader that decodes every
    JPEG with that decoder on these cores cannot deliver more images per second.

    The workers never wait for each other (two chunks per worker in flight, no barrier per step)
    and the JPEG bytes reach them through ``fork``, not a pickle per chunk: a per-step barrier plus
    pickled chunks measured this ceiling ~1.2x too low on the 500x375 / 1024x768 feed sets.
    """
    import collections
    import multiprocessing as mp
    decoder = fastest_decoder() if decoder == "auto" else decoder
    workers = max(1, workers)
    blobs = list(blobs)
    chunk = (blobs * math.ceil(per_worker / len(blobs)))[:per_worker]
    key = id(chunk)
    _SHARED_CHUNKS[key] = chunk  # before the fork: the workers inherit it
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            pending = collections.deque(pool.apply_async(_decode_shared, ((key, decoder),))
                                        for _ in range(2 * workers))
            while True:
                n = pending.popleft().get()
                pending.append(pool.apply_async(_decode_shared, ((key, decoder),)))
                yield None, n
    finally:
        _SHARED_CHUNKS.pop(key, None)


# ----------------------------------------------------------------------------- DALI (CPU)
def dali_cpu_simclr(folder: str, *, size: int, batch_size: int, num_threads: int, views: int = 2,
                    seed: int = 0) -> Iterator[Tuple[List, int]]:
    """DALI's CPU pipeline with the full SimCLR recipe (decode, crop, flip, jitter, grayscale,
    blur, normalise) for ``views`` views; yields ``(views as DALI TensorLists, batch_size)``.

    Colour jitter: brightness/contrast/saturation/hue drawn per sample and switched off with
    probability 1 - p by blending the drawn values with the identity (DALI has no per-sample
    ``RandomApply``); grayscale: saturation 0 with probability p; blur: sigma 0 (off) with 1 - p.
    """
    from nvidia.dali import fn, pipeline_def, types  # optional dependency

    c = SIMCLR
    k = blur_kernel(size)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=seed,
                  prefetch_queue_depth=2)
    def pipe():
        jpegs, _ = fn.readers.file(file_root=folder, random_shuffle=True, name="reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        outs = []
        for _ in range(views):
            v = fn.random_resized_crop(images, size=(size, size), random_area=c["scale"],
                                       interp_type=types.INTERP_CUBIC)
            on = fn.cast(fn.random.coin_flip(probability=c["jitter_p"]), dtype=types.FLOAT)
            b, ct, s, h = c["jitter"]
            bright = 1 + on * (fn.random.uniform(range=(-b, b)))
            contr = 1 + on * (fn.random.uniform(range=(-ct, ct)))
            sat = 1 + on * (fn.random.uniform(range=(-s, s)))
            hue = on * fn.random.uniform(range=(-h * 180, h * 180))
            gray = fn.cast(fn.random.coin_flip(probability=1 - c["gray_p"]), dtype=types.FLOAT)
            v = fn.color_twist(v, brightness=bright, contrast=contr, saturation=sat * gray, hue=hue)
            sigma = fn.cast(fn.random.coin_flip(probability=c["blur_p"]), dtype=types.FLOAT) * \
                fn.random.uniform(range=c["blur_sigma"])
            v = fn.gaussian_blur(v, window_size=k, sigma=sigma)
            v = fn.crop_mirror_normalize(v, mirror=fn.random.coin_flip(probability=c["flip_p"]),
                                         mean=[255 * m for m in c["mean"]], std=[255 * s_ for s_ in c["std"]],
                                         dtype=types.FLOAT, output_layout="CHW")
            outs.append(v)
        return tuple(outs)

    p = pipe()
    p.build()
    try:
        while True:
            out = p.run()
            yield list(out), batch_size
    finally:
        del p


# ----------------------------------------------------------------------------- FFCV
def ffcv_crop_flip(beton: str, *, size: int, batch_size: int, num_workers: int, views: int = 2,
                   seed: int = 0) -> Iterator[Tuple[List, int]]:
    """FFCV's loader: random-resized-crop in the JPEG decoder + flip, uint8 ``[B, 3, size, size]``
    per view (each view decodes with its own crop, as FFCV's pipelines do); endless epochs."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder  # optional dependency
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    pipes = {f"image{v}": [RandomResizedCropRGBImageDecoder((size, size), scale=SIMCLR["scale"]),
                           RandomHorizontalFlip(SIMCLR["flip_p"]), ToTensor(), ToTorchImage()]
             for v in range(views)}  # the .beton holds the image once per view (BenchData.beton)
    pipes["label"] = [IntDecoder(), ToTensor()]
    loader = Loader(beton, batch_size=batch_size, num_workers=num_workers, order=OrderOption.RANDOM,
                    pipelines=pipes, drop_last=True, seed=seed, os_cache=True)
    while True:
        epoch = iter(loader)
        try:
            for batch in epoch:
                yield list(batch[:views]), int(batch[0].shape[0])
        finally:
            # FFCV's epoch iterator is a thread that keeps decoding ahead until told to stop: stop
            # it, or it steals the cores from whatever is measured next
            epoch.close()


def close(it) -> None:
    """Stop a baseline iterator (shuts its workers down)."""
    if hasattr(it, "close"):
        it.close()
