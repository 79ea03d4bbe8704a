"""``fastssl study inflation``: data inflation with generated images at a fixed number of steps.

AdaInf (Wang et al., ICLR 2024): the pretraining stream is ``real x dup (+) generated`` and a
weaker augmentation (``symmetric_adainf``) suits the inflated data. One point per
(preset, dup): ``data.sources.<real>.dup=d``, ``augment.preset=p``, ``train.steps=S`` (every point
trains the same number of steps, so the same number of images ``S x B``).

Recorded per point (from the point's :class:`loaders.mixture.Mixture`): the real source's unique
count ``n_real``, the epoch length ``L = sum_s dup_s x u_s``, the **real share of each epoch**
``dup x n_real / L`` (exact: a dup-mode epoch holds every unique real sample exactly ``dup``
times), the epochs ``S x B / L`` and the real images seen ``share x S x B`` (the stream's real
fraction over whole epochs; a partial last epoch is a random part of one).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from loaders.errors import ConfigError

from .diversity import _check_eval, _source_index

__all__ = ["plan_inflation"]


def _real_index(names: Sequence[str], real: Optional[str]) -> int:
    if real is None:
        return list(names).index("real") if "real" in names else 0
    return _source_index(names, real)


def _steps(cfg, steps: Optional[int], batch: int) -> int:
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps {steps}: must be >= 1")
        return int(steps)
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    if cfg.data.get("budget"):
        return int(cfg.data["budget"]) // batch
    raise ConfigError("the study trains every point for the same steps: give --steps or set train.steps")


def plan_inflation(config: str, overrides: Sequence[str], dups: Sequence[int], presets: Sequence[str], *,
                   steps: Optional[int] = None, real: Optional[str] = None
                   ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """``(points, study)``: one point per (preset, dup), presets outermost."""
    from loaders.augment import list_presets
    from loaders.mixture import Mixture
    from loaders.pipeline import build_sources_and_mixture

    from ..config import load_config

    cfg = load_config(config, list(overrides))
    _check_eval(cfg)
    known = list_presets()
    for p in presets:
        if p not in known:
            raise ConfigError(f"--preset {p!r}: no such augmentation preset (known: {', '.join(known)})")
    batch = int(cfg.data.get("batch_size", 256)) * cfg.train.grad_accum
    S = _steps(cfg, steps, batch)
    _, base = build_sources_and_mixture(cfg.data)
    if base.mode != "dups":
        raise ConfigError("data.sources use 'weight': the inflation study replicates the real source with 'dup' "
                          "(give every source a dup)")
    r = _real_index(base.names, real)
    extra = ["data.budget=null"] if cfg.data.get("budget") else []
    points = []
    for preset in presets:
        for d in dups:
            if int(d) < 0:
                raise ConfigError(f"--dup {d}: must be >= 0")
            dd = base.dups.tolist()
            dd[r] = int(d)
            try:
                m = Mixture(base.sizes.tolist(), dups=dd, fractions=list(base.fractions), seed=base.seed,
                            names=base.names)
            except ValueError as e:
                raise ConfigError(f"--dup {d}: {e}") from e
            share = float(m.counts_per_epoch[r]) / m.epoch_length
            seen = S * batch
            study = {"kind": "inflation", "preset": preset, "dup": int(d), "steps": S, "global_batch": batch,
                     "images": seen, "real_source": base.names[r], "n_real": int(m.unique[r]),
                     "n_other": int(m.unique.sum() - m.unique[r]), "epoch_length": int(m.epoch_length),
                     "real_share": share, "epochs": seen / m.epoch_length, "real_images_seen": share * seen}
            ov = list(overrides) + extra + [f"data.sources.{r}.dup={int(d)}", f"augment.preset={preset}",
                                            f"train.steps={S}"]
            points.append({"name": f"p{len(points):03d}_{preset}_dup{int(d)}", "overrides": ov, "study": study})
    meta = {"kind": "inflation", "dups": [int(d) for d in dups], "presets": list(presets), "steps": S,
            "global_batch": batch, "real_source": base.names[r], "real_share_rule": "dup x n_real / epoch_length "
            "(loaders.mixture.Mixture, dup mode: every unique sample dup times per epoch)",
            "base_overrides": list(overrides)}
    return points, meta
