"""WebDataset shards: our writer's output is plain tar (tar, webdataset read it), shards of
other writers get an index on first open, truncation is an error naming the shard, and a
crash mid-shard leaves only a .tmp that readers ignore."""
import io
import os
import pickle
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image

import loaders.shards as shards_mod
from loaders.base import build_source
from loaders.errors import DataError, SampleError
from loaders.shards import ShardSource, ShardWriter, build_index, index_path, split_key


def _enc(img, fmt="png"):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, {"png": "PNG", "jpg": "JPEG"}[fmt], **({"quality": 95} if fmt == "jpg" else {}))
    return buf.getvalue()


def _images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write(out, imgs, labels, *, per_shard=3, fmt="png"):
    with ShardWriter(out, samples_per_shard=per_shard) as w:
        for img, lab in zip(imgs, labels):
            w.write(_enc(img, fmt), ext=fmt, label=int(lab))
    return w.paths


def test_split_key_matches_webdataset():
    assert split_key("dir/abc.seg.PNG") == ("dir/abc", "seg.png")
    assert split_key("abc.jpg") == ("abc", "jpg")
    assert split_key("./a/b.cls") == ("./a/b", "cls")


def test_roundtrip_png_exact_and_index(tmp_path):
    imgs, labels = _images(7), np.arange(7) * 3 - 2
    paths = _write(tmp_path, imgs, labels)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all(index_path(p).is_file() for p in paths)
    assert not list(tmp_path.glob("*.tmp"))
    src = build_source({"type": "shards", "path": str(tmp_path)})
    assert len(src) == 7
    np.testing.assert_array_equal(src.labels(), labels)
    np.testing.assert_array_equal(src.starts, [0, 3, 6, 7])
    for i in [6, 0, 4, 2]:  # random access, any order
        img, lab = src.decode(i)
        np.testing.assert_array_equal(img, imgs[i])
        assert lab == labels[i]
    assert src.describe(4) == f"{paths[1]}:000000004.png"
    # the index written by the writer equals the one a header scan builds
    for p in paths:
        with np.load(index_path(p)) as z:
            written = {k: z[k] for k in z.files}
        scanned = build_index(p)
        for k in ("key", "ext", "offset", "size", "label", "tag", "tar_size", "tar_mtime_ns", "fingerprint"):
            np.testing.assert_array_equal(written[k], scanned[k])
    # glob and list forms; pickled clones read the same bytes in a fresh state
    assert len(ShardSource(path=str(tmp_path / "shard-00000[01].tar"))) == 6
    assert len(ShardSource(path=[str(paths[2]), str(paths[0])])) == 4
    clone = pickle.loads(pickle.dumps(src))
    assert clone.read(5) == src.read(5)


def test_roundtrip_jpeg_within_tolerance(tmp_path):
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)
    _write(tmp_path, [img], [1], fmt="jpg")
    out, lab = ShardSource(path=tmp_path).decode(0)
    assert lab == 1 and np.abs(out.astype(int) - img).mean() < 3.0


def test_our_shards_are_plain_tar_and_webdataset_readable(tmp_path):
    import webdataset as wds
    imgs, labels = _images(5), [4, 3, 2, 1, 0]
    paths = _write(tmp_path, imgs, labels, per_shard=5)
    listing = subprocess.run(["tar", "-tf", str(paths[0])], capture_output=True, text=True, check=True).stdout.split()
    assert listing == [f"{i:09d}.{e}" for i in range(5) for e in ("png", "cls")]
    ds = wds.WebDataset(str(paths[0]), shardshuffle=False).decode("rgb8").to_tuple("png", "cls")
    got = list(ds)
    assert len(got) == 5
    for (img, cls), ref, lab in zip(got, imgs, labels):
        np.testing.assert_array_equal(img, ref)
        assert int(cls) == lab


def test_webdataset_shardwriter_output_gets_index(tmp_path):
    import webdataset as wds
    imgs = _images(6, seed=1)
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=4, verbose=0) as sink:
        for i, img in enumerate(imgs):
            sample = {"__key__": f"s{i:04d}", "png": _enc(img)}
            if i != 2:  # one sample without .cls -> label -1
                sample["cls"] = i
            sink.write(sample)
    shards = sorted(tmp_path.glob("wds-*.tar"))
    assert len(shards) == 2 and not any(index_path(p).exists() for p in shards)
    src = ShardSource(path=tmp_path)
    assert all(index_path(p).is_file() for p in shards)  # built on first open, written beside
    np.testing.assert_array_equal(src.labels(), [0, 1, -1, 3, 4, 5])
    for i in range(6):
        np.testing.assert_array_equal(src.decode(i)[0], imgs[i])
    assert src.key(2) == "s0002"


