"""DevicePrefetcher on CPU: augments with consecutive steps, passes strengths, and its
state_dict resumes the real torch backend at exactly the next unseen batch."""
import numpy as np
import pytest
import torch

from loaders import ArraySource, Batch
from loaders.augment import Augment
from loaders.mixture import Mixture
from loaders.prefetch import DevicePrefetcher
from loaders.torch_backend import TorchLoader


class ListLoader:
    """A minimal loader: fixed batches, a counter as its state."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __len__(self):
        return len(self.batches) - self.pos

    def __iter__(self):
        while self.pos < len(self.batches):
            b = self.batches[self.pos]
            self.pos += 1
            yield b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]


def batches(k=3, n=8, size=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(k):
        v = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        idx = torch.arange(i * n, (i + 1) * n)
        out.append(Batch(views=[v], index=idx, source=torch.zeros(n, dtype=torch.long), label=idx % 3))
    return out


def test_cpu_prefetcher_augments_with_consecutive_steps():
    bs = batches()
    aug = Augment.from_preset("symmetric", size=16)
    pf = DevicePrefetcher(ListLoader(bs), "cpu", augment=aug, start_step=10)
    got = list(pf)
    assert len(got) == 3 and pf.step == 13
    for i, (b, out) in enumerate(zip(bs, got)):
        ref = aug(b, step=10 + i)
        assert all(torch.equal(x, y) for x, y in zip(out.views, ref.views))
        assert torch.equal(out.index, b.index)


def test_strength_fn_and_no_augment():
    bs = batches(k=2)
    aug = Augment.from_preset("bcl", size=16)
    seen = []

    def strength(b):
        seen.append(b.index.clone())
        return (b.index % 2).float()
    got = list(DevicePrefetcher(ListLoader(bs), "cpu", augment=aug, strength_fn=strength))
    assert [s.tolist() for s in seen] == [b.index.tolist() for b in bs]
    for i, b in enumerate(bs):
        ref = aug(b, step=i, strength=(b.index % 2).float())
        assert torch.equal(got[i].views[1], ref.views[1])
    raw = list(DevicePrefetcher(ListLoader(bs), "cpu"))
    assert torch.equal(raw[1].views[0], bs[1].views[0])


def test_state_dict_counts_handed_out_batches():
    pf = DevicePrefetcher(ListLoader(batches(k=4)), "cpu")
    it = iter(pf)
    next(it)
    next(it)
    assert pf.state_dict() == {"pos": 2}
    with pytest.raises(TypeError, match="state_dict"):
        DevicePrefetcher([1, 2], "cpu").state_dict()


def test_resume_torch_backend_at_next_batch():
    imgs = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)

    def loader():
        return TorchLoader([ArraySource(imgs, name="a")], Mixture([40], seed=1, budget=40), batch_size=8,
                           num_workers=0, resize=16)
    full = [b.index.tolist() for b in DevicePrefetcher(loader(), "cpu")]
    pf = DevicePrefetcher(loader(), "cpu")
    it = iter(pf)
    first = [next(it).index.tolist() for _ in range(2)]
    sd = pf.state_dict()
    resumed = loader()
    resumed.load_state_dict(sd)
    rest = [b.index.tolist() for b in DevicePrefetcher(resumed, "cpu", start_step=2)]
    assert first + rest == full and len(full) == 5
