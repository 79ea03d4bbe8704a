"""Run records: metrics.jsonl (+ CSV), TensorBoard scalars and histograms, optional W&B (offline
or online), and an end-of-run plot.

Only the main process writes: other ranks get a logger with ``enabled=False`` whose calls do
nothing. ``metrics.jsonl`` holds one JSON object per logged step (``{"step": s, "loss": ...}``)
and is appended to, so a resumed run continues the same file; records of steps after the
resume point (written by the killed run) are dropped when the logger opens with
``resume_step``.
"""
from __future__ import annotations

import csv
import json
import math
import secrets
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

__all__ = ["MetricsLogger", "read_metrics", "plot_metrics"]


def read_metrics(path: Union[str, Path]) -> List[Dict]:
    """All records of a ``metrics.jsonl`` file (a torn last line from a kill is ignored)."""
    out = []
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsLogger:
    """Write per-step scalars to ``run_dir/metrics.jsonl``, ``metrics.csv`` and TensorBoard.

    ``log(step, {"loss": 1.2, ...})`` writes one record; ``close()`` flushes, writes the CSV
    and (``plot=True``) ``metrics.png``.
    """

    def __init__(self, run_dir: Union[str, Path], *, enabled: bool = True, tensorboard: bool = True,
                 csv_file: bool = True, plot: bool = True, resume_step: Optional[int] = None,
                 wandb: Optional[str] = None, config: Optional[Mapping] = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.csv_file = csv_file
        self.plot = plot
        self._tb = None
        self._wandb = None
        self._fh = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a", buffering=1)  # line-buffered: survives a kill
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge what a killed run wrote *after* the checkpoint: its point at the resume
                # step itself was logged before the checkpoint and stays
                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
            except ImportError:  # tensorboard is optional for the JSONL/CSV records
                self._tb = None
        self._wandb = _start_wandb(wandb, self.run_dir, config, resume_step) if wandb else None

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step)}
        for k, v in values.items():
            v = float(v)
            rec[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._fh.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "step" and isinstance(v, float)}, step=int(step))

    def histogram(self, tag: str, values, step: int) -> None:
        """A distribution (1-d tensor or array) at ``step``: TensorBoard and W&B only."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_histogram(tag, values, step)
        if self._wandb is not None:
            import wandb
            self._wandb.log({tag: wandb.Histogram(_as_numpy(values))}, step=int(step))

    def text(self, tag: str, value: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, value)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        records = read_metrics(self.path)
        if self.csv_file:
            write_csv(records, self.run_dir / "metrics.csv")
        if self.plot and records:
            plot_metrics(records, self.run_dir / "metrics.png")


def _as_numpy(values):
    import numpy as np
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)


def _start_wandb(mode: str, run_dir: Path, config: Optional[Mapping], resume_step: Optional[int]):
    """A W&B run in ``run_dir/wandb`` (``mode``: offline | online; the ``wandb`` extra).

    The run id is kept in ``run_dir/wandb/run_id`` so that a resumed run continues the same
    W&B run; ``wandb sync run_dir/wandb/offline-run-*`` uploads an offline run later."""
    try:
        import wandb
    except ImportError as e:
        from loaders.errors import ConfigError
        raise ConfigError(f"log.wandb={mode} needs the wandb package: pip install 'fastssl[wandb]' ({e})") from e
    folder = run_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    if resume_step is not None and id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    return wandb.init(mode=mode, dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name,
                      config=dict(config or {}), reinit=True)


def write_csv(records: List[Dict], path: Union[str, Path]) -> Path:
    keys: List[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow(r)
    return Path(path)


def plot_metrics(records: List[Dict], path: Union[str, Path]) -> Optional[Path]:
    """PNG with three panels: training loss (and per-source losses), online probe accuracy,
    images/sec, each against the step (skipped, returning None, without matplotlib)."""
    from .plotting import pyplot
    plt, _ = pyplot()
    if plt is None:  # not installed (the lent GPU machine): the JSONL/CSV records stand alone
        return None

    def series(key):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(*series("loss"), label="loss")
    for key in sorted({k for r in records for k in r if k.startswith("loss/")}):
        ax.plot(*series(key), label=key, alpha=0.7)
    ax.set_title("training loss")
    ax.legend(fontsize=7)
    axes[1].plot(*series("probe_acc"), color="tab:green")
    axes[1].set_title("online probe top-1 (labelled samples)")
    axes[2].plot(*series("images_per_sec"), color="tab:orange")
    axes[2].set_title("images / sec")
    for a in axes:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
