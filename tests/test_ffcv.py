"""FFCV: .beton writer/reader (ours and FFCV's own DatasetWriter) and the plan-driven FFCV loader."""
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="FFCV is an optional extra (pip install 'fastssl[ffcv]')")

from loaders.base import ArraySource  # noqa: E402
from loaders.beton import BetonFile, BetonSource, to_beton  # noqa: E402
from loaders.crop import CropSpec  # noqa: E402
from loaders.errors import ConfigError, SampleError  # noqa: E402
from loaders.ffcv_backend import FFCVLoader, ffcv_native_loader  # noqa: E402
from loaders.mixture import Mixture  # noqa: E402
from loaders.synthetic import SyntheticSource  # noqa: E402


def write_upstream_beton(path, images, labels):
    """A .beton written by FFCV's own DatasetWriter with its own field names (no index field)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class DS:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    w = DatasetWriter(str(path), {"img": RGBImageField(write_mode="raw"), "target": IntField()}, num_workers=1)
    w.from_indexed_dataset(DS())
    return path


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    d = tmp_path_factory.mktemp("beton")
    real = SyntheticSource(n=48, size=16, seed=0, name="real")
    gen = SyntheticSource(n=32, size=16, seed=1, variant="generated", name="gen")
    jpg = to_beton(real, d / "real.beton", fmt="jpg", quality=95, num_workers=1, progress=False)
    raw = to_beton(gen, d / "gen.beton", fmt="raw", num_workers=1, progress=False)
    rng = np.random.default_rng(3)
    up_images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    up_labels = np.arange(24) % 4
    up = write_upstream_beton(d / "upstream.beton", up_images, up_labels)
    return {"dir": d, "real": real, "gen": gen, "jpg": jpg, "raw": raw, "up": up,
            "up_images": up_images, "up_labels": up_labels}


def test_beton_roundtrip_raw_exact_jpg_close_and_labels(betons):
    raw = BetonSource(betons["raw"])
    gen = betons["gen"]
    assert len(raw) == len(gen)
    for i in (0, 7, 31):
        img, label = raw.read(i)
        np.testing.assert_array_equal(img, gen.images[i])
        assert label == gen.labels()[i]
    np.testing.assert_array_equal(raw.labels(), gen.labels())
    np.testing.assert_array_equal(raw.file.sample_index, np.arange(len(gen)))
    jpg = BetonSource(betons["jpg"])
    data, label = jpg.read(5)
    assert isinstance(data, bytes) and data[:2] == b"\xff\xd8"  # JPEG bytes, decodable by any reader
    img, _ = jpg.decode(5)
    err = np.abs(img.astype(int) - betons["real"].images[5].astype(int)).mean()
    assert err < 8, err
    np.testing.assert_array_equal(jpg.labels(), betons["real"].labels())


def test_beton_source_reads_ffcv_written_file(betons):
    up = BetonSource(betons["up"])
    assert len(up) == 24 and up.file.image_field == "img"
    np.testing.assert_array_equal(up.labels(), betons["up_labels"])  # the only IntField is the label
    for i in (0, 23):
        np.testing.assert_array_equal(up.read(i)[0], betons["up_images"][i])


class Corrupt(ArraySource):
    """ArraySource whose listed samples fail like a corrupt file."""

    def __init__(self, images, bad):
        super().__init__(images, np.arange(len(images)) % 3, name="corrupt")
        self.bad = set(bad)

    def read(self, i):
        if i in self.bad:
            raise SampleError(f"corrupt.bin[{i}]: broken", path="corrupt.bin", index=i)
        return super().read(i)


def test_bad_samples_raise_or_are_marked_and_skipped(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    src = Corrupt(images, bad=[4])
    with pytest.raises(SampleError, match=r"corrupt.bin\[4\]"):
        to_beton(src, tmp_path / "x.beton", fmt="raw", num_workers=1, progress=False)
    assert not (tmp_path / "x.beton").exists()
    path = to_beton(src, tmp_path / "y.beton", fmt="raw", num_workers=1, progress=False, on_error="skip")
    b = BetonSource(path)
    with pytest.raises(SampleError, match="could not be decoded"):
        b.read(4)
    mix = Mixture([len(b)], budget=12, seed=0)
    # the plan runs out: its last batch is short (drop_last=False) -- the only place one may be
    loader = FFCVLoader([b], mix, batch_size=12, resize=8, num_workers=1, prefetch=1, on_error="skip",
                        drop_last=False)
    batches = list(loader)
    assert loader.skipped == 1 and len(batches[0]) == 11 and 4 not in batches[0].index.tolist()
    assert loader.skipped_files == [f"{path}[4]"]
    with pytest.raises(SampleError, match=r"y.beton\[4\]"):
        list(FFCVLoader([b], mix, batch_size=12, resize=8, num_workers=1, prefetch=1))


def test_corrupt_jpeg_bytes_in_file(tmp_path, betons):
    path = tmp_path / "broken.beton"
    path.write_bytes(betons["jpg"].read_bytes())
    mix = Mixture([48], budget=16, seed=0)
    k = int(mix.lookup(np.arange(16))[1][5])  # a sample the first batch reads
    f = BetonFile(path)
    with open(path, "r+b") as fh:  # overwrite its JPEG with garbage
        fh.seek(int(f.data_ptr[k]))
        fh.write(b"\x00" * int(f.data_size[k]))
    b = BetonSource(path)
    loader = FFCVLoader([b], mix, batch_size=16, resize=8, num_workers=2, on_error="skip", drop_last=False)
    out = list(loader)
    assert loader.skipped == 1 and len(out[0]) == 15 and k not in out[0].index.tolist()
    with pytest.raises(SampleError, match=rf"broken.beton\[{k}\]"):
        list(FFCVLoader([b], mix, batch_size=16, resize=8, num_workers=1, prefetch=1))


def test_mixture_over_three_betons_ratios_order_resume(betons):
    """>= 20k samples over ours (jpg, raw) + FFCV-written file: proportions within 1%, the
    plan's exact order, and a mid-run state_dict resumes at the same next samples."""
    sources = [BetonSource(betons["jpg"]), BetonSource(betons["raw"]), BetonSource(betons["up"])]
    weights = [0.5, 0.3, 0.2]
    mix = Mixture([len(s) for s in sources], weights=weights, budget=20480, seed=7)
    crops = [CropSpec(8, scale=(0.2, 1.0)), CropSpec(8)]
    loader = FFCVLoader(sources, mix, batch_size=512, crops=crops, num_workers=2, seed=3)
    assert len(loader) == 40
    seen_src, seen_idx = [], []
    first = None
    for k, batch in enumerate(loader):
        assert [tuple(v.shape) for v in batch.views] == [(512, 3, 8, 8)] * 2
        assert batch.views[0].dtype == torch.uint8
        seen_src.append(batch.source.numpy())
        seen_idx.append(batch.index.numpy())
        if k == 0:
            first = batch
    src = np.concatenate(seen_src)
    assert len(src) == 20480
    frac = np.bincount(src, minlength=3) / len(src)
    np.testing.assert_allclose(frac, weights, atol=0.01)
    # the order is the plan's: global ids of rank 0's stream
    s, j = mix.lookup(np.arange(20480))
    np.testing.assert_array_equal(np.concatenate(seen_idx), mix.global_ids(s, j))
    # labels come from each file's own label field
    lab_up = first.label[first.source == 2].numpy()
    idx_up = first.index[first.source == 2].numpy() - mix.offsets[2]
    np.testing.assert_array_equal(lab_up, betons["up_labels"][idx_up])

    # resume: 3 batches, save, a fresh loader continues with the identical 4th batch
    a = FFCVLoader(sources, mix, batch_size=512, crops=crops, num_workers=2, seed=3)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    expected = next(it)
    b = FFCVLoader(sources, mix, batch_size=512, crops=crops, num_workers=1, prefetch=1, seed=3)
    b.load_state_dict(state)
    assert len(b) == 37
    got = next(iter(b))
    torch.testing.assert_close(got.index, expected.index)
    for u, v in zip(got.views, expected.views):
        torch.testing.assert_close(u, v)  # same crops, whatever the thread count


