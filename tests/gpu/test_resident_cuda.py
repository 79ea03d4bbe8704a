"""The resident backend on CUDA: the images live on the device, batches come out there with the
same indices and pixels as on the CPU, and the prefetcher passes them through uncopied."""
import pytest
import torch

from loaders.augment import Augment
from loaders.mixture import Mixture
from loaders.prefetch import DevicePrefetcher
from loaders.resident_backend import ResidentLoader
from loaders.synthetic import SyntheticSource

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sources():
    return [SyntheticSource(n=96, size=32, seed=0, name="real"),
            SyntheticSource(n=64, size=32, seed=1, variant="generated", name="gen")]


@pytest.mark.parametrize("world", [1, 2])
def test_batches_on_cuda_same_as_cpu(world):
    srcs = _sources()
    for rank in range(world):
        mix = Mixture([96, 64], weights=[2, 1], fractions=[0.5, None], budget=1000, seed=7)
        kw = dict(batch_size=64, rank=rank, world_size=world, progress=False)
        gpu = ResidentLoader(srcs, mix, device="cuda", **kw)
        assert gpu.images.is_cuda and gpu.labels.is_cuda and gpu.row_source.is_cuda
        cpu = list(ResidentLoader(srcs, mix, device="cpu", **kw))
        got = list(gpu)
        assert len(got) == len(cpu) > 0
        for a, b in zip(got, cpu):
            assert all(t.is_cuda for t in (a.views[0], a.index, a.source, a.label))
            for name in ("index", "source", "label"):
                assert torch.equal(getattr(a, name).cpu(), getattr(b, name))
            assert torch.equal(a.views[0].cpu(), b.views[0])


def test_prefetcher_and_engine_on_cuda_without_copies():
    mix = Mixture([96, 64], dups=[2, 1], budget=512, seed=3)
    loader = ResidentLoader(_sources(), mix, batch_size=64, device="cuda", progress=False)
    seen = []

    class Recording:
        def __iter__(self):
            for b in loader:
                seen.append(b.views[0].data_ptr())
                yield b

        def state_dict(self):
            return loader.state_dict()

    pf = DevicePrefetcher(Recording(), "cuda")
    out = list(pf)
    assert [b.views[0].data_ptr() for b in out] == seen and len(out) == 8
    aug = Augment.from_preset("symmetric", size=32)
    views = aug(out[0], step=0, crop=True).views
    assert len(views) == 2 and all(v.is_cuda and v.shape == (64, 3, 32, 32) for v in views)
    assert pf.state_dict() == loader.state_dict()
