"""Evaluation on frozen features: weighted kNN, linear probe, few-shot subsets, long-tail groups.

All functions take feature tensors (``float [N, D]``) and integer labels (``int64 [N]``), so
they work for any encoder. :func:`extract_features` produces them from a source of unaugmented
images; :func:`final_eval` is the trainer's end-of-run evaluation and :func:`evaluate_checkpoint`
what ``fastssl eval CHECKPOINT`` runs.

The long-tail protocol (BCL, Zhou et al. 2022; :func:`longtail_protocol`, ``eval.few_shot`` and
``eval.groups``): the probes and the kNN memory bank train on ``eval.train`` -- point it at the
*balanced* training set -- in full and as balanced n-per-class subsets (mean over
``eval.few_shot_seeds`` subset seeds); the many / medium / few class groups are defined by the
*pretraining* split's per-class counts (``final_eval(train_counts=...)``; ``fastssl eval`` counts
the run's ``data.sources``), and by eval.train's labels only when those are not available. Every
number is written with a one-sentence definition (and the counts' origin) into the JSON report.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "knn_predict", "knn_accuracy", "linear_probe", "few_shot_indices", "class_groups",
    "group_accuracy", "class_counts", "mixture_class_counts", "data_class_counts", "longtail_protocol",
    "source_arrays", "extract_features", "evaluate_features", "evaluate_backbone", "metric_definitions",
    "format_table", "write_json", "final_eval", "load_trained_backbone", "evaluate_checkpoint",
]


# ----------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, *,
                num_classes: int, k: int = 200, temperature: float = 0.1,
                chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (InstDisc / solo-learn): cosine similarity, the ``k`` nearest training
    samples vote for their class with weight ``exp(sim / temperature)``.

    ``train_feats [N, D]``, ``train_labels int64 [N]``, ``test_feats [M, D]`` ->
    class scores ``float [M, num_classes]``. Test rows are processed ``chunk`` at a time so the
    ``[chunk, N]`` similarity matrix bounds the memory.
    """
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"knn: {train_feats.shape[0]} train features but {train_labels.shape[0]} labels")
    if (train_labels < 0).any():
        raise ValueError("knn: train labels must be >= 0 (drop unlabelled samples from the memory bank)")
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(bank.device)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start:start + chunk].float().to(bank.device), dim=1)
        sim = q @ bank.T                                    # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)               # [m, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[top_idx], weights)     # sum of weights per class
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *, num_classes: int,
                 k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_predict`."""
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes=num_classes,
                         k=k, temperature=temperature)
    return float((scores.argmax(1).cpu() == test_labels.cpu()).float().mean())


# ----------------------------------------------------------------------------- linear probe
def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: Optional[torch.Tensor] = None, *, num_classes: int, epochs: int = 100,
                 optimizer: str = "adam", lr: float = 1e-2, weight_decay: float = 5e-6,
                 batch_size: int = 1000, final_lr: float = 1e-6, seed: int = 0,
                 progress: bool = False) -> Dict[str, object]:
    """Train ``Linear(D, num_classes)`` on frozen features, cosine lr from ``lr`` to ``final_lr``.

    Defaults follow BCL's probe (Adam lr 1e-2 -> 1e-6, weight decay 5e-6, batch 1000); SGD uses
    momentum 0.9. Features are standardised with the training set's mean/std. Returns
    ``{"accuracy": float | None, "pred": int64 [M], "model": nn.Linear}``.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"linear probe optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    g = torch.Generator().manual_seed(seed)
    x = train_feats.float().cpu()
    y = train_labels.long().cpu()
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_feats.float().cpu() - mean) / std
    model = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        model.weight.normal_(0, 0.01, generator=g)
        model.bias.zero_()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    it = range(epochs)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="linear probe", leave=False)
    for _ in it:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            cur = final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * step / max(total, 1)))
            for group in opt.param_groups:
                group["lr"] = cur
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        pred = model(xt).argmax(1)
    acc = None if test_labels is None else float((pred == test_labels.long().cpu()).float().mean())
    return {"accuracy": acc, "pred": pred, "model": model}


# ----------------------------------------------------------------------------- subsets / groups
def few_shot_indices(labels, n_shot: int, *, seed: int = 0) -> np.ndarray:
    """Balanced ``n_shot``-per-class subset of ``labels`` (int [N]; ``-1`` is never picked).

    Returns sorted ``int64`` indices (``n_shot * num_classes`` of them), the same for the same
    seed. Raises ValueError naming the class when it has fewer than ``n_shot`` samples.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if n_shot <= 0:
        raise ValueError(f"n_shot must be positive, got {n_shot}")
    rng = np.random.default_rng(seed)
    # one shuffle, then a stable sort by class: the first n_shot of each class are a seeded
    # uniform sample of it, without a Python loop over samples
    perm = rng.permutation(len(labels))
    perm = perm[labels[perm] >= 0]
    order = perm[np.argsort(labels[perm], kind="stable")]
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    short = counts < n_shot
    if short.any():
        c = int(classes[short][0])
        raise ValueError(f"few-shot: class {c} has {int(counts[short][0])} samples, fewer than n_shot={n_shot}")
    pick = (starts[:, None] + np.arange(n_shot)[None, :]).reshape(-1)
    return np.sort(order[pick])


def class_groups(train_counts, *, many: int = 100, few: int = 20) -> Dict[str, np.ndarray]:
    """Split classes by their number of training samples: ``many`` (> many), ``medium``
    (few..many inclusive) and ``few`` (< few). ``train_counts`` is ``int [C]``."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts > many),
        "medium": np.flatnonzero((counts >= few) & (counts <= many)),
        "few": np.flatnonzero(counts < few),
    }


def group_accuracy(pred, target, train_counts, *, many: int = 100, few: int = 20) -> Dict[str, float]:
    """Accuracy over all test samples and per class group (see :func:`class_groups`).

    A group's accuracy is over the test samples whose true class is in it (NaN if none).
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    out = {"all": float((pred == target).mean()) if len(target) else float("nan")}
    for name, classes in class_groups(train_counts, many=many, few=few).items():
        sel = np.isin(target, classes)
        out[name] = float((pred[sel] == target[sel]).mean()) if sel.any() else float("nan")
    return out


def class_counts(labels, num_classes: int = 0) -> np.ndarray:
    """Images per class, ``int64 [max(num_classes, max label + 1)]``; label ``-1`` is not counted."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    return np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.int64)


def mixture_class_counts(sources, mixture, *, num_classes: int = 0) -> np.ndarray:
    """Per-class counts of a pretraining mixture (``int64 [C]``): the unique labelled images it
    draws from, i.e. each source's ``fraction`` subset (:meth:`Mixture.subset`), every image once
    (``dup`` and ``weight`` do not multiply counts); label ``-1`` (generated) is not counted."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for s, src in enumerate(sources):
        labels = np.asarray(src.labels(), dtype=np.int64).reshape(-1)[mixture.subset(s)]
        c = class_counts(labels, len(counts))
        counts = np.pad(counts, (0, len(c) - len(counts))) + c
    return counts


def data_class_counts(data_cfg: Mapping, *, num_classes: int = 0) -> np.ndarray:
    """:func:`mixture_class_counts` of a run's ``data:`` section (its sources are opened)."""
    from loaders.pipeline import build_sources_and_mixture

    sources, mixture = build_sources_and_mixture(data_cfg)
    return mixture_class_counts(sources, mixture, num_classes=num_classes)


def short_classes(labels, n_shot: int, *, counts=None):
    """``[(class, count)]`` of the classes present in ``labels`` (or with ``counts`` int [C] > 0)
    with fewer than ``n_shot`` images."""
    counts = class_counts(labels) if counts is None else np.asarray(counts)
    return [(int(c), int(counts[c])) for c in np.flatnonzero((counts > 0) & (counts < n_shot))]


def longtail_protocol(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, *, num_classes: int, few_shot: Sequence[int] = (),
                      seeds: int = 5, groups: bool = False, many: int = 100, few: int = 20,
                      train_counts=None, linear: bool = True, linear_kwargs: Optional[Mapping] = None,
                      knn_pred: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Linear-probe numbers of the long-tail protocol (BCL, Zhou et al. 2022) on frozen features.

    * ``linear_top1``: :func:`linear_probe` (``linear_kwargs``) on every labelled training sample;
    * ``linear_top1_{n}shot`` / ``linear_top1_{n}shot_std``: for each ``n`` in ``few_shot``, the
      mean and population std (ddof=0) over ``s = 0 .. seeds-1`` of :func:`linear_probe` (``seed=s``)
      trained on :func:`few_shot_indices` ``(train_labels, n, seed=s)``. If a class of the training
      set has fewer than ``n`` samples both are NaN (see :func:`short_classes`; the subset could
      not be balanced);
    * with ``groups``: ``classes_{many,medium,few}`` (:func:`class_groups` of ``train_counts``, else
      of the training labels' counts; padded with zeros to ``num_classes``),
      ``linear_top1_{many,medium,few}`` (:func:`group_accuracy` of the full probe's predictions)
      and, when ``knn_pred`` (``int64 [M]``) is given, ``knn_top1_{many,medium,few}``.

    Accuracies are fractions in [0, 1]; a group without test samples is NaN. Unlabelled (``-1``)
    training samples are left out. Needs ``linear`` for ``few_shot``.
    """
    if few_shot and not linear:
        raise ValueError("few-shot accuracies are linear probes: few_shot needs linear=True")
    keep = train_labels >= 0
    x, y = train_feats[keep], train_labels[keep]
    lin = dict(linear_kwargs or {})
    out: Dict[str, float] = {}
    full_pred = None
    if linear:
        res = linear_probe(x, y, test_feats, test_labels, num_classes=num_classes, **lin)
        out["linear_top1"], full_pred = res["accuracy"], res["pred"]
    for n in few_shot:
        accs = [float("nan")]
        if not short_classes(y.numpy(), n):
            accs = []
            for s in range(seeds):
                idx = torch.from_numpy(few_shot_indices(y.numpy(), n, seed=s))
                accs.append(linear_probe(x[idx], y[idx], test_feats, test_labels, num_classes=num_classes,
                                         **{**lin, "seed": s})["accuracy"])
        out[f"linear_top1_{n}shot"] = float(np.mean(accs))
        out[f"linear_top1_{n}shot_std"] = float(np.std(accs))
    if groups:
        counts = class_counts(y.numpy(), num_classes) if train_counts is None else _padded(train_counts, num_classes)
        for name, classes in class_groups(counts, many=many, few=few).items():
            out[f"classes_{name}"] = len(classes)
        for prefix, pred in (("linear_top1", full_pred), ("knn_top1", knn_pred)):
            if pred is not None:
                acc = group_accuracy(pred.cpu().numpy(), test_labels.cpu().numpy(), counts, many=many, few=few)
                out.update({f"{prefix}_{g}": acc[g] for g in ("many", "medium", "few")})
    return out


def _padded(counts, num_classes: int) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    return np.pad(counts, (0, max(0, num_classes - len(counts))))


# ----------------------------------------------------------------------------- features
def source_arrays(source, *, size: Optional[int] = None, progress: bool = False):
    """All images of a source as ``uint8 [N, 3, S, S]`` plus ``int64 [N]`` labels.

    Sources that hold their images in memory (``.images``: synthetic, array) are used as a
    whole array; others are decoded sample by sample (evaluation only, not a hot path).
    Images are resized (bilinear, antialiased) to ``size`` when given or when sizes differ.
    """
    labels = torch.as_tensor(np.asarray(source.labels(), dtype=np.int64))
    images = getattr(source, "images", None)
    if images is not None and isinstance(images, np.ndarray) and images.ndim == 4:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        return _resize(x, size), labels
    n = len(source)
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"decode {getattr(source, 'name', '')}", leave=False)
    imgs = [torch.from_numpy(np.ascontiguousarray(source.decode(i)[0])).permute(2, 0, 1) for i in it]
    shapes = {tuple(t.shape) for t in imgs}
    if size is None and len(shapes) > 1:
        raise ValueError(f"source '{getattr(source, 'name', '')}' has images of several sizes; set eval.image_size")
    if size is not None:
        imgs = [_resize(t[None], size)[0] for t in imgs]
    return torch.stack(imgs), labels


def _resize(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, *, mean: Sequence[float],
                     std: Sequence[float], batch_size: int = 512, device="cpu",
                     progress: bool = False) -> torch.Tensor:
    """Backbone features ``float [N, D]`` of ``uint8 [N, 3, H, W]`` images (eval mode, no aug).

    Images are normalised with ``mean``/``std`` (fractions of 255) on ``device``.
    """
    was_training = backbone.training
    backbone.eval()
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
    out = []
    it = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="features", leave=False)
    for i in it:
        x = (images[i:i + batch_size].to(device).float() - m) / s
        out.append(backbone(x).float().flatten(1).cpu())
    backbone.train(was_training)
    return torch.cat(out)


def evaluate_features(train_feats, train_labels, test_feats, test_labels, *, num_classes: int,
                      k: int = 200, temperature: float = 0.1, linear: bool = True,
                      linear_kwargs: Optional[Mapping] = None, **protocol) -> Dict[str, float]:
    """kNN top-1 and (optionally) linear-probe top-1 (fractions) on labelled train/test features,
    plus the long-tail numbers ``protocol`` selects (:func:`longtail_protocol`'s ``few_shot``,
    ``seeds``, ``groups``, ``many``, ``few``, ``train_counts``; with ``groups`` also kNN's).

    Unlabelled (``-1``) training samples are left out of the memory bank and the probes.
    """
    keep = train_labels >= 0
    train_feats, train_labels = train_feats[keep], train_labels[keep]
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes=num_classes, k=k, temperature=temperature)
    knn_pred = scores.argmax(1).cpu()
    out = {"knn_top1": float((knn_pred == test_labels.cpu()).float().mean())}
    out.update(longtail_protocol(train_feats, train_labels, test_feats, test_labels, num_classes=num_classes,
                                 linear=linear, linear_kwargs=linear_kwargs,
                                 knn_pred=knn_pred if protocol.get("groups") else None, **protocol))
    return out


#: what :func:`evaluate_backbone` returns besides the metrics
_INFO_KEYS = ("num_classes", "n_test", "n_train", "eval_train_counts")


def evaluate_backbone(cfg, backbone: nn.Module, sources, device, *, mean=None, std=None,
                      linear: bool = True, progress: bool = False, protocol: bool = True,
                      train_counts=None) -> Dict[str, object]:
    """kNN (and linear-probe) top-1 of ``backbone`` with the run config's ``eval:`` settings on
    ``sources = (labelled train source, test source)``; with ``protocol`` also the long-tail
    numbers ``eval.few_shot`` / ``eval.groups`` select (:func:`longtail_protocol`; group counts
    ``train_counts``, None = eval.train's labels). Besides the metrics: ``num_classes``,
    ``n_train`` (labelled eval.train images), ``n_test`` and ``eval_train_counts`` (int64 [C])."""
    ev = cfg.eval
    tr_x, tr_y = source_arrays(sources[0], size=ev.image_size, progress=progress)
    te_x, te_y = source_arrays(sources[1], size=ev.image_size, progress=progress)
    num_classes = int(max(int(tr_y.max()), int(te_y.max())) + 1)
    kw = dict(mean=mean if mean is not None else ev.mean, std=std if std is not None else ev.std,
              batch_size=ev.batch_size, device=device, progress=progress)
    lin = dict(epochs=ev.linear_epochs, optimizer=ev.linear_optimizer, lr=ev.linear_lr,
               weight_decay=ev.linear_weight_decay, batch_size=ev.linear_batch_size, progress=progress)
    linear = linear and ev.linear
    lt = dict(few_shot=list(ev.few_shot) if protocol and linear else [], seeds=ev.few_shot_seeds,
              groups=protocol and ev.groups, many=ev.group_many, few=ev.group_few, train_counts=train_counts)
    res = evaluate_features(extract_features(backbone, tr_x, **kw), tr_y, extract_features(backbone, te_x, **kw),
                            te_y, num_classes=num_classes, k=ev.knn_k, temperature=ev.knn_t,
                            linear=linear, linear_kwargs=lin, **lt)
    return {**res, "num_classes": num_classes, "n_test": len(te_y), "n_train": int((tr_y >= 0).sum()),
            "eval_train_counts": class_counts(tr_y.numpy(), num_classes)}


def _normalisation(cfg, aug=None):
    """``eval.mean``/``eval.std``, else the run's augment preset's (what training normalised with)."""
    ev = cfg.eval
    if ev.mean is not None and ev.std is not None:
        return ev.mean, ev.std
    if aug is None:
        from .build import build_augment
        aug = build_augment(cfg.augment)
    return ev.mean or aug.mean, ev.std or aug.std


# ----------------------------------------------------------------------------- reports
_GROUP_RULES = {"many": "more than {many}", "medium": "{few} to {many}", "few": "fewer than {few}"}


def metric_definitions(values: Mapping[str, float], ev, *, n_train: int, n_test: int, counts_origin: str = "",
                       eval_train_counts=None) -> Dict[str, str]:
    """One sentence per ``eval/...`` key of ``values``: what the number is, on which data, how.

    ``ev`` is the run's ``eval`` section; ``counts_origin`` says where the group counts come
    from; ``eval_train_counts`` (int [C]) names the class that made an n-shot number NaN.
    """
    probe = (f"{ev.linear_optimizer} lr {ev.linear_lr:g} cosine to 1e-06, {ev.linear_epochs} epochs, batch "
             f"{ev.linear_batch_size}, weight decay {ev.linear_weight_decay:g}, features standardised")
    test = f"top-1 on the {n_test} images of eval.test (frozen features of unaugmented images)"
    seeds = ev.few_shot_seeds
    fixed = {
        "knn_top1": f"weighted kNN (k={ev.knn_k}, T={ev.knn_t:g}, cosine) {test}; memory bank: the {n_train} "
                    f"labelled images of eval.train",
        "linear_top1": f"linear probe ({probe}) on all {n_train} labelled images of eval.train, {test}",
        "knn_top1_random_init": "eval/knn_top1 of the same architecture at random initialisation (seed train.seed)",
        "chance": "1 / number of classes (largest label in eval.train or eval.test + 1)",
        "seconds": "wall-clock seconds of the whole evaluation (features, kNN, probes)",
    }
    defs = {}
    for key, value in values.items():
        name = key.split("/", 1)[-1]
        shot = re.fullmatch(r"linear_top1_(\d+)shot(_std)?", name)
        group = re.fullmatch(r"(linear|knn)_top1_(many|medium|few)|classes_(many|medium|few)", name)
        if name in fixed:
            text = fixed[name]
        elif shot and shot.group(2):
            text = f"population standard deviation (ddof=0) of eval/{name[:-4]} over its {seeds} subset seeds"
        elif shot:
            text = (f"linear probe ({probe}) on a balanced {shot.group(1)}-per-class subset of eval.train, {test}; "
                    f"mean of {seeds} subset seeds (subset seed = probe seed = 0..{seeds - 1})")
        elif group:
            g = group.group(2) or group.group(3)
            members = (f"classes with {_GROUP_RULES[g].format(many=ev.group_many, few=ev.group_few)} training "
                       f"images, counted in {counts_origin}")
            if group.group(3):
                text = f"number of {g}-group classes: {members}"
            else:
                what = "the full linear probe (eval/linear_top1)" if group.group(1) == "linear" else "eval/knn_top1"
                text = (f"top-1 of {what} over the eval.test images whose class is in the {g} group ({members}); "
                        f"null when no test image is in the group")
        else:
            text = ""
        if shot and _is_nan(value) and eval_train_counts is not None:
            short = short_classes(None, int(shot.group(1)), counts=eval_train_counts)
            if short:
                text += (f"; not computed (null): class {short[0][0]} has {short[0][1]} labelled images in "
                         f"eval.train, fewer than {shot.group(1)} (eval.train should be the balanced training set)")
        defs[key] = text
    return defs


def _is_nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(key: str, v) -> str:
    if _is_nan(v):
        return "n/a"
    if "/classes_" in key:
        return str(int(v))
    if key.endswith("seconds"):
        return f"{v:.2f} s"
    return f"{100 * v:.2f}%"


def format_table(values: Mapping[str, float], definitions: Mapping[str, str]) -> str:
    """``metric  value  definition`` rows (accuracies in percent, n/a for NaN)."""
    width = max([len("metric")] + [len(k) for k in values])
    lines = [f"{'metric':<{width}}  {'value':>8}  definition"]
    lines += [f"{k:<{width}}  {_fmt(k, v):>8}  {definitions.get(k, '')}" for k, v in values.items()]
    return "\n".join(lines)


def _document(values: Mapping[str, float], definitions: Mapping[str, str], **extra) -> Dict[str, object]:
    """The eval.json document: every number (NaN -> null), ``definitions``, then ``extra``."""
    doc: Dict[str, object] = {k: (None if _is_nan(v) else v) for k, v in values.items()}
    doc["definitions"] = dict(definitions)
    doc.update(extra)
    return doc


def write_json(path: Union[str, Path], doc: Mapping) -> Path:
    """Write ``doc`` to ``path`` atomically (a temporary file renamed over it): strict JSON."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False))
    os.replace(tmp, path)
    return path


def _report_parts(res: Mapping[str, object], values: Mapping[str, float], ev, train_counts, origin: str):
    """``(definitions, eval.json document)`` of an evaluation's ``values`` (keys ``eval/...``)."""
    eval_counts = res["eval_train_counts"]
    defs = metric_definitions(values, ev, n_train=res["n_train"], n_test=res["n_test"], counts_origin=origin,
                              eval_train_counts=eval_counts)
    extra = {}
    if ev.groups:
        counts = eval_counts if train_counts is None else _padded(train_counts, res["num_classes"])
        extra["group_counts"] = {"origin": origin, "many": ev.group_many, "few": ev.group_few,
                                 "per_class": [int(c) for c in counts]}
    return defs, _document(values, defs, **extra)


def _metrics(res: Mapping[str, object]) -> Dict[str, float]:
    return {f"eval/{k}": v for k, v in res.items() if k not in _INFO_KEYS}


_EVAL_TRAIN_ORIGIN = "the labels of eval.train"


def _given_counts(train_counts, origin: Optional[str]):
    """``(counts or None, origin words)``: counts without a labelled image fall back to eval.train's."""
    if train_counts is None:
        return None, f"{_EVAL_TRAIN_ORIGIN} (no pretraining counts were given)"
    if int(np.asarray(train_counts).sum()) <= 0:
        return None, f"{_EVAL_TRAIN_ORIGIN} (the pretraining counts given hold no labelled image)"
    origin = origin or "the pretraining split (per-class counts given to final_eval as train_counts)"
    return np.asarray(train_counts, dtype=np.int64), origin


def final_eval(cfg, backbone: nn.Module, sources, device, *, run_dir: Optional[Path] = None, aug=None,
               progress: Optional[bool] = None, train_counts=None,
               counts_origin: Optional[str] = None) -> Dict[str, float]:
    """The end-of-run evaluation: kNN (and linear-probe) top-1 on the held-out split, next to kNN
    of the same architecture at random initialisation and chance, plus the long-tail protocol
    when ``eval.few_shot`` / ``eval.groups`` are set (:func:`longtail_protocol`).

    Keys: ``eval/knn_top1``, ``eval/linear_top1``, ``eval/linear_top1_{n}shot[_std]``,
    ``eval/{linear,knn}_top1_{many,medium,few}``, ``eval/classes_{many,medium,few}``,
    ``eval/knn_top1_random_init``, ``eval/chance``, ``eval/seconds`` (accuracies are fractions).

    Group counts: ``train_counts`` (int [C], images per class of the pretraining split, e.g.
    :func:`mixture_class_counts` of the run's sources and mixture; ``counts_origin`` words for the
    definitions), else the labels of eval.train (said so in the definitions). Printed as a table
    (metric, value, definition) and written to ``run_dir/eval.json`` when given: every number
    (NaN as null), ``definitions`` (key -> sentence) and, with groups, ``group_counts``.
    """
    from .build import build_method

    ev = cfg.eval
    progress = cfg.log.progress if progress is None else progress
    mean, std = _normalisation(cfg, aug)
    train_counts, origin = _given_counts(train_counts, counts_origin)
    t0 = time.perf_counter()
    res = evaluate_backbone(cfg, backbone, sources, device, mean=mean, std=std, progress=progress,
                            train_counts=train_counts)
    out = _metrics(res)
    if ev.random_init_baseline:
        torch.manual_seed(cfg.train.seed)
        rand = build_method(cfg, aug)[0].backbone  # the method's own encoder (a ResNet, a VAE, a generator)
        base = evaluate_backbone(cfg, rand.to(device), sources, device, mean=mean, std=std, linear=False,
                                 protocol=False)
        out["eval/knn_top1_random_init"] = base["knn_top1"]
    out["eval/chance"] = 1.0 / res["num_classes"]
    out["eval/seconds"] = time.perf_counter() - t0
    defs, doc = _report_parts(res, out, ev, train_counts, origin)
    if run_dir is not None:
        write_json(Path(run_dir) / "eval.json", doc)
    print(_report(out, k=ev.knn_k, n_test=res["n_test"]))
    print(format_table(out, defs))
    return out


def _report(out: Mapping[str, float], *, k: int, n_test: int) -> str:
    lines = [f"kNN top-1 (k={k}, held-out split, {n_test} images): {100 * out['eval/knn_top1']:.2f}%"]
    if "eval/knn_top1_random_init" in out:
        lines.append(f"kNN top-1, same encoder at random init: {100 * out['eval/knn_top1_random_init']:.2f}%")
    lines.append(f"chance: {100 * out['eval/chance']:.2f}%")
    if "eval/linear_top1" in out:
        lines.append(f"linear-probe top-1 (frozen features): {100 * out['eval/linear_top1']:.2f}%")
    return "\n".join(lines)


def load_trained_backbone(path: Union[str, Path]):
    """``(run config, backbone with the trained weights)`` from a training checkpoint, a
    ``backbone.pt`` next to its ``config.yaml``, or a run directory."""
    from loaders.errors import ConfigError

    from .build import build_augment, build_method
    from .config import from_dict, load_config

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    if path.is_dir():  # a run directory: use its exported backbone
        if not (path / "backbone.pt").is_file():
            raise ConfigError(f"run directory {path} has no backbone.pt (the run has not finished; "
                              f"evaluate a checkpoint from {path / 'checkpoints'} instead)")
        path = path / "backbone.pt"
    obj = torch.load(path, map_location="cpu", weights_only=False)  # our own files
    if isinstance(obj, dict) and "backbone" in obj and "config" in obj:  # training checkpoint
        cfg, backbone_sd = from_dict(obj["config"]), obj["backbone"]
    else:  # plain backbone state_dict: the architecture comes from the run's config.yaml
        side = path.parent / "config.yaml"
        if not side.is_file():
            raise ConfigError(f"{path} is a plain state_dict and {side} (its run config) is missing")
        cfg, backbone_sd = load_config(side), obj
    # the method builds its encoder (ResNet/ViT from model:, or its own: vae, imle's generator)
    backbone = build_method(cfg, build_augment(cfg.augment))[0].backbone
    backbone.load_state_dict(backbone_sd)
    return cfg, backbone


def _pretraining_counts(cfg):
    """``(counts or None, origin words)`` of the run's ``data.sources`` (:func:`data_class_counts`);
    None (eval.train's labels are used) when they do not load or hold no labelled image."""
    try:
        counts = data_class_counts(cfg.data)
    except Exception as e:  # the pretraining data may live elsewhere: fall back, and say why
        why = " ".join(str(e).split())[:200]
        return None, f"{_EVAL_TRAIN_ORIGIN} (the run's data.sources did not load: {type(e).__name__}: {why})"
    if counts.sum() <= 0:
        return None, f"{_EVAL_TRAIN_ORIGIN} (the run's data.sources hold no labelled image)"
    return counts, ("the run's pretraining data (data.sources: unique labelled images per class, each source's "
                    "fraction subset, dup/weight not multiplied)")


def evaluate_checkpoint(path: Union[str, Path], *, data: Optional[Mapping] = None,
                        linear: bool = True, device: Optional[str] = None, progress: bool = True,
                        overrides: Optional[Mapping] = None) -> Dict[str, object]:
    """What ``fastssl eval CHECKPOINT`` runs: rebuild the backbone (:func:`load_trained_backbone`),
    extract features of the eval ``train`` and ``test`` sources (``data`` overrides
    ``eval.train``/``eval.test``), and evaluate like :func:`final_eval` (no random-init baseline).

    ``overrides``: ``eval`` keys replacing the run config's (e.g. ``{"few_shot": [100, 50],
    "groups": True}``), checked like the config. Group counts: the run's ``data.sources``
    (:func:`data_class_counts`) when they load and hold labels, else the labels of eval.train.
    Returns the eval.json document: ``eval/...`` numbers (NaN as None), ``definitions``,
    ``group_counts`` (with groups), ``checkpoint`` and ``eval_data`` (the two source configs).
    """
    import dataclasses

    from loaders.errors import ConfigError

    from .build import build_eval_sources
    from .config import validate_eval

    cfg, backbone = load_trained_backbone(path)
    if overrides:
        cfg.eval = dataclasses.replace(cfg.eval, **dict(overrides))
        validate_eval(cfg.eval)
    sources = build_eval_sources(cfg, dict(data) if data else None)
    if sources is None:
        raise ConfigError(f"{path}: no eval data; give eval.train and eval.test source configs "
                          f"(e.g. --data data.yaml with train: and test: sections)")
    counts, origin = _pretraining_counts(cfg) if cfg.eval.groups else (None, "")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = _normalisation(cfg)
    t0 = time.perf_counter()
    res = evaluate_backbone(cfg, backbone.to(device), sources, device, mean=mean, std=std, linear=linear,
                            progress=progress, train_counts=counts)
    out = _metrics(res)
    out["eval/chance"] = 1.0 / res["num_classes"]
    out["eval/seconds"] = time.perf_counter() - t0
    _, doc = _report_parts(res, out, cfg.eval, counts, origin)
    doc["checkpoint"] = str(path)
    doc["eval_data"] = {"train": (data or {}).get("train") or cfg.eval.train,
                        "test": (data or {}).get("test") or cfg.eval.test}
    return doc
