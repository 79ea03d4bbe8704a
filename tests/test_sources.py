"""Folder, CSV, .npz and CIFAR sources: each reads back what its format holds, and bad input
gives a clear error naming the file."""
import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from loaders.base import build_source
from loaders.errors import ConfigError, DataError, SampleError
from loaders.sources import CIFARSource, CSVSource, ImageFolderSource, NPZSource, PathTable


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _images(n, h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _write_folder(root, images, labels, fmt="png"):
    paths = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = root / f"class_{lab}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img_{i:03d}.{fmt}"
        Image.fromarray(img).save(p, quality=95) if fmt == "jpg" else Image.fromarray(img).save(p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------- folder

def test_folder_png_exact_and_labels(tmp_path):
    imgs = _images(6)
    labels = [0, 1, 2, 0, 1, 2]
    _write_folder(tmp_path, imgs, labels)
    src = build_source({"type": "folder", "root": str(tmp_path)})
    assert isinstance(src, ImageFolderSource)
    assert src.classes == ["class_0", "class_1", "class_2"]
    assert len(src) == 6
    # files sorted within sorted classes: class_0 holds img 0 and 3, ...
    order = [0, 3, 1, 4, 2, 5]
    np.testing.assert_array_equal(src.labels(), [0, 0, 1, 1, 2, 2])
    for i, j in enumerate(order):
        img, lab = src.decode(i)
        np.testing.assert_array_equal(img, imgs[j])
        assert lab == labels[j]
        assert src.describe(i).endswith(f"img_{j:03d}.png")
    # pickled copies read the same bytes
    clone = pickle.loads(pickle.dumps(src))
    assert clone.read(3) == src.read(3)


def test_folder_jpeg_within_tolerance(tmp_path):
    # smooth image: JPEG at quality 95 stays within a few grey levels
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)
    _write_folder(tmp_path, [img], [0], fmt="jpg")
    out, _ = ImageFolderSource(root=tmp_path).decode(0)
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - img).mean() < 3.0


