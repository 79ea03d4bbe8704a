"""Shard indexes that cannot go stale, torn indexes, and reads that stay right under threads and fork.

A shard rewritten in place usually keeps its size (tars are padded to 10 KiB blocks), so an
index checked against the size alone hands back old labels or another sample's bytes.
"""
import io
import os
import random
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loaders.shards as shards_mod
from loaders.errors import DataError
from loaders.shards import ShardSource, ShardWriter, build_index, index_path

ROOT = Path(__file__).resolve().parents[2]


def _png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write(out, blobs, labels, *, per_shard=4):
    with ShardWriter(out, samples_per_shard=per_shard) as w:
        for b, lab in zip(blobs, labels):
            w.write(b, ext="png", label=int(lab))
    return w.paths


def _rewrite_in_place(path, blobs, labels, *, keys=None):
    """Write a new tar (our writer's layout) over ``path``'s bytes, keeping its inode."""
    scratch = path.parent / "scratch"
    with ShardWriter(scratch, samples_per_shard=len(blobs)) as w:
        for j, (b, lab) in enumerate(zip(blobs, labels)):
            w.write(b, ext="png", label=int(lab), key=None if keys is None else keys[j])
    data = w.paths[0].read_bytes()
    for p in scratch.iterdir():
        p.unlink()
    scratch.rmdir()
    with open(path, "r+b") as f:  # in place: same file, same inode
        f.write(data)
        f.truncate()
    return len(data)


# ------------------------------------------------------------------------ stale indexes

@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "mtime-restored"])
def test_relabelled_shard_of_the_same_size_gives_its_new_labels(tmp_path, keep_mtime):
    imgs = _images(8)
    blobs = [_png(im) for im in imgs]
    paths = _write(tmp_path, blobs, [1] * 8)
    assert len(ShardSource(path=tmp_path)) == 8 and index_path(paths[1]).is_file()
    before = os.stat(paths[1])
    size = _rewrite_in_place(paths[1], blobs[4:], [7, 8, 9, 6])  # same digits count: same member sizes
    assert size == before.st_size  # the old size check cannot see this
    if keep_mtime:  # `touch -r`/`cp -p` style: only the content fingerprint sees the change
        os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(paths[1]).st_mtime_ns == before.st_mtime_ns
    src = ShardSource(path=tmp_path)
    assert src.labels().tolist() == [1, 1, 1, 1, 7, 8, 9, 6]
    np.testing.assert_array_equal(src.decode(5)[0], imgs[5])
    with np.load(index_path(paths[1])) as z:  # rebuilt on disk too
        assert z["label"].tolist() == [7, 8, 9, 6]


