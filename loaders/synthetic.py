"""A seeded, procedurally drawn, labelled image set: fastssl's offline demo and test data.

Each image shows one large shape on a coloured background. The class is the *shape* (10
kinds: disk, square, triangle, cross, ring, star, bars, checker, half-disk, dot grid; with
``num_classes`` up to 20 the second ten are the same shapes with a striped fill). Position,
size (radius 28-42% of the side), rotation, stretch, foreground and background colours,
background gradient and waves, and pixel noise are random and independent of the class, so
colour statistics do not give the class away while the shape survives random-resized crops
(scale 0.2-1) and colour jitter. An SSL encoder trained on it separates the classes far
better than a random one, which is what the demo's kNN check relies on.

``variant="generated"`` is a stand-in for diffusion-generated images: the same classes drawn
with a shifted distribution (blurred/smoother, warmer and brighter palette, radial
backgrounds, little noise). Its labels are kept internally but reported as ``-1`` (unknown),
like AdaInf's generated CIFAR images, unless ``keep_labels=True``.

Everything is drawn with vectorised numpy at construction (images grouped by class and
processed in chunks: no per-image Python), e.g. 10k 32x32 images in well under 2 s.
``train`` and ``test`` come from different seed streams, so they are disjoint draws.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .base import InMemorySource, register_source
from .errors import ConfigError

__all__ = ["SyntheticSource", "synthetic_arrays", "SHAPES", "VARIANTS", "SPLITS"]

VARIANTS = ("real", "generated")
SPLITS = ("train", "test")
#: pixels per chunk of float32 work (bounds peak memory to ~100 MB whatever n and size are)
_CHUNK_PIXELS = 1 << 21


# Shapes in the shape's own frame: (u, v) are pixel offsets from the shape centre, rotated,
# divided by the radius; each shape spans about the unit disk. All take/return [m, S, S].
def _disk(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.82


def _triangle(u, v):
    m = np.ones(u.shape, dtype=bool)
    for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
        m &= (u * math.cos(a) + v * math.sin(a)) >= -0.5
    return m


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.28) & (av <= 1.0)) | ((av <= 0.28) & (au <= 1.0))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55 ** 2)


def _star(u, v):
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    return rho <= 0.38 + 0.62 * ((1.0 + np.cos(5.0 * phi)) * 0.5) ** 1.5


def _bars(u, v):
    inside = (np.abs(u) <= 0.95) & (np.abs(v) <= 0.95)
    return inside & (np.floor((v + 0.95) / 0.38).astype(np.int32) % 2 == 0)


def _checker(u, v):
    inside = (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)
    cells = np.floor((u + 0.9) / 0.45).astype(np.int32) + np.floor((v + 0.9) / 0.45).astype(np.int32)
    return inside & (cells % 2 == 0)


def _half_disk(u, v):
    v2 = v + 0.4
    return (u * u + v2 * v2 <= 1.0) & (v2 >= 0.0)


def _dots(u, v):
    du = u - 0.62 * np.round(u / 0.62)
    dv = v - 0.62 * np.round(v / 0.62)
    return (np.abs(u) <= 0.93) & (np.abs(v) <= 0.93) & (du * du + dv * dv <= 0.22 ** 2)


SHAPES: Tuple[Tuple[str, Callable], ...] = (
    ("disk", _disk), ("square", _square), ("triangle", _triangle), ("cross", _cross), ("ring", _ring),
    ("star", _star), ("bars", _bars), ("checker", _checker), ("half_disk", _half_disk), ("dots", _dots),
)
_MAX_CLASSES = 2 * len(SHAPES)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _check(n, size, variant, split, num_classes) -> None:
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ConfigError(f"synthetic: n must be a positive integer, got {n!r}")
    if not isinstance(size, (int, np.integer)) or not 8 <= size <= 512:
        raise ConfigError(f"synthetic: size must be an integer in [8, 512], got {size!r}")
    if variant not in VARIANTS:
        raise ConfigError(f"synthetic: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if split not in SPLITS:
        raise ConfigError(f"synthetic: split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(num_classes, (int, np.integer)) or not 2 <= num_classes <= _MAX_CLASSES:
        raise ConfigError(f"synthetic: num_classes must be in [2, {_MAX_CLASSES}], got {num_classes!r}")


def _draw_params(rng: np.random.Generator, n: int, generated: bool) -> Dict[str, np.ndarray]:
    """Per-image random parameters, all drawn up front (independent of chunking)."""
    f = np.float32
    p = {
        "cx": rng.uniform(0.32, 0.68, n).astype(f),        # shape centre, fraction of the side
        "cy": rng.uniform(0.32, 0.68, n).astype(f),
        "radius": rng.uniform(0.28, 0.42, n).astype(f),    # fraction of the side
        "theta": rng.uniform(0, 2 * math.pi, n).astype(f),
        "stretch": rng.uniform(0.85, 1.18, n).astype(f),
        "bg0": rng.random((n, 3), dtype=f),
        "bg1": rng.random((n, 3), dtype=f),
        "fg": rng.random((n, 3), dtype=f),
        "grad_dir": rng.uniform(0, 2 * math.pi, n).astype(f),
        "wave_amp": rng.uniform(0.0, 0.12, n).astype(f),
        "wave_freq": rng.uniform(1.0, 3.0, n).astype(f),   # cycles per image side
        "wave_dir": rng.uniform(0, 2 * math.pi, n).astype(f),
        "wave_phase": rng.uniform(0, 2 * math.pi, n).astype(f),
        "stripe_dark": rng.uniform(0.35, 0.6, n).astype(f),
    }
    if generated:
        # shifted palette: brighter, warmer (more red, less blue), lower contrast of colours
        tint = np.array([1.08, 0.95, 0.72], dtype=f)
        for k in ("bg0", "bg1", "fg"):
            p[k] = np.clip((0.3 + 0.7 * p[k] ** 0.8) * tint, 0, 1).astype(f)
    # The shape must stay visible: push the foreground away from the background's luminance.
    bg_l = ((p["bg0"] + p["bg1"]) * 0.5) @ _LUMA
    fg_l = p["fg"] @ _LUMA
    weak = np.abs(fg_l - bg_l) < 0.28
    shift = np.where(bg_l < 0.5, 0.45, -0.45).astype(f)
    p["fg"][weak] = np.clip(p["fg"][weak] + shift[weak, None], 0, 1)
    return p


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[C, m, S, S]`` along the two spatial axes (edge padding)."""
    r = max(1, int(math.ceil(2 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float32) / sigma) ** 2)
    k /= k.sum()
    for axis in (2, 3):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (r, r)
        src = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        out = np.zeros_like(img)
        tmp = np.empty_like(img)
        for j, w in enumerate(k):  # 2r+1 shifted adds over the whole chunk (slices are views)
            sl = [slice(None)] * img.ndim
            sl[axis] = slice(j, j + n)
            np.multiply(src[tuple(sl)], w, out=tmp)
            out += tmp
        img = out
    return img


