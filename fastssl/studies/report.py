"""``fastssl report SWEEP_DIR``: one table of every point and the study's plots.

Regenerated from the point directories alone (no other state): each sub-folder with a
``point.json`` is a point. Per point: its state (from ``attempts.jsonl`` and the run's files),
the varying overrides, the study's values (``point.json``: diversity ``C``, ``C_eff``, ``N``,
``fraction``, ``E``; inflation ``preset``, ``dup``, ``real_share``, ...), what the run did
(``metrics.jsonl``: last ``step`` and ``images_seen``; ``images_per_sec``: the median over the
logged windows), every number of ``eval.json``, the wall time (sum over attempts) and the
number of attempts.

Writes ``report.csv`` (full precision), ``report.md`` (accuracies in percent), ``report.json``
(rows, columns, and per plot the number of lines in each panel) and plots:
``accuracy_vs_N.png`` (diversity: x = N on a log axis, one line per budget and any other
varying override), ``accuracy_vs_dup.png`` (inflation: one line per preset) or, for a plain
sweep with a numeric axis, ``accuracy_vs_<key>.png``. Without matplotlib the plots are skipped
with a note.
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from loaders.errors import ConfigError

from .grid import varying_keys
from .manifest import POINT_FILE, read_attempts, write_json_atomic

__all__ = ["collect", "write_report", "point_state"]

_STUDY_COLUMNS = {
    "diversity": ["C", "C_eff", "steps", "global_batch", "N", "fraction", "E", "E_seen", "frechet"],
    "inflation": ["preset", "dup", "n_real", "n_other", "epoch_length", "real_share", "epochs", "steps",
                  "real_images_seen"],
}
#: overrides a study sets itself (not shown as extra columns)
_STUDY_KEYS = ("data.budget", "train.steps", "augment.preset")
_EVAL_ORDER = ["eval/knn_top1", "eval/linear_top1", "eval/knn_top1_random_init", "eval/chance"]
_TAIL = ["wall_s", "images_per_sec", "attempts", "resumed_from", "pids", "error"]


def point_state(pdir: Path, events: Sequence[Dict[str, Any]]) -> Tuple[str, Optional[str]]:
    """``(state, error)`` from the attempts: done / failed / running (started, no end) / pending."""
    if not events:
        return "pending", None
    last = events[-1]
    if last.get("event") == "start":
        return "running", None
    if last.get("status") == "done" and (pdir / "backbone.pt").is_file():
        return "done", None
    if last.get("status") == "interrupted":
        return "pending", "interrupted"
    return "failed", last.get("error")


def _metrics_summary(pdir: Path) -> Dict[str, Any]:
    from ..metrics_log import read_metrics
    recs = read_metrics(pdir / "metrics.jsonl")
    if not recs:
        return {"steps_done": None, "images_seen": None, "images_per_sec": None}
    ips = [r["images_per_sec"] for r in recs if isinstance(r.get("images_per_sec"), (int, float))]
    seen = recs[-1].get("images_seen")
    if isinstance(seen, float) and seen.is_integer():
        seen = int(seen)
    return {"steps_done": recs[-1].get("step"), "images_seen": seen,
            "images_per_sec": statistics.median(ips) if ips else None}


def _row(pdir: Path) -> Dict[str, Any]:
    spec = json.loads((pdir / POINT_FILE).read_text())
    events = read_attempts(pdir)
    state, error = point_state(pdir, events)
    study = dict(spec.get("study") or {})
    row: Dict[str, Any] = {"point": spec["name"], "state": state, "_overrides": list(spec["overrides"]),
                           "_kind": spec.get("kind", "sweep")}
    row.update({k: v for k, v in study.items() if k != "kind"})
    row.update(_metrics_summary(pdir))
    if study.get("kind") == "diversity" and row["images_seen"] is not None:
        row["E_seen"] = row["images_seen"] * study["share"] / study["N"]
    ev = pdir / "eval.json"
    if ev.is_file():
        doc = json.loads(ev.read_text())
        row.update({k: v for k, v in doc.items()
                    if k.startswith("eval/") and (v is None or isinstance(v, (int, float)))})
    ends = [e for e in events if e.get("event") == "end" and e.get("wall_s") is not None]
    starts = [e for e in events if e.get("event") == "start"]
    row["wall_s"] = sum(float(e["wall_s"]) for e in ends) if ends else None
    row["attempts"] = len(starts)
    row["resumed_from"] = " ".join(str(e["resume_step"]) for e in starts if e.get("resume_step")) or None
    row["pids"] = " ".join(str(e["pid"]) for e in starts) or None
    row["error"] = error
    return row


def collect(sweep_dir) -> List[Dict[str, Any]]:
    """Every point's row, in name order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep directory {sweep_dir} does not exist")
    rows = [_row(p) for p in sorted(sweep_dir.iterdir()) if (p / POINT_FILE).is_file()]
    if not rows:
        raise ConfigError(f"sweep directory {sweep_dir} holds no point (no */{POINT_FILE})")
    return rows


