"""on_error: skip keeps batches whole: a failed sample is replaced by the rank's next plan sample,
identically for 0/1/2 workers, across a resume and on the resident backend; skips are counted per
source; too many stop the run naming files and data.max_skip_fraction; the plan's end is the only
short batch. Worker errors under on_error: raise reach the caller as one short line."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loaders.base import ArraySource
from loaders.crop import CropSpec
from loaders.errors import ConfigError, DataError, SampleError
from loaders.mixture import Mixture
from loaders.pipeline import build_loader
from loaders.resident_backend import ResidentLoader
from loaders.sources import ImageFolderSource
from loaders.torch_backend import TorchLoader

B = 8
CROPS = [CropSpec(8, scale=(0.3, 1.0)), CropSpec(6)]


def write_folder(root: Path, n: int, corrupt, size: int = 12, seed: int = 0) -> ImageFolderSource:
    """``n`` PNGs in two class folders; the indices in ``corrupt`` hold garbage bytes (still .png)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:03d}.png"
        if i in corrupt:
            path.write_bytes(b"\x89PNG\r\n garbage " + bytes(rng.integers(0, 256, 40, dtype=np.uint8)))
        else:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
            path.write_bytes(buf.getvalue())
    return ImageFolderSource(root=root, name="pngs")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """60 PNGs of which 6 (10%) are corrupt, and their global ids in a [folder, array] mixture."""
    root = tmp_path_factory.mktemp("skips") / "pngs"
    src = write_folder(root, 60, corrupt={3, 11, 20, 33, 47, 58})
    bad = {k for k in range(len(src)) if b"garbage" in Path(src.path(k)).read_bytes()}
    assert len(bad) == 6
    return src, bad


def array_source(n=20):
    rng = np.random.default_rng(1)
    return ArraySource(rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8), np.arange(n) % 3, name="arr")


def collect(loader, limit=None):
    out = []
    for k, b in enumerate(loader):
        out.append(b)
        if limit is not None and k + 1 == limit:
            break
    return out


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.label, y.label)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))


def expected_ids(mix, total, bad_gids):
    src, smp = mix.positions(0, total)
    gid = mix.global_ids(src, smp)
    isbad = np.isin(gid, list(bad_gids))
    return gid, isbad


