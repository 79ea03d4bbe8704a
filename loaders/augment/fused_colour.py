"""The colour-jitter chain of one uint8 image in one fused pass (numba), for the worker-augment path.

``colour_chain_u8(x, ops)``: ``x`` ``uint8 [H, W, 3]`` RGB (C-contiguous) and ``ops`` the
``(k, f)`` pairs of :func:`loaders.augment.cv2_ops._affine_chain_u8` (``k`` 0..3 brightness,
contrast, saturation, hue with factor/shift ``f``; 4 grayscale) -> a new ``uint8 [H, W, 3]``.
``colour_view_u8(x, ops, flip, planes=, norm=)``: the same pass with the horizontal flip folded
into its load (rows read right to left) and, with ``planes``, stored straight into planar
``uint8 [3, H, W]`` or normalised ``float32 [3, H, W]`` output (the executor's view layout): the
worker path then needs no ``cv2.flip`` and no ``cv2.split`` per image.

Intermediates stay float32 (values in ``[0, 255]``) and the result is rounded once, so it is the
engine's float result up to one rounding (max 0.5 level of 255 plus float32 noise), exact hue
included: no 8-bit HSV. The ops become *stages*: consecutive brightness/contrast/saturation/
grayscale maps compose into one 3x4 affine matrix followed by a clamp to ``[0, 255]`` (split
after any factor > 1, the only ones whose clamp can bind, so clamps fall where the engine's do),
and a hue stage is torchvision's HSV rotation in closed form (``adjust_hue``). Contrast needs
the mean luma of the image it applies to: the stages before it run once over the image into a
float32 checkpoint (summing it), the pending map carries the mean on, and the rest of the
chain continues from the checkpoint.

The kernel walks the image in tiles of :data:`TILE` pixels: each tile is de-interleaved into
three float32 planes that stay in L1 cache, every stage runs as a vectorised loop over them,
and the tile is rounded back into the output. ~1.5-2x faster per jittered 224 px view than the
OpenCV chain (which pays two 8-bit HSV conversions per hue and one rounding transform per
stage), and the uint8 recipe's error against the engine drops from ~12 to < 1 level of 255.

numba is optional (it comes with the ``ffcv`` extra): import this module only when it is
installed (:func:`loaders.augment.cv2_ops._affine_chain_u8` checks and otherwise runs the
OpenCV chain). The compiled kernel is cached on disk (numba ``cache=True``): a process's first
call costs the numba import and the cache load (~0.5-1 s), the very first one ever the compile.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numba  # optional (the ffcv extra): import this module only when numba is installed
import numpy as np

#: pixels per tile (3 float32 planes of 512 = 6 KB: L1-resident)
TILE = 512
_LUMA = np.asarray((0.2989, 0.587, 0.114), np.float64)   # torchvision's weights (functional._LUMA)
_LUMA_F = tuple(float(v) for v in _LUMA)
_S = sum(_LUMA_F)                                        # 0.9999: the luma map's only eigenvalue
_OPTS = dict(nogil=True, fastmath=True, error_model="numpy", boundscheck=False, cache=True)


@numba.njit(inline="always", **_OPTS)
def _affine_tile(r, g, b, m, a):
    """``clamp(A [r g b] + c, 0, 255)`` in place; ``a``: float32 [12] (3x4 row-major)."""
    a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
    a4, a5, a6, a7 = a[4], a[5], a[6], a[7]
    a8, a9, a10, a11 = a[8], a[9], a[10], a[11]
    lo, hi = np.float32(0.0), np.float32(255.0)
    for i in range(m):
        R, G, B = r[i], g[i], b[i]
        r[i] = min(max(a0 * R + a1 * G + a2 * B + a3, lo), hi)
        g[i] = min(max(a4 * R + a5 * G + a6 * B + a7, lo), hi)
        b[i] = min(max(a8 * R + a9 * G + a10 * B + a11, lo), hi)


@numba.njit(inline="always", **_OPTS)
def _hue_tile(r, g, b, m, shift6):
    """torchvision's HSV hue rotation by ``shift6`` sextants (in ``[0, 6)``) in place; values in
    ``[0, 255]``; the same case order (r wins ties, then g) and closed-form HSV -> RGB."""
    zero, one, four, six = np.float32(0.0), np.float32(1.0), np.float32(4.0), np.float32(6.0)
    for i in range(m):
        R, G, B = r[i], g[i], b[i]
        mx = max(max(R, G), B)
        c = mx - min(min(R, G), B)
        inv = one / (c if c > zero else one)
        h = ((G - B) * inv if mx == R else
             (np.float32(2.0) + (B - R) * inv if mx == G else four + (R - G) * inv))
        h = h + shift6
        h = h + six if h < zero else h
        h = h - six if h >= six else h
        k = np.float32(5.0) + h
        k = k - six if k >= six else k
        r[i] = mx - c * min(max(min(k, four - k), zero), one)
        k = np.float32(3.0) + h
        k = k - six if k >= six else k
        g[i] = mx - c * min(max(min(k, four - k), zero), one)
        k = one + h
        k = k - six if k >= six else k
        b[i] = mx - c * min(max(min(k, four - k), zero), one)


@numba.njit(inline="always", **_OPTS)
def _load_x(x, r, g, b, start, m, width, flip):
    """Pixels ``start .. start + m - 1`` (output order) of the interleaved ``x`` into the tile;
    ``flip``: each row read right to left (the horizontal flip, fused into the load)."""
    if not flip:
        xs = x[3 * start:3 * (start + m)]
        for i in range(m):
            r[i] = xs[3 * i]
            g[i] = xs[3 * i + 1]
            b[i] = xs[3 * i + 2]
        return
    i, q = 0, start
    while i < m:                          # one row segment at a time
        y = q // width
        c = q - y * width
        seg = min(width - c, m - i)
        lo = y * width + width - c - seg  # source pixels lo .. lo + seg - 1, read backwards
        xs = x[3 * lo:3 * (lo + seg)]
        rt, gt, bt = r[i:i + seg], g[i:i + seg], b[i:i + seg]
        for j in range(seg):
            # an unsigned index: numba then skips its negative-index test and the loop vectorises
            # (~7x faster than a signed 3 * (seg - 1 - j) or a reversed view)
            k = np.uint64(3 * (seg - 1 - j))
            rt[j] = xs[k]
            gt[j] = xs[k + np.uint64(1)]
            bt[j] = xs[k + np.uint64(2)]
        i += seg
        q += seg


@numba.njit(inline="always", **_OPTS)
def _store(r, g, b, start, m, out, pu8, pf, norm):
    """The tile rounded once into ``out`` (flat interleaved uint8), else ``pu8`` (uint8 planes
    ``[3, n]``), else ``pf`` (float32 planes: the rounded value times ``norm[c]`` plus ``norm[3 + c]``)."""
    half = np.float32(0.5)            # values are in [0, 255]: + 0.5 and truncation round them
    if out.shape[0] > 0:
        os_ = out[3 * start:3 * (start + m)]
        for i in range(m):
            os_[3 * i] = np.uint8(np.int32(r[i] + half))
            os_[3 * i + 1] = np.uint8(np.int32(g[i] + half))
            os_[3 * i + 2] = np.uint8(np.int32(b[i] + half))
    elif pu8.shape[1] > 0:
        pr, pg, pb = pu8[0, start:start + m], pu8[1, start:start + m], pu8[2, start:start + m]
        for i in range(m):
            pr[i] = np.uint8(np.int32(r[i] + half))
            pg[i] = np.uint8(np.int32(g[i] + half))
            pb[i] = np.uint8(np.int32(b[i] + half))
    else:
        pr, pg, pb = pf[0, start:start + m], pf[1, start:start + m], pf[2, start:start + m]
        s0, s1, s2, o0, o1, o2 = norm[0], norm[1], norm[2], norm[3], norm[4], norm[5]
        for i in range(m):
            pr[i] = np.float32(np.int32(r[i] + half)) * s0 + o0
            pg[i] = np.float32(np.int32(g[i] + half)) * s1 + o1
            pb[i] = np.float32(np.int32(b[i] + half)) * s2 + o2


@numba.njit(**_OPTS)
def _run_stages(x, width, flip, buf, out, pu8, pf, norm, prog, s0, s1, sums):
    """Stages ``s0 .. s1 - 1`` of ``prog`` (float32 ``[S, 13]``: kind, then the 3x4 matrix or the
    hue shift in sextants) over the image. Source: ``x`` (flat ``uint8 [3 n]``, RGB interleaved,
    rows of ``width`` px, mirrored with ``flip``) when it is not empty, else ``buf`` (float32
    ``[3, n]`` planes, already in output order). Sink: :func:`_store` when one of ``out``,
    ``pu8``, ``pf`` is not empty, else ``buf`` in place (when it is not empty), adding per-channel
    sums to ``sums`` (float64 [3]). Per-tile slices (not ``x[start + i]``) keep the loops
    vectorised: numba cannot prove ``start + i`` non-negative and would test every index for
    wrap-around."""
    from_x = x.shape[0] > 0
    to_sink = out.shape[0] > 0 or pu8.shape[1] > 0 or pf.shape[1] > 0
    to_buf = buf.shape[1] > 0
    n = x.shape[0] // 3 if from_x else buf.shape[1]
    r = np.empty(TILE, np.float32)
    g = np.empty(TILE, np.float32)
    b = np.empty(TILE, np.float32)
    for start in range(0, n, TILE):
        m = min(TILE, n - start)
        if from_x:
            _load_x(x, r, g, b, start, m, width, flip)
        else:
            br, bg, bb = buf[0, start:start + m], buf[1, start:start + m], buf[2, start:start + m]
            for i in range(m):
                r[i] = br[i]
                g[i] = bg[i]
                b[i] = bb[i]
        for s in range(s0, s1):
            if prog[s, 0] == 0:
                _affine_tile(r, g, b, m, prog[s, 1:])
            else:
                _hue_tile(r, g, b, m, prog[s, 1])
        if to_sink:
            _store(r, g, b, start, m, out, pu8, pf, norm)
        else:
            if to_buf:
                br, bg, bb = buf[0, start:start + m], buf[1, start:start + m], buf[2, start:start + m]
                for i in range(m):
                    br[i] = r[i]
                    bg[i] = g[i]
                    bb[i] = b[i]
            sr, sg, sb = np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for i in range(m):
                sr += r[i]
                sg += g[i]
                sb += b[i]
            sums[0] += sr
            sums[1] += sg
            sums[2] += sb


# ------------------------------------------------------------------------ stages from ops

_MAX_STAGES = 8
_NONE_U8 = np.empty(0, np.uint8)
_NONE_F32 = np.empty((3, 0), np.float32)
_NONE_P8 = np.empty((3, 0), np.uint8)
_NO_NORM = np.zeros(6, np.float32)


class _Chain:
    """Builds the stage program of one image and runs it: completed stages in ``prog``, a pending
    affine map, and at most one checkpoint (contrast's mean) in ``buf``.

    Every jitter/grayscale map is ``a I + b G`` plus ``c (1, 1, 1)`` (``G``: the 3x3 luma map,
    rows = torchvision's weights, ``G G = s G`` and ``G 1 = s 1`` with ``s`` the weights' sum),
    so the pending map is three floats and composes without matrices (cheap at 32 px too)."""

    def __init__(self, x2: np.ndarray, width: int = 1, flip: bool = False):
        self.x2 = x2
        self.width, self.flip = int(width), bool(flip)     # the source's rows, mirrored on load
        self.prog = np.zeros((_MAX_STAGES, 13), np.float32)
        self.n = 0                           # completed stages
        self.done = 0                        # stages already applied into buf
        self.buf = None                      # float32 [3, n] checkpoint, or None
        self.map = None                      # pending (a, b, c), None = identity

    def push(self, a: float, b: float, c: float, clamp: bool) -> None:
        """Compose ``a I + b G + c`` after the pending map (flushed when its clamp may bind)."""
        if self.map is not None:
            a0, b0, c0 = self.map
            a, b, c = a * a0, a * b0 + b * a0 + b * b0 * _S, a * c0 + b * c0 * _S + c
        self.map = (a, b, c)
        if clamp:
            self.flush()

    def _stage(self) -> np.ndarray:
        if self.n == _MAX_STAGES:
            raise ValueError(f"colour_chain_u8: more than {_MAX_STAGES} stages")
        self.n += 1
        return self.prog[self.n - 1]

    def flush(self) -> None:
        if self.map is not None:
            a, b, c = self.map
            l0, l1, l2 = _LUMA_F
            self._stage()[1:] = (a + b * l0, b * l1, b * l2, c, b * l0, a + b * l1, b * l2, c,
                                 b * l0, b * l1, a + b * l2, c)
            self.map = None

    def hue(self, shift: float) -> None:
        self.flush()
        row = self._stage()
        row[0], row[1] = 1.0, 6.0 * (shift % 1.0)

    def mean_luma(self) -> float:
        """Mean luma of the current image: the stages so far run into the checkpoint (their
        per-channel sums), then the pending map (exact: no clamp binds in a pending map)."""
        sums = np.zeros(3)
        if self.n == 0:                      # the input itself: sums only, no checkpoint
            self._run(self.x2, _NONE_F32, 0, 0, sums, flip=False)
        elif self.buf is None:               # the checkpoint is in output order (flipped)
            self.buf = np.empty((3, self.x2.shape[0] // 3), np.float32)
            self._run(self.x2, self.buf, 0, self.n, sums)
        else:
            self._run(_NONE_U8, self.buf, self.done, self.n, sums)
        self.done = self.n if self.buf is not None else 0
        L = float(_LUMA @ sums) / max(1, self.x2.shape[0] // 3)
        if self.map is not None:
            a, b, c = self.map            # luma(a x + b G x + c 1) = a L + b s L + c s
            L = a * L + b * _S * L + c * _S
        return L

    def _run(self, x, buf, s0, s1, sums, out=_NONE_U8, pu8=_NONE_P8, pf=_NONE_F32, norm=_NO_NORM, flip=None):
        _run_stages(x, self.width, self.flip if flip is None else flip, buf, out, pu8, pf, norm, self.prog,
                    s0, s1, sums)

    def run(self, out: np.ndarray = _NONE_U8, pu8: np.ndarray = _NONE_P8, pf: np.ndarray = _NONE_F32,
            norm: np.ndarray = _NO_NORM) -> None:
        """The remaining stages into one sink (:func:`_store`)."""
        if self.buf is None:
            self._run(self.x2, _NONE_F32, 0, self.n, np.zeros(3), out, pu8, pf, norm)
        else:
            self._run(_NONE_U8, self.buf, self.done, self.n, np.zeros(3), out, pu8, pf, norm)


def _chain(x2: np.ndarray, ops: Sequence[Tuple[int, float]], width: int = 1, flip: bool = False) -> _Chain:
    st = _Chain(x2, width, flip)
    for k, f in ops:
        f = float(f)
        if k == 3:
            if f % 1.0 != 0.0:
                st.hue(f)
        elif k == 0:
            st.push(f, 0.0, 0.0, f > 1.0)
        elif k == 1:
            st.push(f, 0.0, (1.0 - f) * st.mean_luma(), f > 1.0)
        elif k == 2:
            st.push(f, 1.0 - f, 0.0, f > 1.0)
        else:
            st.push(0.0, 1.0, 0.0, False)
    st.flush()
    return st


def colour_chain_u8(x: np.ndarray, ops: Sequence[Tuple[int, float]]) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> the chain ``ops`` applied, rounded once (module docstring)."""
    x = np.ascontiguousarray(x)
    st = _chain(x.reshape(-1), ops)
    if st.n == 0:
        return x
    out = np.empty_like(x)
    st.run(out.reshape(-1))
    return out


def colour_view_u8(x: np.ndarray, ops: Sequence[Tuple[int, float]], flip: bool = False, *,
                   planes: Optional[np.ndarray] = None, norm: Optional[Sequence[float]] = None) -> np.ndarray:
    """Flip (when ``flip``), then the chain ``ops``, of ``uint8 [H, W, 3]`` ``x`` in one pass, rounded once.

    Sink: ``planes`` given -- written into it and returned: ``uint8 [3, H, W]`` (the planar view
    itself), or ``float32 [3, H, W]`` with ``norm`` = ``(scale[3], offset[3])`` (each rounded value
    times ``scale[c]`` plus ``offset[c]``: the normalised view); else a new ``uint8 [H, W, 3]``
    (``x`` itself when there is nothing to do)."""
    x = np.ascontiguousarray(x)
    H, W = x.shape[:2]
    st = _chain(x.reshape(-1), ops, W, flip)
    if planes is None:
        if st.n == 0 and not flip:
            return x
        out = np.empty_like(x)
        st.run(out.reshape(-1))
        return out
    if planes.shape != (3, H, W) or not planes.flags.c_contiguous:
        raise ValueError(f"colour_view_u8: planes must be C-contiguous [3, {H}, {W}], got {planes.shape}")
    flat = planes.reshape(3, -1)
    if planes.dtype == np.uint8:
        st.run(pu8=flat)
    elif planes.dtype == np.float32 and norm is not None:
        st.run(pf=flat, norm=np.asarray(norm, np.float32).reshape(6))
    else:
        raise ValueError(f"colour_view_u8: planes must be uint8, or float32 with norm, got {planes.dtype}")
    return planes
