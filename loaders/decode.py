"""Reduced-scale JPEG decode: decode at 1/2, 1/4 or 1/8 when every view of the sample allows it.

libjpeg-turbo can run its inverse DCT at a reduced size (scaled IDCT), producing the image at
``ceil(H/d) x ceil(W/d)`` for ``d`` in {2, 4, 8} for less work than a full decode (no full-size
IDCT, upsampling, colour conversion or writes), and the later resize of each crop then starts
from a smaller image. The crop boxes do not change: they are drawn on the full-resolution size
(read from the JPEG header, :func:`jpeg_size`, ~2 us) exactly as without reduction, then

* :func:`choose_denominators` picks, per sample, the largest ``d`` in {8, 4, 2} (else 1) such
  that every view's box stays at or above that view's output size: ``box_h >= d * out_h`` and
  ``box_w >= d * out_w`` for all views (so a resize from the reduced crop never upsamples);
* :func:`map_boxes` maps each box ``(top, left, h, w)`` onto the reduced image: each edge
  ``x -> round(x / d)`` (half up), kept inside ``ceil(H/d) x ceil(W/d)``; the mapped size is at
  least ``floor(h / d)``, so still at or above the output size;
* the resize of each view then runs from the reduced crop. The torch backend (``decoder="cv2"``)
  resamples a crop of at least ``HALVE_MIN_PX`` (128) px a side that is reduced by 1.5x or more
  with :func:`halve_to` (2x2 box halvings, then a 3-tap Gaussian and bilinear, or the view's up
  filter below 1.5x) instead of OpenCV's area filter, whose non-integer path costs ~8x bilinear
  at 224 px; the FFCV backend keeps FFCV's resize.

Where the views are not much smaller than the image (``d = 1``) the image is decoded in full,
pixel-identical to the unreduced path (and, for crops under 128 px or reduced by less than 1.5x,
resampled identically). The difference against full decode + the backend's resize, same boxes,
is bounded in ``tests/test_decode.py``: mean abs < 4 and p99 <= 36 levels (0..255) over all
pixels of all views (measured: mean 1.9, p99 17 for 48 px views of 384 x 288 JPEGs; mean 1.8-1.9,
p99 10-11 for 224 px views of 1024 x 768 JPEGs; mean 2.8, p99 30 for 32 px views of 256 x 192).

Decoders (both libjpeg-turbo, ISLOW IDCT): simplejpeg's ``decode_jpeg`` with ``min_height=
ceil(H/d), min_width=ceil(W/d)`` selects exactly scale ``1/d`` (the smallest libjpeg scale whose
output fits; checked after decoding) and is pixel-identical to OpenCV's
``IMREAD_REDUCED_COLOR_d`` at every scale, 2-5% faster here, and decodes straight to RGB. The FFCV
backend passes the same ``d`` to FFCV's ``imdecode`` (turbojpeg, its fast IDCT, as its full
decode). Only 1/2, 1/4, 1/8 are used: libjpeg-turbo has SIMD scaled IDCTs for those; 3/8, 5/8, ...
are plain C.

Region decode (:class:`ViewPlan`, :func:`decode_region`; the ``loaders._jpeg_region`` extension, built
by ``pip install`` against the system libjpeg-turbo): each sample then decodes only the union of
its views' boxes (mapped onto the chosen scale, one column wider on each side). Rows above it are
entropy-decoded only, columns outside it skip IDCT/upsampling/colour conversion, and the decoder
stops after its last row. The views' pixels are identical to those cut from the whole image at
that scale (``tests/test_region_decode.py``); alone it costs ~1/1.17 (500 x 375) to ~1/1.31
(1024 x 768) of a full decode's CPU time for two random-resized-crop views. Without the
extension, whole images are decoded as above.

Shapes and dtypes: boxes are ``int64 [n, 4]`` per view (top, left, h, w), out sizes ``(h, w)``
per view, denominators ``int64 [n]``; decoded images ``uint8 [h, w, 3]`` RGB.
"""
from __future__ import annotations