@pytest.mark.timeout(120)
def test_skips_are_replaced_whole_batches_same_for_0_1_2_workers_and_resume(folder):
    src, bad = folder
    sources = [src, array_source()]
    mix = Mixture([60, 20], dups=[2, 1], budget=280, seed=7, names=["pngs", "arr"])

    def make(workers):
        return TorchLoader(sources, mix, batch_size=B, crops=CROPS, num_workers=workers, seed=3, on_error="skip",
                           max_skip_fraction=0.3)

    ref_loader = make(0)
    ref = collect(ref_loader)
    gid, isbad = expected_ids(mix, 280, bad)
    good = gid[~isbad]
    n_full = len(good) // B
    assert isbad.sum() > 10 and [len(b) for b in ref] == [B] * n_full  # every batch whole; the rest dropped
    got = torch.cat([b.index for b in ref]).numpy()
    assert np.array_equal(got, good[:n_full * B]) and not set(got.tolist()) & bad
    assert ref_loader.skipped == isbad.sum() and ref_loader.skipped_by_source == {"pngs": int(isbad.sum()), "arr": 0}
    assert len(ref_loader.skipped_files) == 20 and all(f.endswith(".png") for f in ref_loader.skipped_files)
    assert ref_loader.state_dict()["skipped_by_source"]["pngs"] == isbad.sum()
    same(collect(make(1)), ref)
    same(collect(make(2)), ref)
    # resume mid-way, at a cursor inside a chunk (the skips moved it off the chunk grid)
    cursor = np.flatnonzero(~isbad)[B - 1::B] + 1  # after batch k: just past its last sample
    inside = [k + 1 for k in range(2, n_full - 2) if cursor[k] % B]
    for workers, k in [(2, inside[0]), (0, inside[len(inside) // 2]), (1, inside[-1])]:
        first = make(workers)
        head = collect(first, limit=k)
        sd = first.state_dict()
        assert sd["plan"]["samples"] == cursor[k - 1] and sd["plan"]["samples"] % B != 0
        assert sd["skipped"] == isbad[:cursor[k - 1]].sum()
        resumed = make(2 - workers)
        resumed.load_state_dict(sd)
        same(head + collect(resumed), ref)
        assert resumed.skipped == ref_loader.skipped


@pytest.mark.timeout(60)
def test_resident_backend_replaces_the_same_samples(folder):
    src, bad = folder
    mix = Mixture([60, 20], dups=[1, 2], budget=200, seed=5, names=["pngs", "arr"])
    kw = dict(batch_size=B, on_error="skip", max_skip_fraction=0.3)
    res = ResidentLoader([src, array_source()], mix, progress=False, **kw)
    ref = TorchLoader([src, array_source()], mix, num_workers=0, resize=None, **kw)
    got, want = collect(res), collect(ref)
    same(got, want)
    assert all(len(b) == B for b in got) and res.state_dict() == ref.state_dict()
    assert res.skipped_by_source["pngs"] == ref.skipped_by_source["pngs"] > 0


@pytest.mark.timeout(60)
def test_the_plan_end_is_the_only_short_batch(folder):
    src, bad = folder
    mix = Mixture([60], budget=60, seed=1)
    loader = TorchLoader([src], mix, batch_size=B, crops=CROPS, num_workers=0, on_error="skip",
                         max_skip_fraction=0.3, drop_last=False)
    got = collect(loader)
    sizes = [len(b) for b in got]
    assert sizes == [B] * 6 + [6]  # 54 readable samples: 6 whole batches, the plan runs out in the 7th
    assert loader.skipped == 6 and len(loader) == 0 and loader.state_dict()["plan"]["samples"] == 60
    # two ranks: each gets whole batches from its own stream
    for r in range(2):
        lr = TorchLoader([src], Mixture([60], seed=1), batch_size=B, crops=CROPS, num_workers=0, rank=r,
                         world_size=2, on_error="skip", max_skip_fraction=0.3)
        assert [len(b) for b in collect(lr, limit=5)] == [B] * 5


@pytest.mark.timeout(60)
def test_too_many_skips_stop_naming_files_and_the_key(tmp_path, folder):
    src, bad = folder
    with pytest.raises(DataError, match=r"data\.max_skip_fraction=0\.01.*pngs/c\d/0\d\d\.png") as e:
        collect(TorchLoader([src], Mixture([60], seed=2), batch_size=B, num_workers=2, resize=12,
                            on_error="skip"))
    assert "\n" not in str(e.value) and len(str(e.value)) < 700
    # one early bad file does not stop a run: checked only after 100 reads (1 of 120 < 1%)
    one = write_folder(tmp_path / "one", 120, corrupt={2})
    loader = TorchLoader([one], Mixture([120], budget=120, seed=0), batch_size=B, resize=12, num_workers=0,
                         on_error="skip")
    assert sum(len(b) for b in collect(loader)) == 112 and loader.skipped == 1
    # a source where everything fails stops instead of looping forever
    dead = write_folder(tmp_path / "dead", 10, corrupt=set(range(10)))
    with pytest.raises(DataError, match=r"100 of the 100 samples read failed"):
        collect(TorchLoader([dead], Mixture([10], seed=0), batch_size=4, resize=12, num_workers=0,
                            on_error="skip", max_skip_fraction=0.5))


@pytest.mark.timeout(60)
def test_worker_error_is_one_short_line_naming_file_sample_and_source(folder):
    src, bad = folder
    mix = Mixture([60], budget=60, seed=0)
    for workers in (0, 2):
        with pytest.raises(SampleError) as e:
            collect(TorchLoader([src], mix, batch_size=B, crops=CROPS, num_workers=workers))
        msg = str(e.value)
        k = e.value.index
        assert k in bad and src.path(k) in msg and f"sample {k}" in msg and "source 'pngs'" in msg, msg
        assert "\n" not in msg and "Traceback" not in msg and len(msg) < 400, msg
        assert e.value.path == src.path(k)


def test_backend_options_and_batch_size_are_checked():
    cfg = {"sources": [{"name": "syn", "type": "synthetic", "n": 32, "size": 16}], "batch_size": 8,
           "num_workers": 0}
    loader = build_loader({**cfg, "backend_options": {"timeout": 5}})
    assert isinstance(loader, TorchLoader) and loader.timeout == 5
    with pytest.raises(ConfigError, match=r"unknown key 'timout' in data\.backend_options \(backend 'torch'\); "
                                          r"did you mean 'timeout'\? \(valid: .*prefetch_factor"):
        build_loader({**cfg, "backend_options": {"timout": 5}})
    with pytest.raises(ConfigError, match=r"unknown key 'timeout' in data\.backend_options \(backend 'resident'\)"):
        build_loader({**cfg, "backend": "resident", "backend_options": {"timeout": 5}})
    with pytest.raises(ConfigError, match=r"backend_options\.seed: set by data\.seed"):
        build_loader({**cfg, "backend_options": {"seed": 1}})
    for bs in (0, -3, 2.5, True, "8"):
        with pytest.raises(ConfigError, match=r"^data\.batch_size must be a positive integer"):
            build_loader({**cfg, "batch_size": bs})
    with pytest.raises(ConfigError, match=r"data\.max_skip_fraction must be a number in \[0, 1\)"):
        build_loader({**cfg, "max_skip_fraction": 1})
    with pytest.raises(ConfigError, match=r"torch loader: batch_size must be a positive integer, got 0"):
        TorchLoader([array_source()], Mixture([20]), batch_size=0)
