"""``fastssl sweep``: a grid of config overrides, one run directory per point, a manifest.

:func:`plan_sweep` turns ``key=v1,v2,...`` axes into points (:mod:`fastssl.studies.grid`);
:func:`run_sweep` (also used by the studies) writes each point's ``point.json``, merges the points
into ``sweep.json`` (:mod:`fastssl.studies.manifest`), checks every point's config (a bad
override marks that point failed without starting it), runs the points that are not done with
the chosen launcher (:mod:`fastssl.studies.launchers`; each trains with ``train.resume=auto`` on
its run directory, so an interrupted point continues from its newest checkpoint and a finished
one is skipped), prints a summary and writes the report (:mod:`fastssl.studies.report`).

Exit status: 0 when every point of the command is done, 1 when some failed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from loaders.errors import ConfigError

from .grid import grid, point_name, varying_keys
from .launchers import LaunchOptions, launch, preflight
from .manifest import POINT_FILE, Manifest, SweepLock, append_attempt, now, pid_alive, write_json_atomic
from .runner import one_line

__all__ = ["plan_sweep", "run_sweep", "default_sweep_dir"]


def default_sweep_dir(config: str, kind: str = "sweep") -> Path:
    stem = Path(config).stem
    return Path("runs") / ("sweeps" if kind == "sweep" else "studies") / stem


def plan_sweep(axes: Sequence[str], *, zip_axes: bool = False) -> List[Dict[str, Any]]:
    """The points of ``axes`` (``key=v1,v2`` texts): ``[{"name", "overrides", "study": None}]``."""
    combos = grid(axes, zip_axes=zip_axes)
    varying = varying_keys(combos)
    return [{"name": point_name(i, ov, varying), "overrides": ov, "study": None} for i, ov in enumerate(combos)]


def _write_point_files(manifest: Manifest, points: Sequence[Dict[str, Any]], config: str, kind: str) -> List[str]:
    """Each point's directory and ``point.json`` (its study values merged over earlier ones)."""
    names = []
    for pt in points:
        name = manifest.find(pt["overrides"])["name"]
        pdir = manifest.dir / name
        pdir.mkdir(parents=True, exist_ok=True)
        path = pdir / POINT_FILE
        old = json.loads(path.read_text()) if path.is_file() else {}
        study = {**(old.get("study") or {}), **(pt.get("study") or {})}
        write_json_atomic(path, {"name": name, "kind": kind, "config": config, "overrides": list(pt["overrides"]),
                                 "study": study or None, "created": old.get("created") or now()})
        names.append(name)
    return names


def _todo(manifest: Manifest, names: Sequence[str]) -> List[str]:
    """Points of this command that are not done (a done point whose backbone.pt vanished reruns)."""
    out = []
    for name in names:
        p = manifest.point(name)
        if p["state"] == "done" and (manifest.dir / name / "backbone.pt").is_file():
            continue
        if p["state"] == "running" and pid_alive(p["pid"], p["host"]):
            raise ConfigError(f"point {name} is still running (pid {p['pid']} on {p['host']}): wait for it or stop it")
        out.append(name)
    return out


def _prevalidate(manifest: Manifest, names: Sequence[str], config: str) -> List[str]:
    """Points whose config composes and type-checks; the others are marked failed (not started)."""
    from ..config import load_config

    ok = []
    for name in names:
        p = manifest.point(name)
        try:
            load_config(config, list(p["overrides"]) + ["train.resume=auto"])
        except ConfigError as e:
            err = one_line(e)
            append_attempt(manifest.dir / name, {"event": "end", "status": "failed", "error": err, "time": now(),
                                                 "by": "runner (config check)"})
            manifest.update(name, state="failed", error=err, finished=now())
            print(f"fastssl sweep: point {name}: failed (config): {err}", file=sys.stderr, flush=True)
            continue
        ok.append(name)
    return ok


def _no_repeated_points(points: Sequence[Dict[str, Any]]) -> None:
    seen = set()
    for pt in points:
        key = tuple(pt["overrides"])
        if key in seen:
            raise ConfigError(f"two points have the same overrides ({' '.join(key) or 'none'}): "
                              f"drop the repeated value")
        seen.add(key)


def _summary(manifest: Manifest, names: Sequence[str]) -> str:
    lines = []
    for name in names:
        p = manifest.point(name)
        wall = f"{p['wall_s']:.1f} s" if p["wall_s"] is not None else "-"
        lines.append(f"  {p['state']:<8} {wall:>9}  {name}" + (f"  ({p['error']})" if p["error"] else ""))
    return "\n".join(lines)


def run_sweep(sweep_dir, config: str, points: Sequence[Dict[str, Any]], *, kind: str = "sweep",
              study: Optional[Dict[str, Any]] = None, launch_opts: Optional[LaunchOptions] = None,
              report: bool = True) -> int:
    """Run (or continue) the sweep of ``points`` on ``config`` in ``sweep_dir``; 0 if all are done."""
    config_path = Path(config)
    if not config_path.is_file():
        raise ConfigError(f"config file {config} does not exist")
    config = str(config_path.resolve())
    sweep_dir = Path(sweep_dir)
    _no_repeated_points(points)
    opts = launch_opts or LaunchOptions()
    preflight(opts)
    with SweepLock(sweep_dir):
        manifest = Manifest.open(sweep_dir, config=config, kind=kind, points=points, study=study)
        names = _write_point_files(manifest, points, config, kind)
        todo = _todo(manifest, names)
        done_before = len(names) - len(todo)
        print(f"fastssl sweep: {sweep_dir}: {len(names)} point(s), {done_before} done, {len(todo)} to run "
              f"({opts.launcher})", file=sys.stderr, flush=True)
        runnable = _prevalidate(manifest, todo, config)
        if runnable:
            launch(manifest, runnable, opts)
        print(f"fastssl sweep: {sweep_dir}:\n{_summary(manifest, names)}", file=sys.stderr, flush=True)
    if report:
        from .report import write_report
        write_report(sweep_dir)
    failed = [n for n in names if manifest.point(n)["state"] != "done"]
    return 0 if not failed else 1
