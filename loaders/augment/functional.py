"""Batched image ops with explicit per-sample parameters.

Every op takes ``img``: ``float32 [B, 3, H, W]`` with values in ``[0, 1]`` (RGB) on any device,
plus per-sample parameters as tensors with a leading ``B`` dimension, and returns a new
``[B, 3, H', W']`` tensor in ``[0, 1]``. Random parameters are drawn elsewhere
(:mod:`loaders.augment.params`), so each op can be compared with torchvision's functional op
on the same parameters (tests/test_augment_ops.py).

Each op reproduces the torchvision (``transforms.v2.functional``) op of the same name on
float images. On uint8 images torchvision rounds (or truncates) after every op; this engine
keeps float32 between ops and quantises nothing, so a whole uint8 torchvision pipeline and
this one differ by the accumulated rounding (a few 1/255 steps), never by more.

Speed decisions (CPU and CUDA alike):
* resampling is two batched matmuls with per-sample interpolation matrices, so a whole batch
  of differently-sized crops is resized in one call, and ``1/255`` is folded into a matrix;
* colour ops work on channel planes with broadcasting (no per-sample Python, no float64);
* hue rotation uses the closed-form HSV->RGB (``v - c * clamp(min(k, 4-k), 0, 1)``) instead
  of building 6 candidate planes and a one-hot mask, which is ~3x fewer passes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "to_float", "resample_matrix", "resized_crop", "hflip", "rgb_to_grayscale", "grayscale",
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue",
    "gaussian_kernel1d", "gaussian_blur", "blur_kernel_size", "solarize", "normalize",
    "invert", "posterize", "autocontrast", "equalize", "adjust_sharpness", "affine", "cutout",
    "masked_apply",
]

#: ITU-R 601 luma weights as torchvision uses them for rgb_to_grayscale
_LUMA = (0.2989, 0.587, 0.114)


def _col(t: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, 1, 1]`` for broadcasting over an image batch."""
    return t.reshape(-1, 1, 1, 1)


def to_float(img: torch.Tensor) -> torch.Tensor:
    """``uint8 [B,3,H,W]`` (0..255) -> ``float32`` in ``[0, 1]``; float input is returned as float32."""
    if img.dtype == torch.uint8:
        return img.to(torch.float32).mul_(1.0 / 255.0)
    return img.to(torch.float32, copy=True)   # a new tensor: later ops may write in place


# ---------------------------------------------------------------- resampling (crop + resize)

