"""The resident backend (``data.backend: resident``): the whole mixture in device memory as uint8.

For CIFAR-scale recipes (AdaInf: 50k real x dup + 1M generated at 32 px; BCL; SDCLR; IDAA) the
data fits in device memory: :class:`ResidentLoader` loads every source of the mixture once, at
construction, into ONE ``uint8 [N, 3, H, W]`` tensor on ``device`` (``N = mixture.offsets[-1]``,
the unique samples of all sources; row ``i`` is the sample of global id ``i`` = ``Batch.index``),
plus ``int64 [N]`` labels and sources. Each batch is then a gather on the device
(``images.index_select(0, index)``): the index (8 bytes per sample, from pinned memory) is the only
host -> device copy per step; no workers, no per-sample Python, no pixels through the host.

Order, ratios, dup, fraction, budget, rank slices, ``len``, ``skipped`` and ``state_dict`` /
``load_state_dict`` are :class:`~loaders.plan_loader.PlanLoader`'s: the same ``index`` / ``source``
/ ``label`` sequence as the torch backend, and a checkpoint of either resumes on the other.

**Memory.** ``N x 3 x H x W`` bytes for the pixels plus ``16 x N`` for labels and sources, on
*every* rank (each rank holds its own copy; nothing is shared between processes): 1.05M x 32 x 32
x 3 = 3.2 GB for AdaInf's CIFAR-10 mixture. On CUDA the need is checked against
``torch.cuda.mem_get_info`` before allocating (a one-line :class:`ConfigError`). A ``fraction``
does not shrink the tensor (rows are global ids); samples outside a per-sample source's subset are
not decoded and stay zero. The host keeps what the sources keep (CIFAR's and synthetic arrays, a
compressed npz once loaded); a stored npz is memory-mapped and per-sample sources are staged on the
host only while loading.

**Loading.** Sources that expose their pixels as one ``uint8 [n, H, W, 3]`` array (``images``:
``array``, ``synthetic``, ``cifar``, ``npz`` -- memory-mapped when stored) are copied as whole
arrays in chunks. Any other source (``folder``, ``csv``, ``shards``, ``beton``) is decoded once,
sample by sample (``read(i)`` bounded by ``read_timeout_s`` through
:class:`~loaders.plan_loader.TimedReader`, then PIL as the torch backend's default decoder), with a
tqdm bar (``progress=True``, rank 0 only). A corrupt (or timed-out) sample is found there, once:
``on_error="raise"`` raises a one-line :class:`SampleError` naming the file and the source;
``on_error="skip"`` marks its row, and every time the plan draws it, it is replaced by the next
sample of the plan and counted in ``skipped`` (:mod:`loaders.plan_loader`'s rule, shared with the
torch backend, so the two yield the same batches). Whole-array sources are not read per sample
(no timeout applies: their arrays are loaded or memory-mapped at once).

**Sizes.** When all images share one size they are kept at full resolution (``resize`` is then
unused). Otherwise each image not already ``resize x resize`` is resized to it with an
antialiased bilinear resize (:func:`resize_images`: ``torch.nn.functional.interpolate(...,
antialias=True)``, rounded); without ``resize`` mixed sizes are a :class:`ConfigError` naming the
source (or the file).

**Views and crops.** One view per batch: the full images, uint8 ``[B, 3, H, W]`` on the device.
The loader does not crop (``crops`` must be None): the augmentation engine cuts every view on the
device (``Augment(batch, step=s, crop=True)``). :func:`loaders.pipeline.build_loader` never passes
crops to this backend (``data.crop_in_decode`` is ignored). ``num_workers`` and ``pin_memory`` are
accepted and ignored (nothing is read per step; the batch is already on the device).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Source, decode_image
from .batch import Batch
from .crop import CropSpec
from .errors import ConfigError, SampleError
from .mixture import Mixture
from .plan_loader import DEFAULT_MAX_SKIP_FRACTION, DEFAULT_READ_TIMEOUT_S, PlanLoader, TimedReader, sample_error

__all__ = ["ResidentLoader", "resize_images", "source_array"]

#: bytes per host -> device (or host -> host) copy while loading
_CHUNK_BYTES = 32 << 20


def _batch_key(seed: int, rank: int, first_item: int) -> int:
    """The batch's seed key (``Batch.key``) from its rank-stream position."""
    from .augment.sampler import batch_key
    return int(batch_key(seed, rank, first_item))


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[n, 3, H, W]`` -> uint8 ``[n, 3, size, size]``: antialiased bilinear, rounded."""
    if x.shape[0] == 0:
        return x.new_empty((0, 3, size, size))
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _resize_hwc(x: np.ndarray, size: int) -> np.ndarray:
    """:func:`resize_images` for uint8 ``[n, H, W, 3]`` host arrays."""
    t = resize_images(torch.from_numpy(np.require(x, np.uint8, ["C", "W"])).permute(0, 3, 1, 2), size)
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def source_array(src: Source) -> Optional[np.ndarray]:
    """The source's pixels as one uint8 ``[len(src), H, W, 3]`` array (``images`` of in-memory and
    npz sources), or None when it must be decoded sample by sample."""
    try:
        images = getattr(src, "images", None)
    except Exception:  # a lazily loaded array that fails: let decode() name the problem
        return None
    if (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[0] == len(src) and images.shape[3] == 3):
        return images
    return None


class _Decoded:
    """One per-sample source decoded into a host staging array: ``images`` uint8 ``[len(rows), H,
    W, 3]`` (None when every sample failed), ``rows`` (the source's sample indices), ``bad``
    (int64 indices into ``rows`` of the corrupt samples) and ``reasons`` (one line per bad row)."""

    def __init__(self, images: Optional[np.ndarray], rows: np.ndarray, bad: np.ndarray, reasons: List[str]):
        self.images, self.rows, self.bad, self.reasons = images, rows, bad, reasons


#: samples read per TimedReader call while decoding a per-sample source
_READ_BLOCK = 64


def _decoded_samples(src: Source, rows: List[int], reader: TimedReader):
    """``(i, image or SampleError)`` for ``src``'s samples ``rows``, read in blocks through
    ``reader`` (the read timeout); a source with its own ``decode`` is decoded by it (no timeout)."""
    if getattr(src.decode, "__func__", None) is not Source.decode:  # its own decode (class or instance)
        for i in rows:
            try:
                yield i, src.decode(i)[0]
            except SampleError as e:
                yield i, e
        return
    for a in range(0, len(rows), _READ_BLOCK):
        block = rows[a:a + _READ_BLOCK]
        for i, r in zip(block, reader.read_all([(src, i) for i in block])):
            if isinstance(r, BaseException) and not isinstance(r, SampleError):
                raise r
            try:
                yield i, r if isinstance(r, SampleError) else decode_image(r[0], path=src.describe(i), index=i)
            except SampleError as e:
                yield i, e


def _decode_source(src: Source, rows: np.ndarray, *, resize: Optional[int], on_error: str,
                   progress: bool, read_timeout_s: Optional[float] = None) -> _Decoded:
    """Decode ``src``'s samples ``rows`` once (reads bounded by ``read_timeout_s``), into one
    staging array.

    A sample whose size differs from the first one's: without ``resize`` a ConfigError naming it;
    with ``resize`` the source switches to ``resize x resize`` (rows so far are resized too).
    """
    from tqdm import tqdm
    buf: Optional[np.ndarray] = None
    bad: List[int] = []
    reasons: List[str] = []
    samples = _decoded_samples(src, rows.tolist(), TimedReader(read_timeout_s))
    for k, (i, img) in enumerate(tqdm(samples, total=len(rows), desc=f"resident: decoding '{src.name}'",
                                      unit="img", disable=not progress, leave=False)):
        if isinstance(img, SampleError):
            err = sample_error(img, src, i)
            if on_error == "raise":
                raise err from None
            bad.append(k)
            reasons.append(str(err))
            continue
        if buf is None:
            buf = np.zeros((len(rows), *img.shape), np.uint8)
        if img.shape != buf.shape[1:]:
            if resize is None:
                raise ConfigError(f"resident loader: {src.describe(i)} is {img.shape[0]}x{img.shape[1]} but "
                                  f"source '{src.name}' started with {buf.shape[1]}x{buf.shape[2]}: "
                                  "set data.image_size (resize) to store every image at one size")
            if buf.shape[1:3] != (resize, resize):
                buf = _restage(buf, k, resize)
            if img.shape[:2] != (resize, resize):
                img = _resize_hwc(img[None], resize)[0]
        buf[k] = img
    return _Decoded(buf, rows, np.asarray(bad, np.int64), reasons)


def _restage(buf: np.ndarray, done: int, size: int) -> np.ndarray:
    """A ``[n, size, size, 3]`` staging array holding ``buf``'s first ``done`` rows resized."""
    out = np.zeros((buf.shape[0], size, size, 3), np.uint8)
    step = max(1, _CHUNK_BYTES // max(1, int(np.prod(buf.shape[1:]))))
    for a in range(0, done, step):
        out[a:min(done, a + step)] = _resize_hwc(buf[a:min(done, a + step)], size)
    return out


def _upload(dst: torch.Tensor, rows: np.ndarray, arr: np.ndarray) -> None:
    """Write host uint8 ``[n, h, w, 3]`` ``arr`` into rows ``rows`` (int64 ``[n]``, ascending) of
    ``dst`` (``[N, 3, H, W]`` on its device), in chunks, resizing to ``H x W`` when it differs."""
    H, W = dst.shape[2], dst.shape[3]
    same = arr.shape[1:3] == (H, W)
    step = max(1, _CHUNK_BYTES // max(1, int(np.prod(arr.shape[1:]))))
    contiguous = len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1
    for a in range(0, arr.shape[0], step):
        part, r = arr[a:a + step], rows[a:a + step]
        if dst.device.type == "cpu" and same and contiguous:
            # numpy's transpose copy straight into the tensor (no intermediate, ~3x torch's on uint8)
            np.copyto(dst[int(r[0]):int(r[-1]) + 1].numpy(), part.transpose(0, 3, 1, 2))
            continue
        t = torch.from_numpy(np.array(part)).to(dst.device).permute(0, 3, 1, 2)  # copy: memmaps are read-only
        if not same:
            t = resize_images(t, H)
        dst.index_copy_(0, torch.from_numpy(r).to(dst.device), t.contiguous())


class ResidentLoader(PlanLoader):
    """Iterate one rank's batches of a mixture from a device-resident uint8 copy of every source.

    Args (as :class:`~loaders.torch_backend.TorchLoader`, plus):
        crops: must be None (the engine crops on the device); a list is a ConfigError.
        resize: the side every image is resized to when the sources' sizes differ (else unused).
        device: where the images live and batches are gathered (``"cpu"``, ``"cuda:0"``, ...).
        progress: tqdm bar while decoding per-sample sources (rank 0 only).
        num_workers, pin_memory: accepted and ignored.
        read_timeout_s: bound on each ``read`` while loading per-sample sources.
        max_skip_fraction: see :class:`~loaders.plan_loader.PlanLoader` (checked as the plan
            draws the corrupt rows, not at load).

    Attributes: ``images`` (uint8 ``[N, 3, H, W]`` on ``device``), ``labels`` / ``row_source``
    (int64 ``[N]`` on ``device``), ``nbytes`` (their size), ``corrupt`` (rows found corrupt at load
    under ``on_error="skip"``). Skipped rows are replaced by the plan's next samples, so every
    batch is whole (:mod:`loaders.plan_loader`).
    """

    backend = "resident"

    def __init__(self, sources: Sequence[Source], mixture: Mixture, *, batch_size: int,
                 crops: Optional[Sequence[CropSpec]] = None, resize: Optional[int] = None, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, on_error: str = "raise",
                 pin_memory: bool = False, drop_last: bool = True, device="cpu", progress: bool = True,
                 read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
                 max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION):
        if crops is not None:
            raise ConfigError("resident loader: crops given, but data.crop_in_decode must be false with "
                              "data.backend: resident (the augmentation engine crops on the device)")
        super().__init__(sources, mixture, batch_size=batch_size, crops=None, resize=resize, rank=rank,
                         world_size=world_size, num_workers=num_workers, seed=seed, on_error=on_error,
                         pin_memory=pin_memory, drop_last=drop_last, read_timeout_s=read_timeout_s,
                         max_skip_fraction=max_skip_fraction)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"resident loader: invalid device {device!r} ({e})") from e
        self.progress = bool(progress) and self.rank == 0
        self._load()

    # -------------------------------------------------------------------------------- loading
    def _load(self) -> None:
        N = int(self.offsets[-1])
        staged = self._stage()
        H, W = self._target_size(staged)
        self._check_memory(N, H, W)
        #: bytes held on the device: pixels + labels + sources
        self.nbytes = N * 3 * H * W + 16 * N
        # every row is written unless a per-sample source decodes only its fraction's subset
        full = all(isinstance(s, np.ndarray) or len(s.rows) == n
                   for s, n in zip(staged, self.mixture.sizes.tolist()))
        self.images = (torch.empty if full else torch.zeros)((N, 3, H, W), dtype=torch.uint8, device=self.device)
        valid = np.ones(N, bool)
        self._reasons = {}  # global row -> why it failed (on_error="skip")
        for s, got in enumerate(staged):
            off = int(self.offsets[s])
            if isinstance(got, np.ndarray):
                _upload(self.images, off + np.arange(len(got), dtype=np.int64), got)
            elif got.images is not None:
                _upload(self.images, off + got.rows, got.images)
            if not isinstance(got, np.ndarray):
                valid[off + got.rows[got.bad]] = False
                self._reasons.update(zip((off + got.rows[got.bad]).tolist(), got.reasons))
                if got.images is None:
                    valid[off + got.rows] = False
        labels = np.concatenate([np.asarray(src.labels(), np.int64).reshape(-1) for src in self.sources])
        self.labels = torch.from_numpy(labels).to(self.device)
        self.row_source = torch.repeat_interleave(
            torch.arange(len(self.sources), device=self.device),
            torch.as_tensor(self.mixture.sizes, device=self.device))
        self._valid = None if valid.all() else valid
        #: rows found corrupt while loading (``on_error="skip"``)
        self.corrupt = int(N - valid.sum())

    def _stage(self) -> list:
        """Per source: its pixel array (whole-array sources) or a :class:`_Decoded`."""
        out = []
        for s, src in enumerate(self.sources):
            arr = source_array(src)
            if arr is not None:
                out.append(arr)
                continue
            rows = (np.arange(len(src), dtype=np.int64) if self.mixture.unique[s] == self.mixture.sizes[s]
                    else np.sort(self.mixture.subset(s)))
            out.append(_decode_source(src, rows, resize=self.resize, on_error=self.on_error,
                                      progress=self.progress, read_timeout_s=self.read_timeout_s))
        return out

    def _target_size(self, staged) -> Tuple[int, int]:
        """The stored (H, W): the images' common size, else ``resize x resize`` (ConfigError without)."""
        sizes = []
        for s, got in enumerate(staged):
            arr = got if isinstance(got, np.ndarray) else got.images
            if arr is not None:
                sizes.append((s, (int(arr.shape[1]), int(arr.shape[2]))))
        if not sizes:
            raise ConfigError(f"resident loader: every sample of every source failed to decode "
                              f"({', '.join(self.mixture.names)})")
        first = sizes[0]
        for s, hw in sizes[1:]:
            if hw != first[1]:
                if self.resize is None:
                    raise ConfigError(
                        f"resident loader: source '{self.mixture.names[s]}' holds {hw[0]}x{hw[1]} images but "
                        f"'{self.mixture.names[first[0]]}' holds {first[1][0]}x{first[1][1]}: set data.image_size "
                        "(resize) to store every image at one size")
                return self.resize, self.resize
        return first[1]

    def _check_memory(self, N: int, H: int, W: int) -> None:
        """On CUDA: a one-line ConfigError when the tensor does not fit in the free device memory."""
        need = N * 3 * H * W + 16 * N
        if self.device.type != "cuda":
            return
        if not torch.cuda.is_available():
            raise ConfigError(f"resident loader: device {self.device} but CUDA is not available")
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > free:
            raise ConfigError(
                f"resident loader: the mixture needs {need / 2**30:.2f} GiB on {self.device} ({N} x 3 x {H} x {W} "
                f"uint8 + labels) but {free / 2**30:.2f} GiB is free: use data.backend: torch")

    # ------------------------------------------------------------------------------ iteration
    def _batches(self, plan):
        cuda = self.device.type == "cuda"
        for b in self._batch_ids(plan):
            _, _, gid = plan.batch(b)
            failed = ()
            if self._valid is not None:
                keep = self._valid[gid]
                if not keep.all():
                    failed = tuple((int(k), self._reasons.get(int(gid[k]), "")) for k in np.flatnonzero(~keep))
                    gid = gid[keep]
            idx = torch.from_numpy(gid)
            if cuda:  # pinned: the copy does not wait for the device's queue
                idx = idx.pin_memory().to(self.device, non_blocking=True)
            else:
                idx = idx.to(self.device)  # a no-op on the CPU
            yield Batch(views=[self.images.index_select(0, idx)], index=idx,
                        source=self.row_source.index_select(0, idx), label=self.labels.index_select(0, idx),
                        skipped=len(failed), meta={"backend": "resident", "batch": b, "failed": failed},
                        stage="raw", key=_batch_key(self.seed, plan.rank, plan.samples + b * plan.batch_size))
