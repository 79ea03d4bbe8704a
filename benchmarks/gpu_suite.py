"""The GPU suite: every check that needs the lent GPU machine, prepared to run in ONE call.

On the device tool (one H200, 16 cores, Python 3.12, torch 2.11, no network; fastssl is run
from the checkout, never installed, since setup.py pins another torch)::

    make gpu-wheels                      # here, once: the wheels that machine lacks -> .whl/ (ignored)
    run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=540)
    # or, where `make` is there: run(command="make gpu-suite", carry=[".whl"], timeout_s=540)

The suite finishes in under 8 minutes there (``--total-budget``, default 470 s, set-up included;
part budgets in ``BUDGETS``: tests 75, augment 50, data 30, e2e 70 + 70 + 90, loader 60 s), so a
15-minute lease holds the machine's start, the run and the transfers. To rerun only some parts:
``bash benchmarks/gpu_suite.sh --parts e2e-224,loader`` (``--quick`` halves repeats, windows and
set sizes). The files come back under the reply's ``files_at``; copy the records into
``benchmarks/results/`` and commit them::

    python -m benchmarks.gpu_suite --collect <files_at>   # extracts records.tar.gz -> benchmarks/results/
    git add benchmarks/results/<the printed files>

Run as ``python -m benchmarks.gpu_suite [--out DIR] [--quick] [--device cuda|cpu] [--parts a,b]``.
``--out`` defaults to ``$OUT`` when set (the device tool's folder that comes back), else
``benchmarks/results/gpu-suite-<timestamp>``. Steps, in this order:

0. ``.whl/*.whl`` (those whose tags fit this Python) are installed with
   ``pip install --no-deps --target <tmp>``, which is prepended to the children's ``PYTHONPATH``;
   the GPU, driver, CUDA, torch/torchvision/Python and library versions are printed and
   written to ``env.json``;
1. ``tests``      -- ``pytest -q tests/gpu`` (junit xml, log; ``-n 4`` where pytest-xdist is there,
   ``--timeout 60`` per test where pytest-timeout is);
2. ``augment``    -- ``fastssl bench augment --sizes 32 224 --batch 256`` (engine vs kornia vs
   torchvision per sample);
3. ``data``       -- writes the benchmark sets the next parts read (cifar 2048, imagenet 512), so
   their budgets time the benchmarks, not the JPEG encoder;
4. ``e2e-32-resident``, ``e2e-32-torch`` -- ``fastssl bench e2e``, SimCLR ResNet-18 (CIFAR stem)
   at 32 px with ``--backend resident`` / ``--backend torch``; ``e2e-224`` -- ResNet-50 at 224 px
   (``--dataset imagenet --no-cifar-stem --workers 16``, torch backend); on CUDA with
   ``--mixed-precision bf16 --channels-last``. A flag ``fastssl bench e2e --help`` does not list
   is left out (and said so in the summary); without ``--backend`` the resident part is skipped;
5. ``loader``     -- ``fastssl bench loader --sets imagenet --modes feed --workers 16
   --backends torch --formats shards`` (224 px feed path; the decode-only ceiling beside it).

Each part is a child process in its own process group with its own time budget: over budget, the
whole group (DataLoader workers too) is killed, the part is marked ``timed out`` and the next
one runs; when the total budget is spent, the parts left are ``not run``. After every part its
records are added to ``records.tar.gz`` and the summary is rewritten, so a run cut short still
returns what finished. At the end ONE table is printed: part, status, seconds, headline numbers
(augment engine/kornia at 32 px, e2e real/model-only and model-only/plain-pytorch, loader feed
samples/s).

OUT layout (6 files, flat: the device tool returns at most 8 files of 16 MiB)::

    summary.md       the table (+ environment line), rewritten after every part
    summary.json     the same, machine-readable: {"env": ..., "parts": [{name, status, seconds,
                     headline, records, command, note}, ...]}
    env.json         GPU, driver, CUDA, versions, installed wheels, the e2e flags found
    logs.txt         every child's output, one header per part
    junit.xml        pytest's report of tests/gpu
    records.tar.gz   <part>/<record>.json + .png for every part that wrote one

``--device cpu --quick`` is the CPU dry run (tiny sets, 0.2 s windows, one repeat, batch 16,
ResNet-18 width 8 for both e2e parts, the GPU hidden): every part end to end in about a minute
and a half on 2 cores; ``tests/test_gpu_suite.py`` runs it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WHEELS = ROOT / ".whl"

#: the files the suite leaves in OUT (see the module doc)
LAYOUT = ("summary.md", "summary.json", "env.json", "logs.txt", "junit.xml", "records.tar.gz")
PART_NAMES = ("tests", "augment", "data", "e2e-32-resident", "e2e-32-torch", "e2e-224", "loader")
#: seconds each part may run (full run on the GPU machine); their sum + start-up stays under 8 min
BUDGETS = {"tests": 75, "augment": 50, "data": 30, "e2e-32-resident": 70, "e2e-32-torch": 70, "e2e-224": 90,
           "loader": 60}
TOTAL_BUDGET = 470.0
#: flags of `fastssl bench e2e` the suite uses when that command lists them
E2E_OPTIONAL = ("--backend", "--mixed-precision", "--channels-last")

__all__ = ["Part", "Result", "plan", "run_part", "run_suite", "e2e_flags", "headline", "main"]


# ----------------------------------------------------------------------------- parts
@dataclass
class Part:
    """One child process: ``cmd`` run from the repository root, killed after ``budget`` seconds.
    ``records``: the folder it writes its records into (None: none). ``skip``: why it is not run."""

    name: str
    cmd: List[str]
    budget: float
    records: Optional[Path] = None
    skip: Optional[str] = None
    note: str = ""


@dataclass
class Result:
    name: str
    status: str                    # ok | failed (rc N) | timed out | skipped | not run
    seconds: float = 0.0
    rc: Optional[int] = None
    command: str = ""
    note: str = ""
    records: List[str] = field(default_factory=list)
    headline: Dict[str, object] = field(default_factory=dict)

    @property
    def good(self) -> bool:
        return self.status == "ok" or self.status.startswith("skipped")


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; workers of the group may linger: take them down as well
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def run_part(part: Part, *, log: Path, env: Optional[Dict[str, str]] = None, cwd: Path = ROOT,
             echo: Callable[[str], None] = print) -> Result:
    """Run one part with its budget; its output is appended to ``log``."""
    command = " ".join(shlex.quote(c) for c in part.cmd)
    if part.skip:
        return Result(part.name, f"skipped: {part.skip}", command=command, note=part.note)
    if part.records is not None:
        part.records.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"\n===== {part.name} (budget {part.budget:.0f} s) {_now()}\n$ {command}\n")
        fh.flush()
        t0 = time.monotonic()
        # own process group (not a new session): the whole group is killed on timeout, and a
        # caller that kills our session still takes the children along
        proc = subprocess.Popen(part.cmd, cwd=str(cwd), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0)
        try:
            rc = proc.wait(timeout=max(0.1, part.budget))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = proc.returncode, True
        except BaseException:   # Ctrl-C, SIGTERM (SystemExit): the child's group is not ours to leave
            _kill_group(proc, grace=2.0)
            raise
        dt = time.monotonic() - t0
        if not timed_out:
            # workers left behind by a child that exited: never let them run into the next part
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        status = "timed out" if timed_out else ("ok" if rc == 0 else f"failed (rc {rc})")
        fh.write(f"===== {part.name}: {status} after {dt:.1f} s\n")
    res = Result(part.name, status, seconds=dt, rc=rc, command=command, note=part.note)
    if part.records is not None:
        res.records = sorted(str(p) for p in part.records.iterdir() if p.suffix in (".json", ".png"))
    if status != "ok":
        echo(f"[gpu-suite] {part.name}: {status}; the end of its log:")
        for line in _tail(log, 15):
            echo(f"    {line}")
    return res


def _tail(path: Path, n: int) -> List[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    lines = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]
    return lines[-n:]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- e2e flags
def e2e_flags(py: str, env: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    """Which optional flags ``fastssl bench e2e --help`` lists (the command evolves concurrently)."""
    try:
        out = subprocess.run([py, "-m", "fastssl", "bench", "e2e", "--help"], cwd=str(ROOT), env=env,
                             capture_output=True, text=True, timeout=120)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": repr(e), **{f: False for f in E2E_OPTIONAL}, "resident": False}
    found: Dict[str, object] = {f: bool(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
                                for f in E2E_OPTIONAL}
    found["resident"] = bool(found["--backend"]) and "resident" in text
    return found


# ----------------------------------------------------------------------------- plan
def _importable(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _settings(device: str, quick: bool) -> Dict[str, object]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device == "cpu":
        return {"aug_batch": 16, "aug_repeats": 1, "n_cifar": 64, "n_imagenet": 64, "e2e_repeats": 1,
                "e2e_window": 0.2, "e2e_warmup": 1, "e2e_batch": 16, "e2e_width": 8, "rn50": False,
                "workers": max(1, min(2, cpus)), "loader_repeats": 1, "loader_window": 0.2, "loader_batch": 16,
                "stage_images": 32, "budget_scale": 2.0, "total": 600.0}
    s = {"aug_batch": 256, "aug_repeats": 3, "n_cifar": 2048, "n_imagenet": 512, "e2e_repeats": 2,
         "e2e_window": 3.0, "e2e_warmup": 5, "e2e_batch": None, "e2e_width": None, "rn50": True,
         "workers": 16, "loader_repeats": 3, "loader_window": 2.0, "loader_batch": None, "stage_images": 256,
         "budget_scale": 1.0, "total": TOTAL_BUDGET}
    if quick:   # halve repeats, windows and set sizes
        s.update(aug_repeats=2, n_cifar=1024, n_imagenet=256, e2e_repeats=1, e2e_window=1.5, loader_repeats=2,
                 loader_window=1.0, stage_images=128, budget_scale=0.6)
    return s


def plan(*, out: Path, work: Path, device: str = "cuda", quick: bool = False, py: str = sys.executable,
         flags: Optional[Dict[str, object]] = None, cache: Optional[str] = None,
         only: Optional[Sequence[str]] = None) -> List[Part]:
    """The suite's parts, in order, for ``device`` (``cuda`` or ``cpu``)."""
    s = _settings(device, quick)
    flags = flags if flags is not None else {f: True for f in E2E_OPTIONAL} | {"resident": True}
    cache_args = ["--cache", str(cache)] if cache else []
    fb = [py, "-m", "fastssl", "bench"]

    def budget(name):
        return BUDGETS[name] * float(s["budget_scale"])

    pytest_args = []
    if _importable("pytest_timeout"):   # one hung test must not eat the part's budget
        pytest_args += ["--timeout", "60"]
    if device == "cuda" and _importable("xdist"):   # ~20 CUDA tests, most of them CPU-side set-up
        pytest_args += ["-n", "4"]
    parts = [
        Part("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, "tests/gpu",
                       f"--junitxml={out / 'junit.xml'}"], budget("tests")),
        Part("augment", fb + ["augment", "--sizes", "32", "224", "--batch", str(s["aug_batch"]),
                              "--repeats", str(s["aug_repeats"]), "--device", device,
                              "--out", str(work / "augment")], budget("augment"), records=work / "augment"),
        Part("data", [py, "-m", "benchmarks.gpu_suite", "--make-data",
                      f"cifar={s['n_cifar']},imagenet={s['n_imagenet']}", *cache_args], budget("data"),
             note=f"bench sets: cifar {s['n_cifar']}, imagenet {s['n_imagenet']} images"),
    ]

    def e2e(name, *, dataset, n, backbone, backend, cifar_stem):
        args = ["--method", "simclr", "--dataset", dataset, "--n", str(n), "--format", "shards",
                "--backbone", backbone, "--workers", str(s["workers"]), "--repeats", str(s["e2e_repeats"]),
                "--window", str(s["e2e_window"]), "--warmup", str(s["e2e_warmup"]), "--device", device]
        if not cifar_stem:
            args.append("--no-cifar-stem")
        if s["e2e_width"]:
            args += ["--width", str(s["e2e_width"])]
        if s["e2e_batch"]:
            args += ["--batch-size", str(s["e2e_batch"])]
        dropped, skip = [], None
        wanted = [("--backend", [backend])]
        if device == "cuda":
            wanted += [("--mixed-precision", ["bf16"]), ("--channels-last", [])]
        for flag, vals in wanted:
            if flags.get(flag):
                args += [flag, *vals]
            else:
                dropped.append(flag)
        if backend == "resident" and not flags.get("resident"):
            skip = "fastssl bench e2e has no --backend resident (yet)"
        note = f"left out (not in bench e2e --help): {' '.join(dropped)}" if dropped else ""
        return Part(name, fb + ["e2e", *args, *cache_args, "--out", str(work / name)], budget(name),
                    records=work / name, skip=skip, note=note)

    parts += [
        e2e("e2e-32-resident", dataset="cifar", n=s["n_cifar"], backbone="resnet18", backend="resident",
            cifar_stem=True),
        e2e("e2e-32-torch", dataset="cifar", n=s["n_cifar"], backbone="resnet18", backend="torch", cifar_stem=True),
        e2e("e2e-224", dataset="imagenet", n=s["n_imagenet"], backbone="resnet50" if s["rn50"] else "resnet18",
            backend="torch", cifar_stem=False),
    ]
    loader = ["--sets", "imagenet", "--n", str(s["n_imagenet"]), "--modes", "feed", "--workers", str(s["workers"]),
              "--backends", "torch", "--formats", "shards", "--baselines", "ceiling",
              "--repeats", str(s["loader_repeats"]), "--window", str(s["loader_window"]),
              "--stage-images", str(s["stage_images"])]
    if s["loader_batch"]:
        loader += ["--batch-size", str(s["loader_batch"])]
    parts.append(Part("loader", fb + ["loader", *loader, *cache_args, "--out", str(work / "loader")],
                      budget("loader"), records=work / "loader"))
    if only:
        unknown = sorted(set(only) - set(PART_NAMES))
        if unknown:
            raise SystemExit(f"unknown part(s) {unknown}; the parts are {', '.join(PART_NAMES)}")
        parts = [p for p in parts if p.name in only]
    return parts


