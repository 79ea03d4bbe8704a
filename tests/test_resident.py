"""The resident backend: the torch backend's order, ranks and resume; pixels equal to the sources'
decoded images; proportions; size rules; errors; build_loader + the engine; prefetcher pass-through."""
import types

import numpy as np
import pytest
import torch
from PIL import Image

from loaders.augment import Augment
from loaders.base import ArraySource
from loaders.crop import CropSpec
from loaders.errors import ConfigError, SampleError
from loaders.mixture import Mixture
from loaders.pipeline import build_loader
from loaders.prefetch import DevicePrefetcher
from loaders.resident_backend import ResidentLoader, resize_images
from loaders.sources import ImageFolderSource, NPZSource
from loaders.synthetic import SyntheticSource
from loaders.torch_backend import TorchLoader

MIXES = {
    "dup+budget": lambda: Mixture([96, 64], dups=[2, 1], budget=700, seed=11),
    "weights+fraction+budget": lambda: Mixture([96, 64], weights=[3, 1], fractions=[0.5, None], budget=640,
                                               epoch_length=200, seed=5),
    "dup+fraction": lambda: Mixture([96, 64], dups=[1, 3], fractions=[None, 0.25], budget=600, seed=2),
}


@pytest.fixture(scope="module")
def synth():
    return [SyntheticSource(n=96, size=16, seed=0, name="real"),
            SyntheticSource(n=64, size=16, seed=1, variant="generated", name="gen")]


def resident(sources, mix, **kw):
    kw.setdefault("batch_size", 32)
    return ResidentLoader(sources, mix, progress=False, **kw)


def torch_loader(sources, mix, **kw):
    kw.setdefault("batch_size", 32)
    return TorchLoader(sources, mix, num_workers=0, resize=None, **kw)


def collect(loader, limit=None):
    out = []
    for k, b in enumerate(loader):
        out.append(b)
        if limit is not None and k + 1 == limit:
            break
    return out


