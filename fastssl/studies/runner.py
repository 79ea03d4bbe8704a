"""One sweep point: ``fastssl.trainer.train`` on the point's run directory with ``resume=auto``.

:func:`run_point` is what every launcher runs (in a subprocess of the sweep runner, in a
submitit job, or in the runner's own process): it reads ``point.json`` (config path and
overrides), appends a ``start`` line to ``attempts.jsonl`` (pid, host, the checkpoint step it
resumes from), trains (an unfinished run continues from its newest checkpoint; a finished one
answers "nothing to do"), and appends an ``end`` line (status ``done`` / ``failed`` with a
one-line error, wall seconds). It never raises for a failed run: a bad override (ConfigError),
missing data (DataError), a diverged loss or any other exception becomes ``failed``.

``python -m fastssl.studies.runner POINT_DIR`` runs it as a process: exit 0 when done, 1 when
failed, 130 when interrupted.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .manifest import POINT_FILE, append_attempt, now

__all__ = ["run_point", "run_point_job", "one_line", "newest_checkpoint_step", "main"]


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line (ConfigError/DataError: just the message, it names the key)."""
    msg = " ".join(str(e).split())
    name = type(e).__name__
    return msg if name in ("ConfigError", "DataError") and msg else f"{name}: {msg}" if msg else name


def newest_checkpoint_step(point_dir: Path) -> Optional[int]:
    """The step of the newest ``checkpoints/step_*.pt`` (the one ``resume=auto`` starts from)."""
    steps = []
    for p in (Path(point_dir) / "checkpoints").glob("step_*.pt"):
        m = re.fullmatch(r"step_(\d+)\.pt", p.name)
        if m:
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


def run_point(point_dir) -> Dict[str, Any]:
    """Train (or resume, or find complete) the point in ``point_dir``; returns its ``end`` event."""
    from .. import trainer
    from ..config import load_config

    point_dir = Path(point_dir)
    spec = json.loads((point_dir / POINT_FILE).read_text())
    start = {"event": "start", "pid": os.getpid(), "host": socket.gethostname(), "time": now(),
             "resume_step": newest_checkpoint_step(point_dir)}
    append_attempt(point_dir, start)
    print(f"fastssl sweep: point {spec['name']} (pid {os.getpid()}): {' '.join(spec['overrides']) or '(no overrides)'}"
          + (f", resuming from step {start['resume_step']}" if start["resume_step"] else ""), file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    end: Dict[str, Any] = {"event": "end", "pid": os.getpid(), "status": "done", "error": None, "step": None}
    try:
        cfg = load_config(spec["config"], list(spec["overrides"]) + ["train.resume=auto"])
        result = trainer.train(cfg, out=str(point_dir))
        if result is None:
            end.update(status="failed", error="the trainer returned no result")
        else:
            end["step"] = int(result.step)
    except KeyboardInterrupt:
        end.update(status="interrupted", error="interrupted", time=now(), wall_s=time.perf_counter() - t0)
        append_attempt(point_dir, end)
        raise
    except Exception as e:  # noqa: BLE001 - every failure of one point is recorded, the sweep goes on
        end.update(status="failed", error=one_line(e))
        print(f"fastssl sweep: point {spec['name']} failed: {end['error']}", file=sys.stderr, flush=True)
    end.update(time=now(), wall_s=time.perf_counter() - t0)
    append_attempt(point_dir, end)
    return end


def run_point_job(point_dir: str) -> Dict[str, Any]:
    """The function a submitit job runs (a module-level function: pickled by reference)."""
    return run_point(point_dir)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fastssl.studies.runner POINT_DIR", file=sys.stderr)
        return 2
    try:
        end = run_point(argv[0])
    except KeyboardInterrupt:
        return 130
    return 0 if end["status"] == "done" else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
