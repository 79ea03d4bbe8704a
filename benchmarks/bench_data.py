"""``fastssl bench lists``: opening a 10M-row file list (CSV and Parquet), new reader vs the old one.

Writes a list of ``--rows`` ImageNet-style paths with labels (CSV and Parquet, generated with
pyarrow compute in a temporary folder), then measures, each in a fresh subprocess so peak RSS
(``VmHWM`` of ``/proc/self/status``) belongs to that reader alone:

* ``csv/new/first`` and ``parquet/new/first``: :class:`~loaders.sources.CSVSource` /
  ``ParquetSource`` building their cache entry (:mod:`loaders.lists`); ``.../cached``: opening
  it again (memory maps); wall seconds, CPU seconds (all threads: the number to trust on a busy
  machine) and peak RSS, the interpreter + ``import loaders`` (torch) baseline reported apart;
* ``csv/old``: the reader fastssl had before (``csv`` module -> list of ``str`` -> one bytes
  blob), on ``--baseline-rows`` rows (default 2M: 10M would need several GB) and extrapolated
  linearly to ``--rows``;
* ``workers``: 2 DataLoader workers (fork) that each touch every page of the arrays; per process
  RSS, PSS and USS (``/proc/<pid>/smaps_rollup``): shared arrays show up as a small USS and a
  PSS near a third of the arrays (three processes map them).

The record states the 100M extrapolation: time grows linearly, the CSV/Parquet readers stream
(peak memory does not grow with the row count), the cache holds ~(path bytes + 16) bytes a row.
Target (2-core CPU machine, 10M rows): first open <= 10 s and peak RSS <= 1.5 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

__all__ = ["write_lists", "run", "add_arguments", "from_args"]

ROOT = Path(__file__).resolve().parent.parent
TARGET_S, TARGET_MB = 10.0, 1536.0


def write_lists(folder: Path, rows: int, *, chunk: int = 1 << 20) -> Dict[str, Path]:
    """``list.csv`` and ``list.parquet`` with ``rows`` rows ``train/n<cls:08>/img_<i:09>.JPEG, cls``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    csv_path, pq_path = folder / "list.csv", folder / "list.parquet"
    schema = pa.schema([("path", pa.string()), ("label", pa.int64())])
    with pacsv.CSVWriter(csv_path, schema, write_options=pacsv.WriteOptions(quoting_style="none")) as cw, \
            pq.ParquetWriter(pq_path, schema) as pw:
        for s in range(0, rows, chunk):
            i = np.arange(s, min(rows, s + chunk), dtype=np.int64)
            cls = (i * 7919) % 1000
            txt = lambda a, w: pc.utf8_lpad(pc.cast(pa.array(a), pa.string()), w, "0")  # noqa: E731
            path = pc.binary_join_element_wise("train/n", txt(cls, 8), "/img_", txt(i, 9), ".JPEG", "")
            table = pa.table({"path": path, "label": pa.array(cls)}, schema=schema)
            cw.write_table(table)
            pw.write_table(table)
    return {"csv": csv_path, "parquet": pq_path}


# --------------------------------------------------------------------------------------------
# child processes (one per measurement)
# --------------------------------------------------------------------------------------------

