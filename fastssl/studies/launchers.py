"""How a sweep's points run: ``serial`` (default), ``local-jobs``, ``slurm`` or ``inline``.

* ``serial`` -- one point after another, each in its own Python process
  (``python -m fastssl.studies.runner POINT_DIR``), its output teed to ``POINT_DIR/log.txt`` and
  to this terminal. A crash of one point (even a segfault or an out-of-memory kill) does not end
  the sweep, and the point process dies with the runner (Linux ``PR_SET_PDEATHSIG``), so a
  killed runner leaves no orphan training behind and a re-run resumes the point from its newest
  checkpoint.
* ``local-jobs`` -- each point a job of ``submitit.LocalExecutor`` (a separate process per
  point, ``--parallel`` at a time, logs under ``SWEEP_DIR/.submitit/<job id>/``). Jobs see no GPU
  unless ``--gpus-per-job`` is given (submitit's local executor sets ``CUDA_VISIBLE_DEVICES``);
  concurrent jobs get disjoint GPUs.
* ``slurm`` -- every point a task of one job array of ``submitit.AutoExecutor(cluster="slurm")``
  with the ``--slurm-*`` settings; the runner waits for them. Re-running while the array's
  tasks are still queued or running re-attaches to them instead of submitting again.
* ``inline`` -- in the runner's own process (debugging: no isolation, a crash ends the sweep).

Each point's state goes through ``pending -> running -> done | failed`` in the manifest; the
outcome is read from the point's ``attempts.jsonl`` (written by :func:`runner.run_point`), so a
process that died without writing its ``end`` line is ``failed`` with its exit status.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from loaders.errors import ConfigError

from ..metrics_log import read_metrics
from .manifest import LOG_FILE, Manifest, now, read_attempts
from .runner import one_line, run_point, run_point_job

__all__ = ["LaunchOptions", "LAUNCHERS", "launch", "preflight", "finish_point"]

LAUNCHERS = ("serial", "local-jobs", "slurm", "inline")


@dataclass
class LaunchOptions:
    launcher: str = "serial"
    #: local-jobs: points running at the same time
    parallel: int = 1
    #: local-jobs / slurm: a job's time limit in minutes (slurm: --slurm-time)
    timeout_min: int = 7 * 24 * 60
    #: local-jobs: GPUs per job (None: 1 when CUDA is available, else 0)
    gpus_per_job: Optional[int] = None
    #: slurm settings: partition, gpus, cpus, mem_gb, account, qos, constraint, array_parallelism
    slurm: Dict[str, Any] = field(default_factory=dict)
    #: serial: write the points' output to their log.txt only
    quiet: bool = False
    #: seconds between polls of running jobs (local-jobs, slurm)
    poll_s: float = 1.0


def _say(msg: str) -> None:
    print(f"fastssl sweep: {msg}", file=sys.stderr, flush=True)


def finish_point(manifest: Manifest, name: str, *, fallback: str) -> Dict[str, Any]:
    """Set the point's state from its ``attempts.jsonl``: the ``end`` line of its last attempt
    (done / failed / interrupted -> pending), else failed with ``fallback`` (the process died)."""
    pdir = manifest.dir / name
    events = read_attempts(pdir)
    starts = [e for e in events if e.get("event") == "start"]
    last_end = events[-1] if events and events[-1].get("event") == "end" else None
    walls = [float(e["wall_s"]) for e in events if e.get("event") == "end" and e.get("wall_s") is not None]
    fields: Dict[str, Any] = {"attempts": len(starts), "finished": now(), "wall_s": sum(walls) if walls else None,
                              "pids": [e["pid"] for e in starts]}
    if starts:
        fields.update(pid=starts[-1]["pid"], host=starts[-1].get("host"))
    if last_end is None:
        fields.update(state="failed", error=fallback)
    elif last_end["status"] == "done":
        fields.update(state="done", error=None)
    elif last_end["status"] == "interrupted":
        fields.update(state="pending", error="interrupted")
    else:
        fields.update(state="failed", error=last_end.get("error") or fallback)
    p = manifest.update(name, **fields)
    tail = f": {p['error']}" if p["state"] == "failed" else ""
    wall = f" in {p['wall_s']:.1f} s" if p["wall_s"] is not None and p["state"] == "done" else ""
    _say(f"point {name}: {p['state']}{wall}{tail}")
    return p


def _start(manifest: Manifest, name: str, **fields) -> None:
    manifest.update(name, state="running", started=now(), finished=None, error=None, **fields)


# ------------------------------------------------------------------------------ serial
def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: SIGKILL this process when the runner dies (its parent thread exits)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else ""


def _tee(fd: int, log, quiet: bool) -> None:
    out = None if quiet else getattr(sys.stderr, "buffer", None)
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        log.write(chunk)
        log.flush()
        if out is not None:
            out.write(chunk)
            out.flush()


def _serial(manifest: Manifest, names: List[str], opts: LaunchOptions) -> None:
    for i, name in enumerate(names):
        pdir = manifest.dir / name
        log_path = pdir / LOG_FILE
        _say(f"point {i + 1}/{len(names)} {name}: starting (log {log_path})")
        _start(manifest, name, log=str(log_path), host=socket.gethostname())
        cmd = [sys.executable, "-m", "fastssl.studies.runner", str(pdir)]
        with open(log_path, "ab") as log:
            log.write(f"\n===== {now()} {' '.join(cmd)}\n".encode())
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            pids = list(manifest.point(name)["pids"]) + [proc.pid]
            manifest.update(name, pid=proc.pid, pids=pids)
            try:
                _tee(proc.stdout.fileno(), log, opts.quiet)
                rc = proc.wait()
            except KeyboardInterrupt:
                _stop(proc)
                finish_point(manifest, name, fallback="interrupted")
                raise
            finally:
                proc.stdout.close()
        finish_point(manifest, name, fallback=f"the point's process ended without a result ({_exit_text(rc)})"
                     + (f"; last output: {_last_line(log_path)}" if _last_line(log_path) else ""))


def _stop(proc: subprocess.Popen) -> None:
    """The child got the same Ctrl-C (same process group): give it a moment to write its end line."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ inline
