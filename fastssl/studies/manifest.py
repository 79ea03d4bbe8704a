"""The sweep directory: ``sweep.json`` (the manifest), one run directory per point, a lock.

Layout::

    SWEEP_DIR/
      sweep.json            the manifest (rewritten atomically after every change)
      sweep.lock            pid + host of the runner working on it (one runner at a time)
      report.{csv,md,json}  + plots (fastssl report)
      p000_.../             one run directory per point: the trainer's files plus
        point.json          the point's spec: config, overrides, study values (written once)
        attempts.jsonl      one line per attempt start and end (pid, host, times, status, error)
        log.txt             the point's stdout + stderr (serial launcher)

``sweep.json``::

    {"version": 1, "kind": "sweep" | "diversity" | "inflation",
     "config": "/abs/path/config.yaml", "created": ISO, "updated": ISO,
     "study": {...},                        # the study's parameters and rules (studies only)
     "points": [{"name": "p000_lr=0.1", "overrides": ["optim.lr=0.1", ...],
                 "state": "pending" | "running" | "done" | "failed", "error": null | "one line",
                 "pid": int | null, "pids": [...], "host": str | null, "job_id": str | null,
                 "attempts": int, "started": ISO | null, "finished": ISO | null,
                 "wall_s": float | null, "log": path | null}, ...]}

Points are matched by their override list: re-running a command with more values appends new
points (new indices) and keeps the finished ones. Everything the report needs is in the point
directories (``point.json``, ``attempts.jsonl``, ``metrics.jsonl``, ``eval.json``), so the
report is regenerated from them alone.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from loaders.errors import ConfigError

__all__ = ["Manifest", "SweepLock", "write_json_atomic", "read_attempts", "append_attempt", "now",
           "pid_alive", "POINT_FILE", "ATTEMPTS_FILE", "LOG_FILE", "MANIFEST", "STATES"]

MANIFEST = "sweep.json"
POINT_FILE = "point.json"
ATTEMPTS_FILE = "attempts.jsonl"
LOG_FILE = "log.txt"
STATES = ("pending", "running", "done", "failed")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json_atomic(path: Path, doc: Any) -> Path:
    """``doc`` as JSON in ``path``: written to a temporary file in the same folder, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_attempts(point_dir: Path) -> List[Dict[str, Any]]:
    """The point's attempt events (a torn last line from a kill is ignored)."""
    path = Path(point_dir) / ATTEMPTS_FILE
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def append_attempt(point_dir: Path, event: Dict[str, Any]) -> None:
    with open(Path(point_dir) / ATTEMPTS_FILE, "a") as fh:
        fh.write(json.dumps(event) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _new_point(name: str, overrides: Sequence[str]) -> Dict[str, Any]:
    return {"name": name, "overrides": list(overrides), "state": "pending", "error": None, "pid": None,
            "pids": [], "host": None, "job_id": None, "attempts": 0, "started": None, "finished": None,
            "wall_s": None, "log": None}


class Manifest:
    """``sweep.json`` of a sweep directory; :meth:`update` rewrites it atomically."""

    def __init__(self, sweep_dir: Path, doc: Dict[str, Any]):
        self.dir = Path(sweep_dir)
        self.path = self.dir / MANIFEST
        self.doc = doc

    @classmethod
    def open(cls, sweep_dir: Path, *, config: str, kind: str, points: Sequence[Dict[str, Any]],
             study: Optional[Dict[str, Any]] = None, create: bool = True) -> "Manifest":
        """The manifest with ``points`` (each ``{"overrides": [...], "name": optional, "spec":
        {...}}``) merged in: known points (same overrides) keep their state, new ones are appended.
        A manifest of another config or kind is refused (one line naming both)."""
        sweep_dir = Path(sweep_dir)
        path = sweep_dir / MANIFEST
        if path.is_file():
            doc = json.loads(path.read_text())
            for key, mine in (("config", config), ("kind", kind)):
                if doc.get(key) != mine:
                    raise ConfigError(f"sweep directory {sweep_dir} holds a sweep with {key} {doc.get(key)!r}, "
                                      f"not {mine!r}: choose another --out")
        else:
            doc = {"version": 1, "kind": kind, "config": config, "created": now(), "updated": now(),
                   "study": None, "points": []}
        if study is not None:
            doc["study"] = study
        known = {tuple(p["overrides"]): p for p in doc["points"]}
        used = {p["name"] for p in doc["points"]}
        for i, pt in enumerate(points):
            if tuple(pt["overrides"]) in known:
                continue
            name = pt["name"]
            if name in used:   # an earlier sweep in this folder took the name: next free index
                name = _free_name(name, used, len(doc["points"]))
            used.add(name)
            doc["points"].append(_new_point(name, pt["overrides"]))
        m = cls(sweep_dir, doc)
        if create:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            m.write()
        return m

    def point(self, name: str) -> Dict[str, Any]:
        for p in self.doc["points"]:
            if p["name"] == name:
                return p
        raise KeyError(name)

    def find(self, overrides: Sequence[str]) -> Dict[str, Any]:
        for p in self.doc["points"]:
            if p["overrides"] == list(overrides):
                return p
        raise KeyError(tuple(overrides))

    def update(self, name: str, **fields) -> Dict[str, Any]:
        p = self.point(name)
        bad = [k for k in fields if k not in p]
        if bad:
            raise KeyError(f"unknown manifest fields {bad}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"state {fields['state']!r} is not one of {STATES}")
        p.update(fields)
        self.write()
        return p

    def write(self) -> None:
        self.doc["updated"] = now()
        write_json_atomic(self.path, self.doc)

    def counts(self) -> Dict[str, int]:
        out = {s: 0 for s in STATES}
        for p in self.doc["points"]:
            out[p["state"]] += 1
        return out


def _free_name(name: str, used: set, start: int) -> str:
    tail = name.split("_", 1)[1] if "_" in name else ""
    i = start
    while True:
        cand = f"p{i:03d}" + (f"_{tail}" if tail else "")
        if cand not in used:
            return cand
        i += 1


def pid_alive(pid: Optional[int], host: Optional[str]) -> bool:
    """Whether ``pid`` runs on this host (a process of another host counts as not known: False)."""
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file():   # a recycled pid of another program is not ours
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return True
        return "python" in text or "fastssl" in text or "submitit" in text
    return True


class SweepLock:
    """``sweep.lock`` (pid and host of the runner): a second runner on the same directory is
    refused while the first one lives; the lock of a dead runner (SIGKILL) is taken over."""

    def __init__(self, sweep_dir: Path):
        self.path = Path(sweep_dir) / "sweep.lock"
        self.held = False

    def acquire(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError):
                    other = {}
                if pid_alive(other.get("pid"), other.get("host")):
                    raise ConfigError(f"sweep directory {self.path.parent} is in use by another runner "
                                      f"(pid {other.get('pid')} on {other.get('host')}); wait for it or stop it")
                self.path.unlink(missing_ok=True)   # a dead runner's lock
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
            self.held = True
            return self
        raise ConfigError(f"could not take {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
