"""Small labelled image sets written in every on-disk format a source type reads.

Each ``write_*`` function writes one set and returns the source config (``{"type": ...}``)
that reads it back; :func:`write_split` writes a labelled train and test set of one format.
Images are a per-class colour plus noise, so a kNN on them is better than chance. Labels are
``0..classes-1`` (never ``-1``), in the order the images were given.
"""
from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image

#: every built-in source type
FORMATS = ("synthetic", "npz", "cifar", "folder", "csv", "shards", "beton")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def labelled_images(n: int, size: int = 16, *, classes: int = 10, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``uint8 [n, size, size, 3]`` RGB images and their ``int64 [n]`` labels ``i % classes``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % classes
    colours = np.random.default_rng(1234).integers(40, 216, (classes, 3))
    noise = rng.integers(-40, 41, (n, size, size, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    """PNG (lossless) or JPEG (quality 95) bytes of one ``uint8 [H, W, 3]`` image."""
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        Image.fromarray(image).save(buf, "JPEG", quality=95)
    else:
        Image.fromarray(image).save(buf, fmt.upper())
    return buf.getvalue()


def write_npz(path, images: np.ndarray, labels: np.ndarray) -> Dict:
    """An uncompressed ``.npz`` with ``image`` and ``label`` arrays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image=images, label=np.asarray(labels, dtype=np.int64))
    return {"type": "npz", "path": str(path)}


def write_cifar10(root, train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray]) -> Path:
    """torchvision's CIFAR-10 python layout under ``root/cifar-10-batches-py``: ``data_batch_1..5``
    (the train set split in five), ``test_batch`` and ``batches.meta``. Images must be 32x32.

    Batches are pickled dicts as :class:`loaders.sources.CIFARSource` reads them (loaded with
    ``encoding="bytes"``): ``b"data"`` ``uint8 [N, 3072]`` of planar R, G, B rows and
    ``b"labels"`` a list of ints. Returns the ``cifar-10-batches-py`` directory.
    """
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        if images.shape[1:] != (32, 32, 3):
            raise ValueError(f"CIFAR images must be [N, 32, 32, 3], got {list(images.shape)}")
        data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
                         b"data": data, b"filenames": [b"%d.png" % i for i in range(len(images))]}, f)

    images, labels = train
    for i, part in enumerate(np.array_split(np.arange(len(images)), 5), start=1):
        dump(f"data_batch_{i}", images[part], labels[part])
    dump("test_batch", *test)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": -(-len(images) // 5), b"num_vis": 3072,
                     b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, f)
    return d


def write_folder(root, images: np.ndarray, labels: np.ndarray, fmts: Sequence[str] = ("png", "jpg")) -> Dict:
    """``root/class_LL/img_III.EXT`` (class sub-folders), formats taken in turn from ``fmts``.

    Zero-padded class names keep the folder source's sorted class order equal to the labels,
    provided every label ``0..max`` occurs.
    """
    root = Path(root)
    for i, (img, lab) in enumerate(zip(images, labels)):
        fmt = fmts[i % len(fmts)]
        d = root / f"class_{int(lab):02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:03d}.{fmt}").write_bytes(encode(img, fmt))
    return {"type": "folder", "root": str(root)}


def write_csv(path, image_dir, images: np.ndarray, labels: np.ndarray) -> Dict:
    """PNG files in ``image_dir`` listed (relative to it) with their labels in the CSV ``path``."""
    path, image_dir = Path(path), Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, (img, lab) in enumerate(zip(images, labels)):
            name = f"img_{i:03d}.png"
            (image_dir / name).write_bytes(encode(img, "png"))
            w.writerow([name, int(lab)])
    return {"type": "csv", "path": str(path), "root": str(image_dir), "label_column": "label"}


def write_shards(out_dir, images: np.ndarray, labels: np.ndarray, *, samples_per_shard: int = 16) -> Dict:
    """WebDataset PNG shards (+ index) written by :func:`loaders.convert.to_shards`."""
    from loaders.base import ArraySource
    from loaders.convert import to_shards
    to_shards(ArraySource(images, labels, name=Path(out_dir).name), out_dir, samples_per_shard=samples_per_shard,
              fmt="png", progress=False)
    return {"type": "shards", "path": str(out_dir)}


def write_beton(path, images: np.ndarray, labels: np.ndarray) -> Dict:
    """An FFCV ``.beton`` (raw pixels) written by :func:`loaders.beton.to_beton` (needs ffcv)."""
    from loaders.base import ArraySource
    from loaders.beton import to_beton
    to_beton(ArraySource(images, labels, name=Path(path).stem), path, fmt="raw", num_workers=1, progress=False)
    return {"type": "beton", "path": str(path)}


def write_split(fmt: str, root, *, n_train: int = 40, n_test: int = 20, size: int = 16,
                classes: int = 10) -> Tuple[Dict, Dict]:
    """A labelled train and test set in format ``fmt`` under ``root``: their source configs.

    ``synthetic`` writes nothing (generated on the fly); ``cifar`` images are 32x32 whatever
    ``size`` is (the format's size).
    """
    root = Path(root)
    if fmt == "synthetic":
        return ({"type": "synthetic", "n": n_train, "size": size, "num_classes": classes},
                {"type": "synthetic", "n": n_test, "size": size, "num_classes": classes, "split": "test"})
    if fmt == "cifar":
        train = labelled_images(n_train, 32, classes=classes, seed=0)
        test = labelled_images(n_test, 32, classes=classes, seed=1)
        write_cifar10(root, train, test)
        return ({"type": "cifar", "root": str(root), "train": True},
                {"type": "cifar", "root": str(root), "train": False})
    cfgs = []
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = labelled_images(n, size, classes=classes, seed=seed)
        if fmt == "npz":
            cfgs.append(write_npz(root / f"{split}.npz", images, labels))
        elif fmt == "folder":
            cfgs.append(write_folder(root / split, images, labels))
        elif fmt == "csv":
            cfgs.append(write_csv(root / f"{split}.csv", root / f"{split}_images", images, labels))
        elif fmt == "shards":
            cfgs.append(write_shards(root / split, images, labels))
        elif fmt == "beton":
            cfgs.append(write_beton(root / f"{split}.beton", images, labels))
        else:
            raise ValueError(f"unknown format '{fmt}' (one of: {', '.join(FORMATS)})")
    return cfgs[0], cfgs[1]