def _inline(manifest: Manifest, names: List[str], opts: LaunchOptions) -> None:
    for i, name in enumerate(names):
        _say(f"point {i + 1}/{len(names)} {name}: starting (in this process)")
        _start(manifest, name, pid=os.getpid(), host=socket.gethostname())
        try:
            run_point(manifest.dir / name)
        finally:
            finish_point(manifest, name, fallback="the point ended without a result")


# ------------------------------------------------------------------------------ submitit
def _submitit():
    try:
        import submitit
    except ImportError as e:
        raise ConfigError(f"--launcher local-jobs/slurm needs submitit: pip install 'fastssl[sweep]' ({e})") from e
    return submitit


def _gpu_slots(opts: LaunchOptions) -> List[List[int]]:
    """Disjoint GPU lists per concurrent local job ([] each without GPUs)."""
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    per = opts.gpus_per_job if opts.gpus_per_job is not None else (1 if count else 0)
    if per == 0:
        return [[] for _ in range(opts.parallel)]
    if per * opts.parallel > count:
        raise ConfigError(f"--gpus-per-job {per} x --parallel {opts.parallel} needs {per * opts.parallel} GPUs, "
                          f"{count} visible")
    return [list(range(k * per, (k + 1) * per)) for k in range(opts.parallel)]


def _local_jobs(manifest: Manifest, names: List[str], opts: LaunchOptions) -> None:
    submitit = _submitit()
    executor = submitit.LocalExecutor(folder=str(manifest.dir / ".submitit" / "%j"))
    free = _gpu_slots(opts)
    pending, running, beat = list(names), {}, _Heartbeat()
    try:
        while pending or running:
            while pending and free:
                name, gpus = pending.pop(0), free.pop(0)
                executor.update_parameters(timeout_min=opts.timeout_min, gpus_per_node=len(gpus),
                                           visible_gpus=gpus)
                job = executor.submit(run_point_job, str((manifest.dir / name).resolve()))
                _start(manifest, name, job_id=str(job.job_id), log=str(job.paths.stderr))
                _say(f"point {name}: submitted as local job {job.job_id}")
                running[name] = (job, gpus)
            time.sleep(opts.poll_s)
            beat(manifest, running, len(pending))
            for name, (job, gpus) in list(running.items()):
                _note_pid(manifest, name)
                if job.done():
                    _collect(manifest, name, job)
                    del running[name]
                    free.append(gpus)
    except KeyboardInterrupt:
        _cancel(manifest, running)
        raise


class _Heartbeat:
    """Every ``every`` seconds one line: the running points and their last logged step."""

    def __init__(self, every: float = 60.0):
        self.every, self.last = every, time.monotonic()

    def __call__(self, manifest: Manifest, running, pending: int) -> None:
        if time.monotonic() - self.last < self.every:
            return
        self.last = time.monotonic()
        parts = []
        for name in running:
            recs = read_metrics(manifest.dir / name / "metrics.jsonl")
            parts.append(f"{name} at step {recs[-1].get('step', 0) if recs else 0}")
        c = manifest.counts()
        _say(f"{c['done']} done, {c['failed']} failed, {len(running)} running, {pending} waiting: " + "; ".join(parts))