# ----------------------------------------------------------------------------- headlines
def _records(res: Result) -> List[Dict]:
    out = []
    for p in res.records:
        if p.endswith(".json"):
            try:
                out.append(json.loads(Path(p).read_text()))
            except (OSError, json.JSONDecodeError):
                pass
    return out


def _median(v: Dict) -> Optional[float]:
    if not isinstance(v, dict):
        return None
    if v.get("median") is not None:
        return float(v["median"])
    vals = v.get("values") or []
    return float(sorted(vals)[len(vals) // 2]) if vals else None


def headline(name: str, res: Result, out: Path) -> Dict[str, object]:
    """The numbers the summary shows for one part (read from its records; empty when none)."""
    h: Dict[str, object] = {}
    if name == "tests":
        junit = out / "junit.xml"
        try:
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            h = {"passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
                 "failed": tot["failures"] + tot["errors"], "skipped": tot["skipped"]}
        except (OSError, ET.ParseError):
            pass
        return h
    for rec in _records(res):
        r = rec.get("results", {})
        if name == "augment":
            ratios = rec.get("config", {}).get("ratios", {})
            for k in ("engine/kornia@32px", "engine/torchvision@32px", "engine/kornia@224px"):
                if k in ratios:
                    h[k] = ratios[k]
            e = _median(r.get("engine@32px", {}))
            if e:
                h["engine@32px images/s"] = round(e)
        elif name.startswith("e2e"):
            model = _median(r.get("model-only", {}))
            real = next((_median(v) for k, v in r.items() if k.startswith("real")), None)
            plain = next((_median(v) for k, v in r.items() if k.startswith("plain")), None)
            if model:
                h["model-only samples/s"] = round(model, 1)
            if real:
                h["real samples/s"] = round(real, 1)
            if real and model:
                h["real/model-only"] = round(real / model, 3)
            if model and plain:
                h["model-only/plain-pytorch"] = round(model / plain, 3)
            errors = {k: v["error"][:120] for k, v in r.items() if isinstance(v, dict) and v.get("error")}
            if errors:
                h["errors"] = errors
        elif name == "loader":
            for k, v in r.items():
                m = _median(v)
                if m and "/feed/" in k and (k.endswith("/shards") or "ceiling" in k):
                    h[f"{k} samples/s"] = round(m, 1)
    return h


def _fmt_headline(h: Dict[str, object]) -> str:
    parts = []
    for k, v in h.items():
        if isinstance(v, float):
            v = f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        parts.append(f"{k} {v}")
    return "; ".join(parts)


def summary_table(results: Sequence[Result]) -> str:
    rows = ["| part | status | seconds | headline |", "|---|---|---:|---|"]
    for r in results:
        text = _fmt_headline(r.headline)
        if r.note:
            text = f"{text} ({r.note})" if text else r.note
        rows.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {text.replace('|', '/')} |")
    return "\n".join(rows)


def _env_line(env: Dict) -> str:
    v = env.get("versions", {})
    return (f"GPU {env.get('gpu') or 'none'} (driver {env.get('driver') or '-'}, CUDA {env.get('cuda_runtime') or '-'})"
            f"; torch {v.get('torch')}, torchvision {v.get('torchvision')}, Python {env.get('python')}"
            f"; {env.get('cpu_count')} CPUs")


def write_summary(out: Path, env: Dict, results: Sequence[Result], *, meta: Dict) -> str:
    table = summary_table(results)
    md = (f"# GPU suite {meta.get('started', '')}\n\n{_env_line(env)}\n\n"
          f"`{meta.get('command', '')}` ({meta.get('mode', '')})\n\n{table}\n")
    _atomic_write(out / "summary.md", md)
    doc = {"env": env, "meta": meta, "parts": [
        {"name": r.name, "status": r.status, "seconds": round(r.seconds, 2), "rc": r.rc, "headline": r.headline,
         "records": [f"{r.name}/{Path(p).name}" for p in r.records], "command": r.command, "note": r.note}
        for r in results]}
    _atomic_write(out / "summary.json", json.dumps(doc, indent=2, default=str))
    return table


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_records_tar(out: Path, results: Sequence[Result]) -> None:
    """Every record so far into ``records.tar.gz`` as ``<part>/<file>`` (rewritten atomically)."""
    files = [(r.name, Path(p)) for r in results for p in r.records if Path(p).exists()]
    if not files:
        return
    tmp = out / ".records.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for part, p in files:
            tar.add(str(p), arcname=f"{part}/{p.name}")
    os.replace(tmp, out / "records.tar.gz")


# ----------------------------------------------------------------------------- set-up
def install_wheels(wheels: Path, *, py: str, log: Path, echo=print) -> Dict[str, object]:
    """``pip install --no-deps --target <tmp>`` the wheels in ``wheels`` that fit this Python;
    returns ``{"target", "installed", "skipped", "error"}`` (target None when nothing installed)."""
    info: Dict[str, object] = {"target": None, "installed": [], "skipped": [], "error": None}
    whls = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not whls:
        return info
    fit, skipped = _fitting_wheels(whls)
    info["skipped"] = [p.name for p in skipped]
    if not fit:
        return info
    target = Path(tempfile.mkdtemp(prefix="gpu-suite-site-"))
    cmd = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, fit)]
    t0 = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"\n===== wheels {_now()}\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=120).returncode
        except subprocess.TimeoutExpired:
            rc = "timed out"
    if rc != 0:
        info["error"] = f"pip install: {rc}"
        echo(f"[gpu-suite] installing {wheels}/*.whl failed ({rc}); going on without them")
        return info
    info.update(target=str(target), installed=[p.name for p in fit])
    echo(f"[gpu-suite] installed {len(fit)} wheels into {target} ({time.monotonic() - t0:.1f} s)"
         + (f"; skipped (other Python/platform): {', '.join(info['skipped'])}" if skipped else ""))
    return info


