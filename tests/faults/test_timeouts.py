"""Bounded reads: a read that never returns (a FIFO named like an image, standing in for a hung
network mount) is a one-line error naming the file within data.read_timeout_s, or a counted,
replaced skip; on the torch backend in-process and in a worker, and on the resident backend."""
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loaders.crop import CropSpec
from loaders.errors import DataError, SampleError
from loaders.mixture import Mixture
from loaders.pipeline import build_loader
from loaders.plan_loader import TimedReader, hung_reads
from loaders.resident_backend import ResidentLoader
from loaders.sources import ImageFolderSource
from loaders.torch_backend import TorchLoader

T = 0.5


@pytest.fixture
def fifo_folder(tmp_path):
    """20 PNGs in one class folder plus ``c0/x.jpg``, a FIFO nobody writes to. Afterwards every
    read still blocked on it is released (a writer opens and closes it)."""
    d = tmp_path / "imgs" / "c0"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(buf, "PNG")
        (d / f"{i:02d}.png").write_bytes(buf.getvalue())
    fifo = d / "x.jpg"
    os.mkfifo(fifo)
    src = ImageFolderSource(root=tmp_path / "imgs", name="imgs")
    k = [src.path(i) for i in range(len(src))].index(str(fifo))
    yield src, k, str(fifo)
    try:  # wake the abandoned reader threads of this process (they exit on their own)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def loader(src, **kw):
    kw.setdefault("num_workers", 0)
    return TorchLoader([src], Mixture([len(src)], budget=len(src), seed=1), batch_size=7, crops=[CropSpec(8)],
                       read_timeout_s=T, **kw)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 1])
def test_hung_read_is_a_named_error_within_the_timeout(fifo_folder, workers):
    src, k, fifo = fifo_folder
    t0 = time.monotonic()
    with pytest.raises(SampleError, match=rf"read of {fifo} timed out after 0\.5 s \(data\.read_timeout_s\) "
                                          r"\(source 'imgs', sample \d+\)$") as e:
        list(loader(src, num_workers=workers))
    assert time.monotonic() - t0 < T + 2 and e.value.index == k and e.value.path == fifo


@pytest.mark.timeout(60)
def test_hung_read_under_skip_is_counted_and_replaced(fifo_folder):
    src, k, fifo = fifo_folder
    for workers in (0, 2):
        got = loader(src, num_workers=workers, on_error="skip", max_skip_fraction=0.5)
        t0 = time.monotonic()
        batches = list(got)
        assert time.monotonic() - t0 < T + 3
        assert [len(b) for b in batches] == [7, 7, 6][:len(batches)] and len(batches) == 2  # 20 readable: 2 whole
        assert got.skipped == 1 and got.skipped_by_source == {"source0": 1} and got.skipped_files == [fifo]
        assert "timed out after 0.5 s" in got.skip_reasons[-1]
        assert k not in [i for b in batches for i in b.index.tolist()]


@pytest.mark.timeout(60)
def test_resident_load_and_build_loader_honour_the_timeout(fifo_folder):
    src, k, fifo = fifo_folder
    mix = Mixture([len(src)], budget=len(src))
    with pytest.raises(SampleError, match=rf"read of {fifo} timed out after 0\.5 s"):
        ResidentLoader([src], mix, batch_size=5, read_timeout_s=T, progress=False)
    res = ResidentLoader([src], mix, batch_size=5, read_timeout_s=T, progress=False, on_error="skip",
                         max_skip_fraction=0.5)
    assert res.corrupt == 1 and [len(b) for b in res] == [5] * 4 and res.skipped == 1
    cfg = {"sources": [{"type": "folder", "root": str(Path(fifo).parents[1])}], "batch_size": 7, "num_workers": 0,
           "budget": 21, "read_timeout_s": T}
    with pytest.raises(SampleError, match=r"x\.jpg timed out"):
        list(build_loader(cfg, crops=[CropSpec(8)]))


@pytest.mark.timeout(60)
def test_timed_reader_threads_and_hung_limit(fifo_folder):
    src, k, fifo = fifo_folder
    time.sleep(0.1)  # earlier tests' reads, released by their fixture, have returned
    base = len(hung_reads())
    reader = TimedReader(T, threads=2, max_hung=base + 2)
    calls = [(src, i) for i in range(len(src))]
    got = reader.read_all(calls)
    assert isinstance(got[k], SampleError) and all(isinstance(g, tuple) for i, g in enumerate(got) if i != k)
    assert [g[0] for i, g in enumerate(got) if i != k] == [src.read(i)[0] for i in range(len(src)) if i != k]
    assert hung_reads()[-1] == fifo
    with pytest.raises(DataError, match=rf"{base + 2} reads are still blocked after data\.read_timeout_s=0\.5 s"):
        reader.read_all([(src, k)])