import functools
import threading
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["DENOMINATORS", "Encoded", "LateDecodeError", "jpeg_size", "lazy_jpeg", "choose_denominators",
           "map_boxes", "reduced_size", "decode_scaled", "decode_region", "region_available", "ViewPlan",
           "halve_to", "prefilter_sigma"]

#: the reduction factors used, largest first (libjpeg-turbo's SIMD scaled IDCTs)
DENOMINATORS = (8, 4, 2)
#: JPEG colour spaces decoded straight to RGB by simplejpeg (others take the full decode path)
_LAZY_COLORSPACES = ("YCbCr", "Gray", "RGB")


class LateDecodeError(Exception):
    """A JPEG whose header read but whose data did not decode at the chosen scale: the caller
    decodes the chunk again without reduction (so the error, or the skip, is the unreduced path's)."""

    def __init__(self, slot: int, cause: BaseException):
        super().__init__(f"sample slot {slot}: {type(cause).__name__}: {cause}")
        self.slot = slot


class Encoded:
    """A JPEG not decoded yet: its bytes and its full size from the header.

    ``shape`` is ``(H, W, 3)``, as the decoded array's would be, so size lookups
    (``img.shape[:2]``) work on it before decoding.
    """

    __slots__ = ("data", "shape")

    def __init__(self, data: bytes, height: int, width: int):
        self.data = data
        self.shape = (int(height), int(width), 3)


@functools.lru_cache(maxsize=1)
def _simplejpeg():
    try:
        import simplejpeg  # optional (extra "fast")
    except ImportError:
        return None
    return simplejpeg


def jpeg_size(data) -> Optional[Tuple[int, int]]:
    """``(height, width)`` from a JPEG's header, or None (not a JPEG, unreadable header, a colour
    space not decoded straight to RGB, or simplejpeg not installed)."""
    sj = _simplejpeg()
    if sj is None or not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:2]) != b"\xff\xd8":
        return None
    try:
        h, w, colorspace, _ = sj.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
        return None
    if colorspace not in _LAZY_COLORSPACES or h <= 0 or w <= 0:
        return None
    return int(h), int(w)


def lazy_jpeg(data) -> Optional[Encoded]:
    """``data`` as an :class:`Encoded` (decoded later, at the scale its views allow), or None
    when it should be decoded now by the full path (see :func:`jpeg_size`)."""
    hw = jpeg_size(data)
    return None if hw is None else Encoded(data, *hw)