def _fitting_wheels(whls: Sequence[Path]):
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        try:
            from pip._vendor.packaging.tags import sys_tags
            from pip._vendor.packaging.utils import parse_wheel_filename
        except ImportError:
            return list(whls), []
    supported = set(sys_tags())
    fit, skipped = [], []
    for p in whls:
        try:
            ok = bool(parse_wheel_filename(p.name)[3] & supported)
        except Exception:
            ok = True   # let pip decide
        (fit if ok else skipped).append(p)
    return fit, skipped


def env_info() -> Dict[str, object]:
    """The environment, as this (child) process sees it; printed as JSON by ``--env-json``."""
    import importlib
    import platform
    info: Dict[str, object] = {"python": platform.python_version(), "executable": sys.executable,
                               "platform": platform.platform(), "cpu_count": os.cpu_count(),
                               "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count(), "gpu": None, "driver": None, "cuda_runtime": None}
    versions: Dict[str, Optional[str]] = {}
    errors: Dict[str, str] = {}
    for mod, name in (("torch", "torch"), ("torchvision", "torchvision"), ("numpy", "numpy"), ("PIL", "pillow"),
                      ("cv2", "opencv"), ("kornia", "kornia"), ("kornia_rs", "kornia_rs"),
                      ("simplejpeg", "simplejpeg"), ("webdataset", "webdataset"), ("accelerate", "accelerate"),
                      ("timm", "timm"), ("yaml", "pyyaml"), ("matplotlib", "matplotlib"), ("nvidia.dali", "dali"),
                      ("ffcv", "ffcv")):
        try:
            m = importlib.import_module(mod)
            versions[name] = str(getattr(m, "__version__", "?"))
            if mod in ("kornia", "simplejpeg", "webdataset", "kornia_rs"):
                info.setdefault("from", {})[name] = str(Path(getattr(m, "__file__", "") or "?").parent)
        except Exception as e:   # noqa: BLE001 -- a broken install is reported, not raised
            versions[name] = None
            errors[name] = f"{type(e).__name__}: {e}"[:200]
    info["versions"], info["import_errors"] = versions, errors
    try:
        import torch
        info["cuda_runtime"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                        gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
    except Exception as e:   # noqa: BLE001
        info["torch_error"] = f"{type(e).__name__}: {e}"[:300]
    smi = shutil.which("nvidia-smi")
    if smi and info.get("cuda_available"):
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            first = q.stdout.strip().splitlines()[0] if q.stdout.strip() else ""
            if first:
                info["nvidia_smi"] = first
                info["driver"] = first.split(",")[1].strip() if "," in first else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    return info


def make_data(spec: str, cache: Optional[str]) -> int:
    """``--make-data cifar=2048,imagenet=512``: write (or reuse) the benchmark sets."""
    from .data import make_bench_data
    for item in spec.split(","):
        name, n = item.split("=")
        t0 = time.monotonic()
        d = make_bench_data(name, n=int(n), root=cache, progress=False)
        print(f"{name}: n={d.n} at {d.root} formats={sorted(d.formats)} missing={d.missing} "
              f"({time.monotonic() - t0:.1f} s)", flush=True)
    return 0


def _child_env(device: str, site: Optional[str]) -> Dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in (site, str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TQDM_MININTERVAL", "10")   # progress bars: a line now and then, not a log full of them
    env.setdefault("MPLBACKEND", "Agg")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""   # the dry run: tests/gpu report their CUDA skips
    return env


def _run_env_probe(py: str, env: Dict[str, str], log: Path) -> Dict[str, object]:
    try:
        p = subprocess.run([py, "-m", "benchmarks.gpu_suite", "--env-json"], cwd=str(ROOT), env=env,
                           capture_output=True, text=True, timeout=120)
        with open(log, "a") as fh:
            fh.write(f"\n===== environment {_now()}\n{p.stderr}")
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        return json.loads(line[-1]) if line else {"error": f"env probe rc {p.returncode}: {p.stderr[-500:]}"}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        return {"error": repr(e)}


# ----------------------------------------------------------------------------- the suite
def run_suite(parts: Sequence[Part], *, out: Path, env: Dict, child_env: Optional[Dict[str, str]], meta: Dict,
              total_budget: float, echo=print) -> List[Result]:
    """Run ``parts`` in order within ``total_budget`` seconds; after each, the records tar and the
    summary are rewritten. Returns one :class:`Result` per part."""
    log = out / "logs.txt"
    t_end = time.monotonic() + total_budget
    results: List[Result] = []
    pending = list(parts)
    for part in parts:
        pending.remove(part)
        left = t_end - time.monotonic()
        if not part.skip and left < 5:
            res = Result(part.name, "not run (total budget spent)", note=part.note,
                         command=" ".join(shlex.quote(c) for c in part.cmd))
        else:
            if left < part.budget:
                part.budget = left
            echo(f"[gpu-suite] {part.name} (budget {part.budget:.0f} s) ...")
            try:
                res = run_part(part, log=log, env=child_env, echo=echo)
            except BaseException:   # SIGTERM/Ctrl-C: run_part killed the child; leave a summary that says so
                results.append(Result(part.name, "interrupted", note=part.note))
                write_summary(out, env, results + [Result(p.name, "not run (interrupted)") for p in pending],
                              meta=meta)
                raise
            res.headline = headline(part.name, res, out)
            echo(f"[gpu-suite] {part.name}: {res.status} ({res.seconds:.1f} s) {_fmt_headline(res.headline)}")
        results.append(res)
        write_records_tar(out, results)
        write_summary(out, env, results + [Result(p.name, "pending") for p in pending], meta=meta)
    write_summary(out, env, results, meta=meta)
    return results


def collect(src: Path, dest: Path = RESULTS) -> List[Path]:
    """Copy the records of a returned suite folder (``records.tar.gz``) flat into ``dest``."""
    tar_path = src / "records.tar.gz" if src.is_dir() else src
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(tar_path, "r:gz") as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if not m.isfile() or not name.endswith((".json", ".png")) or name.startswith("."):
                continue
            data = tar.extractfile(m).read()
            target = dest / name
            if target.exists() and target.read_bytes() != data:
                target = dest / f"{Path(name).stem}-{Path(m.name).parent.name}{Path(name).suffix}"
            target.write_bytes(data)
            written.append(target)
    return written


def _default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return RESULTS / f"gpu-suite-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite",
                                description="every GPU check in one call (see the module doc)")
    p.add_argument("--out", default=None, help="default: $OUT when set, else benchmarks/results/gpu-suite-<ts>")
    p.add_argument("--quick", action="store_true", help="half the repeats, windows and set sizes")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the dry run (tiny sizes, GPU hidden; use with --quick)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of: {','.join(PART_NAMES)}")
    p.add_argument("--total-budget", type=float, default=None,
                   help=f"seconds for all parts (default {TOTAL_BUDGET:.0f} on CUDA, 600 for the CPU dry run)")
    p.add_argument("--wheels", default=str(WHEELS), help="folder of wheels to install first ('' for none)")
    p.add_argument("--cache", default=None, help="bench data folder (default: .cache/bench)")
    p.add_argument("--collect", default=None, metavar="DIR",
                   help="copy the records of a returned suite folder into benchmarks/results/ and exit")
    p.add_argument("--env-json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make-data", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.env_json:
        print(json.dumps(env_info(), default=str))
        return 0
    if args.make_data:
        return make_data(args.make_data, args.cache)
    if args.collect:
        files = collect(Path(args.collect))
        for f in files:
            print(f)
        print(f"{len(files)} files in {RESULTS}; `git add` them")
        return 0

    def echo(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.monotonic()
    out = (Path(args.out) if args.out else _default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in LAYOUT:   # a rerun into the same folder starts clean
        (out / name).unlink(missing_ok=True)
    log = out / "logs.txt"
    log.touch()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    wheels = install_wheels(Path(args.wheels), py=py, log=log, echo=echo) if args.wheels else {}
    child_env = _child_env(args.device, wheels.get("target"))
    env = _run_env_probe(py, child_env, log)
    flags = e2e_flags(py, child_env)
    env.update(wheels=wheels, e2e_flags=flags, device_arg=args.device, quick=args.quick)
    _atomic_write(out / "env.json", json.dumps(env, indent=2, default=str))
    echo(f"[gpu-suite] {_env_line(env)}")
    if env.get("nvidia_smi"):
        echo(f"[gpu-suite] nvidia-smi: {env['nvidia_smi']}")
    if env.get("import_errors"):
        echo(f"[gpu-suite] not importable: {', '.join(sorted(env['import_errors']))}")
    echo(f"[gpu-suite] bench e2e flags: {flags}")
    if args.device == "cuda" and not env.get("cuda_available"):
        echo("[gpu-suite] WARNING: --device cuda but torch sees no CUDA device")
    only = [x for x in args.parts.split(",") if x] if args.parts else None
    parts = plan(out=out, work=work, device=args.device, quick=args.quick, py=py, flags=flags, cache=args.cache,
                 only=only)
    total = args.total_budget or float(_settings(args.device, args.quick)["total"])
    total -= time.monotonic() - t0   # the set-up counts
    meta = {"started": _now(), "command": "python -m benchmarks.gpu_suite " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            "mode": f"device {args.device}{', quick' if args.quick else ''}", "out": str(out), "layout": LAYOUT}

    def on_signal(signum, frame):   # the caller gives up: run_part stops the running part's group
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        results = run_suite(parts, out=out, env=env, child_env=child_env, meta=meta, total_budget=total, echo=echo)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if wheels.get("target"):
            shutil.rmtree(str(wheels["target"]), ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - t0, 1)
    table = write_summary(out, env, results, meta=meta)
    echo("")
    echo(f"GPU suite: {_env_line(env)}; {meta['seconds']:.0f} s in all")
    echo(table)
    echo(f"[gpu-suite] OUT {out}: " + ", ".join(n for n in LAYOUT if (out / n).exists()))
    return 0 if all(r.good for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
