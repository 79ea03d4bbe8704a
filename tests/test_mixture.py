"""The mixture's order: exact counts, proportions, determinism, scale, plans and bad inputs."""
import time
import tracemalloc

import numpy as np
import pytest

from loaders.mixture import Mixture, Plan, keyed_permutation, largest_remainder


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_keyed_permutation_is_a_bijection(n):
    x = np.arange(n)
    a = keyed_permutation(x, n, np.array([11], np.uint64))
    assert np.array_equal(np.sort(a), x)
    if n >= 64:
        b = keyed_permutation(x, n, np.array([12], np.uint64))
        assert not np.array_equal(a, b)
        assert abs(np.corrcoef(a, x)[0, 1]) < 0.2  # actually shuffled


def test_keyed_permutation_per_element_keys_match_single_key():
    n = 300
    keys = np.array([5, 9], np.uint64)
    x = np.arange(n)
    per = keyed_permutation(np.concatenate([x, x]), n, np.repeat(keys, n))
    assert np.array_equal(per[:n], keyed_permutation(x, n, keys[:1]))
    assert np.array_equal(per[n:], keyed_permutation(x, n, keys[1:]))


def test_largest_remainder():
    c = largest_remainder(10, np.array([1 / 3, 1 / 3, 1 / 3]))
    assert c.tolist() == [4, 3, 3]
    assert largest_remainder(7, np.array([0.5, 0.25, 0.25])).sum() == 7


def test_weight_proportions_within_one_percent():
    w = [0.5, 0.3, 0.2]
    m = Mixture([1000, 3000, 500], weights=[5, 3, 2], seed=4)
    src, smp = m.positions(0, 120_000)
    frac = np.bincount(src, minlength=3) / len(src)
    np.testing.assert_allclose(frac, w, atol=0.01)
    # every epoch holds exactly the largest-remainder counts
    L = m.epoch_length
    assert L == 4500
    for e in range(3):
        assert np.bincount(src[e * L:(e + 1) * L], minlength=3).tolist() == [2250, 1350, 900]
    assert ((smp >= 0) & (smp < m.sizes[src])).all()


def test_weight_mode_cycles_a_fresh_permutation_per_pass():
    m = Mixture([100, 100], weights=[0.75, 0.25], epoch_length=400, seed=2)
    src, smp = m.positions(0, 400)
    assert np.array_equal(np.bincount(smp[src == 0], minlength=100), np.full(100, 3))
    assert np.array_equal(np.bincount(smp[src == 1], minlength=100), np.full(100, 1))
    # uneven counts: over many epochs every unique sample is drawn about equally often
    m = Mixture([7, 50], weights=[1, 1], epoch_length=20, seed=0)
    src, smp = m.positions(0, 20 * 70)  # source 0: 700 draws = exactly 100 passes of 7
    assert np.array_equal(np.bincount(smp[src == 0], minlength=7), np.full(7, 100))


def test_dup_epoch_is_a_permutation_of_the_multiset():
    m = Mixture([50, 200], dups=[10, 1], seed=1)
    L = m.epoch_length
    assert L == 700 and m.counts_per_epoch.tolist() == [500, 200]
    src, smp = m.positions(0, 3 * L)
    ids = m.global_ids(src, smp)
    expected = np.concatenate([np.repeat(np.arange(50), 10), 50 + np.arange(200)])
    for e in range(3):
        assert np.array_equal(np.sort(ids[e * L:(e + 1) * L]), np.sort(expected))
    assert not np.array_equal(ids[:L], ids[L:2 * L])  # each epoch is shuffled afresh
    # AdaInf example: 50k real x10 + 1M generated -> 1/3 real
    big = Mixture([50_000, 1_000_000], dups=[10, 1])
    assert big.counts_per_epoch[0] / big.epoch_length == pytest.approx(1 / 3)