def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _smaps(pid: int) -> Dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of ``pid`` in MB."""
    vals = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        vals[k] = int(v.split()[0]) / 1024
    return {"rss_mb": vals.get("Rss", 0.0), "pss_mb": vals.get("Pss", 0.0),
            "uss_mb": vals.get("Private_Clean", 0.0) + vals.get("Private_Dirty", 0.0)}


def _child_new(a: Dict) -> Dict:
    import pickle

    from loaders.base import build_source
    base = _status_mb("VmHWM")
    cfg = {"type": a["kind"], "path": a["path"], "label_column": "label", "cache_dir": a["cache_dir"]}
    t0, c0 = time.perf_counter(), time.process_time()
    src = build_source(cfg)
    first, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_mb("VmHWM")
    t0 = time.perf_counter()
    again = build_source(cfg)
    cached = time.perf_counter() - t0
    assert len(again) == len(src) == a["rows"] and again.image_path(len(src) - 1) == src.image_path(len(src) - 1)
    return {"first_s": first, "cpu_s": cpu, "cached_s": cached, "peak_mb": peak, "base_mb": base,
            "pickled_bytes": len(pickle.dumps(src))}


def _child_old(a: Dict) -> Dict:
    """The CSV reading fastssl had before loaders.lists: csv module -> list of str -> one bytes blob."""
    import csv

    import loaders.sources  # noqa: F401  (the same interpreter baseline as the new reader)
    base = _status_mb("VmHWM")
    t0, c0 = time.perf_counter(), time.process_time()
    with open(a["path"], newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        pcol, lcol = header.index("path"), header.index("label")
        paths, labels = [], []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            paths.append(row[pcol].strip())
            labels.append(int(row[lcol]) if row[lcol].strip() else -1)
    encoded = [os.fsencode(p) for p in paths]
    blob = b"".join(encoded)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    del encoded, paths
    labels = np.asarray(labels, dtype=np.int64)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(labels) == a["rows"] and len(blob) == offsets[-1]
    return {"first_s": secs, "cpu_s": cpu, "peak_mb": _status_mb("VmHWM"), "base_mb": base}


class _Touch:
    """A 2-item dataset: each DataLoader worker touches every page of the list's arrays, waits for
    the other worker (so both map them when measured), then reports its memory."""

    def __init__(self, src, barrier):
        self.src, self.barrier = src, barrier

    def __len__(self):
        return 2

    def __getitem__(self, k):
        blob, offsets, labels = self.src._paths.arrays
        total = int(blob.sum(dtype=np.uint64)) + int(offsets[::512].sum()) + int(labels.sum())
        total += int(offsets.sum()) & 1
        paths = [self.src.image_path(int(i)) for i in np.linspace(0, len(self.src) - 1, 1000).astype(int)]
        self.barrier.wait(timeout=600)
        return {"pid": os.getpid(), "touched": total, "paths": len(paths), **_smaps(os.getpid())}


def _child_workers(a: Dict) -> Dict:
    import multiprocessing as mp

    import torch

    from loaders.base import build_source
    src = build_source({"type": "csv", "path": a["path"], "label_column": "label", "cache_dir": a["cache_dir"]})
    blob, offsets, labels = src._paths.arrays
    int(blob.sum(dtype=np.uint64)) + int(offsets.sum()) + int(labels.sum())  # the main process maps them too
    barrier = mp.get_context("fork").Barrier(2)
    dl = torch.utils.data.DataLoader(_Touch(src, barrier), batch_size=None, num_workers=2,
                                     multiprocessing_context="fork")
    it = iter(dl)
    workers = [next(it), next(it)]
    main = _smaps(os.getpid())  # while the workers still map the arrays
    list(it)
    return {"arrays_mb": (blob.nbytes + offsets.nbytes + labels.nbytes) / 2**20, "main": main, "workers": workers}


def _child(argv) -> None:
    a = json.loads(argv[0])
    fn = {"new": _child_new, "old": _child_old, "workers": _child_workers}[a["mode"]]
    print("RESULT " + json.dumps(fn(a)), flush=True)


def _spawn(args: Dict) -> Dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_data", "--child", json.dumps(args)],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"bench lists child {args['mode']} failed: {(res.stdout + res.stderr)[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

def run(*, rows: int = 10_000_000, baseline_rows: int = 2_000_000, repeats: int = 1, tmp: Optional[str] = None,
        out_dir=None, command: Optional[str] = None, progress: bool = True) -> Path:
    """Measure (module docstring) and write a ``lists`` record; returns its path."""
    from .common import RESULTS, write_record
    baseline_rows = min(baseline_rows or rows, rows)
    with tempfile.TemporaryDirectory(prefix="fastssl-bench-lists-", dir=tmp) as d:
        d = Path(d)
        t0 = time.perf_counter()
        lists = write_lists(d / "full", rows)
        small = write_lists(d / "small", baseline_rows)["csv"] if baseline_rows != rows else lists["csv"]
        sizes = {k: p.stat().st_size for k, p in lists.items()}
        _say(progress, f"wrote {rows} rows in {time.perf_counter() - t0:.1f}s: {sizes}")
        results: Dict[str, Dict] = {}
        new = {k: [] for k in lists}
        for r in range(repeats):
            for kind, path in lists.items():
                new[kind].append(_spawn({"mode": "new", "kind": kind, "path": str(path), "rows": rows,
                                         "cache_dir": str(d / f"cache-{kind}-{r}")}))
                _say(progress, f"{kind} new: {new[kind][-1]}")
        old = [_spawn({"mode": "old", "path": str(small), "rows": baseline_rows}) for _ in range(repeats)]
        _say(progress, f"csv old ({baseline_rows} rows): {old}")
        workers = _spawn({"mode": "workers", "path": str(lists["csv"]), "cache_dir": str(d / "cache-csv-0")})
        _say(progress, f"workers: {workers}")
        cache_bytes = sum(f.stat().st_size for f in (d / "cache-csv-0").rglob("*") if f.is_file())
    scale = rows / baseline_rows
    for kind, runs in new.items():
        results[f"{kind}/new/first open"] = {"values": [x["first_s"] for x in runs], "unit": "s", "kind": "ours"}
        results[f"{kind}/new/first open CPU"] = {"values": [x["cpu_s"] for x in runs], "unit": "s", "kind": "ours"}
        results[f"{kind}/new/cached open"] = {"values": [1e3 * x["cached_s"] for x in runs], "unit": "ms",
                                              "kind": "ours"}
        results[f"{kind}/new/peak RSS"] = {"values": [x["peak_mb"] for x in runs], "unit": "MB", "kind": "ours"}
    results["csv/old/open (extrapolated)"] = {"values": [x["first_s"] * scale for x in old], "unit": "s",
                                              "kind": "baseline"}
    results["csv/old/open CPU (extrapolated)"] = {"values": [x["cpu_s"] * scale for x in old], "unit": "s",
                                                  "kind": "baseline"}
    results["csv/old/peak RSS (extrapolated)"] = {
        "values": [x["base_mb"] + (x["peak_mb"] - x["base_mb"]) * scale for x in old], "unit": "MB",
        "kind": "baseline"}
    results.update(_summary(new, old, workers, rows, baseline_rows, cache_bytes))
    config = {"rows": rows, "baseline_rows": baseline_rows, "repeats": repeats, "list_bytes": sizes,
              "cache_bytes": cache_bytes, "raw": {"new": new, "old": old, "workers": workers}}
    return write_record("lists", config=config, results=results, command=command,
                        directory=Path(out_dir) if out_dir else RESULTS, notes=_notes(rows, baseline_rows))


def _summary(new, old, workers, rows: int, baseline_rows: int, cache_bytes: int) -> Dict[str, Dict]:
    out = {}
    base = min(x["base_mb"] for runs in new.values() for x in runs)
    out["interpreter + import loaders baseline"] = {"text": f"{base:.0f} MB RSS (inside every peak above)"}
    csv_s = max(x["first_s"] for x in new["csv"])
    csv_mb = max(x["peak_mb"] for x in new["csv"])
    met = csv_s <= TARGET_S and csv_mb <= TARGET_MB
    out["target (csv, first open)"] = {"text": f"{csv_s:.1f} s, {csv_mb:.0f} MB vs <= {TARGET_S:.0f} s, "
                                               f"<= {TARGET_MB:.0f} MB: {'met' if met else 'missed'}"}
    f = 100_000_000 / rows
    out["100M rows (extrapolated)"] = {"text": f"csv first open ~{csv_s * f:.0f} s, peak RSS ~{csv_mb:.0f} MB "
                                               f"(streaming: does not grow with rows), cache "
                                               f"~{cache_bytes * f / 2**30:.1f} GiB on disk"}
    old_s = min(x["first_s"] for x in old) * 100_000_000 / baseline_rows
    old_mb = min(x["peak_mb"] - x["base_mb"] for x in old) * 100_000_000 / baseline_rows / 1024
    out["100M rows, old reader (extrapolated)"] = {"text": f"~{old_s:.0f} s, ~{old_mb:.0f} GB above the baseline"}
    for i, w in enumerate(workers["workers"]):
        for k in ("rss_mb", "pss_mb", "uss_mb"):
            out[f"worker {i} {k[:3].upper()}"] = {"values": [w[k]], "unit": "MB", "kind": "ours"}
    out["arrays shared by workers"] = {"text": f"arrays {workers['arrays_mb']:.0f} MB; a worker's USS "
                                               f"{max(w['uss_mb'] for w in workers['workers']):.0f} MB"}
    return out


def _notes(rows: int, baseline_rows: int) -> str:
    return (f"{rows} rows; the old reader ran on {baseline_rows} rows and is extrapolated linearly "
            "(its list of str grows with the rows). Peaks include the interpreter + import baseline.")


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench lists] {msg}", file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the generated lists")
    p.add_argument("--baseline-rows", type=int, default=2_000_000,
                   help="rows for the old reader, extrapolated to --rows (0: --rows)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tmp", default=None, help="where the temporary lists and caches go (default: $TMPDIR)")
    p.add_argument("--out", default=None, help="record folder (default benchmarks/results)")


def from_args(args, command: str) -> Path:
    return run(rows=args.rows, baseline_rows=args.baseline_rows, repeats=args.repeats, tmp=args.tmp,
               out_dir=args.out, command=command)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data")
        add_arguments(parser)
        a = parser.parse_args()
        print(from_args(a, "python -m benchmarks.bench_data " + " ".join(sys.argv[1:])))