def _aa_filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Antialiasing filters of torch's ``interpolate(..., antialias=True)`` (PIL's):
    triangle for bilinear, Keys cubic with ``a = -0.5`` for bicubic."""
    x = x.abs()
    if mode == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _cubic_coeffs(t: torch.Tensor, a: float = -0.75):
    """The four tap weights of torch's non-antialiased bicubic (``a = -0.75``) at fraction ``t``."""
    def c1(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def c2(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, *,
                    mode: str = "bilinear", antialias: bool = True, gain: float = 1.0) -> torch.Tensor:
    """Per-sample 1-D resampling matrices for "crop ``[start, start+length)`` then resize to
    ``out_size``" along one axis, exactly as ``torch.nn.functional.interpolate`` with
    ``align_corners=False`` (the kernel torchvision's ``resized_crop`` calls).

    ``start``, ``length``: ``[B]`` (pixels, integers stored in any dtype). Returns
    ``float32 [B, out_size, in_size]``; row ``i`` holds the weights of output pixel ``i``
    (zero outside the crop, so crop borders are clamped as torch clamps the cropped image).
    ``gain`` multiplies every weight (used to fold the uint8 -> [0, 1] scaling in for free).

    Speed decision: the filter is evaluated only on each output pixel's ``T`` taps
    (``[B, out, T]``, T = 2..~10) and scattered into the dense matrix, instead of on the dense
    ``[B, out, in]`` grid (~25x fewer filter evaluations at 224 px).
    """
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"resample mode must be bilinear, bicubic or nearest, got {mode!r}")
    dev = start.device
    B = start.shape[0]
    start = start.to(torch.float32).reshape(-1, 1, 1)
    length = length.to(torch.float32).reshape(-1, 1, 1)
    scale = length / out_size                                           # [B,1,1] input px per output px
    i = torch.arange(out_size, device=dev, dtype=torch.float32).reshape(1, -1, 1)
    if mode == "nearest":
        pos = torch.minimum(torch.floor(i * scale), length - 1)        # [B,out,1]
        w = torch.ones_like(pos)
    elif antialias:
        # torch's _upsample_*_aa: window [xmin, xmax) around center, filter stretched by the
        # downscale factor, weights renormalised over the window.
        base = 1.0 if mode == "bilinear" else 2.0
        s = scale.clamp(min=1.0)
        support = base * s
        center = scale * (i + 0.5)
        xmin = torch.trunc(center - support + 0.5).clamp(min=0.0)
        xmax = torch.minimum(torch.trunc(center + support + 0.5), length)
        taps = int(math.ceil(2 * base * max(in_size / out_size, 1.0))) + 2
        pos = xmin + torch.arange(taps, device=dev, dtype=torch.float32).reshape(1, 1, -1)
        w = _aa_filter((pos - center + 0.5) / s, mode) * (pos < xmax)
        total = w.sum(-1, keepdim=True)
        w = w / torch.where(total == 0, torch.ones_like(total), total)
    elif mode == "bilinear":
        src = ((i + 0.5) * scale - 0.5).clamp(min=0.0)
        i0 = torch.floor(src)
        lam = src - i0
        pos = torch.cat([torch.minimum(i0, length - 1.0), torch.minimum(i0 + 1.0, length - 1.0)], -1)
        w = torch.cat([1.0 - lam, lam], -1)
    else:  # bicubic, no antialias: 4 taps with clamped indices, a = -0.75
        src = (i + 0.5) * scale - 0.5
        i0 = torch.floor(src)
        pos = torch.cat([torch.minimum((i0 + k).clamp(min=0.0), length - 1.0) for k in (-1.0, 0.0, 1.0, 2.0)], -1)
        w = torch.cat(_cubic_coeffs(src - i0), -1)
    # taps outside the crop carry weight 0 (aa window) or were clamped into it (the others)
    col = (start + pos.clamp(max=in_size - 1 - 0.0)).clamp(0, in_size - 1).to(torch.int64)
    w = (w * gain).to(torch.float32)
    out = torch.zeros(B, out_size, in_size, device=dev, dtype=torch.float32)
    # one scatter per tap: clamped taps may share a column, and a single scatter_add with
    # repeated indices uses float atomics on CUDA (run-to-run bit differences); per tap each row
    # gets one index, so the sum order is fixed and views are bit-reproducible.
    for t in range(col.shape[-1]):
        out.scatter_add_(2, col[..., t:t + 1], w[..., t:t + 1])
    return out


def resized_crop(img: torch.Tensor, boxes: torch.Tensor, size: int, *, mode: str = "bilinear",
                 antialias: bool = True, clamp: bool = True) -> torch.Tensor:
    """Crop ``boxes`` (``int64 [B, 4]`` rows ``(top, left, h, w)``) out of ``img`` and resize
    each crop to ``size x size``; equals torchvision's ``resized_crop`` per sample.

    ``img``: ``uint8`` (0..255) or ``float`` (0..1) ``[B, C, H, W]``; returns ``float32
    [B, C, size, size]`` in ``[0, 1]`` (bicubic overshoot is clamped when ``clamp``).
    """
    B, C, H, W = img.shape
    gain = 1.0 / 255.0 if img.dtype == torch.uint8 else 1.0
    boxes = boxes.to(img.device)
    wy = resample_matrix(boxes[:, 0], boxes[:, 2], H, size, mode=mode, antialias=antialias)
    wx = resample_matrix(boxes[:, 1], boxes[:, 3], W, size, mode=mode, antialias=antialias, gain=gain)
    x = img.to(torch.float32).reshape(B, C * H, W)
    # Two plain bmm calls (channels folded into the matrix rows): [B, C*H, W] @ [B, W, s], then
    # [B, s, H] @ [B, H, C*s]. Broadcasting matmul ([B,C,H,W] @ [B,1,W,s]) measured ~5x slower
    # on CPU at 32 px because it expands the weights per channel.
    t = torch.bmm(x, wx.transpose(1, 2))                                  # [B, C*H, s]
    t = t.view(B, C, H, size).permute(0, 2, 1, 3).reshape(B, H, C * size)
    out = torch.bmm(wy, t).view(B, size, C, size).permute(0, 2, 1, 3).contiguous()
    return out.clamp_(0.0, 1.0) if clamp else out


