"""The report's plots: accuracy against the study's axis, one line per series.

* diversity: x = N (log axis), one line per budget ``C_eff`` (and per value of any other varying
  override, e.g. the method);
* inflation: x = dup, one line per augmentation preset (and other varying overrides);
* plain sweep: x = the first varying override whose values are all numbers, one line per
  combination of the other varying overrides (no plot when there is no numeric axis).

One panel per accuracy present (kNN top-1, linear-probe top-1); only done points are drawn.
The number of lines in each panel is counted on the figure (``len(ax.get_lines())``) before it
is saved and returned for ``report.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["make_plots", "plot_spec"]

_METRICS = (("eval/knn_top1", "kNN top-1 (%)"), ("eval/linear_top1", "linear-probe top-1 (%)"))


def _number(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_spec(kind: str, rows: Sequence[Dict[str, Any]], varying: Sequence[str]):
    """``(x key, x label, log x, series keys, file name)`` or None when nothing can be plotted."""
    if kind == "diversity":
        return "N", "unique images N (log)", True, ["C_eff"] + list(varying), "accuracy_vs_N.png"
    if kind == "inflation":
        return "dup", "real dup", False, ["preset"] + list(varying), "accuracy_vs_dup.png"
    for key in varying:
        if all(_number(r.get(key)) is not None for r in rows):
            rest = [k for k in varying if k != key]
            return key, key, False, rest, f"accuracy_vs_{key.replace('.', '_')}.png"
    return None


def _series(rows, x: str, keys: Sequence[str], metric: str) -> Dict[str, List[Tuple[float, float]]]:
    out: Dict[str, List[Tuple[float, float]]] = {}
    for r in rows:
        if r["state"] != "done" or r.get(metric) is None or _number(r.get(x)) is None:
            continue
        label = ", ".join(f"{'C' if k == 'C_eff' else k}={r.get(k)}" for k in keys) or "all"
        out.setdefault(label, []).append((_number(r[x]), 100 * float(r[metric])))
    return {k: sorted(v) for k, v in out.items()}


def make_plots(sweep_dir: Path, rows: Sequence[Dict[str, Any]], kind: str, varying: Sequence[str]):
    """``(plots, notes)``: per written plot ``{file, x, panels: [{metric, lines, labels}]}``."""
    spec = plot_spec(kind, rows, varying)
    if spec is None:
        return [], ["no plot: no numeric varying override to put on the x axis"]
    x, xlabel, logx, keys, fname = spec
    metrics = [(m, lab) for m, lab in _METRICS if any(r.get(m) is not None and r["state"] == "done" for r in rows)]
    if not metrics:
        return [], ["no plot: no done point with evaluation numbers yet"]
    from ..plotting import pyplot
    plt, why = pyplot()
    if plt is None:
        return [], [f"plots skipped: matplotlib is not installed ({why}); the tables are complete"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    panels = []
    for ax, (metric, label) in zip(axes[0], metrics):
        series = _series(rows, x, keys, metric)
        for name, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        panels.append({"metric": metric, "lines": len(ax.get_lines()), "labels": list(series)})
    fig.suptitle(f"{Path(sweep_dir).name}: {kind}")
    fig.tight_layout()
    fig.savefig(Path(sweep_dir) / fname, dpi=120)
    plt.close(fig)
    return [{"file": fname, "x": x, "log_x": logx, "series_keys": list(keys), "panels": panels}], []