def assert_same(got, ref, pixels=True):
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        for name in ("index", "source", "label"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.skipped == b.skipped
        if pixels:
            assert len(a.views) == 1 and torch.equal(a.views[0], b.views[0].contiguous())


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("world", [1, 2])
def test_same_batches_as_torch_backend_per_rank(synth, mix, world):
    for rank in range(world):
        m = MIXES[mix]()
        got = collect(resident(synth, m, rank=rank, world_size=world))
        assert got and all(b.views[0].dtype == torch.uint8 and b.views[0].shape[1:] == (3, 16, 16) for b in got)
        assert_same(got, collect(torch_loader(synth, m, rank=rank, world_size=world)))


def test_two_ranks_are_disjoint_and_interleave_to_the_single_rank_stream(synth):
    m = MIXES["dup+budget"]()
    one = torch.cat([b.index for b in collect(resident(synth, m, batch_size=10))])
    r0, r1 = (torch.cat([b.index for b in collect(resident(synth, m, batch_size=5, rank=r, world_size=2))])
              for r in (0, 1))
    ids = m.global_ids(*m.positions(0, m.total))
    assert torch.equal(r0, torch.from_numpy(ids[0::2][:len(r0)]))
    assert torch.equal(r1, torch.from_numpy(ids[1::2][:len(r1)]))
    both = torch.stack([r0, r1], 1).reshape(-1)  # positions 0, 1, 2, ...: rank r holds r, r+2, ...
    assert torch.equal(both, one[:len(both)])
    # disjoint positions: the two ranks together hold each position once
    assert len(r0) + len(r1) == len(both) == 2 * (m.total // 2 // 5 * 5)


@pytest.mark.parametrize("k", [0, 3, 9])
def test_resume_exact_and_across_backends(synth, k):
    m = MIXES["weights+fraction+budget"]()
    ref = collect(resident(synth, m))
    first = resident(synth, m)
    head = collect(first, limit=k) if k else []
    sd = first.state_dict()
    assert sd["plan"]["samples"] == 32 * k and len(first) == len(ref) - k
    again = resident(synth, m)
    again.load_state_dict(sd)
    assert_same(head + collect(again), ref)
    # a resident checkpoint resumes the torch backend at the same sample, and back
    tl = torch_loader(synth, m)
    tl.load_state_dict(sd)
    assert_same(collect(tl), ref[k:])
    tfirst = torch_loader(synth, m)
    if k:
        collect(tfirst, limit=k)
    back = resident(synth, m)
    back.load_state_dict(tfirst.state_dict())
    assert_same(collect(back), ref[k:])


def test_proportions_over_many_draws(synth):
    m = Mixture([96, 64, 40], weights=[5, 3, 2], seed=4)  # no budget: an endless stream
    loader = resident(synth + [SyntheticSource(n=40, size=16, seed=2, name="third")], m, batch_size=500)
    src = torch.cat([b.source for b in collect(loader, limit=200)]).numpy()  # 100k draws
    np.testing.assert_allclose(np.bincount(src, minlength=3) / len(src), [0.5, 0.3, 0.2], atol=0.01)
    # dup mode: every epoch holds each unique sample exactly dup times
    m = Mixture([96, 64], dups=[2, 1], seed=3)
    ids = torch.cat([b.index for b in collect(resident(synth, m, batch_size=256), limit=4)])[:256]
    assert np.array_equal(np.bincount(ids.numpy(), minlength=160), [2] * 96 + [1] * 64)


def _pixels_match(batches, sources, mix):
    for b in batches:
        for v, s, i in zip(b.views[0], b.source.tolist(), b.index.tolist()):
            img, lab = sources[s].decode(i - int(mix.offsets[s]))
            assert torch.equal(v, torch.from_numpy(np.array(img)).permute(2, 0, 1))
        assert b.label.tolist() == [int(sources[s].labels()[i - int(mix.offsets[s])])
                                    for s, i in zip(b.source.tolist(), b.index.tolist())]


def _write_pngs(root, arrays, classes=2):
    for i, a in enumerate(arrays):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{i:03d}.png")
    return ImageFolderSource(root=root, name="pngs")


class CountingDecode:
    """Wraps a source's decode/read and counts the calls."""

    def __init__(self, src):
        self.calls = 0
        dec, read = src.decode, src.read

        def decode(i):
            self.calls += 1
            return dec(i)

        def no_read(i):
            raise AssertionError(f"read({i}) after loading")
        src.decode, self.read, self.no_read = decode, read, no_read


def test_pixels_equal_decoded_images_synthetic_npz_and_png_folder(tmp_path, synth):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "stored.npz", image=rng.integers(0, 256, (30, 16, 16, 3), np.uint8),
             label=np.arange(30) % 7)
    np.savez_compressed(tmp_path / "packed.npz", image=rng.integers(0, 256, (20, 16, 16, 3), np.uint8))
    stored, packed = NPZSource(path=tmp_path / "stored.npz"), NPZSource(path=tmp_path / "packed.npz")
    assert stored.memmapped and not packed.memmapped
    folder = _write_pngs(tmp_path / "pngs", list(rng.integers(0, 256, (25, 16, 16, 3), np.uint8)))
    count = CountingDecode(folder)
    sources = [synth[0], stored, packed, folder]
    mix = Mixture([len(s) for s in sources], dups=[1, 1, 2, 1], budget=480, seed=1)
    loader = resident(sources, mix)
    assert count.calls == 25 and loader.images.shape == (96 + 30 + 20 + 25, 3, 16, 16)
    folder.read = count.no_read  # iterating reads nothing from the sources
    batches = collect(loader)
    folder.read = count.read
    _pixels_match(batches, sources, mix)
    assert_same(collect(resident(sources, mix)), collect(torch_loader(sources, mix)))


def test_fraction_decodes_only_the_subset(tmp_path):
    rng = np.random.default_rng(1)
    folder = _write_pngs(tmp_path / "pngs", list(rng.integers(0, 256, (40, 8, 8, 3), np.uint8)))
    count = CountingDecode(folder)
    mix = Mixture([40], fractions=[0.25], budget=100, seed=3)
    loader = resident([folder], mix, batch_size=10)
    assert count.calls == 10
    _pixels_match(collect(loader), [folder], mix)


def test_crops_and_mixed_sizes_are_config_errors_and_resize_resizes(tmp_path, synth):
    mix = Mixture([96, 64], budget=64)
    with pytest.raises(ConfigError, match="crop_in_decode must be false"):
        ResidentLoader(synth, mix, batch_size=8, crops=[CropSpec(16)])
    big = SyntheticSource(n=64, size=24, seed=1, name="big")
    with pytest.raises(ConfigError, match=r"source 'big' holds 24x24 images but 'real' holds 16x16.*image_size"):
        resident([synth[0], big], Mixture([96, 64], names=["real", "big"], budget=64))
    loader = resident([synth[0], big], Mixture([96, 64], names=["real", "big"], budget=64), resize=16)
    assert loader.images.shape == (160, 3, 16, 16)
    ref = resize_images(torch.from_numpy(big.images).permute(0, 3, 1, 2), 16)
    assert torch.equal(loader.images[96:], ref)
    assert torch.equal(loader.images[:96], torch.from_numpy(synth[0].images).permute(0, 3, 1, 2))
    # close to PIL's antialiased bilinear (what the torch backend uses to resize)
    pil = np.stack([np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.BILINEAR)) for a in big.images])
    assert (ref.permute(0, 2, 3, 1).float() - torch.from_numpy(pil).float()).abs().mean() < 1.5
    # within one per-sample source: the file is named; with resize every image ends up resize x resize
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (12 if i == 3 else 8, 8, 3), np.uint8) for i in range(6)]
    folder = _write_pngs(tmp_path / "mixed", arrays, classes=1)
    with pytest.raises(ConfigError, match=r"mixed/c0/003\.png is 12x8 but source 'pngs' started with 8x8"):
        resident([folder], Mixture([6]))
    loader = resident([folder], Mixture([6]), resize=10)
    ref = torch.cat([resize_images(torch.from_numpy(a)[None].permute(0, 3, 1, 2), 10) for a in arrays])
    assert torch.equal(loader.images, ref)


