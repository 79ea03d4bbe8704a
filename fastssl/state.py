"""The complete train state: what a checkpoint holds and how a resume restores it.

A checkpoint (:func:`fastssl.checkpoint.save_checkpoint`, atomic) holds everything that
changes during training: the method and probe (``model``: weights, buffers such as queues and
DINO's centre, and each method's schedule state -- progress, EMA tau), the exported
``backbone``, both optimizers, the grad scaler, the RNG states, the loader's cursor (the
sample after the last one trained on), every recipe's state, the open log window, plus the
config and the world size it was written with. A resume is refused when it would silently
change the experiment (:func:`resume_conflicts`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from loaders.errors import ConfigError

__all__ = ["collect_state", "restore_state", "loader_state_for", "resume_conflicts", "check_resume",
           "world_change_note", "RESUME_KEYS"]

#: config keys a resumed run must share with its checkpoint (the sample order, the lr scale or
#: the model depend on them)
RESUME_KEYS = ("data.sources", "data.batch_size", "data.seed", "data.epoch_length", "train.grad_accum",
               "method", "model", "recipes")


def collect_state(*, inner, optimizer, probe_opt, scaler, loader_state, recipes, meters,
                  config: Dict[str, Any], world: int) -> Dict[str, Any]:
    """The checkpoint dict (RNG states and the step are added by ``save_checkpoint``).

    ``loader_state``: one loader state per rank (``loaders``; rank 0's also as ``loader``)."""
    states = list(loader_state) if isinstance(loader_state, (list, tuple)) else [loader_state]
    return {
        "model": inner.state_dict(),
        "backbone": inner.method.backbone.state_dict(),
        "optimizer": optimizer.state_dict(),
        "probe_optimizer": probe_opt.state_dict() if probe_opt is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "loader": states[0],
        "loaders": states,
        "recipes": {r.name: r.state_dict() for r in recipes},
        "meters": meters.state_dict(),
        "config": config,
        "world_size": world,
    }


def loader_state_for(ckpt: Mapping[str, Any], rank: int, world: int) -> Dict[str, Any]:
    """This rank's saved cursor (the same world size), else rank 0's (the plan maps it)."""
    states = ckpt.get("loaders") or []
    if len(states) == world and int(ckpt.get("world_size", world)) == world:
        return states[rank]
    return ckpt["loader"]


def restore_state(ckpt: Mapping[str, Any], *, module, optimizer, probe_opt, loader, recipes, meters,
                  rank: int = 0, world: int = 1) -> None:
    """Load a checkpoint into freshly built parts (before ``accelerator.prepare``); the scaler
    and RNG states are applied by the caller after ``prepare``. ``loader``: the run's data stream
    (:class:`loaders.stream.Stream`, which holds the one loader cursor) or any object with
    ``load_state_dict``."""
    module.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if probe_opt is not None and ckpt.get("probe_optimizer") is not None:
        probe_opt.load_state_dict(ckpt["probe_optimizer"])
    loader.load_state_dict(loader_state_for(ckpt, rank, world))
    saved = ckpt.get("recipes") or {}
    for r in recipes:
        if r.name in saved:
            r.load_state_dict(saved[r.name])
    if ckpt.get("meters"):
        meters.load_state_dict(ckpt["meters"])


def _get(d: Mapping[str, Any], dotted: str):
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _diff(a: Any, b: Any, where: str, out: List[str]) -> None:
    """Dotted keys under ``where`` whose values differ (recursing into mappings)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k), b.get(k), f"{where}.{k}", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where} (checkpoint {a!r}, now {b!r})")


def resume_conflicts(ckpt: Mapping[str, Any], config: Mapping[str, Any], world: int,
                     keys: Sequence[str] = RESUME_KEYS) -> List[str]:
    """The differences between a checkpoint and this run that a resume must not cross."""
    out: List[str] = []
    saved = ckpt.get("config") or {}
    for key in keys:
        _diff(_get(saved, key), _get(config, key), key, out)
    old_world = int(ckpt.get("world_size", world))
    if old_world != world:
        consumed = int(((ckpt.get("loader") or {}).get("plan") or {}).get("samples", 0)) * old_world
        if consumed % world:
            out.append(f"world size (checkpoint {old_world} processes, now {world}: the {consumed} samples "
                       f"trained on so far do not split evenly over {world} ranks)")
    return out


def world_change_note(ckpt: Mapping[str, Any], world: int, batch_size: int) -> str:
    """'' or the note printed when a resume changes the number of processes (the plan continues
    at the same global position; the global batch, and with it the scaled lr, changes)."""
    old_world = int(ckpt.get("world_size", world))
    if old_world == world:
        return ""
    return (f"resuming a {old_world}-process run on {world} processes: the plan continues at the same "
            f"global sample; the global batch changes from {old_world * batch_size} to {world * batch_size} "
            f"images per step (and the scaled lr with it)")


def check_resume(path: Path, ckpt: Mapping[str, Any], config: Mapping[str, Any], world: int) -> None:
    """ConfigError naming every differing key, or nothing."""
    diffs = resume_conflicts(ckpt, config, world)
    if diffs:
        raise ConfigError(f"cannot resume from {path}: {'; '.join(diffs)}. Start a new run with "
                          f"--force (or another --out), or resume with the checkpoint's settings")