def _columns(rows: Sequence[Dict[str, Any]], kind: str) -> Tuple[List[str], List[str]]:
    """``(columns, override keys shown as columns)``."""
    varying = [k for k in varying_keys([r["_overrides"] for r in rows])
               if kind == "sweep" or not (k in _STUDY_KEYS or k.startswith("data.sources."))]
    for r in rows:
        vals = dict(o.split("=", 1) for o in r["_overrides"])
        for k in varying:
            r[k] = vals.get(k)
    evals = [k for k in _EVAL_ORDER if any(k in r for r in rows)]
    evals += sorted({k for r in rows for k in r if k.startswith("eval/") and k not in evals and k != "eval/seconds"})
    study = [c for c in _STUDY_COLUMNS.get(kind, []) if any(r.get(c) is not None for r in rows)]
    cols = ["point", "state"] + varying + study + ["steps_done", "images_seen"] + evals + _TAIL
    return cols, varying


def _fmt(col: str, v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return str(v)
    if col.startswith("eval/") or col == "real_share":
        return f"{100 * v:.2f}%"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if col in ("wall_s", "images_per_sec"):
            return f"{v:,.1f}"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _markdown(rows, cols, sweep_dir: Path, notes: Sequence[str], plots: Sequence[Dict[str, Any]]) -> str:
    head = [c.replace("eval/", "") for c in cols]
    lines = [f"# Sweep report: {sweep_dir}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if c not in ("point", "state", "error", "preset") else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    lines += [""] + [f"![{p['file']}]({p['file']})" for p in plots] + [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(sweep_dir, *, quiet: bool = False) -> Dict[str, Any]:
    """Write report.csv / .md / .json and the plots into ``sweep_dir``; returns the JSON document."""
    from .plots import make_plots

    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    kinds = {r["_kind"] for r in rows}
    kind = kinds.pop() if len(kinds) == 1 else "sweep"
    cols, varying = _columns(rows, kind)
    notes = _notes(sweep_dir, kind)
    plots, plot_notes = make_plots(sweep_dir, rows, kind, varying)
    notes += plot_notes
    with open(sweep_dir / "report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in cols])
    (sweep_dir / "report.md").write_text(_markdown(rows, cols, sweep_dir, notes, plots))
    doc = {"sweep_dir": str(sweep_dir), "kind": kind, "columns": cols,
           "rows": [{c: r.get(c) for c in cols} | {"overrides": r["_overrides"]} for r in rows],
           "plots": plots, "notes": notes}
    write_json_atomic(sweep_dir / "report.json", doc)
    if not quiet:
        done = sum(r["state"] == "done" for r in rows)
        print(f"fastssl report: {len(rows)} point(s), {done} done: wrote {sweep_dir / 'report.md'}, report.csv, "
              f"report.json" + "".join(f", {p['file']}" for p in plots), file=sys.stderr)
        for n in plot_notes:
            print(f"fastssl report: {n}", file=sys.stderr)
    return doc


def _notes(sweep_dir: Path, kind: str) -> List[str]:
    """The study's rules, from sweep.json when it is there (the table does not depend on it)."""
    path = sweep_dir / "sweep.json"
    study = json.loads(path.read_text()).get("study") if path.is_file() else None
    notes = ["accuracies: fractions of eval.json shown in percent; images_per_sec: median of the logged windows "
             "(metrics.jsonl); wall_s: sum of the point's attempts (attempts.jsonl)"]
    if kind == "diversity":
        notes.append("E = C_eff x share / N (planned), E_seen = images_seen x share / N (from metrics.jsonl)")
    if study:
        for key in ("rounding", "subset_rule", "real_share_rule", "frechet_encoder"):
            if study.get(key):
                notes.append(f"{key}: {study[key]}")
        if study.get("nested"):
            n = study["nested"]
            notes.append(f"nested subsets: {n['nested']} ({n['checked_pairs']} consecutive pair(s) checked: "
                         f"{n['how']})")
    return notes