def test_fraction_subset_exact_and_fixed_across_epochs():
    m = Mixture([1000, 40], fractions=[0.25, None], dups=[2, 1], seed=3)
    assert m.unique.tolist() == [250, 40]
    L = m.epoch_length
    src, smp = m.positions(0, 3 * L)
    subset = set(m.subset(0).tolist())
    assert len(subset) == 250
    for e in range(3):
        sl = slice(e * L, (e + 1) * L)
        s0 = smp[sl][src[sl] == 0]
        assert set(s0.tolist()) == subset
        assert np.array_equal(np.bincount(s0, minlength=1000)[sorted(subset)], np.full(250, 2))
    # weight mode uses the same subset; another seed another subset; smaller fraction nests
    w = Mixture([1000, 40], fractions=[0.25, 0], weights=[1, 1], seed=3)
    s, x = w.positions(0, 5000)
    assert set(x[s == 0].tolist()) == subset
    assert set(Mixture([1000], fractions=[0.25], seed=4).subset(0).tolist()) != subset
    assert set(Mixture([1000], fractions=[0.1], seed=3).subset(0).tolist()) <= subset
    assert Mixture([10], fractions=[0.25]).unique.tolist() == [3]  # round(2.5) half up


def test_same_seed_same_order_other_seed_differs():
    a = Mixture([300, 200], weights=[1, 2], seed=7).positions(0, 2000)
    b = Mixture([300, 200], weights=[1, 2], seed=7).positions(0, 2000)
    c = Mixture([300, 200], weights=[1, 2], seed=8).positions(0, 2000)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_ranges_are_consistent_across_queries_and_epochs():
    m = Mixture([30, 20], dups=[2, 3], seed=5)
    whole = m.positions(0, 1000)
    part = m.positions(333, 777)
    assert np.array_equal(part[1], whole[1][333:777])
    pos = np.array([999, 0, 500])
    assert np.array_equal(m.lookup(pos)[1], whole[1][pos])


def test_hundred_million_sample_plan_query_is_fast_and_small():
    m = Mixture([60_000_000, 40_000_000], weights=[0.4, 0.6], fractions=[0.5, None], seed=0,
                budget=1_000_000_000)
    assert m.epoch_length == 70_000_000
    start = 345_678_901  # epoch 4, middle
    tracemalloc.start()
    t = time.perf_counter()
    src, smp = m.positions(start, start + 100_000)
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dt < 1.0, dt
    assert peak < 64 * 2**20, peak
    frac = np.bincount(src, minlength=2) / len(src)
    np.testing.assert_allclose(frac, [0.4, 0.6], atol=0.01)
    assert ((smp >= 0) & (smp < m.sizes[src])).all()
    assert len(np.unique(m.global_ids(src, smp))) > 99_000  # a 100k window of a 70M epoch: ~no repeats
    assert np.array_equal(m.lookup(np.array([start + 5]))[1], smp[5:6])


def test_budget_is_the_stream_length():
    m = Mixture([10, 10], budget=55)
    assert m.total == 55
    assert len(m.positions(0, 55)[0]) == 55
    with pytest.raises(IndexError, match="budget"):
        m.positions(50, 56)
    assert Mixture([10]).total is None


def test_plan_ranks_are_disjoint_and_cover_the_budget():
    m = Mixture([40, 60], dups=[1, 1], budget=100, seed=1)
    B, W = 4, 3
    seen = []
    for r in range(W):
        p = Plan(m, batch_size=B, rank=r, world_size=W)
        assert len(p) == 33 // B  # floor(100 / 3) = 33 samples, drop_last
        for b in range(len(p)):
            src, smp, gid = p.batch(b)
            items = p.batch_items(b)
            assert np.array_equal(gid, m.global_ids(*m.lookup(r + items * W)))
            seen.append(r + items * W)
        q = Plan(m, batch_size=B, rank=r, world_size=W, drop_last=False)
        assert len(q) == 9 and len(q.batch(8)[0]) == 1
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen) == 3 * 8 * 4
    with pytest.raises(TypeError, match="infinite"):
        len(Plan(Mixture([10]), batch_size=2))


