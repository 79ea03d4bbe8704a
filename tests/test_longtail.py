"""Long-tailed splits: the per-class counts follow the formula exactly, a split number is
reproducible, different split numbers differ, and the written .npz holds exactly the kept
samples (pixels and labels) with its counts beside it."""
import json
import subprocess
import sys

import numpy as np

from loaders.longtail import longtail_counts, longtail_indices, write_longtail
from loaders.sources import NPZSource
from loaders.synthetic import SyntheticSource


def test_cifar100_counts_follow_the_formula():
    counts = longtail_counts(100, 450, 100)
    assert counts.tolist() == [int(450 * 0.01 ** (c / 99)) for c in range(100)]
    assert counts.sum() == 9754 and counts[0] == 450 and counts[-1] == 4
    assert longtail_counts(10, 4500, 100).sum() == 11165
    assert longtail_counts(10, 5000, 100).sum() == 12406


def test_splits_are_reproducible_and_differ():
    labels = np.repeat(np.arange(100), 500)           # CIFAR-100's training labels
    np.random.default_rng(0).shuffle(labels)
    counts = longtail_counts(100, 450, 100)
    a = longtail_indices(labels, counts, split=1)
    assert np.array_equal(a, longtail_indices(labels, counts, split=1))
    assert len(a) == 9754 and np.array_equal(np.bincount(labels[a], minlength=100), counts)
    others = [longtail_indices(labels, counts, split=s) for s in range(2, 6)]
    assert all(not np.array_equal(a, b) for b in others)


def test_written_split_holds_exactly_the_kept_samples(tmp_path):
    src = SyntheticSource(n=400, size=8)
    out = tmp_path / "lt.npz"
    rec = write_longtail(src, out, imbalance=10, split=2, progress=False)
    per_class = np.bincount(src.labels())
    n_max = int(0.9 * per_class.max())
    assert rec["counts"] == [int(n_max * 0.1 ** (c / 9)) for c in range(10)]
    lt = NPZSource(path=str(out))
    idx = np.asarray(rec["indices"])
    assert len(lt) == rec["total"] == len(idx)
    assert np.array_equal(lt.labels(), src.labels()[idx])
    for k in (0, len(idx) // 2, len(idx) - 1):
        assert np.array_equal(lt.decode(k)[0], src.decode(int(idx[k]))[0])
    side = json.loads((tmp_path / "lt.counts.json").read_text())
    assert side["counts"] == rec["counts"] and side["split"] == 2


def test_cli_writes_the_split(tmp_path):
    out = tmp_path / "syn_lt.npz"
    res = subprocess.run([sys.executable, "-m", "fastssl", "data", "longtail", "--source",
                          "type=synthetic,n=400,size=8", "--imbalance", "10", "--split", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "per-class counts" in res.stdout and out.exists()