# ---------------------------------------------------------------- flips and colour

def hflip(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples where ``mask`` (``bool [B]``) is set."""
    return torch.where(_col(mask), img.flip(-1), img)


def rgb_to_grayscale(img: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` with torchvision's weights (0.2989, 0.587, 0.114)."""
    r, g, b = img.unbind(1)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(1)


def grayscale(img: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Replace the samples where ``mask`` is set (all when None) by their 3-channel luma."""
    gray = rgb_to_grayscale(img).expand_as(img)
    return gray.contiguous() if mask is None else torch.where(_col(mask), gray, img)


def _blend(img: torch.Tensor, other, factor: torch.Tensor) -> torch.Tensor:
    # factor * img + (1 - factor) * other, clamped: torchvision's _blend
    f = _col(factor)
    return (img * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(img * factor)`` per sample (``factor``: ``[B]``, 1 = unchanged)."""
    return (img * _col(factor)).clamp_(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the sample's mean luma (``factor``: ``[B]``, 1 = unchanged)."""
    mean = rgb_to_grayscale(img).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(img, mean, factor)


def adjust_saturation(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma (``factor``: ``[B]``, 0 = gray, 1 = unchanged)."""
    return _blend(img, rgb_to_grayscale(img), factor)


def adjust_hue(img: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (``[B]``, in turns, ``[-0.5, 0.5]``), as torchvision's
    ``adjust_hue`` (RGB -> HSV, ``h = (h + shift) mod 1``, HSV -> RGB)."""
    r, g, b = img.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # hue in sextants [0, 6): the same case order as torchvision (r wins ties, then g)
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.remainder(h + 6.0 * shift.reshape(-1, 1, 1), 6.0)
    # closed-form HSV -> RGB: channel n in (5, 3, 1) for (r, g, b)
    n = torch.tensor([5.0, 3.0, 1.0], device=img.device).reshape(1, 3, 1, 1)
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


# ---------------------------------------------------------------- blur, solarize, normalize

def blur_kernel_size(image_size: int) -> int:
    """Gaussian-blur kernel for an image of ``image_size`` px (23 at 224, 5 at 32 px): the one
    rule, :func:`loaders.augment.ops.blur.kernel_size`."""
    from .ops.blur import kernel_size  # the op module imports this one
    return kernel_size(image_size)


def gaussian_kernel1d(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels ``[B, kernel_size]`` for per-sample ``sigma`` ``[B]`` (px)."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x.unsqueeze(0) / sigma.to(torch.float32).unsqueeze(1)) ** 2)
    return pdf / pdf.sum(-1, keepdim=True)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` (``[B]``, px) and reflect padding,
    as torchvision's ``gaussian_blur`` with kernel ``(kernel_size, kernel_size)``.

    Implemented as two depthwise (grouped) convolutions over ``B*C`` channels, so each sample
    uses its own kernel in one call.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"blur kernel_size must be odd and positive, got {kernel_size}")
    B, C, H, W = img.shape
    k = gaussian_kernel1d(sigma, kernel_size).repeat_interleave(C, dim=0)   # [B*C, k]
    p = kernel_size // 2
    x = F.pad(img.reshape(1, B * C, H, W), (p, p, p, p), mode="reflect")
    x = F.conv2d(x, k.reshape(B * C, 1, 1, kernel_size), groups=B * C)
    x = F.conv2d(x, k.reshape(B * C, 1, kernel_size, 1), groups=B * C)
    return x.reshape(B, C, H, W)


def solarize(img: torch.Tensor, threshold, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Invert pixels ``>= threshold`` (``[0, 1]`` scale; a float or a ``[B]`` tensor) in the
    samples where ``mask`` is set (all when None)."""
    if isinstance(threshold, torch.Tensor):
        threshold = _col(threshold)
    hit = img >= threshold
    if mask is not None:
        hit = hit & _col(mask)
    return torch.where(hit, 1.0 - img, img)


_NORM_CONSTS: dict = {}


def normalize_constants(mean: Sequence[float], std: Sequence[float], device, *, from_uint8: bool = False):
    """``(offset, scale)`` ``float32 [1,C,1,1]`` on ``device`` with ``x * scale + offset`` the
    normalisation: ``(x - mean) / std`` for ``[0, 1]`` input, ``(x / 255 - mean) / std`` for
    ``from_uint8``. Made once per (mean, std, device) and kept: no host -> device copy (and so
    no implicit sync on CUDA) per batch."""
    key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), str(torch.device(device)), from_uint8)
    c = _NORM_CONSTS.get(key)
    if c is None:
        kw = dict(dtype=torch.float32, device=device)
        if from_uint8:
            scale = torch.tensor([1.0 / (255.0 * s) for s in std], **kw).reshape(1, -1, 1, 1)
            offset = torch.tensor([-m / s for m, s in zip(mean, std)], **kw).reshape(1, -1, 1, 1)
        else:
            m = torch.as_tensor(mean, **kw).reshape(1, -1, 1, 1)
            scale = 1.0 / torch.as_tensor(std, **kw).reshape(1, -1, 1, 1)
            offset = -m * scale
        c = _NORM_CONSTS[key] = (offset, scale)
    return c


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(img - mean) / std`` per channel, fused into one multiply-add."""
    offset, scale = normalize_constants(mean, std, img.device)
    return torch.addcmul(offset, img, scale)


# ---------------------------------------------------------------- RandAugment's pixel ops

def invert(img: torch.Tensor) -> torch.Tensor:
    return 1.0 - img


def posterize(img: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` (``int [B]``, 1..8) bits of each uint8 value (torchvision/PIL)."""
    q = torch.round(img * 255.0)
    step = torch.pow(2.0, 8.0 - _col(bits.to(torch.float32)))
    return torch.floor(q / step) * step / 255.0


def autocontrast(img: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each sample to span ``[0, 1]`` (channels with max == min unchanged)."""
    lo = img.amin(dim=(-2, -1), keepdim=True)
    hi = img.amax(dim=(-2, -1), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((img - lo) * scale).clamp_(0.0, 1.0)


def equalize(img: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per sample and channel on the uint8 grid, as torchvision's
    ``equalize`` (PIL's algorithm): 256-bin histograms for all ``B*C`` planes via one
    ``scatter_add``, then a LUT per plane."""
    B, C, H, W = img.shape
    q = torch.round(img * 255.0).clamp_(0, 255).to(torch.int64).reshape(B * C, H * W)
    hist = torch.zeros(B * C, 256, device=img.device, dtype=torch.int64)
    hist.scatter_add_(1, q, torch.ones_like(q))
    # last non-zero bin of each plane
    idx = torch.arange(256, device=img.device).expand_as(hist)
    last = torch.where(hist > 0, idx, torch.zeros_like(idx)).amax(dim=1, keepdim=True)
    step = (H * W - hist.gather(1, last)) // 255                       # [BC, 1]
    valid = step > 0
    safe = torch.where(valid, step, torch.ones_like(step))
    cum = torch.cumsum(hist, dim=1)
    lut = ((cum + safe // 2) // safe)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], dim=1).clamp_(0, 255)
    out = lut.gather(1, q)
    out = torch.where(valid, out, q)
    return out.to(torch.float32).reshape(B, C, H, W) / 255.0


def adjust_sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (3x3 kernel, centre 5, others 1, /13; borders
    kept), as torchvision's ``adjust_sharpness`` (``factor``: ``[B]``, 1 = unchanged)."""
    B, C, H, W = img.shape
    if H <= 2 or W <= 2:
        return img
    k = torch.ones(3, 3, device=img.device, dtype=img.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(B * C, 1, 3, 3)
    inner = F.conv2d(img.reshape(1, B * C, H, W), k, groups=B * C).reshape(B, C, H - 2, W - 2)
    blurred = img.clone()
    blurred[..., 1:-1, 1:-1] = inner
    return _blend(img, blurred, factor)


def affine(img: torch.Tensor, inverse: torch.Tensor, *, fill: float = 0.0,
           mode: str = "nearest") -> torch.Tensor:
    """Warp by per-sample inverse affine maps ``inverse`` (``[B, 2, 3]``) taking an output
    point ``(x, y)`` to the input point ``A @ (x, y, 1)``, in pixel coordinates whose origin is
    the image's top-left corner (pixel centres at ``i + 0.5``). Points outside get ``fill``."""
    B, C, H, W = img.shape
    dev = img.device
    ys = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(1, H * W, 3)
    src = pts @ inverse.to(torch.float32).transpose(1, 2)               # [B, HW, 2]
    # grid_sample's normalised coordinates (align_corners=False): -1 .. 1 spans the image edges
    norm = torch.tensor([2.0 / W, 2.0 / H], device=dev)
    grid = (src * norm - 1.0).reshape(B, H, W, 2)
    if fill == 0.0:
        return F.grid_sample(img, grid, mode=mode, padding_mode="zeros", align_corners=False)
    ones = torch.ones(B, 1, H, W, device=dev, dtype=img.dtype)
    out = F.grid_sample(torch.cat([img, ones], 1), grid, mode=mode, padding_mode="zeros", align_corners=False)
    inside = out[:, -1:]
    return out[:, :-1] * inside + fill * (1.0 - inside)


def cutout(img: torch.Tensor, boxes: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """Paint per-sample rectangles ``boxes`` (``[B, 4]`` rows ``(y0, x0, y1, x1)``, pixels,
    inclusive like PIL's ``ImageDraw.rectangle``) with colour ``fill`` (3 values in [0, 1])."""
    B, C, H, W = img.shape
    dev = img.device
    y = torch.arange(H, device=dev).reshape(1, H, 1)
    x = torch.arange(W, device=dev).reshape(1, 1, W)
    b = boxes.to(dev).reshape(B, 4, 1, 1)
    inside = (y >= b[:, 0]) & (y <= b[:, 2]) & (x >= b[:, 1]) & (x <= b[:, 3])
    colour = torch.as_tensor(fill, dtype=img.dtype, device=dev).reshape(1, C, 1, 1)
    return torch.where(inside.unsqueeze(1), colour, img)


# ---------------------------------------------------------------- per-sample selection

def masked_apply(img: torch.Tensor, mask: torch.Tensor, fn, *params: torch.Tensor,
                 inplace: bool = False) -> torch.Tensor:
    """``fn(img, *params)`` on the samples where ``mask`` (``bool [B]``) is set; the others are
    returned bit-for-bit unchanged. ``params`` are per-sample tensors (leading dim ``B``).

    Speed decision: on CPU the selected rows are gathered, transformed and scattered back, so an
    op with probability p costs p of a full pass (``nonzero`` is free there). On CUDA ``nonzero``
    would force a host sync on every op, so the op runs on the whole batch and ``torch.where``
    keeps the unselected samples: more FLOPs, no sync, and the GPU has FLOPs to spare.
    ``inplace=True`` lets the CPU path write the selected rows back into ``img`` (saves a full
    copy per op; the engine passes it for tensors it allocated itself).
    """
    if img.device.type == "cpu":
        idx = mask.nonzero().squeeze(1)
        n = idx.numel()
        if n == 0:
            return img
        if n == img.shape[0]:
            return fn(img, *params)
        out = fn(img.index_select(0, idx), *[p.index_select(0, idx) for p in params])
        return img.index_copy_(0, idx, out) if inplace else img.index_copy(0, idx, out)
    return torch.where(mask.reshape(-1, 1, 1, 1), fn(img, *params), img)