def test_gnu_tar_output_gets_index(tmp_path):
    imgs = _images(3, seed=2)
    files = tmp_path / "files"
    files.mkdir()
    names = []
    for i, img in enumerate(imgs):
        (files / f"k{i}.png").write_bytes(_enc(img))
        (files / f"k{i}.cls").write_text(f"{i + 10}\n")
        (files / f"k{i}.json").write_text("{}")
        names += [f"k{i}.png", f"k{i}.cls", f"k{i}.json"]
    tar_path = tmp_path / "gnu.tar"
    subprocess.run(["tar", "-cf", str(tar_path), "-C", str(files), *names], check=True)
    src = ShardSource(path=tar_path)
    np.testing.assert_array_equal(src.labels(), [10, 11, 12])
    for i in range(3):
        np.testing.assert_array_equal(src.decode(i)[0], imgs[i])


def test_index_kept_in_memory_when_directory_is_read_only(tmp_path, monkeypatch, capsys):
    paths = _write(tmp_path, _images(2), [0, 1], per_shard=1)
    for p in paths:
        os.remove(index_path(p))

    def refuse(path, write_fn, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(shards_mod, "atomic_write", refuse)
    src = ShardSource(path=tmp_path)
    assert len(src) == 2 and not index_path(paths[0]).exists()
    ShardSource(path=tmp_path)
    err = capsys.readouterr().err
    assert err.count("kept in memory") == 1 and "Permission denied" in err  # said once, naming the index


def test_stale_index_is_rebuilt(tmp_path):
    paths = _write(tmp_path, _images(3), [0, 1, 2])
    fake = tmp_path / "other"
    _write(fake, _images(5, seed=9), [7] * 5, per_shard=5)
    os.replace(fake / "shard-000000.tar", paths[0])  # the tar changes, its old index stays
    src = ShardSource(path=paths[0])
    assert len(src) == 5 and list(src.labels()) == [7] * 5
    np.testing.assert_array_equal(src.decode(4)[0], _images(5, seed=9)[4])


@pytest.mark.parametrize("where", ["data", "header", "boundary"])
def test_truncated_shard_is_a_data_error(tmp_path, where):
    paths = _write(tmp_path, _images(4, size=16), [0, 1, 2, 3], per_shard=4)
    p = paths[0]
    ix = build_index(p)
    data = p.read_bytes()
    cut = {"data": int(ix["offset"][-1]) + 10,      # inside the last image's bytes
           "header": int(ix["offset"][-1]) - 300,   # inside the last image's header
           "boundary": _end_of_members(p)}[where]   # right after the last member: no end marker
    p.write_bytes(data[:cut])
    with pytest.raises(DataError, match="shard-000000.tar.*truncated|truncated.*shard-000000.tar"):
        ShardSource(path=tmp_path)


def _end_of_members(p):
    with tarfile.open(p) as tf:
        for _ in tf:
            pass
        return tf.offset


def test_truncation_after_open_is_a_sample_error(tmp_path):
    paths = _write(tmp_path, _images(4, size=16), [0, 1, 2, 3], per_shard=4)
    src = ShardSource(path=tmp_path)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: int(src._offset[3]) + 5])
    src.read(0)
    with pytest.raises(SampleError, match="shard-000000.tar.*truncated") as e:
        src.read(3)
    assert e.value.path == str(paths[0])


def test_not_a_tar_and_empty(tmp_path):
    (tmp_path / "junk.tar").write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match="junk.tar"):
        ShardSource(path=tmp_path)
    with pytest.raises(DataError, match="no .tar shards"):
        ShardSource(path=tmp_path / "empty_dir_glob_*.tar")
    with pytest.raises(DataError, match="does not exist"):
        ShardSource(path=tmp_path / "nothing")


def test_crash_mid_shard_leaves_only_tmp(tmp_path):
    pid = os.fork()  # the child writes 5 samples (shards of 3) and dies without closing
    if pid == 0:
        try:
            w = ShardWriter(tmp_path, samples_per_shard=3)
            for i in range(5):
                w.write(_enc(np.full((4, 4, 3), i, np.uint8)), ext="png", label=i)
        finally:
            os._exit(1)  # crash: no close, no cleanup, no atexit
    os.waitpid(pid, 0)
    names = sorted(os.listdir(tmp_path))
    assert names == ["shard-000000.tar", "shard-000000.tar.idx", "shard-000001.tar.tmp"]
    src = ShardSource(path=tmp_path)
    assert len(src) == 3 and list(src.labels()) == [0, 1, 2]


def test_writer_aborts_on_exception_and_checks_input(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, samples_per_shard=10) as w:
            w.write(_enc(_images(1)[0]), ext="png", label=0)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    w = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="extension"):
        w.write(b"x", ext="gif")
    with pytest.raises(ValueError, match="no '.'"):
        w.write(b"x", ext="png", key="a.b")
    w.write(b"x", ext="png", key="a")
    with pytest.raises(ValueError, match="twice"):
        w.write(b"x", ext="png", key="a")
    w.abort()
