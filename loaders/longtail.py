"""Long-tailed splits of a balanced labelled source (``fastssl data longtail``).

Class ``c`` of ``C`` keeps ``int(n_max * (1 / imbalance) ** (c / (C - 1)))`` of its samples, so
class 0 is the head (``n_max``) and class ``C - 1`` the tail (``n_max / imbalance``). The BCL and
SDCLR papers' CIFAR splits take ``n_max`` = 90% of a class (450 of CIFAR-100's 500 training
images, 4,500 of CIFAR-10's 5,000): at imbalance 100 that is 9,754 CIFAR-100 images (head 450,
tail 4) and 11,165 CIFAR-10 images; ``max_per_class=5000`` gives the other common CIFAR-10-LT
convention (12,406 images). Which samples of a class are kept is a seeded draw per split number
(``split`` 1..5 in the papers: five different subsets, each reproducible).

:func:`write_longtail` stores the split as an uncompressed ``.npz`` (``image``, ``label``, any
source type can be the input) and, beside it, ``<name>.counts.json``: the per-class counts, the
formula, the split's seed and the source indices it kept.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .base import Source
from .errors import ConfigError

__all__ = ["longtail_counts", "longtail_indices", "SubsetSource", "write_longtail"]


def longtail_counts(num_classes: int, max_per_class: int, imbalance: float) -> np.ndarray:
    """``int64 [C]``: ``int(max_per_class * (1 / imbalance) ** (c / (C - 1)))`` for class ``c``."""
    if num_classes < 2 or max_per_class < 1 or imbalance < 1:
        raise ConfigError(f"longtail: need >= 2 classes, max_per_class >= 1 and imbalance >= 1, got "
                          f"{num_classes}, {max_per_class}, {imbalance}")
    c = np.arange(num_classes, dtype=np.float64)
    return np.array([int(max_per_class * (1.0 / imbalance) ** (k / (num_classes - 1))) for k in c], np.int64)


def longtail_indices(labels: np.ndarray, counts: np.ndarray, *, split: int) -> np.ndarray:
    """Sorted source indices: ``counts[c]`` samples of each class ``c``, drawn without
    replacement with a generator seeded by ``split`` (the same split, the same subset)."""
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng([0x10A6, int(split)])
    keep = []
    for c, n in enumerate(counts.tolist()):
        members = np.flatnonzero(labels == c)
        if len(members) < n:
            raise ConfigError(f"longtail: class {c} has {len(members)} samples, the split needs {n} "
                              f"(lower --max-per-class)")
        keep.append(np.sort(rng.choice(members, size=n, replace=False)))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


class SubsetSource(Source):
    """The samples ``indices`` of ``source``, in that order (a view: nothing is copied)."""

    def __init__(self, source: Source, indices: np.ndarray, *, name: Optional[str] = None):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        self.name = name or f"{getattr(source, 'name', 'source')}[subset]"

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int):
        return self.source.read(int(self.indices[i]))

    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels(), np.int64)[self.indices]

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.indices[i]))


def write_longtail(source: Source, out, *, imbalance: float = 100, split: int = 1,
                   max_per_class: Optional[int] = None, progress: bool = True) -> Dict:
    """Write the split of ``source`` to ``out`` (``.npz``) and ``<out stem>.counts.json``;
    returns the JSON record (counts, total, seed, indices)."""
    from .convert import source_to_npz

    out = Path(out)
    if out.suffix != ".npz":
        raise ConfigError(f"longtail: --out '{out}' must end with .npz")
    labels = np.asarray(source.labels(), np.int64)
    if labels.size == 0 or labels.min() < 0:
        raise ConfigError(f"longtail: source '{getattr(source, 'name', '?')}' needs labels >= 0 for every sample")
    num_classes = int(labels.max()) + 1
    per_class = np.bincount(labels, minlength=num_classes)
    n_max = int(max_per_class) if max_per_class else int(0.9 * int(per_class.max()))
    counts = longtail_counts(num_classes, n_max, imbalance)
    idx = longtail_indices(labels, counts, split=split)
    source_to_npz(SubsetSource(source, idx, name=f"{getattr(source, 'name', 'source')}-lt"), out,
                  progress=progress)
    record = {"source": getattr(source, "name", "?"), "imbalance": imbalance, "split": int(split),
              "max_per_class": n_max, "total": int(counts.sum()), "counts": counts.tolist(),
              "formula": f"class c keeps int({n_max} * (1/{imbalance}) ** (c / {num_classes - 1}))",
              "seed": [0x10A6, int(split)], "indices": idx.tolist()}
    side = out.with_name(out.stem + ".counts.json")
    side.write_text(json.dumps(record))
    return record
