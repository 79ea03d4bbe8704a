"""Plots and the README performance section, made only from the records in ``benchmarks/results``.

``plot_record(path)`` writes ``path.with_suffix(".png")``: one horizontal bar per measured variant
(median, whiskers min..max). ``readme_section(records)`` renders a markdown table in which every
number links to its record file, with the command that reproduces it, the date and the device;
``update_readme(readme, records)`` rewrites the block between ``<!-- perf:start -->`` and
``<!-- perf:end -->`` and nothing else.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .common import RESULTS

__all__ = ["load_records", "latest", "plot_record", "readme_section", "update_readme", "START", "END"]

START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def load_records(directory=RESULTS) -> List[Dict]:
    """Every ``*.json`` record under ``directory``, oldest first; each gets ``_path``."""
    out = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"benchmark record {p} is not valid JSON: {e}") from e
        if not isinstance(rec, dict) or "results" not in rec or "name" not in rec:
            raise ValueError(f"benchmark record {p} has no 'name'/'results': not a fastssl record")
        rec["_path"] = str(p)
        out.append(rec)
    out.sort(key=lambda r: r.get("date", ""))
    return out


def _scope(rec: Dict) -> str:
    """What a record measured: its name plus the ``size/mode`` prefixes of its loader results
    (``loader`` runs may be split by set and mode), so a newer run replaces only what it re-measured."""
    cfg = rec.get("config") or {}
    if rec["name"] == "e2e":  # one table per method (+ overrides), model, size, backend and device
        sets = " ".join(f"--set {o}" for o in cfg.get("overrides") or [])
        bits = [cfg.get("method"), f"({sets})" if sets else None, cfg.get("backbone"),
                f"{cfg['view_px']}px" if cfg.get("view_px") else None, cfg.get("backend", "torch"), cfg.get("device")]
        return " ".join(["e2e", *[str(b) for b in bits if b]])
    if rec["name"] != "loader":
        return rec["name"]
    parts = sorted({"/".join(k.split("/")[:2]) for k, v in rec["results"].items() if v.get("values")})
    backends = sorted(cfg.get("backends") or {})
    return f"loader {' '.join(parts)}" + (f" [{', '.join(backends)}]" if backends else "")


def latest(records: Sequence[Dict]) -> Dict[str, Dict]:
    """The newest record of each scope (benchmark name; for ``loader``, the sizes/modes it covers)."""
    out: Dict[str, Dict] = {}
    for r in records:
        out[_scope(r)] = r  # records are sorted oldest first
    return out


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a note) where matplotlib is not
    installed (the lent GPU machine): records are written either way, plots are extras."""
    from fastssl.plotting import pyplot as _pyplot
    plt, why = _pyplot()
    if plt is None:
        print(f"plot skipped: matplotlib is not installed ({why})", file=sys.stderr)
    return plt