def reduced_size(height, width, d):
    """libjpeg's output size at scale ``1/d``: ``(ceil(H/d), ceil(W/d))`` (arrays or ints)."""
    return -(-height // d), -(-width // d)


def choose_denominators(boxes: Sequence[np.ndarray], out_sizes: Sequence[Tuple[int, int]],
                        allowed: Optional[np.ndarray] = None) -> np.ndarray:
    """Per sample, the largest ``d`` in :data:`DENOMINATORS` (else 1) with ``box_h >= d * out_h``
    and ``box_w >= d * out_w`` for every view ``v`` (``boxes[v]``: ``int64 [n, 4]``, ``out_sizes[v]``:
    ``(out_h, out_w)``). ``allowed``: bool ``[n]``, samples that may reduce (others get 1)."""
    n = len(boxes[0]) if len(boxes) else 0
    k = np.full(n, np.iinfo(np.int64).max, np.int64)  # largest integer factor every view allows
    for b, (oh, ow) in zip(boxes, out_sizes):
        b = np.asarray(b, np.int64)
        k = np.minimum(k, np.minimum(b[:, 2] // int(oh), b[:, 3] // int(ow)))
    d = np.ones(n, np.int64)
    for den in DENOMINATORS[::-1]:  # 2, 4, 8: the last one that fits wins
        d[k >= den] = den
    if allowed is not None:
        d[~np.asarray(allowed, bool)] = 1
    return d


def map_boxes(boxes: np.ndarray, d: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """``int64 [n, 4]`` boxes on the full-size images mapped onto the images decoded at ``1/d``
    (``d``: ``int64 [n]``): edges rounded half up to the reduced grid, inside its bounds."""
    b = np.asarray(boxes, np.int64)
    d = np.asarray(d, np.int64)
    if (d == 1).all():
        return b
    rh, rw = reduced_size(np.asarray(heights, np.int64), np.asarray(widths, np.int64), d)
    top = np.minimum((2 * b[:, 0] + d) // (2 * d), rh - 1)
    left = np.minimum((2 * b[:, 1] + d) // (2 * d), rw - 1)
    bottom = np.clip((2 * (b[:, 0] + b[:, 2]) + d) // (2 * d), top + 1, rh)
    right = np.clip((2 * (b[:, 1] + b[:, 3]) + d) // (2 * d), left + 1, rw)
    return np.stack([top, left, bottom - top, right - left], axis=1)


def decode_scaled(data: bytes, d: int, height: int, width: int) -> Tuple[np.ndarray, int]:
    """RGB ``uint8 [ceil(H/d), ceil(W/d), 3]`` from simplejpeg, and the ``d`` actually used (1 if
    libjpeg picked another scale: then the image is decoded in full). Raises ValueError/RuntimeError
    for data simplejpeg cannot decode."""
    sj = _simplejpeg()
    if d == 1:
        return sj.decode_jpeg(data, colorspace="RGB"), 1
    rh, rw = reduced_size(height, width, d)
    img = sj.decode_jpeg(data, colorspace="RGB", min_height=rh, min_width=rw)
    if img.shape[:2] != (rh, rw):  # never seen; keep the boxes right whatever libjpeg did
        return sj.decode_jpeg(data, colorspace="RGB"), 1
    return img, d


#: an axis whose fitted sigma is below this is not blurred (3 taps of a narrower Gaussian are ~[0, 1, 0])
MIN_PREFILTER_SIGMA = 0.3
#: from this sigma on, OpenCV's fixed 3-tap kernel [1, 2, 1] / 4 (sigma ~0.71) is used instead: its
#: path costs ~0.6x a computed kernel's, and it is within 0.1 sigma of the fit there
FIXED_PREFILTER_SIGMA = 0.62


def prefilter_sigma(factor: float) -> float:
    """The Gaussian sigma (input pixels) that :func:`halve_to` blurs an axis reduced by ``factor``
    with before its bilinear resize: ``0.52 + 0.66 * (factor - 1.5)`` (0 at or below 1x). A 3-tap
    Gaussian of that width followed by bilinear is closest, in mean abs level, to torchvision's
    antialiased resize (a triangle ``factor`` pixels wide) over 1.3x-2x on photo-like JPEGs
    (fitted on the feed benchmark's images)."""
    return 0.0 if factor <= 1.0 else max(0.0, 0.52 + 0.66 * (factor - 1.5))


def _prefilter(crop: np.ndarray, fy: float, fx: float) -> np.ndarray:
    """``crop`` blurred per axis for a bilinear reduction by ``(fy, fx)`` (:func:`prefilter_sigma`)."""
    import cv2
    sy, sx = prefilter_sigma(fy), prefilter_sigma(fx)
    ksize = (3 if sx >= MIN_PREFILTER_SIGMA else 1, 3 if sy >= MIN_PREFILTER_SIGMA else 1)
    border = cv2.BORDER_REFLECT_101 | cv2.BORDER_ISOLATED  # the crop alone, never its parent's pixels
    if min(s for s in (sx, sy) if s >= MIN_PREFILTER_SIGMA) >= FIXED_PREFILTER_SIGMA:
        return cv2.GaussianBlur(crop, ksize, 0, borderType=border)
    return cv2.GaussianBlur(crop, ksize, sigmaX=max(sx, MIN_PREFILTER_SIGMA),
                            sigmaY=max(sy, MIN_PREFILTER_SIGMA), borderType=border)


def halve_to(crop: np.ndarray, out: np.ndarray, interpolation: int, area_min_factor: float = 1.5) -> None:
    """Resample ``crop`` (``uint8 [h, w, 3]``, larger than ``out``) into ``out`` (``[oh, ow, 3]``)
    without OpenCV's area filter at non-integer factors (~8x the cost of bilinear at 224 px): 2x2
    box halvings (its exact-2x path) while both sides are at least twice the output (an odd last
    row/column is dropped); then a remaining factor of at least ``area_min_factor`` is blurred by a
    3-tap Gaussian per axis (:func:`prefilter_sigma`) and resized bilinearly, a smaller one uses
    ``interpolation`` (the view's up filter), as the backend's rule does.

    Against the previous rule for the remaining factor (bilinear to twice the output, then one
    more 2x2 halving), on the feed benchmark's JPEGs and random 1.5x+ crops to 224 px: ~0.7x its
    CPU time, and nearer torchvision's antialiased resize of the same crop (mean abs 0.69 levels
    against 0.98 at 500 x 375, 1.00 against 1.16 at 1024 x 768; ``tests/test_decode.py`` bounds it)."""
    import cv2
    oh, ow = out.shape[:2]
    h, w = crop.shape[:2]
    while h >= 2 * oh and w >= 2 * ow:
        h, w = h // 2, w // 2
        crop = cv2.resize(crop[:2 * h, :2 * w], (w, h), interpolation=cv2.INTER_AREA)
    if (h, w) == (oh, ow):
        out[...] = crop
    elif max(h / oh, w / ow) >= area_min_factor:
        cv2.resize(_prefilter(crop, h / oh, w / ow), (ow, oh), dst=out, interpolation=cv2.INTER_LINEAR)
    else:
        cv2.resize(crop, (ow, oh), dst=out, interpolation=interpolation)


@functools.lru_cache(maxsize=1)
def _region_ext():
    try:
        from . import _jpeg_region  # built by setup.py from _jpeg_region.c (optional)
    except ImportError:
        return None
    return _jpeg_region


def region_available() -> bool:
    """Whether region decode can run here (the ``loaders._jpeg_region`` extension is built)."""
    return _region_ext() is not None


#: columns a region's width may grow by (jpeg_crop_scanline widens it to an iMCU boundary, <= 32 px)
_REGION_PAD = 32
_scratch = threading.local()


def decode_region(data, d: int, top: int, left: int, height: int, width: int) -> Tuple[np.ndarray, int, int]:
    """Rows ``[top, top + height)`` and (at least) columns ``[left, left + width)`` of the JPEG at
    scale ``1/d`` (``d`` in 1, 2, 4, 8; coordinates on the ``ceil(H/d) x ceil(W/d)`` image): RGB
    ``uint8 [height, w, 3]`` and its origin ``(y0, x0)`` on that image, ``y0 == top``, ``x0 <= left``.

    Only those rows and columns go through dequantisation, IDCT, upsampling and colour conversion,
    and rows below the region are not decoded at all (``loaders/_jpeg_region.c``). The pixels
    equal the full decode's at ``(y0 + r, x0 + c)`` except in a column at a cut edge (fancy
    upsampling treats it as the image's edge): callers that want exact pixels ask for one column
    more on each side, as :class:`ViewPlan` does. The array is a view of a per-thread buffer that
    the next call overwrites. Raises ValueError for data libjpeg cannot decode (warnings included).
    """
    ext = _region_ext()
    need_w = int(width) + _REGION_PAD
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape[0] < height or buf.shape[1] < need_w:
        h0, w0 = (0, 0) if buf is None else buf.shape[:2]
        buf = _scratch.buf = np.empty((max(h0, int(height)), max(w0, need_w), 3), np.uint8)
    y0, x0, h, w = ext.decode_region(data, int(d), int(top), int(left), int(height), int(width), buf,
                                     buf.strides[0])
    return buf[:h, :w], y0, x0


class ViewPlan:
    """How each sample of a chunk is decoded for its views: the scale (:func:`choose_denominators`),
    the boxes on the decoded image, and with ``region`` the part of the image decoded.

    ``images``: decoded arrays and :class:`Encoded` JPEGs; ``boxes[v]``: ``int64 [n, 4]`` per view
    on the full-size images; ``out_sizes[v]``: ``(out_h, out_w)``. ``region`` (needs
    :func:`region_available`): decode only the union of the sample's view boxes, widened by one
    column on each side, at that scale (:func:`decode_region`), so that every view's pixels equal
    those of the whole image decoded at the same scale; otherwise the whole image
    (:func:`decode_scaled`). ``d``: ``int64 [n]``, the scales chosen (1 = full size; arrays keep 1).
    """

    def __init__(self, images: List, boxes: Sequence[np.ndarray], out_sizes: Sequence[Tuple[int, int]],
                 *, region: bool = True):
        n = len(images)
        self.images = images
        self.full_boxes = [np.asarray(b, np.int64) for b in boxes]
        self.lazy = np.fromiter((isinstance(im, Encoded) for im in images), bool, n)
        self.region = bool(region) and bool(self.lazy.any()) and region_available()
        self.d = choose_denominators(self.full_boxes, out_sizes, allowed=self.lazy)
        self.full = np.asarray([im.shape[:2] for im in images], np.int64).reshape(n, 2)
        mapped = [map_boxes(b, self.d, self.full[:, 0], self.full[:, 1]) for b in self.full_boxes]
        self._boxes = [b.tolist() for b in mapped]
        self._regions = self._union(mapped).tolist() if self.region else None

    def _union(self, mapped: List[np.ndarray]) -> np.ndarray:
        """``int64 [n, 4]`` (top, left, h, w): every view's box on the scaled image, plus a column
        each side (inside the image)."""
        top = np.min([b[:, 0] for b in mapped], axis=0)
        left = np.min([b[:, 1] for b in mapped], axis=0)
        bottom = np.max([b[:, 0] + b[:, 2] for b in mapped], axis=0)
        right = np.max([b[:, 1] + b[:, 3] for b in mapped], axis=0)
        _, rw = reduced_size(self.full[:, 0], self.full[:, 1], self.d)
        left = np.maximum(left - 1, 0)
        right = np.minimum(right + 1, rw)
        return np.stack([top, left, bottom - top, right - left], axis=1)

    def boxes(self, i: int) -> List[Tuple[int, int, int, int]]:
        """Sample ``i``'s view boxes on its decoded scale (before any region offset)."""
        return [tuple(b[i]) for b in self._boxes]

    def sample(self, i: int) -> Tuple[np.ndarray, List[Tuple[int, int, int, int]]]:
        """Sample ``i`` decoded (``uint8 [h, w, 3]``) and its view boxes ``(top, left, h, w)`` on
        that array. A region is a view of a per-thread buffer: use it before the next call. Raises
        :class:`LateDecodeError` for an Encoded item that fails to decode."""
        im = self.images[i]
        if not self.lazy[i]:
            return im, self.boxes(i)
        d = int(self.d[i])
        try:
            if self._regions is not None:
                top, left, h, w = self._regions[i]
                arr, y0, x0 = decode_region(im.data, d, top, left, h, w)
                return arr, [(t - y0, lf - x0, bh, bw) for t, lf, bh, bw in self.boxes(i)]
            arr, used = decode_scaled(im.data, d, im.shape[0], im.shape[1])
        except (ValueError, RuntimeError) as e:
            raise LateDecodeError(i, e) from e
        if used != d:  # libjpeg picked another scale (never seen): the full-size boxes
            self.d[i] = used
            return arr, [tuple(b[i].tolist()) for b in self.full_boxes]
        return arr, self.boxes(i)