def test_one_decode_many_views_and_flip(betons):
    """Full-image crops of one decode are identical across views; flips mirror them exactly."""
    src = BetonSource(betons["raw"])
    mix = Mixture([len(src)], budget=32, seed=0)
    full = CropSpec(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = next(iter(FFCVLoader([src], mix, batch_size=32, crops=[full, full], num_workers=1, prefetch=1)))
    torch.testing.assert_close(plain.views[0], plain.views[1])
    expect = torch.from_numpy(betons["gen"].images[plain.index.numpy()]).permute(0, 3, 1, 2)
    torch.testing.assert_close(plain.views[0], expect)
    flipped = next(iter(FFCVLoader([src], mix, batch_size=32, crops=[full, full], num_workers=2, flip=True)))
    for v in flipped.views:
        same = (v == expect).flatten(1).all(1)
        mirrored = (v == expect.flip(-1)).flatten(1).all(1)
        assert bool((same | mirrored).all())
        assert 0 < int(mirrored.sum()) < 32


def test_resize_and_as_is_views(betons):
    src = BetonSource(betons["raw"])
    mix = Mixture([len(src)], budget=32, seed=0)
    as_is = next(iter(FFCVLoader([src], mix, batch_size=16, num_workers=1, prefetch=1)))
    expect = torch.from_numpy(betons["gen"].images[as_is.index.numpy()]).permute(0, 3, 1, 2)
    torch.testing.assert_close(as_is.views[0], expect)
    small = next(iter(FFCVLoader([src], mix, batch_size=16, resize=8, num_workers=1, prefetch=1)))
    assert small.views[0].shape == (16, 3, 8, 8)


def test_non_beton_source_and_missing_ffcv(monkeypatch, betons):
    mix = Mixture([4], budget=4)
    with pytest.raises(ConfigError, match="beton sources only"):
        FFCVLoader([ArraySource(np.zeros((4, 8, 8, 3), np.uint8))], mix, batch_size=4)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv -> ImportError
    with pytest.raises(ImportError, match=r"fastssl\[ffcv\]"):
        BetonSource(betons["raw"])


def test_cli_data_beton(tmp_path):
    from loaders.cli_data import main
    out = tmp_path / "cli.beton"
    rc = main(["beton", "--source", "type=synthetic,n=10,size=8", "--out", str(out), "--format", "raw",
               "--workers", "1", "--no-progress"])
    assert rc == 0 and len(BetonSource(out)) == 10


def test_ffcv_native_loader_baseline(betons):
    loader = ffcv_native_loader(str(betons["raw"]), batch_size=8, crop=CropSpec(8), num_workers=1)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 8, 8) and images.dtype == torch.uint8 and labels.shape == (8,)


