"""Evaluation on frozen features: weighted kNN, linear probe, few-shot subsets, long-tail groups.

All functions take feature tensors (``float [N, D]``) and integer labels (``int64 [N]``), so
they work for any encoder. :func:`extract_features` produces them from a source of unaugmented
images; :func:`evaluate_checkpoint` is what ``fastssl eval CHECKPOINT`` runs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "knn_predict", "knn_accuracy", "linear_probe", "few_shot_indices", "class_groups",
    "group_accuracy", "source_arrays", "extract_features", "evaluate_features", "evaluate_backbone",
    "final_eval", "load_trained_backbone", "evaluate_checkpoint",
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
                      linear_kwargs: Optional[Mapping] = None) -> Dict[str, float]:
    """kNN top-1 and (optionally) linear-probe top-1 (fractions) on labelled train/test features.

    Unlabelled (``-1``) training samples are left out of the memory bank and the probe.
    """
    keep = train_labels >= 0
    train_feats, train_labels = train_feats[keep], train_labels[keep]
    out = {"knn_top1": knn_accuracy(train_feats, train_labels, test_feats, test_labels,
                                    num_classes=num_classes, k=k, temperature=temperature)}
    if linear:
        res = linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes=num_classes,
                           **dict(linear_kwargs or {}))
        out["linear_top1"] = res["accuracy"]
    return out


def evaluate_backbone(cfg, backbone: nn.Module, sources, device, *, mean=None, std=None,
                      linear: bool = True, progress: bool = False) -> Dict[str, float]:
    """kNN (and linear-probe) top-1 of ``backbone`` with the run config's ``eval:`` settings on
    ``sources = (labelled train source, test source)``; also ``num_classes`` and ``n_test``."""
    ev = cfg.eval
    tr_x, tr_y = source_arrays(sources[0], size=ev.image_size, progress=progress)
    te_x, te_y = source_arrays(sources[1], size=ev.image_size, progress=progress)
    num_classes = int(max(int(tr_y.max()), int(te_y.max())) + 1)
    kw = dict(mean=mean if mean is not None else ev.mean, std=std if std is not None else ev.std,
              batch_size=ev.batch_size, device=device, progress=progress)
    lin = dict(epochs=ev.linear_epochs, optimizer=ev.linear_optimizer, lr=ev.linear_lr,
               weight_decay=ev.linear_weight_decay, batch_size=ev.linear_batch_size, progress=progress)
    res = evaluate_features(extract_features(backbone, tr_x, **kw), tr_y, extract_features(backbone, te_x, **kw),
                            te_y, num_classes=num_classes, k=ev.knn_k, temperature=ev.knn_t,
                            linear=linear and ev.linear, linear_kwargs=lin)
    return {**res, "num_classes": num_classes, "n_test": len(te_y)}


def _normalisation(cfg, aug=None):
    """``eval.mean``/``eval.std``, else the run's augment preset's (what training normalised with)."""
    ev = cfg.eval
    if ev.mean is not None and ev.std is not None:
        return ev.mean, ev.std
    if aug is None:
        from .build import build_augment
        aug = build_augment(cfg.augment)
    return ev.mean or aug.mean, ev.std or aug.std


def final_eval(cfg, backbone: nn.Module, sources, device, *, run_dir: Optional[Path] = None, aug=None,
               progress: Optional[bool] = None) -> Dict[str, float]:
    """The end-of-run evaluation: kNN (and linear-probe) top-1 on the held-out split, next to kNN
    of the same architecture at random initialisation and chance; printed, and written to
    ``run_dir/eval.json`` when given. Keys: ``eval/knn_top1``, ``eval/linear_top1``,
    ``eval/knn_top1_random_init``, ``eval/chance``, ``eval/seconds`` (fractions in [0, 1])."""
    import json
    import time

    from .build import build_backbone

    ev = cfg.eval
    progress = cfg.log.progress if progress is None else progress
    mean, std = _normalisation(cfg, aug)
    t0 = time.perf_counter()
    res = evaluate_backbone(cfg, backbone, sources, device, mean=mean, std=std, progress=progress)
    out = {"eval/knn_top1": res["knn_top1"], "eval/chance": 1.0 / res["num_classes"]}
    if "linear_top1" in res:
        out["eval/linear_top1"] = res["linear_top1"]
    if ev.random_init_baseline:
        torch.manual_seed(cfg.train.seed)
        rand, _ = build_backbone(cfg, aug)
        base = evaluate_backbone(cfg, rand.to(device), sources, device, mean=mean, std=std, linear=False)
        out["eval/knn_top1_random_init"] = base["knn_top1"]
    out["eval/seconds"] = time.perf_counter() - t0
    if run_dir is not None:
        (Path(run_dir) / "eval.json").write_text(json.dumps(out, indent=2))
    print(_report(out, k=ev.knn_k, n_test=res["n_test"]))
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

    from .build import build_augment, build_backbone
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
    backbone, _ = build_backbone(cfg, build_augment(cfg.augment))
    backbone.load_state_dict(backbone_sd)
    return cfg, backbone


def evaluate_checkpoint(path: Union[str, Path], *, data: Optional[Mapping] = None,
                        linear: bool = True, device: Optional[str] = None,
                        progress: bool = True) -> Dict[str, float]:
    """What ``fastssl eval CHECKPOINT`` runs: rebuild the backbone (:func:`load_trained_backbone`),
    extract features of the eval ``train`` and ``test`` sources (``data`` overrides
    ``eval.train``/``eval.test``) and return kNN and linear-probe top-1 (fractions)."""
    from loaders.errors import ConfigError

    from .build import build_eval_sources

    cfg, backbone = load_trained_backbone(path)
    sources = build_eval_sources(cfg, dict(data) if data else None)
    if sources is None:
        raise ConfigError(f"{path}: no eval data; give eval.train and eval.test source configs "
                          f"(e.g. --data data.yaml with train: and test: sections)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = _normalisation(cfg)
    res = evaluate_backbone(cfg, backbone.to(device), sources, device, mean=mean, std=std, linear=linear,
                            progress=progress)
    return {k: v for k, v in res.items() if k in ("knn_top1", "linear_top1")}
