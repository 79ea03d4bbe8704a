"""``uint8 [B, C, H, W]`` -> normalised ``float32 [B, C, H, W]`` in one vectorised pass (numba).

``normalize_into(src, dst, scale, offset)``: ``src`` uint8 and ``dst`` float32, both C-contiguous
and viewed as ``[B, C, H * W]``; ``dst = src * scale[c] + offset[c]`` (``scale`` =
``1 / (255 std)``, ``offset`` = ``-mean / std``, float32 ``[C]``). One read of the bytes, one
write of the floats: ~1.8x OpenCV's per-channel ``addWeighted`` over strided plane stacks at
224 px (the consumer's ``WorkerAugment.finish``). Import only when numba is installed.
"""
from __future__ import annotations

import numba  # optional (the ffcv extra)
import numpy as np


@numba.njit(nogil=True, fastmath=True, error_model="numpy", boundscheck=False, cache=True)
def _normalize(src, dst, scale, offset):
    B, C, N = src.shape
    for b in range(B):
        for c in range(C):
            s = scale[c]
            o = offset[c]
            a = src[b, c]
            d = dst[b, c]
            for j in range(N):
                d[j] = np.float32(a[j]) * s + o


def normalize_into(src: np.ndarray, dst: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> None:
    """``dst[b, c] = src[b, c] * scale[c] + offset[c]`` (module docstring)."""
    B, C = src.shape[:2]
    _normalize(src.reshape(B, C, -1), dst.reshape(B, C, -1), np.asarray(scale, np.float32),
               np.asarray(offset, np.float32))
