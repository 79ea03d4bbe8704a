"""Benchmark records: every speed number fastssl shows comes from one of these JSON files.

A record holds the machine (CPU model, cores, GPU), the versions, the exact command, the
config, every repeat's value and their median/min/max. ``write_record`` stores it under
``benchmarks/results/`` as ``{name}-{timestamp}.json``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "machine_info", "versions", "summarize", "write_record", "time_repeats"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> Dict:
    info = {
        "hostname_hash": abs(hash(platform.node())) % 10**8,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": sys.version.split()[0],
        "gpu": None,
    }
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def versions(extra=()) -> Dict[str, Optional[str]]:
    """Versions of the packages that matter for a speed number (None when not installed)."""
    from importlib import metadata
    names = ["torch", "torchvision", "numpy", "pillow", "nvidia-dali-cuda130", "ffcv", "kornia",
             "webdataset", "accelerate", "opencv-python", *extra]
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    try:
        import fastssl
        out["fastssl"] = fastssl.__version__
    except ImportError:
        pass
    return out


def summarize(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def time_repeats(fn: Callable[[], int], repeats: int = 3, warmup: int = 1) -> List[float]:
    """Call ``fn`` (which returns how many images it processed) and return images/sec per repeat."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        out.append(n / (time.perf_counter() - t0))
    return out


def write_record(name: str, *, config: Dict, results: Dict, command: Optional[str] = None,
                 notes: str = "", directory: Path = RESULTS) -> Path:
    """Write ``{name}-{UTC timestamp}.json`` and return its path.

    ``results`` maps a measured variant (e.g. ``"engine@32px"``) to a dict holding at least
    ``values`` (images/sec per repeat); median/min/max are filled in here.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    res = {}
    for k, v in results.items():
        v = dict(v)
        if "values" in v:
            v.update(summarize(list(v["values"])))
        res[k] = v
    now = _dt.datetime.now(_dt.timezone.utc)
    rec = {
        "name": name,
        "date": now.isoformat(timespec="seconds"),
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        "versions": versions(),
        "config": config,
        "results": res,
        "notes": notes,
    }
    path = directory / f"{name}-{now.strftime('%Y%m%dT%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=2, sort_keys=False))
    os.replace(tmp, path)
    return path