def test_reencoded_image_comes_back_correct(tmp_path):
    imgs = _images(8, size=16, seed=1)
    blobs = [_png(im) for im in imgs]
    paths = _write(tmp_path, blobs, range(8))
    ShardSource(path=tmp_path)
    new = _images(1, size=8, seed=99)[0]  # re-encoded smaller: the later members move, the tar does not shrink
    new_blob = _png(new)
    assert -(-len(new_blob) // 512) < -(-len(blobs[6]) // 512)
    size = _rewrite_in_place(paths[1], [blobs[4], blobs[5], new_blob, blobs[7]], [4, 5, 6, 7])
    assert size == os.path.getsize(paths[0])
    src = ShardSource(path=tmp_path)
    np.testing.assert_array_equal(src.decode(6)[0], new)
    for i in (0, 4, 5, 7):
        np.testing.assert_array_equal(src.decode(i)[0], imgs[i])


def _plain_tar(path, payloads, labels):
    """A shard written by another tool (plain tarfile): its mtime is the time of writing."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for k, (p, lab) in enumerate(zip(payloads, labels)):
            for name, data in ((f"s{k:04d}.png", p), (f"s{k:04d}.cls", str(lab).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_racy_index_is_verified_not_trusted(tmp_path):
    """Size, mtime and the head/tail fingerprint all unchanged (a large shard relabelled in the
    middle within the same clock tick as its index): the index is racy, so it is rebuilt."""
    payloads = [os.urandom(8000) for _ in range(40)]  # ~330 KB: the middle is not fingerprinted
    tar = tmp_path / "big.tar"
    _plain_tar(tar, payloads, [3] * 40)
    assert ShardSource(path=tar).labels().tolist() == [3] * 40
    st = os.stat(tar)
    _plain_tar(tar, payloads, [3] * 20 + [5] * 20)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(tar) == st.st_size
    assert ShardSource(path=tar).labels().tolist() == [3] * 20 + [5] * 20


def test_current_index_is_trusted_without_a_scan(tmp_path, monkeypatch):
    paths = _write(tmp_path, [_png(im) for im in _images(6)], range(6), per_shard=3)

    def no_scan(path):
        raise AssertionError(f"index of {path} rebuilt although current")
    monkeypatch.setattr(shards_mod, "build_index", no_scan)
    src = ShardSource(path=tmp_path)  # the writer's indexes: current and not racy
    assert len(src) == 6 and src.shards == paths


def test_shard_changed_after_load_is_a_named_error(tmp_path):
    blobs = [_png(im) for im in _images(8, seed=2)]
    paths = _write(tmp_path, blobs, range(8))
    src = ShardSource(path=tmp_path)
    assert src.read(5)[0] == blobs[5]
    # same size again, members in another order: every offset now holds another sample
    _rewrite_in_place(paths[1], blobs[4:][::-1], [7, 6, 5, 4], keys=["000000007", "000000006", "000000005",
                                                                      "000000004"])
    assert os.path.getsize(paths[1]) == os.path.getsize(paths[0])
    with pytest.raises(DataError, match=r"shard-000001.tar' changed after its index was loaded.*"
                                        r"'000000007.png'.*not '000000004.png'"):
        src.read(4)
    assert src.read(1)[0] == blobs[1]  # the unchanged shard still reads


# ------------------------------------------------------------------------ torn indexes

def _garbage(n):
    return bytes(random.Random(n).randrange(256) for _ in range(n))


@pytest.mark.parametrize("damage", ["cut", "garbage", "empty", "other-npz"])
def test_torn_or_unreadable_index_is_rebuilt(tmp_path, damage):
    blobs = [_png(im) for im in _images(5)]
    paths = _write(tmp_path, blobs, [0, 1, 2, 3, 4], per_shard=5)
    ipath = index_path(paths[0])
    good = ipath.read_bytes()
    if damage == "cut":
        ipath.write_bytes(good[: len(good) // 2])  # a torn zip: BadZipFile
    elif damage == "garbage":
        ipath.write_bytes(_garbage(300))
    elif damage == "empty":
        ipath.write_bytes(b"")
    else:
        np.savez(ipath.open("wb"), version=np.int64(2), offset=np.arange(3))
    src = ShardSource(path=tmp_path)
    assert src.labels().tolist() == [0, 1, 2, 3, 4] and src.read(3)[0] == blobs[3]
    with np.load(ipath) as z:  # rewritten whole
        assert int(z["version"]) == 2 and z["label"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000000.tar.idx"]


def test_torn_index_in_data_info_command(tmp_path):
    paths = _write(tmp_path, [_png(im) for im in _images(7)], range(7), per_shard=3)
    ipath = index_path(paths[1])
    ipath.write_bytes(ipath.read_bytes()[:200])
    res = subprocess.run([sys.executable, "-m", "fastssl", "data", "info", "--source", f"type=shards,path={tmp_path}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "samples: 7" in res.stdout and "Traceback" not in res.stderr
    assert build_index(paths[1])["label"].tolist() == [3, 4, 5]


# ------------------------------------------------------------------------ threads and fork

def test_threaded_reads_with_a_small_descriptor_cache(tmp_path, monkeypatch):
    """DALI's reader pool shares one source: 16 threads, 26 shards, room for 3 open descriptors."""
    monkeypatch.setattr(shards_mod, "_MAX_OPEN", 3)
    rng = np.random.default_rng(5)
    payloads = [rng.integers(0, 256, int(rng.integers(200, 3000)), dtype=np.uint8).tobytes() for _ in range(26 * 6)]
    _write(tmp_path, payloads, range(len(payloads)), per_shard=6)
    src = ShardSource(path=tmp_path)
    errors, bad = [], []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        def reader(seed):
            r = random.Random(seed)
            try:
                for _ in range(1500):
                    i = r.randrange(len(payloads))
                    data, label = src.read(i)
                    if data != payloads[i] or label != i:
                        bad.append(i)
            except Exception as e:  # noqa: BLE001  (any error in a thread fails the test)
                errors.append(repr(e))
        threads = [threading.Thread(target=reader, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[:3]
    assert not bad, f"{len(bad)} reads returned another sample's bytes"
    assert len(src._files._table) <= 3
    src.close()
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) < 200  # nothing leaked


def test_forked_child_reads_its_own_descriptors(tmp_path):
    blobs = [_png(im) for im in _images(12, seed=4)]
    _write(tmp_path, blobs, range(12), per_shard=3)
    src = ShardSource(path=tmp_path)
    assert src.read(0)[0] == blobs[0] and src._files._table  # the parent has descriptors open
    parent_table = src._files
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = src._files is not parent_table and not src._files._table
            ok = ok and all(src.read(i) == (blobs[i], i) for i in (11, 0, 5, 7))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert src.read(9) == (blobs[9], 9)  # the parent's descriptors were not disturbed
