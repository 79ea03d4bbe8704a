"""Each loss against an independent, straightforward implementation of its formula (float64)."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastssl import losses as L


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _cos(a, b):
    a, b = _unit(a), _unit(b)
    return sum(x * y for x, y in zip(a, b))


# ---------------------------------------------------------------- NT-Xent
def _nt_xent_loops(z1, z2, t):
    """Reference: every anchor of the 2B embeddings, positive = other view, negatives = the rest."""
    zs = [list(map(float, r)) for r in torch.cat([z1, z2])]
    b = z1.shape[0]
    per_anchor = []
    for a in range(2 * b):
        p = (a + b) % (2 * b)
        denom = sum(math.exp(_cos(zs[a], zs[k]) / t) for k in range(2 * b) if k != a)
        per_anchor.append(-math.log(math.exp(_cos(zs[a], zs[p]) / t) / denom))
    per_sample = [(per_anchor[i] + per_anchor[i + b]) / 2 for i in range(b)]
    return sum(per_anchor) / (2 * b), per_sample


@pytest.mark.parametrize("t", [0.2, 0.5])
def test_nt_xent_matches_loops_and_per_sample_averages(t):
    z1, z2 = _rand(6, 5, seed=1), _rand(6, 5, seed=2) * 3
    loss, per = L.nt_xent(z1, z2, temperature=t)
    ref, ref_per = _nt_xent_loops(z1, z2, t)
    assert per.shape == (6,)
    assert loss.item() == pytest.approx(ref, abs=1e-10)
    np.testing.assert_allclose(per.numpy(), ref_per, atol=1e-10)
    assert per.mean().item() == pytest.approx(loss.item(), abs=1e-12)


def test_nt_xent_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="nt_xent"):
        L.nt_xent(_rand(4, 3), _rand(5, 3))


# ---------------------------------------------------------------- MoCo
def test_moco_infonce_matches_loops():
    q, k, t = _rand(4, 6, seed=3), _rand(4, 6, seed=4), 0.2
    queue = torch.nn.functional.normalize(_rand(7, 6, seed=5), dim=1)
    ref = 0.0
    for i in range(4):
        qi, ki = list(map(float, q[i])), list(map(float, k[i]))
        pos = math.exp(_cos(qi, ki) / t)
        neg = sum(math.exp(_cos(qi, list(map(float, queue[j]))) / t) for j in range(7))
        ref += -math.log(pos / (pos + neg)) / 4
    assert L.moco_infonce(q, k, queue, temperature=t).item() == pytest.approx(ref, abs=1e-10)


def test_key_queue_is_a_ring_buffer():
    torch.manual_seed(0)
    queue = L.KeyQueue(5, 2)
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    queue.push(keys)
    assert torch.equal(queue.queue[:3], torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert int(queue.ptr) == 3
    queue.push(-keys)  # 3 more: slots 3, 4, then wraps to 0
    assert torch.equal(queue.queue[[3, 4, 0]], -torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(queue.queue[1:3], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert int(queue.ptr) == 1


def test_mocov3_infonce_matches_loops():
    q, k, t = _rand(5, 4, seed=6), _rand(5, 4, seed=7), 0.2
    ref = 0.0
    for i in range(5):
        qi = list(map(float, q[i]))
        logits = [_cos(qi, list(map(float, k[j]))) / t for j in range(5)]
        ref += -(logits[i] - math.log(sum(math.exp(x) for x in logits))) / 5
    assert L.mocov3_infonce(q, k, temperature=t).item() == pytest.approx(2 * t * ref, abs=1e-10)


# ---------------------------------------------------------------- BYOL / SimSiam
def test_cosine_losses_and_stop_gradient():
    p, z = _rand(4, 3, seed=8).requires_grad_(), _rand(4, 3, seed=9).requires_grad_()
    cos = [_cos(list(map(float, p.detach()[i])), list(map(float, z.detach()[i]))) for i in range(4)]
    assert L.byol_loss(p, z).item() == pytest.approx(sum(2 - 2 * c for c in cos) / 4, abs=1e-12)
    loss = L.simsiam_loss(p, z)
    assert loss.item() == pytest.approx(-sum(cos) / 4, abs=1e-12)
    loss.backward()
    assert z.grad is None and p.grad is not None  # the target branch gets no gradient


# ---------------------------------------------------------------- Barlow Twins
def test_barlow_twins_matches_definition():
    z1, z2 = _rand(8, 4, seed=10), _rand(8, 4, seed=11) + 1
    n, d, lambd, scale = 8, 4, 0.0051, 0.1

    def standardise(z):
        cols = []
        for j in range(d):
            x = [float(z[i, j]) for i in range(n)]
            m = sum(x) / n
            v = sum((xi - m) ** 2 for xi in x) / n
            cols.append([(xi - m) / math.sqrt(v + 1e-5) for xi in x])
        return cols  # [d][n]

    a, b = standardise(z1), standardise(z2)
    ref = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            ref += (1 - c) ** 2 if i == j else lambd * c ** 2
    assert L.barlow_twins_loss(z1, z2, lambd=lambd, scale=scale).item() == pytest.approx(scale * ref, abs=1e-10)


# ---------------------------------------------------------------- VICReg
def test_vicreg_terms_match_definition():
    z1, z2 = _rand(10, 3, seed=12), _rand(10, 3, seed=13) * 0.5
    a, b = z1.numpy(), z2.numpy()
    inv = np.mean((a - b) ** 2)
    var = sum(np.mean(np.maximum(0, 1 - np.sqrt(z.var(axis=0, ddof=1) + 1e-4))) / 2 for z in (a, b))
    cov = 0.0
    for z in (a, b):
        c = np.cov(z, rowvar=False)  # unbiased, [d, d]
        cov += (np.sum(c ** 2) - np.sum(np.diag(c) ** 2)) / 3
    loss, terms = L.vicreg_loss(z1, z2)
    assert terms["invariance"].item() == pytest.approx(inv, abs=1e-12)
    assert terms["variance"].item() == pytest.approx(var, abs=1e-12)
    assert terms["covariance"].item() == pytest.approx(cov, abs=1e-12)
    assert loss.item() == pytest.approx(25 * inv + 25 * var + 1 * cov, abs=1e-10)


# ---------------------------------------------------------------- DINO
def test_dino_loss_center_and_temperature_schedule():
    b, k, v = 3, 5, 4  # 2 global + 2 local views
    crit = L.DINOLoss(k, n_global=2, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                      teacher_temp_warmup=0.5, center_momentum=0.9).double()
    crit.center.fill_(0.3)
    student, teacher = _rand(v * b, k, seed=14), _rand(2 * b, k, seed=15)
    assert crit.teacher_temperature(0.0) == pytest.approx(0.04)
    assert crit.teacher_temperature(0.25) == pytest.approx(0.055)
    assert crit.teacher_temperature(0.9) == pytest.approx(0.07)
    tt = 0.055
    s_np, t_np = student.numpy(), teacher.numpy()
    ref, pairs = 0.0, 0
    for ti in range(2):
        for si in range(v):
            if si == ti:
                continue
            for r in range(b):
                t_logit = (t_np[ti * b + r] - 0.3) / tt
                pt = np.exp(t_logit - t_logit.max())
                pt /= pt.sum()
                s_logit = s_np[si * b + r] / 0.1
                logp = s_logit - (s_logit.max() + np.log(np.exp(s_logit - s_logit.max()).sum()))
                ref += -(pt * logp).sum() / b
            pairs += 1
    loss = crit(student, teacher, progress=0.25)
    assert loss.item() == pytest.approx(ref / pairs, abs=1e-10)
    np.testing.assert_allclose(crit.center.numpy()[0], 0.9 * 0.3 + 0.1 * t_np.mean(axis=0), atol=1e-12)


# ---------------------------------------------------------------- SwAV
def _sinkhorn_numpy(scores, eps, iters):
    q = np.exp(scores / eps).T  # [K, B], as written in the SwAV paper's pseudo-code
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_matches_reference_and_marginals():
    scores = torch.nn.functional.normalize(_rand(12, 4, seed=16), dim=1) @ \
        torch.nn.functional.normalize(_rand(6, 4, seed=17), dim=1).T  # cosines [B=12, K=6]
    q = L.sinkhorn(scores, eps=0.05, iters=3)
    np.testing.assert_allclose(q.numpy(), _sinkhorn_numpy(scores.numpy(), 0.05, 3), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(q.sum(dim=1).numpy(), np.ones(12), atol=1e-12)  # each sample: one unit
    q_long = L.sinkhorn(scores, eps=0.05, iters=300)
    np.testing.assert_allclose(q_long.sum(dim=0).numpy(), np.full(6, 12 / 6), rtol=1e-3)  # equipartition


def test_swav_loss_matches_explicit_pairs():
    scores = [torch.tanh(_rand(5, 7, seed=20 + i)) for i in range(3)]
    t = 0.1
    ref, pairs = 0.0, 0
    for i in range(2):
        q = _sinkhorn_numpy(scores[i].numpy(), 0.05, 3)
        for v in range(3):
            if v == i:
                continue
            x = scores[v].numpy() / t
            logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
            ref += -(q * logp).sum(axis=1).mean()
            pairs += 1
    assert L.swav_loss(scores, n_global=2, temperature=t).item() == pytest.approx(ref / pairs, abs=1e-9)


# ---------------------------------------------------------------- per-sample reduction
def _per_sample_cases():
    q, k, queue = _rand(5, 4, seed=30), _rand(5, 4, seed=31), torch.nn.functional.normalize(_rand(7, 4, seed=32), dim=1)
    scores = [torch.tanh(_rand(5, 6, seed=33 + i)) for i in range(4)]
    student, teacher = _rand(4 * 5, 6, seed=40), _rand(2 * 5, 6, seed=41)

    def dino(reduction):
        crit = L.DINOLoss(6, n_global=2).double()
        return crit(student, teacher, progress=0.05, reduction=reduction)

    return {
        "moco_infonce": lambda r: L.moco_infonce(q, k, queue, temperature=0.2, reduction=r),
        "mocov3_infonce": lambda r: L.mocov3_infonce(q, k, temperature=0.2, reduction=r),
        "byol_loss": lambda r: L.byol_loss(q, k, reduction=r),
        "simsiam_loss": lambda r: L.simsiam_loss(q, k, reduction=r),
        "dino": dino,
        "swav_loss": lambda r: L.swav_loss(scores, n_global=2, temperature=0.1, reduction=r),
    }


@pytest.mark.parametrize("name", ["moco_infonce", "mocov3_infonce", "byol_loss", "simsiam_loss", "dino", "swav_loss"])
def test_reduction_none_gives_per_sample_terms_whose_mean_is_the_loss(name):
    fn = _per_sample_cases()[name]
    per, loss = fn("none"), fn("mean")
    assert per.shape == (5,) and loss.dim() == 0
    assert per.mean().item() == pytest.approx(loss.item(), abs=1e-12)
    assert per.std().item() > 0  # really one value per sample
    with pytest.raises(ValueError, match="reduction"):
        fn("sum")


def test_per_sample_terms_match_their_formulas():
    p, z = _rand(4, 3, seed=50), _rand(4, 3, seed=51)
    cos = [_cos(list(map(float, a)), list(map(float, b))) for a, b in zip(p, z)]
    np.testing.assert_allclose(L.byol_loss(p, z, reduction="none").numpy(), [2 - 2 * c for c in cos], atol=1e-12)
    np.testing.assert_allclose(L.simsiam_loss(p, z, reduction="none").numpy(), [-c for c in cos], atol=1e-12)
    # swav: sample 0 alone, pairs (0 -> 1), (1 -> 0) with the batch's codes
    scores = [torch.tanh(_rand(5, 7, seed=60 + i)) for i in range(2)]
    per = L.swav_loss(scores, n_global=2, temperature=0.1, reduction="none")
    ref = 0.0
    for i, v in ((0, 1), (1, 0)):
        q = _sinkhorn_numpy(scores[i].numpy(), 0.05, 3)[0]
        x = scores[v].numpy()[0] / 0.1
        ref += -(q * (x - np.log(np.exp(x).sum()))).sum() / 2
    assert per[0].item() == pytest.approx(ref, abs=1e-9)


# ---------------------------------------------------------------- distributed (CPU, gloo)
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, z1, z2, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z1.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        results = {}
        for name, fn in [("nt_xent", lambda a, c: L.nt_xent(a, c, temperature=0.3)[0]),
                         ("barlow", L.barlow_twins_loss),
                         ("vicreg", lambda a, c: L.vicreg_loss(a, c)[0])]:
            a = z1[sl].clone().requires_grad_()
            c = z2[sl].clone().requires_grad_()
            loss = fn(a, c)
            loss.backward()
            # a rank's input gradient sums d(loss_k)/d(own rows) over all ranks k; DDP then divides
            # by the world size, so grad/world must equal the single-process gradient of those rows
            g = torch.cat([a.grad, c.grad])
            results[name] = (float(loss.detach()), (g / world).numpy())
        # Sinkhorn normalises over the global batch; MoCo v3 uses global in-batch negatives;
        # the MoCo queue receives every rank's keys in rank order
        results["sinkhorn"] = L.sinkhorn(torch.tanh(z1[sl]), eps=0.05, iters=3).numpy()
        results["mocov3"] = float(L.mocov3_infonce(z1[sl], z2[sl], temperature=0.2))
        queue = L.KeyQueue(16, z1.shape[1])
        queue.push(z2[sl])
        results["queue"] = queue.queue[: z2.shape[0]].numpy()
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_losses_under_two_process_gloo_equal_single_process():
    z1, z2 = _rand(8, 5, seed=30), _rand(8, 5, seed=31)
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), z1, z2, out), nprocs=2, join=True)
    for name, fn in [("nt_xent", lambda a, c: L.nt_xent(a, c, temperature=0.3)[0]),
                     ("barlow", L.barlow_twins_loss), ("vicreg", lambda a, c: L.vicreg_loss(a, c)[0])]:
        a, c = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        full = fn(a, c)
        full.backward()
        losses = [out[r][name][0] for r in range(2)]
        # per-rank losses average to the global one (nt_xent: mean over local anchors;
        # barlow: identical on every rank; vicreg: local invariance term, global var/cov)
        assert np.mean(losses) == pytest.approx(full.item(), abs=1e-9)
        for r in range(2):
            g = out[r][name][1]
            sl = slice(r * 4, (r + 1) * 4)
            np.testing.assert_allclose(g[:4], a.grad[sl].numpy(), atol=1e-9, err_msg=name)
            np.testing.assert_allclose(g[4:], c.grad[sl].numpy(), atol=1e-9, err_msg=name)
    full_q = L.sinkhorn(torch.tanh(z1), eps=0.05, iters=3).numpy()
    np.testing.assert_allclose(np.concatenate([out[0]["sinkhorn"], out[1]["sinkhorn"]]), full_q, atol=1e-12)
    mocov3 = np.mean([out[r]["mocov3"] for r in range(2)])
    assert mocov3 == pytest.approx(L.mocov3_infonce(z1, z2, temperature=0.2).item(), abs=1e-9)
    keys = torch.nn.functional.normalize(z2, dim=1).numpy()
    for r in range(2):
        np.testing.assert_allclose(out[r]["queue"], keys, atol=1e-12)