def test_corrupt_samples_raise_naming_the_file_or_are_skipped_like_torch(tmp_path):
    rng = np.random.default_rng(3)
    folder = _write_pngs(tmp_path / "pngs", list(rng.integers(0, 256, (20, 8, 8, 3), np.uint8)))
    (tmp_path / "pngs" / "c1" / "005.png").write_bytes(b"\x89PNG not really")
    mix = Mixture([20], budget=60, seed=2)
    with pytest.raises(SampleError, match=r"c1/005\.png"):
        resident([folder], mix)
    loader = resident([folder], mix, batch_size=9, on_error="skip")
    got = collect(loader)
    ref_loader = torch_loader([folder], mix, batch_size=9, on_error="skip")
    assert_same(got, collect(ref_loader))
    # drawn 3 times in the 60 samples read (each replaced: 6 whole batches, the 3 left over dropped)
    assert loader.corrupt == 1 and loader.skipped == ref_loader.skipped == 3
    assert [len(b) for b in got] == [9] * 6
    assert loader.state_dict() == ref_loader.state_dict()


def test_build_loader_and_engine_make_two_16px_views(synth):
    cfg = {"sources": [{"name": "real", "type": "synthetic", "n": 96, "size": 32, "dup": 2},
                       {"name": "gen", "type": "synthetic", "n": 64, "size": 32, "variant": "generated"}],
           "backend": "resident", "crop_in_decode": False, "batch_size": 32, "budget": 256, "seed": 3,
           "backend_options": {"progress": False}}
    aug = Augment.from_preset("symmetric", size=16)
    loader = build_loader(cfg, crops=aug.crop_specs, device="cpu")
    assert isinstance(loader, ResidentLoader) and loader.crops is None and len(loader) == 8
    for s, batch in enumerate(loader):
        out = aug(batch, step=s, crop=True)
        assert len(out.views) == 2 and all(v.shape == (32, 3, 16, 16) and v.dtype == torch.float32
                                           for v in out.views)
        assert not torch.equal(out.views[0], out.views[1])
    # crop_in_decode true is ignored (no crops reach the backend); other backends ignore `device`
    assert build_loader({**cfg, "crop_in_decode": True}, crops=aug.crop_specs).crops is None
    assert isinstance(build_loader({**cfg, "backend": "torch", "backend_options": None}, device="cpu"), TorchLoader)
    with pytest.raises(ConfigError, match="backend_options.device is 'meta'"):
        build_loader({**cfg, "backend_options": {"device": "meta", "progress": False}}, device="cpu")


