"""Checkpoints: atomic writes, RNG capture and the backbone export.

A training checkpoint is one ``torch.save`` file holding whatever state dicts the trainer
passes (model, optimizer, probe, grad scaler, the loader's mixture cursor, BCL table ...),
plus the RNG states of python, numpy, torch and CUDA, the config and the step. It is written
to ``NAME.tmp`` and moved into place with ``os.replace``, so a run killed at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from loaders.errors import ConfigError

__all__ = [
    "atomic_save", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "checkpoints_newest_first", "checkpoint_path", "save_backbone", "CheckpointError",
]

class CheckpointError(ConfigError):
    """A checkpoint file that does not load; the message names it."""


_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to ``path.tmp`` then ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def rng_state() -> Dict[str, Any]:
    """RNG states of python, numpy (legacy global), torch CPU and every CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Union[str, Path], step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def save_checkpoint(run_dir: Union[str, Path], step: int, state: Dict[str, Any], *,
                    keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXXX.pt`` atomically (adds RNG states and step),
    point ``last.pt`` at it and keep only the newest ``keep`` step files."""
    state = dict(state)
    state["step"] = int(step)
    state["rng"] = rng_state()
    path = atomic_save(state, checkpoint_path(run_dir, step))
    last = Path(run_dir) / "checkpoints" / "last.txt"
    tmp = last.with_name("last.txt.tmp")
    tmp.write_text(path.name + "\n")
    os.replace(tmp, last)
    if keep > 0:
        old = sorted(_step_files(Path(run_dir) / "checkpoints"))[:-keep]
        for _, p in old:
            p.unlink(missing_ok=True)
    return path


def _step_files(folder: Path):
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return out


def latest_checkpoint(run_dir: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint of a run directory, or None."""
    files = sorted(_step_files(Path(run_dir) / "checkpoints"))
    return files[-1][1] if files else None


def checkpoints_newest_first(run_dir: Union[str, Path]) -> List[Path]:
    """The run directory's step checkpoints, newest first."""
    return [p for _, p in sorted(_step_files(Path(run_dir) / "checkpoints"), reverse=True)]


def load_checkpoint(path: Union[str, Path], *, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (RNG states are not applied here)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # weights_only=False: the file holds numpy RNG state and the config dict (our own files)
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torn copy, truncated download, not a checkpoint at all
        raise CheckpointError(f"checkpoint {path} does not load ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]})") from e
    if not isinstance(obj, dict) or "step" not in obj:
        raise CheckpointError(f"checkpoint {path} is not a fastssl training checkpoint (no 'step')")
    return obj


def save_backbone(backbone: torch.nn.Module, path: Union[str, Path], *,
                  meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write the backbone's plain ``state_dict`` (``fastssl.models.export_backbone``) atomically.

    Loadable without fastssl; ``meta`` (architecture name, width, feature dim) goes to a sibling
    ``.json`` file.
    """
    from .models import export_backbone
    path = atomic_save(export_backbone(backbone), path)
    if meta is not None:
        import json
        side = Path(path).with_suffix(".json")
        side.write_text(json.dumps(meta, indent=2))
    return path