def plot_record(path) -> Optional[Path]:
    """Bar chart of one record's measured variants (median, min..max whiskers); returns the PNG
    path (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None

    path = Path(path)
    rec = json.loads(path.read_text())
    rows = [(k, v) for k, v in rec["results"].items() if v.get("values")]
    png = path.with_suffix(".png")
    if rec["name"] == "scaling":
        return _plot_scaling(rec, png)
    fig, ax = plt.subplots(figsize=(9, 0.32 * max(len(rows), 3) + 1.5))
    med = [v["median"] for _, v in rows]
    lo = [v["median"] - v["min"] for _, v in rows]
    hi = [v["max"] - v["median"] for _, v in rows]
    colors = {"ours": "tab:blue", "baseline": "tab:orange", "ceiling": "tab:green", "stage": "tab:gray",
              "model": "tab:red", "e2e": "tab:blue"}
    ax.barh(range(len(rows)), med, xerr=[lo, hi], color=[colors.get(v.get("kind"), "tab:purple") for _, v in rows])
    ax.set_yticks(range(len(rows)), [f"{k} ({v.get('unit', '')})" for k, v in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("rate (median of repeats; whiskers min..max)")
    m = rec["machine"]
    ax.set_title(f"{rec['name']} | {m.get('cpu_model', '?')} x{m.get('usable_cores', '?')}"
                 f"{' | ' + m['gpu'] if m.get('gpu') else ''} | {rec['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _plot_scaling(rec: Dict, png: Path) -> Path:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis in zip(axes, ("workers", "batch")):
        series: Dict[str, List] = {}
        for k, v in rec["results"].items():
            if v.get("axis") == axis and v.get("values"):
                series.setdefault(v["series"], []).append((v["x"], v["median"], v["min"], v["max"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            x = [p[0] for p in pts]
            ax.errorbar(x, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                        marker="o", capsize=3, label=name)
        ax.set_xlabel("DataLoader workers" if axis == "workers" else "batch size")
        ax.set_ylabel("samples/s")
        if axis == "batch":
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = rec["machine"]
    fig.suptitle(f"loader scaling | {m.get('cpu_model', '?')} x{m.get('usable_cores', '?')} | {rec['date']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _device(rec: Dict) -> str:
    m = rec.get("machine", {})
    s = f"{m.get('cpu_model', '?')}, {m.get('usable_cores', '?')} cores"
    return s + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")


def readme_section(records: Sequence[Dict], *, relative_to: Optional[Path] = RESULTS.parent.parent) -> str:
    """Markdown for the newest record of each benchmark: one row per measured variant (median
    and range, the ratios it is judged by), each number linked to its record file."""
    if not records:
        return "No benchmark records yet: run `fastssl bench loader` (see benchmarks/).\n"
    lines: List[str] = []
    for scope, rec in sorted(latest(records).items()):
        link = Path(rec["_path"])
        if relative_to is not None:
            link = Path(os.path.relpath(link, relative_to))
        png = link.with_suffix(".png")
        lines.append(f"**{scope}** ({rec['date'][:10]}, {_device(rec)}): `{rec['command']}`"
                     + (f" ([plot]({png.as_posix()}))" if (Path(rec["_path"]).with_suffix(".png")).exists() else ""))
        lines.append("")
        lines.append("| variant | median | min..max | unit |")
        lines.append("|---|---:|---:|---|")
        for k, v in rec["results"].items():
            if v.get("values"):
                lines.append(f"| {k} | [{_fmt(v['median'])}]({link.as_posix()}) | {_fmt(v['min'])}..{_fmt(v['max'])}"
                             f" | {v.get('unit', '')} |")
            elif "ratio" in v:
                mark = "" if "met" not in v else (" (met)" if v["met"] else " (missed)")
                lines.append(f"| {k} | [{v['ratio']:.2f}x]({link.as_posix()}) | target {v.get('target', '-')}x{mark} |"
                             f" ratio |")
            elif "text" in v:
                lines.append(f"| {k} | [{v['text']}]({link.as_posix()}) | | |")
            elif "share" in v:
                share = ", ".join(f"{s} {100 * x:.0f}%" for s, x in v["share"].items())
                lines.append(f"| {k} | [{_fmt(v['rate'])}]({link.as_posix()}) | {share} | {v.get('unit', '')} |")
            elif "error" in v:
                lines.append(f"| {k} | failed | {v['error'][:80]} | |")
        lines.append("")
    return "\n".join(lines)


def update_readme(readme, records: Sequence[Dict]) -> str:
    """Rewrite the block between the perf markers of ``readme``; returns the new text."""
    readme = Path(readme)
    text = readme.read_text()
    a, b = text.find(START), text.find(END)
    if a < 0 or b < a:
        raise ValueError(f"{readme}: no '{START}' ... '{END}' block to rewrite")
    body = readme_section(records, relative_to=readme.resolve().parent)
    new = text[:a + len(START)] + "\n" + body.rstrip() + "\n" + text[b:]
    readme.write_text(new)
    return new


def main_report(*, results=RESULTS, readme: Optional[str] = None, plots: bool = True) -> str:
    """Re-plot every record, then print (or write into ``readme``) the performance section."""
    recs = load_records(results)
    if plots:
        for r in recs:
            plot_record(r["_path"])
    if readme:
        return update_readme(readme, recs)
    return readme_section(recs)