def test_prefetcher_passes_resident_batches_through_uncopied(synth):
    loader = resident(synth, MIXES["dup+budget"]())
    seen = []

    class Recording:
        def __iter__(self):
            for b in loader:
                seen.append(b)
                yield b

        def state_dict(self):
            return loader.state_dict()

    out = list(DevicePrefetcher(Recording(), "cpu"))
    assert len(out) == len(seen) == 21
    for a, b in zip(out, seen):
        assert a.views[0].data_ptr() == b.views[0].data_ptr() and a.index.data_ptr() == b.index.data_ptr()


def test_cuda_memory_check_is_one_line(monkeypatch):
    fake = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device cuda:0 but CUDA is not available"):
        ResidentLoader._check_memory(fake, 10, 32, 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 << 30, 80 << 30))
    with pytest.raises(ConfigError) as e:
        ResidentLoader._check_memory(fake, 1_050_000, 32, 32)
    msg = str(e.value)
    assert "\n" not in msg and "3.02 GiB on cuda:0" in msg and "2.00 GiB is free" in msg
    ResidentLoader._check_memory(fake, 50_000, 32, 32)  # 0.15 GiB fits


def test_labels_and_array_sources(synth):
    arr = ArraySource(np.zeros((10, 16, 16, 3), np.uint8), labels=np.arange(10) + 100, name="arr")
    mix = Mixture([96, 10], budget=128, seed=0)
    loader = resident([synth[0], arr], mix)
    assert loader.labels[96:].tolist() == list(range(100, 110)) and loader.row_source.tolist() == [0] * 96 + [1] * 10
    # num_workers and pin_memory are accepted and ignored
    other = resident(synth, MIXES["dup+budget"](), num_workers=3, pin_memory=True)
    assert not other.images.is_pinned() and len(collect(other)) == 21


@pytest.mark.timeout(120)
def test_loader_bench_measures_resident_and_its_target(tmp_path):
    import json

    from benchmarks.bench_loader import resident_targets, run
    from benchmarks.data import make_bench_data
    data = make_bench_data("cifar", n=32, root=tmp_path / "bench", samples_per_shard=16, progress=False)
    path = run(sets=["cifar"], n={"cifar": 32}, modes=("full", "feed"), backends=("torch", "resident"),
               formats=("npz", "shards"), baselines=(), batch_size={"cifar": 8}, num_workers=1, repeats=1,
               window_s=0.05, warmup=1, stages=False, cache=data.root.parent, out_dir=tmp_path,
               command="fastssl bench loader --test", progress=False)
    rec = json.loads(path.read_text())
    r = rec["results"]
    for mode in ("full", "feed"):
        for f in ("npz", "shards"):
            assert r[f"32px/{mode}/resident/{f}"]["kind"] == "resident" and r[f"32px/{mode}/resident/{f}"]["median"] > 0
        t = r[f"32px/target/resident {mode} >= 2x best other fastssl backend"]
        others = [v["median"] for k, v in r.items() if k.startswith(f"32px/{mode}/") and v.get("kind") == "ours"]
        mine = [v["median"] for k, v in r.items() if k.startswith(f"32px/{mode}/resident/")]
        assert t["ratio"] == pytest.approx(max(mine) / max(others)) and t["target"] == 2.0
    assert rec["config"]["resident_torch_threads"] >= 1
    # resident variants never count as the numerator of the loader targets
    assert not resident_targets({"32px/full/resident/npz": {"kind": "resident", "median": 5.0}}, size_tag="32px")