def test_plan_state_dict_resume_and_world_size_change():
    m = Mixture([100, 100], weights=[1, 1], seed=9)
    p = Plan(m, batch_size=8, rank=0, world_size=2)
    p.advance(3)
    sd = p.state_dict()
    assert sd["samples"] == 24 and sd["world_size"] == 2 and sd["seed"] == 9
    q = Plan(m, batch_size=8, rank=0, world_size=2)
    q.load_state_dict(sd)
    assert np.array_equal(q.batch(0)[2], Plan(m, batch_size=8, rank=0, world_size=2).batch(3)[2])
    # world size 2 -> 4: 48 global positions consumed -> 12 per rank; rank 1 of 4 reads 1 + 4*12 next
    r = Plan(m, batch_size=8, rank=1, world_size=4)
    r.load_state_dict(sd)
    assert r.samples == 12
    assert np.array_equal(r.batch(0)[2], m.global_ids(*m.lookup(1 + 4 * np.arange(12, 20))))
    other = Plan(Mixture([100, 100], weights=[1, 2], seed=9), batch_size=8)
    with pytest.raises(ValueError, match="another mixture"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=[10, 10], weights=[1, -1]), "source1.*weight"),
    (dict(sizes=[10, 10], weights=[0, 0]), "all mixture weights are zero"),
    (dict(sizes=[10, 0], names=["real", "gen"]), "'gen' is empty"),
    (dict(sizes=[10, 10], fractions=[1.5, None]), "source0.*fraction 1.5 > 1"),
    (dict(sizes=[10, 10], weights=[1, 1], dups=[1, 1]), "either weights"),
    (dict(sizes=[10, 10], dups=[1.5, 1]), "source0.*dup"),
    (dict(sizes=[10, 10], dups=[1, -2]), "source1.*dup"),
    (dict(sizes=[10, 10], dups=[0, 0]), "all dups are zero"),
    (dict(sizes=[10, 10], epoch_length=5), "weight mode only"),
    (dict(sizes=[10], budget=0), "budget"),
    (dict(sizes=[10], fractions=[0.01]), "selects no sample"),
])
def test_bad_inputs(kwargs, match):
    sizes = kwargs.pop("sizes")
    with pytest.raises(ValueError, match=match):
        Mixture(sizes, **kwargs)


def test_scalar_key_fast_path_matches_the_array_path():
    """Scalar keys are hashed with Python ints (speed): bit-identical to the uint64-array hashing,
    also for negative parts; lookups across an epoch boundary (per-element keys) agree with
    lookups of each side alone (one scalar key)."""
    from loaders import mixture as M
    rng = np.random.default_rng(0)
    for _ in range(300):
        parts = [int(x) for x in rng.integers(-2**63, 2**63 - 1, size=int(rng.integers(1, 5)))]
        h = np.zeros(1, dtype=np.uint64)
        for p in parts:
            a = np.atleast_1d((np.asarray(p).astype(np.int64) & 0x7FFFFFFFFFFFFFFF).astype(np.uint64))
            h = M._splitmix(h ^ M._splitmix(a))
        k = M._key(*parts)
        assert k.dtype == np.uint64 and k.shape == (1,) and k[0] == h[0]
        x = rng.integers(0, 1000, 64)
        np.testing.assert_array_equal(keyed_permutation(x, 1000, k), keyed_permutation(x, 1000, np.repeat(k, 64)))
    mix = Mixture([30, 50], weights=[0.5, 0.5], epoch_length=40, seed=5)
    both = mix.lookup(np.arange(25, 55))  # epochs 0 and 1 in one query
    parts = [mix.lookup(np.arange(25, 40)), mix.lookup(np.arange(40, 55))]
    for a, b in zip(both, zip(*parts)):
        np.testing.assert_array_equal(a, np.concatenate(b))
