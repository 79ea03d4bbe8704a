"""The run directory's policy: which checkpoint a resume starts from, what a fresh run may
overwrite, and the per-rank sample-id log.

Layout: ``config.yaml``, ``metrics.jsonl``/``metrics.csv``/``metrics.png``, ``tb/``
(TensorBoard), ``wandb/`` (``log.wandb``), ``checkpoints/step_XXXXXXXX.pt`` (the newest
``train.keep_checkpoints``), ``backbone.pt`` (+ ``.json``), ``eval.json``; with ``log.indices``
also ``indices_rank{r}.jsonl`` (the sample ids and loss of every micro-step).

A directory that already holds a run is never overwritten silently: a new run there needs
``--resume`` (continue it) or ``--force`` (start over; the old run's files are removed).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

from loaders.errors import ConfigError

from .checkpoint import latest_checkpoint

__all__ = ["RUN_FILES", "existing_run_files", "resume_target", "check_fresh", "clear_run",
           "open_indices_log"]

#: what a run writes into its directory (removed by --force)
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "metrics.png", "tb", "wandb", "checkpoints",
             "backbone.pt", "backbone.json", "eval.json")


def existing_run_files(run_dir: Path) -> List[str]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    found += sorted(p.name for p in run_dir.glob("indices_rank*.jsonl"))
    return found


def resume_target(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: ``None`` (fresh), ``"auto"`` (the run directory's newest,
    or None when it has none) or a path, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"train.resume: checkpoint {path} does not exist")
    return path


def check_fresh(run_dir: Path, *, resume: Optional[str], force: bool) -> None:
    """A fresh run (nothing to resume from) may not write over an earlier run's files unless
    ``--force`` is given, or ``--resume auto`` found no checkpoint to continue from."""
    found = existing_run_files(run_dir)
    if found and not force and resume != "auto":
        raise ConfigError(f"run directory {run_dir} already holds a run ({', '.join(found[:4])}"
                          f"{', ...' if len(found) > 4 else ''}): continue it with --resume auto, "
                          f"start over with --force, or choose another --out")


def clear_run(run_dir: Path) -> int:
    """Remove an earlier run's files (a fresh run under --force or --resume auto without a
    checkpoint); returns how many entries were removed."""
    n = 0
    for name in existing_run_files(run_dir):
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        n += 1
    return n


def _line_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def open_indices_log(run_dir: Path, rank: int, resume_step: Optional[int]):
    """Append handle of ``indices_rank{rank}.jsonl``; on resume the killed run's lines after the
    checkpoint's step are dropped first."""
    path = Path(run_dir) / f"indices_rank{rank}.jsonl"
    if resume_step is not None and path.exists():
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and _line_step(ln) is not None and _line_step(ln) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in keep))
    elif resume_step is None and path.exists():
        path.unlink()
    return open(path, "a", buffering=1)