def _render(p: Dict[str, np.ndarray], ids: np.ndarray, shape_fn, striped: bool, size: int,
            generated: bool, noise_rng: np.random.Generator) -> np.ndarray:
    """Draw images ``ids`` (all of one class) as float32 ``[3, m, S, S]`` (channels first), ~[0, 1].

    Speed: channels-first planes. With channels last every elementwise op runs numpy's inner
    loop over a length-3 axis, ~20x slower than over the contiguous S*S plane.
    """
    S, m = size, len(ids)
    g = (np.arange(S, dtype=np.float32) + 0.5)
    ys, xs = g[None, :, None], g[None, None, :]
    col = lambda k: p[k][ids][:, None, None]  # noqa: E731 - [m,1,1] per-image scalars
    # shape frame
    rad = col("radius") * S
    dx = (xs - col("cx") * S) / rad
    dy = (ys - col("cy") * S) / rad
    c, s = np.cos(col("theta")), np.sin(col("theta"))
    u = (c * dx + s * dy) * col("stretch")
    v = (-s * dx + c * dy) / col("stretch")
    mask = shape_fn(u, v).astype(np.float32)                                 # [m,S,S]
    if generated:
        # smooth, "diffusion-like" edges. Blurring the mask (one plane) instead of the finished
        # image (three) is 3x cheaper and the same picture: the background is already smooth.
        mask = _gaussian_blur(mask[None], 0.9 * S / 32)[0]
    # background: two-colour gradient (linear; radial for "generated") plus a soft wave
    xc, yc = (xs - S / 2) / S, (ys - S / 2) / S                              # [1,1,S], [1,S,1]
    if generated:
        t = np.broadcast_to(np.clip(np.sqrt(xc * xc + yc * yc) * 1.6, 0, 1), (m, S, S))
    else:
        t = np.clip(0.5 + xc * np.cos(col("grad_dir")) + yc * np.sin(col("grad_dir")), 0, 1)
    # sin(a + b) = sin a cos b + cos a sin b: the wave from [m,1,S] and [m,S,1] factors, no
    # full-size sin
    f = 2 * math.pi * col("wave_freq")
    a = f * xc * np.cos(col("wave_dir")) + col("wave_phase")
    b = f * yc * np.sin(col("wave_dir"))
    wave = col("wave_amp") * (np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b))
    if striped:  # classes 10..19: the same shape with a two-tone striped fill
        fg_scale = 1 - (np.floor(u * 2.5).astype(np.int32) % 2).astype(np.float32) * col("stripe_dark")
    else:
        fg_scale = None
    img = np.empty((3, m, S, S), dtype=np.float32)
    for ch in range(3):
        bg0 = p["bg0"][ids, ch][:, None, None]
        bg1 = p["bg1"][ids, ch][:, None, None]
        fg = p["fg"][ids, ch][:, None, None]
        plane = img[ch]
        np.multiply(t, bg1 - bg0, out=plane)
        plane += bg0
        plane += wave
        fgp = fg * fg_scale if fg_scale is not None else fg
        plane += mask * (fgp - plane)                                        # blend the shape in
    sigma = 0.012 if generated else 0.045
    # luminance noise shared by the channels; uniform with the std of N(0, sigma): cheaper to
    # draw than Gaussian and indistinguishable after 8-bit rounding for this purpose
    noise = noise_rng.random((m, S, S), dtype=np.float32)
    noise -= 0.5
    noise *= sigma * math.sqrt(12.0)
    img += noise
    return img