def _note_pid(manifest: Manifest, name: str) -> None:
    """Copy the pid the job's process wrote into attempts.jsonl into the manifest (once)."""
    starts = [e for e in read_attempts(manifest.dir / name) if e.get("event") == "start"]
    p = manifest.point(name)
    if starts and starts[-1]["pid"] != p["pid"]:
        manifest.update(name, pid=starts[-1]["pid"], host=starts[-1].get("host"),
                        pids=[e["pid"] for e in starts])


def _collect(manifest: Manifest, name: str, job) -> None:
    try:
        job.result()
        fallback = "the job ended without a result"
    except Exception as e:  # noqa: BLE001 - submitit's FailedJobError / UncompletedJobError
        fallback = f"job {job.job_id}: {one_line(e)}"[:500]
    finish_point(manifest, name, fallback=fallback)


def _cancel(manifest: Manifest, running: Dict[str, Any]) -> None:
    for name, (job, _) in running.items():
        try:
            job.cancel(check=False)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        finish_point(manifest, name, fallback="interrupted: job cancelled")


def _slurm_executor(manifest: Manifest, opts: LaunchOptions):
    submitit = _submitit()
    s = opts.slurm
    try:
        executor = submitit.AutoExecutor(folder=str(manifest.dir / ".submitit" / "%j"), cluster="slurm")
    except Exception as e:  # noqa: BLE001 - sbatch missing, etc.
        raise ConfigError(f"--launcher slurm: {one_line(e)}") from e
    params = {"timeout_min": int(s.get("time") or opts.timeout_min), "gpus_per_node": s.get("gpus"),
              "cpus_per_task": s.get("cpus"), "mem_gb": s.get("mem_gb"), "slurm_partition": s.get("partition"),
              "slurm_account": s.get("account"), "slurm_qos": s.get("qos"), "slurm_constraint": s.get("constraint"),
              "slurm_array_parallelism": s.get("array_parallelism"), "name": f"fastssl-{manifest.dir.name}",
              "tasks_per_node": 1, "nodes": 1}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _slurm(manifest: Manifest, names: List[str], opts: LaunchOptions) -> None:
    submitit = _submitit()
    running, fresh = {}, []
    for name in names:   # tasks of an earlier runner still queued or running: wait for them instead
        p = manifest.point(name)
        if p["state"] == "running" and p["job_id"]:
            job = submitit.SlurmJob(folder=str(manifest.dir / ".submitit" / "%j"), job_id=p["job_id"])
            if not job.done():
                _say(f"point {name}: re-attached to slurm job {p['job_id']}")
                running[name] = (job, None)
                continue
        fresh.append(name)
    if fresh:
        executor = _slurm_executor(manifest, opts)
        with executor.batch():
            jobs = [executor.submit(run_point_job, str((manifest.dir / n).resolve())) for n in fresh]
        for name, job in zip(fresh, jobs):
            _start(manifest, name, job_id=str(job.job_id), log=str(job.paths.stderr))
            _say(f"point {name}: submitted as slurm job {job.job_id}")
            running[name] = (job, None)
    beat = _Heartbeat(300.0)
    try:
        while running:
            time.sleep(max(opts.poll_s, 10.0))
            beat(manifest, running, 0)
            for name, (job, _) in list(running.items()):
                _note_pid(manifest, name)
                if job.done():
                    _collect(manifest, name, job)
                    del running[name]
    except KeyboardInterrupt:
        _say("interrupted: the slurm jobs keep running; re-run the command to wait for them again")
        raise


def preflight(opts: LaunchOptions) -> None:
    """Refuse a launcher that cannot run here before anything is written (one line)."""
    if opts.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {opts.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if opts.parallel < 1:
        raise ConfigError(f"--parallel {opts.parallel}: must be >= 1")
    if opts.launcher in ("local-jobs", "slurm"):
        _submitit()
    if opts.launcher == "slurm":
        import shutil
        missing = [t for t in ("srun", "sbatch") if shutil.which(t) is None]
        if missing:
            raise ConfigError(f"--launcher slurm: {' and '.join(missing)} not found on PATH (not a slurm cluster?)")


def launch(manifest: Manifest, names: List[str], opts: LaunchOptions) -> None:
    preflight(opts)
    {"serial": _serial, "inline": _inline, "local-jobs": _local_jobs, "slurm": _slurm}[opts.launcher](
        manifest, names, opts)