def test_batch_per_thread_order_and_errors_independent_of_threads(tmp_path, betons):
    """Thread k builds batches k, k+K, ...: any thread count yields the serial loader's batches
    (same order, same pixels); a corrupt sample in a later batch raises only after the batches
    before it were handed out, and under skip the same samples are dropped."""
    path = tmp_path / "broken.beton"
    path.write_bytes(betons["jpg"].read_bytes())
    mix = Mixture([48], budget=96, seed=2)
    k = int(mix.lookup(np.arange(96))[1][45])  # read in batch 5 (batch size 8), first in epoch 0
    f = BetonFile(path)
    with open(path, "r+b") as fh:
        fh.seek(int(f.data_ptr[k]))
        fh.write(b"\x00" * int(f.data_size[k]))
    src = BetonSource(path)
    crops = [CropSpec(8, scale=(0.2, 1.0)), CropSpec(6)]

    def run(workers, prefetch, on_error="skip"):
        return list(FFCVLoader([src], mix, batch_size=8, crops=crops, num_workers=workers, prefetch=prefetch,
                               seed=1, flip=True, on_error=on_error))

    ref = run(1, 1)
    bad = [(b.meta["batch"], b.skipped) for b in ref if b.skipped]
    assert bad[0] == (5, 1) and sum(b.skipped for b in ref) == 2  # sample k is read once per epoch
    for workers, prefetch in [(2, 2), (3, 1), (1, 3)]:
        got = run(workers, prefetch)
        assert [b.meta["batch"] for b in got] == [b.meta["batch"] for b in ref]
        for a, b in zip(ref, got):
            assert torch.equal(a.index, b.index) and a.skipped == b.skipped
            assert all(torch.equal(u, v) for u, v in zip(a.views, b.views))
    loader = FFCVLoader([src], mix, batch_size=8, crops=crops, num_workers=3, seed=1, on_error="raise")
    seen = []
    with pytest.raises(SampleError, match=rf"broken.beton\[{k}\]"):
        for batch in loader:
            seen.append(batch.meta["batch"])
    assert seen == [0, 1, 2, 3, 4]
