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
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from loaders.errors import ConfigError

from .checkpoint import CheckpointError, checkpoints_newest_first, load_checkpoint

__all__ = ["RUN_FILES", "existing_run_files", "load_resume", "check_fresh", "clear_run", "run_is_complete",
           "open_indices_log"]

#: what a run writes into its directory (removed by --force)
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "metrics.png", "tb", "wandb", "checkpoints",
             "backbone.pt", "backbone.json", "eval.json", "eval_cli.json")


def existing_run_files(run_dir: Path) -> List[str]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    found += sorted(p.name for p in run_dir.glob("indices_rank*.jsonl"))
    return found


def load_resume(resume: Optional[str], run_dir: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """``(path, checkpoint)`` to resume from, or ``(None, None)`` for a fresh run.

    ``resume``: None (fresh), a path (it must exist and load: else a one-line error naming it)
    or ``"auto"``: the run directory's newest checkpoint that loads; an unreadable newer one (a
    torn copy) is named once on stderr and passed over.
    """
    if not resume:
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"train.resume: checkpoint {path} does not exist")
        return path, load_checkpoint(path)
    for path in checkpoints_newest_first(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            print(f"fastssl: {e}; trying the previous checkpoint", file=sys.stderr)
    return None, None


def check_fresh(run_dir: Path, *, resume: Optional[str], force: bool) -> None:
    """A fresh run (nothing to resume from) may not write over an earlier run's files unless
    ``--force`` is given, or ``--resume auto`` found no checkpoint to continue from."""
    found = existing_run_files(run_dir)
    if found and not force and resume != "auto":
        raise ConfigError(f"run directory {run_dir} already holds a run ({', '.join(found[:4])}"
                          f"{', ...' if len(found) > 4 else ''}): continue it with --resume auto, "
                          f"start over with --force, or choose another --out")


def run_is_complete(run_dir: Path, *, eval_enabled: bool) -> bool:
    """The run's last steps are done and its outputs written: ``backbone.pt`` and, when the run
    evaluates, ``eval.json`` (written last)."""
    run_dir = Path(run_dir)
    return (run_dir / "backbone.pt").is_file() and (not eval_enabled or (run_dir / "eval.json").is_file())


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
