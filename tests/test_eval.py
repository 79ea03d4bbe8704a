"""Evaluation: kNN vs a straightforward implementation, linear probe, few-shot, long-tail groups,
and the online probe's handling of label -1."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastssl.eval import class_groups, few_shot_indices, group_accuracy, knn_accuracy, knn_predict, linear_probe
from fastssl.probe import OnlineProbe


def _knn_reference(train, labels, test, *, num_classes, k, t):
    """Loop-per-query weighted kNN: cosine similarity, top-k, votes exp(sim / t)."""
    out = []
    for q in test:
        sims = [float(F.cosine_similarity(q, x, dim=0)) for x in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(labels[i])] += float(np.exp(sims[i] / t))
        out.append(votes)
    return torch.tensor(out)


def test_knn_matches_reference():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    test = torch.randn(25, 8, generator=g)
    for k in (1, 7, 200):  # 200 > N: uses all samples
        got = knn_predict(train, labels, test, num_classes=4, k=k, temperature=0.1, chunk=7)
        ref = _knn_reference(train, labels, test, num_classes=4, k=min(k, 60), t=0.1)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(1), ref.argmax(1))


def test_knn_accuracy_on_clusters_and_scale_invariance():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 16, generator=g) * 4
    y_tr = torch.arange(200) % 5
    y_te = torch.arange(50) % 5
    x_tr = centers[y_tr] + torch.randn(200, 16, generator=g)
    x_te = centers[y_te] + torch.randn(50, 16, generator=g)
    acc = knn_accuracy(x_tr, y_tr, x_te, y_te, num_classes=5, k=20)
    assert acc > 0.9
    # cosine similarity: rescaling features per row changes nothing
    assert knn_accuracy(x_tr * 7.0, y_tr, x_te * 0.01, y_te, num_classes=5, k=20) == acc
    with pytest.raises(ValueError, match="train labels must be >= 0"):
        knn_predict(x_tr, torch.full((200,), -1), x_te, num_classes=5)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_linear_probe_learns_separable_data(opt):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(10, 3, generator=g)
    x = torch.randn(600, 10, generator=g)
    y = (x @ w).argmax(1)                      # linearly separable by construction
    res = linear_probe(x[:500], y[:500], x[500:], y[500:], num_classes=3, epochs=60,
                       optimizer=opt, lr=0.05 if opt == "adam" else 0.5, batch_size=100)
    assert res["accuracy"] > 0.93
    assert res["pred"].shape == (100,)
    with pytest.raises(ValueError, match="adam' or 'sgd"):
        linear_probe(x, y, x, y, num_classes=3, optimizer="lbfgs")


def test_few_shot_indices_balanced_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=500)
    labels[:20] = -1                               # unlabelled samples are never picked
    idx = few_shot_indices(labels, 10, seed=3)
    assert len(idx) == 60 and len(np.unique(idx)) == 60
    assert np.all(np.bincount(labels[idx], minlength=6) == 10)
    assert (labels[idx] >= 0).all()
    assert np.array_equal(idx, few_shot_indices(labels, 10, seed=3))
    assert not np.array_equal(idx, few_shot_indices(labels, 10, seed=4))
    # every sample of a class is equally likely: over seeds, picks spread over the class
    picks = np.concatenate([few_shot_indices(labels, 10, seed=s) for s in range(40)])
    c0 = np.flatnonzero(labels == 0)
    assert len(np.intersect1d(picks, c0)) > 0.9 * len(c0)
    with pytest.raises(ValueError, match="class 2 has 3 samples"):
        few_shot_indices(np.array([0] * 5 + [1] * 5 + [2] * 3), 4)


def test_long_tail_groups():
    # the BCL long-tailed CIFAR-100 split: class c keeps int(450 * 0.01 ** (c / 99)) images
    counts = np.array([int(450 * 0.01 ** (c / 99)) for c in range(100)])
    groups = class_groups(counts)
    assert set(np.concatenate(list(groups.values()))) == set(range(100))
    assert all(counts[groups["many"]] > 100)
    assert all((counts[groups["medium"]] >= 20) & (counts[groups["medium"]] <= 100))
    assert all(counts[groups["few"]] < 20)
    # by hand: > 100 for c <= 32 (c = 32 keeps 101), < 20 for c >= 67 (c = 66 keeps 20)
    assert len(groups["many"]) == 33 and len(groups["medium"]) == 34 and len(groups["few"]) == 33
    target = np.repeat(np.arange(100), 2)
    pred = target.copy()
    pred[np.isin(target, groups["few"])] = -5       # all few-shot classes wrong
    acc = group_accuracy(pred, target, counts)
    assert acc["many"] == 1.0 and acc["medium"] == 1.0 and acc["few"] == 0.0
    assert acc["all"] == pytest.approx(1 - len(groups["few"]) / 100)


def test_online_probe_ignores_unlabelled():
    torch.manual_seed(0)
    probe = OnlineProbe(8, 4)
    feats = torch.randn(12, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, -1, -1, 1, -1, 2, -1, 0, 3])
    out = probe(feats, labels)
    known = labels >= 0
    ref = F.cross_entropy(probe.linear(feats[known].detach()), labels[known])
    torch.testing.assert_close(out.loss, ref)
    assert out.count == 8
    # features of unlabelled samples do not change the loss or the accuracy
    feats2 = feats.detach().clone()
    feats2[~known] = torch.randn(4, 8) * 100
    out2 = probe(feats2, labels)
    torch.testing.assert_close(out2.loss, out.loss)
    assert out2.correct == out.correct
    # the loss does not reach the features (detached) but trains the probe
    out.loss.backward()
    assert feats.grad is None and probe.linear.weight.grad is not None
    # a batch without labels: loss 0 with a graph, no NaN
    empty = probe(torch.randn(3, 8), torch.full((3,), -1))
    assert empty.loss.item() == 0.0 and empty.count == 0 and empty.loss.requires_grad
    # out-of-range labels are refused once at set-up (fastssl.build.check_labels, tested in
    # test_trainer.py); inside the step cross_entropy still refuses them
    with pytest.raises((IndexError, RuntimeError)):
        probe(torch.randn(2, 8), torch.tensor([0, 4]))