def test_folder_flat_is_unlabelled(tmp_path):
    for i, img in enumerate(_images(3)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolderSource(root=tmp_path)
    assert len(src) == 3 and src.classes == []
    np.testing.assert_array_equal(src.labels(), [-1, -1, -1])


def test_folder_corrupt_image_names_file(tmp_path):
    _write_folder(tmp_path, _images(2), [0, 0])
    bad = tmp_path / "class_0" / "img_001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    src = ImageFolderSource(root=tmp_path)
    src.decode(0)
    with pytest.raises(SampleError, match="img_001.png") as e:
        src.decode(1)
    assert e.value.path == str(bad) and e.value.index == 1


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(root=tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolderSource(root=tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown key 'rooot'"):
        build_source({"type": "folder", "rooot": str(tmp_path)})


def test_path_table_roundtrip():
    paths = ["a/b.jpg", "ü/ñ.png", "", "x" * 300]
    t = PathTable(paths)
    assert len(t) == 4 and [t[i] for i in range(4)] == paths


# ---------------------------------------------------------------------------------- csv

def test_csv_root_labels_and_missing_file(tmp_path):
    imgs = _images(3)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\n0.png,4\n1.png,\nmissing.png,7\n2.png,1\n")
    src = build_source({"type": "csv", "path": str(csv_path), "root": str(tmp_path), "label_column": "label"})
    assert isinstance(src, CSVSource) and len(src) == 4
    np.testing.assert_array_equal(src.labels(), [4, -1, 7, 1])
    np.testing.assert_array_equal(src.decode(0)[0], imgs[0])
    np.testing.assert_array_equal(src.decode(3)[0], imgs[2])
    with pytest.raises(SampleError, match="missing.png") as e:
        src.read(2)
    assert e.value.index == 2
    # no label column: all unknown; paths as written (absolute here)
    csv2 = tmp_path / "abs.csv"
    csv2.write_text("file\n" + "\n".join(str(tmp_path / f"{i}.png") for i in range(3)) + "\n")
    src2 = CSVSource(path=csv2, path_column="file")
    np.testing.assert_array_equal(src2.labels(), [-1, -1, -1])
    np.testing.assert_array_equal(src2.decode(1)[0], imgs[1])


def test_csv_errors(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("file,label\nx.png,1\n")
    with pytest.raises(DataError, match=r"no column 'path'.*a\.csv|a\.csv.*no column 'path'"):
        CSVSource(path=p)
    with pytest.raises(DataError, match="no column 'cls'"):
        CSVSource(path=p, path_column="file", label_column="cls")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.csv.*empty"):
        CSVSource(path=empty)
    header_only = tmp_path / "h.csv"
    header_only.write_text("path\n")
    with pytest.raises(DataError, match="h.csv.*no images"):
        CSVSource(path=header_only)
    bad_label = tmp_path / "b.csv"
    bad_label.write_text("path,label\nx.png,cat\n")
    with pytest.raises(DataError, match="line 2.*not an integer"):
        CSVSource(path=bad_label, label_column="label")
    with pytest.raises(DataError, match="cannot be opened"):
        CSVSource(path=tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------- npz

def test_npz_stored_is_memory_mapped(tmp_path):
    imgs = _images(7, 8, 8)
    labels = np.arange(7) % 3
    p = tmp_path / "gen.npz"
    np.savez(p, image=imgs, label=labels)
    src = build_source({"type": "npz", "path": str(p)})
    assert isinstance(src, NPZSource) and src.memmapped
    assert isinstance(src.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(src.images), imgs)
    np.testing.assert_array_equal(src.labels(), labels)
    arr, lab = src.read(5)
    np.testing.assert_array_equal(arr, imgs[5])
    assert lab == 2 and not isinstance(arr, np.memmap)
    # pickling drops the map; the clone re-maps lazily
    blob = pickle.dumps(src)
    assert len(blob) < 2000
    np.testing.assert_array_equal(pickle.loads(blob).read(6)[0], imgs[6])


def test_npz_compressed_and_no_labels(tmp_path):
    imgs = _images(4, 6, 5)
    p = tmp_path / "c.npz"
    np.savez_compressed(p, image=imgs)
    src = NPZSource(path=p)
    assert not src.memmapped
    np.testing.assert_array_equal(src.labels(), [-1] * 4)
    np.testing.assert_array_equal(src.read(3)[0], imgs[3])


def test_npz_errors(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, images=_images(2))
    with pytest.raises(DataError, match=r"x\.npz.*no key 'image'.*images"):
        NPZSource(path=p)
    np.savez(p, image=_images(2).astype(np.float32))
    with pytest.raises(DataError, match=r"x\.npz.*'image' must be uint8"):
        NPZSource(path=p)
    np.savez(p, image=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="uint8 \\[N,H,W,3\\]"):
        NPZSource(path=p)
    np.savez(p, image=_images(3), label=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"x\.npz.*'label'.*\[3\]"):
        NPZSource(path=p)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        NPZSource(path=tmp_path / "bad.npz")
    with pytest.raises(DataError, match="does not exist"):
        NPZSource(path=tmp_path / "none.npz")


def test_npz_truncated_file(tmp_path):
    imgs = _images(50, 8, 8)
    p = tmp_path / "t.npz"
    np.savez(p, image=imgs)
    data = p.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.npz"):
        NPZSource(path=cut)


# ---------------------------------------------------------------------------------- cifar

def _write_cifar(root, kind, n_per_file=3, seed=0):
    rng = np.random.default_rng(seed)
    if kind == 10:
        d = root / "cifar-10-batches-py"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = b"labels"
    else:
        d = root / "cifar-100-python"
        files = {"train": ["train"], "test": ["test"]}
        key = b"fine_labels"
    d.mkdir(parents=True)
    truth = {}
    for split, names in files.items():
        hwc, labs = [], []
        for name in names:
            img = rng.integers(0, 256, (n_per_file, 32, 32, 3), dtype=np.uint8)
            lab = rng.integers(0, kind, n_per_file).tolist()
            data = img.transpose(0, 3, 1, 2).reshape(n_per_file, 3072)  # planar R, G, B rows
            with open(d / name, "wb") as f:
                pickle.dump({b"data": data, key: lab, b"batch_label": b"x"}, f)
            hwc.append(img)
            labs += lab
        truth[split] = (np.concatenate(hwc), np.array(labs))
    return d, truth


@pytest.mark.parametrize("kind", [10, 100])
def test_cifar_reads_torchvision_format(tmp_path, kind):
    d, truth = _write_cifar(tmp_path, kind)
    for root in (tmp_path, d):  # the parent dir or the batches dir itself
        for train in (True, False):
            src = build_source({"type": "cifar", "root": str(root), "train": train})
            imgs, labs = truth["train" if train else "test"]
            assert len(src) == len(imgs)
            np.testing.assert_array_equal(src.labels(), labs)
            for i in (0, len(src) - 1):
                arr, lab = src.read(i)
                np.testing.assert_array_equal(arr, imgs[i])
                assert lab == labs[i]
    clone = pickle.loads(pickle.dumps(src))
    assert clone._images is None
    np.testing.assert_array_equal(clone.read(1)[0], truth["test"][0][1])


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="never downloads"):
        CIFARSource(root=tmp_path)
    d, _ = _write_cifar(tmp_path, 10)
    os.remove(d / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        CIFARSource(root=tmp_path)
    CIFARSource(root=tmp_path, train=False)
