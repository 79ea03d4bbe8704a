"""``fastssl study diversity``: pretraining data diversity under a fixed compute budget.

DiversitySSL (Hammoud et al., ECCV 2024): diversity is the number ``N`` of unique training
images, the budget ``C = N x E`` the images seen; a smaller ``N`` is seen for more epochs ``E``
so that every point of a budget sees the same number of images.

Run length. Points run as one process each, so the global batch is ``B = data.batch_size x
train.grad_accum``. A budget becomes whole steps by **rounding to the nearest step, halves up**:
``steps = floor(C / B + 1/2)`` (in integers ``(2C + B) // (2B)``), and the point sees exactly
``C' = steps x B`` images (``|C' - C| <= B/2``; recorded per point as ``C_eff``). The points set
``data.budget=C'`` and ``train.steps=null`` (the trainer's ``run_length`` gives ``C' // B =
steps``), so every point of a budget sees the same images count, whatever ``N``.

Diversity. ``N`` applies to one source (``--source``, default the first) through its
``fraction``: the mixture keeps ``round_half_up(fraction x n)`` unique samples
(``floor(f n + 1/2)``, :class:`loaders.mixture.Mixture`). ``--unique N`` is converted to the
float fraction that the mixture itself maps to exactly ``N`` (checked with ``Mixture``);
``--fractions f`` keeps ``f`` and records the ``N`` it gives. ``E = C' x share / N`` where
``share`` is the source's part of the stream (1 for a single source).

Nesting. The mixture's subset of source ``s`` is the first ``u`` values of one keyed
permutation of ``[0, n)`` (key: seed, s), whatever ``u``: the ``N`` samples of a smaller point
are a subset of every larger point's. The study checks this on the actual ``Mixture`` objects of
the points (``Mixture.subset``) and records the result (``study.nested``).

Every point is evaluated on the config's downstream set (``eval.train`` / ``eval.test``: kNN and
linear probe, the trainer's end-of-run evaluation). ``--frechet`` adds the Fréchet distance
between a sample of the point's pretraining stream and the downstream set under one fixed
encoder (:mod:`fastssl.studies.frechet`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from loaders.errors import ConfigError

__all__ = ["ROUNDING", "steps_for_budget", "fraction_for", "plan_diversity", "check_nested"]

ROUNDING = ("steps = round(C / B) to the nearest whole step, halves rounded up: floor(C/B + 1/2); "
            "images seen C_eff = steps x B, |C_eff - C| <= B/2 (B = data.batch_size x train.grad_accum, "
            "one process per point)")


def steps_for_budget(budget: int, global_batch: int) -> int:
    """``floor(budget / global_batch + 1/2)`` in integers; a budget under half a batch is an error."""
    if budget < 1:
        raise ConfigError(f"--budget {budget}: must be >= 1 image")
    steps = (2 * budget + global_batch) // (2 * global_batch)
    if steps < 1:
        raise ConfigError(f"--budget {budget}: under half a step of {global_batch} images (the global batch)")
    return steps


def _mixture(base, s: int, fraction: Optional[float], data_cfg):
    """``base``'s mixture with source ``s``'s fraction replaced (loaders.mixture.Mixture)."""
    from loaders.mixture import Mixture

    fr = list(base.fractions)
    fr[s] = fraction
    weights = base.weights if base.mode == "weights" else None
    return Mixture(base.sizes.tolist(), weights=weights, dups=None if weights is not None else base.dups.tolist(),
                   fractions=fr, epoch_length=data_cfg.get("epoch_length") if weights is not None else None,
                   seed=base.seed, names=base.names)


def _unique_of(n: int, fraction: float) -> int:
    from loaders.mixture import Mixture
    return int(Mixture([n], fractions=[fraction]).unique[0])


def fraction_for(count: int, n: int) -> float:
    """The fraction for which the mixture keeps exactly ``count`` of ``n`` samples."""
    if not 1 <= count <= n:
        raise ConfigError(f"--unique {count}: must be between 1 and the source's {n} samples")
    if count == n:
        return 1.0
    f = count / n
    for cand in (f, math.nextafter(f, 1.0), math.nextafter(f, 0.0)):
        if _unique_of(n, cand) == count:
            return cand
    raise ConfigError(f"--unique {count}: no fraction of {n} samples gives exactly {count}")  # pragma: no cover


def _fraction_text(f: float) -> str:
    """The override text of ``f`` that parses back to the same float."""
    from ..config import parse_override

    text = repr(float(f))
    if parse_override(f"x={text}")[1] != f:  # pragma: no cover - repr round-trips through YAML
        raise ConfigError(f"fraction {f!r} does not survive the YAML override")
    return text


def _source_index(names: Sequence[str], source: Optional[str]) -> int:
    if source is None:
        return 0
    if source in names:
        return list(names).index(source)
    if source.isdigit() and int(source) < len(names):
        return int(source)
    raise ConfigError(f"--source {source!r}: no such data source (sources: {', '.join(names)})")


def check_nested(subsets: Sequence[Tuple[int, np.ndarray]]) -> Dict[str, Any]:
    """``subsets``: ``(N, sample ids)`` per point; every smaller set must lie in every larger one."""
    order = sorted(subsets, key=lambda t: t[0])
    pairs, bad = 0, None
    for (n_small, small), (n_big, big) in zip(order, order[1:]):
        pairs += 1
        if n_small < n_big and not np.isin(small, big).all():
            bad = bad or {"small": int(n_small), "large": int(n_big),
                          "missing": int((~np.isin(small, big)).sum())}
    return {"nested": bad is None, "checked_pairs": pairs, "counterexample": bad,
            "how": "Mixture.subset(source) of each point's mixture; consecutive N checked with numpy.isin"}


def _no_repeats(values: Sequence, what: str, describe) -> None:
    """Two points of one study with the same value would be the same run: a one-line error."""
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"{what}: two values give the same point ({describe(v)})")
        seen.add(v)


def _check_eval(cfg) -> None:
    if not cfg.eval.enabled or not cfg.eval.train or not cfg.eval.test:
        raise ConfigError("the study evaluates every point on the downstream set: set eval.enabled: true, "
                          "eval.train and eval.test in the config")


def _diversity_values(unique, fractions, n: int) -> List[Tuple[int, float]]:
    if (unique is None) == (fractions is None):
        raise ConfigError("give exactly one of --unique N1,N2,... and --fractions f1,f2,...")
    if unique is not None:
        return [(int(u), fraction_for(int(u), n)) for u in unique]
    out = []
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"--fractions {f}: must be in (0, 1]")
        u = _unique_of(n, f)
        if u < 1:
            raise ConfigError(f"--fractions {f}: selects no sample of the source's {n}")
        out.append((u, float(f)))
    return out


def _frechet(cfg, sources, mixtures, k: Optional[int]):
    """``({N: FD}, encoder description)`` or ``({}, None)`` without ``k``."""
    if not k:
        return {}, None
    import sys

    from .frechet import FrechetProbe

    probe = FrechetProbe(cfg, sources, k=k)
    out = {}
    for N, m in mixtures.items():
        out[N] = probe.distance(m, key=(N,))
        print(f"fastssl study: Fréchet distance, N={N}: {out[N]:.4g}", file=sys.stderr, flush=True)
    return out, probe.encoder_text


def plan_diversity(config: str, overrides: Sequence[str], budgets: Sequence[int], *,
                   unique: Optional[Sequence[int]] = None, fractions: Optional[Sequence[float]] = None,
                   source: Optional[str] = None, frechet: Optional[int] = None
                   ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """``(points, study)``: one point per (budget, N), budgets outermost; ``frechet``: sample
    size K of the Fréchet distance per point (None: not computed)."""
    from loaders.pipeline import build_sources_and_mixture

    from ..config import load_config

    cfg = load_config(config, list(overrides))
    _check_eval(cfg)
    batch = int(cfg.data.get("batch_size", 256)) * cfg.train.grad_accum
    sources, base = build_sources_and_mixture(cfg.data)
    s = _source_index(base.names, source)
    n = int(base.sizes[s])
    values = _diversity_values(unique, fractions, n)
    _no_repeats([N for N, _ in values], "--unique/--fractions: N", lambda N: f"{N} unique samples")
    _no_repeats([steps_for_budget(int(C), batch) for C in budgets], "--budget",
                lambda st: f"{st} steps of {batch} images")
    mixtures = {N: _mixture(base, s, f, cfg.data) for N, f in values}
    for N, m in mixtures.items():
        if int(m.unique[s]) != N:  # pragma: no cover - fraction_for checked it
            raise ConfigError(f"--unique {N}: the mixture keeps {int(m.unique[s])}")
    nested = check_nested([(N, m.subset(s)) for N, m in mixtures.items()])
    fd, encoder = _frechet(cfg, sources, mixtures, frechet)
    points = []
    for C in budgets:
        steps = steps_for_budget(int(C), batch)
        c_eff = steps * batch
        for N, f in values:
            m = mixtures[N]
            share = float(m.counts_per_epoch[s]) / m.epoch_length
            study = {"kind": "diversity", "C": int(C), "C_eff": c_eff, "steps": steps, "global_batch": batch,
                     "source": base.names[s], "n_source": n, "N": N, "fraction": f, "share": share,
                     "E": c_eff * share / N, "epoch_length": int(m.epoch_length)}
            if fd:
                study["frechet"] = fd[N]
            ov = list(overrides) + [f"data.sources.{s}.fraction={_fraction_text(f)}", f"data.budget={c_eff}",
                                    "train.steps=null"]
            points.append({"name": f"p{len(points):03d}_C{c_eff}_N{N}", "overrides": ov, "study": study})
    meta = {"kind": "diversity", "budgets": [int(c) for c in budgets], "global_batch": batch, "rounding": ROUNDING,
            "source": base.names[s], "source_index": s, "n_source": n, "unique": [N for N, _ in values],
            "fractions": [f for _, f in values], "frechet_encoder": encoder,
            "subset_rule": "unique = floor(fraction x n + 1/2) (loaders.mixture.Mixture)", "nested": nested,
            "base_overrides": list(overrides)}
    return points, meta
