"""Reused batch memory (loaders/shm.py): the slab ring between workers and the main process and
the main-process buffer pool never hand out memory something still references, and a loader with
the ring yields exactly the batches it yields without it."""
import gc

import numpy as np
import pytest
import torch

from loaders.base import ArraySource
from loaders.crop import CropSpec
from loaders.mixture import Mixture
from loaders.shm import BufferPool, SlabRing, ring_supported
from loaders.torch_backend import TorchLoader

needs_fork = pytest.mark.skipif(not ring_supported(), reason="the slab ring needs the fork start method")


def test_pool_reuses_only_unreferenced_buffers():
    pool = BufferPool()
    t = pool.empty((4, 5))
    p = t.data_ptr()
    del t
    gc.collect()
    t2 = pool.empty((4, 5))
    assert t2.data_ptr() == p and pool.reused == 1          # released buffer comes back
    view = t2[1:]                                            # a view keeps the buffer held
    del t2
    gc.collect()
    t3 = pool.empty((4, 5))
    assert t3.data_ptr() != p and pool.allocated == 2
    view.fill_(7.0)
    assert float(t3.sum()) != 7.0 * 15 or t3.data_ptr() != p
    del view
    gc.collect()
    assert pool.empty((4, 5)).data_ptr() == p                # free again once the view is gone
    # other shapes with the same byte size share buffers; dtype is honoured
    assert pool.empty((20,), torch.uint8).dtype == torch.uint8


def test_pool_buffer_saved_by_autograd_is_not_reused():
    pool = BufferPool()
    x = pool.empty((3,)).fill_(2.0)
    p = x.data_ptr()
    w = torch.nn.Parameter(torch.ones(3))
    y = (x * w).sum()          # autograd saves x for w's gradient
    del x
    gc.collect()
    z = pool.empty((3,)).fill_(-5.0)
    assert z.data_ptr() != p   # still referenced by the graph
    y.backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))


def test_ring_flags_and_writer():
    ring = SlabRing(num_workers=2, slots_per_worker=2, slot_bytes=1000)
    a, b = ring.writer(1), ring.writer(1)
    assert {a.slot, b.slot} == {2, 3} and ring.writer(1) is None     # worker 1 owns slots 2, 3
    t = a((2, 3, 4, 4), torch.uint8)
    f = a((1, 3, 2, 2), torch.float32)
    assert a.offset(f) % 64 == 0 and a.offset(torch.zeros(1)) is None
    t.copy_(torch.arange(96, dtype=torch.uint8).reshape(2, 3, 4, 4))
    f.fill_(1.5)
    big = a((100, 100), torch.uint8)                        # does not fit: a fresh tensor
    assert a.offset(big) is None and a.ref([t, big]) is None
    ref = a.ref([t.permute(0, 2, 3, 1), f])
    views = ring.open(ref)
    assert torch.equal(views[0], t.permute(0, 2, 3, 1)) and torch.equal(views[1], f)
    assert ring._flags[a.slot] == 1
    del views
    gc.collect()
    assert ring._flags[a.slot] == 0                         # released with the last view
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(ring)


def _source(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, 40, 36, 3), dtype=np.uint8), np.arange(n), name="arr")


def _loader(src, **kw):
    kw.setdefault("crops", [CropSpec(24), CropSpec(16, interpolation="bicubic")])
    return TorchLoader([src], Mixture([len(src)], budget=len(src), seed=0), batch_size=8, seed=5, **kw)


@needs_fork
@pytest.mark.parametrize("decoder", ["pil", "cv2"])
def test_ring_batches_equal_plain_batches(decoder):
    src = _source()
    ref = [b.views for b in _loader(src, num_workers=0, decoder=decoder)]
    loader = _loader(src, num_workers=2, decoder=decoder, flip=True)   # default: prefetch_factor + 2 slots
    plain = _loader(src, num_workers=2, decoder=decoder, shared_slots=0, flip=True)
    got = [[v.clone() for v in b.views] for b in loader]     # copies: each batch is dropped at once
    assert loader.ring is not None and loader.ring.served == len(got) == 6
    want = [b.views for b in plain]
    assert plain.ring is None
    for g, w in zip(got, want):
        assert all(torch.equal(x, y) for x, y in zip(g, w))
    assert not all(torch.equal(x, y) for x, y in zip(got[0], ref[0]))  # flip=True really changed them


@needs_fork
def test_kept_batches_stay_valid_when_slots_run_out():
    """The user keeps every batch: a worker never overwrites a held slot; it falls back to fresh
    tensors, and every kept batch still holds its own pixels at the end."""
    src = _source(n=96)
    want = [[v.clone() for v in b.views] for b in _loader(src, num_workers=0)]
    loader = _loader(src, num_workers=2, shared_slots=1)
    kept = [b for b in loader]
    assert 0 < loader.ring.served < len(kept)              # some from slots, the rest fresh
    for b, w in zip(kept, want):
        assert all(torch.equal(x, y) for x, y in zip(b.views, w))
    ring = loader.ring
    del kept, b
    gc.collect()
    assert int(ring._flags.sum()) == 0                     # every slot released


@needs_fork
def test_ring_with_the_worker_hook_uint8_and_float():
    pytest.importorskip("cv2")
    from loaders.cpu_augment import WorkerAugment
    src = _source()
    for output in ("uint8", "float"):
        hook = WorkerAugment.from_preset("imagenet_simclr", size=24, output=output, precision="uint8")
        runs = []
        for slots, workers in ((0, 0), (3, 2)):
            loader = _loader(src, num_workers=workers, crops=hook.crop_specs, worker_augment=hook,
                             decoder="cv2", shared_slots=slots)
            runs.append([hook.finish(b).views for b in loader])
            if slots:
                assert loader.ring.served == 6
        for a, b in zip(*runs):
            assert all(x.dtype == torch.float32 and torch.equal(x, y) for x, y in zip(a, b))


def test_ring_off_where_it_cannot_work():
    src = _source()
    assert _loader(src, num_workers=0)._make_ring() is None
    assert _loader(src, num_workers=2, pin_memory=True)._make_ring() is None
    assert _loader(src, num_workers=2, shared_slots=0)._make_ring() is None
    assert _loader(src, num_workers=2, crops=None, resize=24)._make_ring() is None
    with pytest.raises(ValueError, match="shared_slots"):
        _loader(src, shared_slots=-1)