def synthetic_arrays(n: int, size: int = 32, seed: int = 0, variant: str = "real", split: str = "train",
                     num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Draw the synthetic set: ``(images uint8 [n, size, size, 3] RGB, labels int64 [n])``.

    Labels are balanced (counts differ by at most one) and shuffled; the true class is
    returned for both variants. Deterministic in all arguments.
    """
    _check(n, size, variant, split, num_classes)
    vid, sid = VARIANTS.index(variant), SPLITS.index(split)
    rng = np.random.default_rng([int(seed), vid, sid, 0x5EED])
    labels = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
    generated = variant == "generated"
    p = _draw_params(rng, n, generated)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for c in range(num_classes):
        ids = np.flatnonzero(labels == c)
        _, shape_fn = SHAPES[c % len(SHAPES)]
        for k, start in enumerate(range(0, len(ids), chunk)):
            part = ids[start:start + chunk]
            noise_rng = np.random.default_rng([int(seed), vid, sid, 1, c, k])
            img = _render(p, part, shape_fn, c >= len(SHAPES), size, generated, noise_rng)
            out = np.empty((len(part), size, size, 3), dtype=np.uint8)
            for ch in range(3):
                plane = img[ch]
                plane *= 255.0
                plane += 0.5
                np.clip(plane, 0, 255, out=plane)
                out[..., ch] = plane  # float -> uint8 truncation after +0.5: rounding
            images[part] = out
    return images, labels


@register_source("synthetic")
class SyntheticSource(InMemorySource):
    """The synthetic set as a source of ``uint8 [size, size, 3]`` RGB arrays.

    ``images`` (``uint8 [n, size, size, 3]``) and ``true_labels`` hold the whole set;
    ``labels()`` gives ``true_labels`` for ``variant="real"`` and ``-1`` for
    ``variant="generated"`` unless ``keep_labels=True``.
    """

    config_keys = ("n", "size", "seed", "variant", "split", "num_classes", "name", "keep_labels")

    def __init__(self, *, n: int, size: int = 32, seed: int = 0, variant: str = "real", split: str = "train",
                 num_classes: int = 10, name: Optional[str] = None, keep_labels: bool = False):
        self.images, self.true_labels = synthetic_arrays(n, size, seed, variant, split, num_classes)
        self.size, self.seed, self.variant, self.split, self.num_classes = size, seed, variant, split, num_classes
        self.name = name or f"synthetic-{variant}-{split}"
        self._labels = (self.true_labels if variant == "real" or keep_labels
                        else np.full(n, -1, dtype=np.int64))

    @property
    def classes(self):
        return [SHAPES[c % len(SHAPES)][0] + ("_striped" if c >= len(SHAPES) else "")
                for c in range(self.num_classes)]

    def describe(self, i: int) -> str:
        return f"synthetic(variant={self.variant}, split={self.split}, seed={self.seed})[{i}]"
