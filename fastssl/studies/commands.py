"""The ``fastssl sweep``, ``fastssl study diversity|inflation`` and ``fastssl report`` commands."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from loaders.errors import ConfigError

from .grid import split_values

__all__ = ["add_sweep", "add_study", "add_report"]

_SWEEP_HELP = """\
Run CONFIG once per point of a grid of overrides. Each KEY=V1,V2,... is one axis; the points are
the product of the axes (first axis slowest) or, with --zip, their position-wise combination.
Values split on commas outside brackets, braces, parentheses and quotes: model.width=8,16 is two
values, 'optim.betas=[0.9,0.99],[0.8,0.9]' two lists; quote a value that holds a comma
(data.sources.0.path="'a,b.csv'"). Each point is a run directory under the sweep directory,
trained with train.resume=auto: re-running the same command skips done points and continues
unfinished ones from their newest checkpoint. The manifest sweep.json holds every point's
overrides and state (pending/running/done/failed, one-line error), rewritten atomically.
Exit status 0 when every point is done, 1 when some failed (the others still run)."""


def _add_launch_options(p) -> None:
    g = p.add_argument_group("launcher")
    g.add_argument("--launcher", choices=["serial", "local-jobs", "slurm", "inline"], default="serial",
                   help="serial (default): one point after another, each in its own process; local-jobs: "
                        "submitit's LocalExecutor, --parallel at a time; slurm: a submitit job array; inline: in "
                        "this process (debugging)")
    g.add_argument("--parallel", type=int, default=1, metavar="N", help="local-jobs: points at a time (default 1)")
    g.add_argument("--gpus-per-job", type=int, default=None, metavar="G",
                   help="local-jobs: GPUs per point (default 1 with CUDA, else 0); concurrent jobs get disjoint GPUs")
    g.add_argument("--timeout-min", type=int, default=7 * 24 * 60, metavar="MIN",
                   help="local-jobs/slurm: a job's time limit in minutes (default 7 days)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-time", type=int, default=None, metavar="MIN", help="slurm time limit in minutes")
    g.add_argument("--slurm-gpus", type=int, default=None, metavar="G", help="GPUs per point (gpus_per_node)")
    g.add_argument("--slurm-cpus", type=int, default=None, metavar="C", help="CPUs per point (cpus_per_task)")
    g.add_argument("--slurm-mem-gb", type=float, default=None, metavar="GB")
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--slurm-qos", default=None)
    g.add_argument("--slurm-constraint", default=None)
    g.add_argument("--slurm-array-parallelism", type=int, default=None, metavar="K",
                   help="at most K points of the array at a time")
    g.add_argument("--quiet", action="store_true", help="serial: the points' output goes to their log.txt only")
    g.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def _launch_opts(args):
    from .launchers import LaunchOptions
    slurm = {"partition": args.slurm_partition, "time": args.slurm_time, "gpus": args.slurm_gpus,
             "cpus": args.slurm_cpus, "mem_gb": args.slurm_mem_gb, "account": args.slurm_account,
             "qos": args.slurm_qos, "constraint": args.slurm_constraint,
             "array_parallelism": args.slurm_array_parallelism}
    return LaunchOptions(launcher=args.launcher, parallel=args.parallel, timeout_min=args.timeout_min,
                         gpus_per_job=args.gpus_per_job, slurm=slurm, quiet=args.quiet)


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run a config over a grid of overrides (one run directory per point)",
                       description=_SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="run config YAML")
    p.add_argument("overrides", metavar="KEY=V1,V2", nargs="*", help="sweep axes (one value: a fixed override)")
    p.add_argument("--zip", action="store_true", help="combine the axes position by position, not as a product")
    p.add_argument("--out", metavar="SWEEP_DIR", default=None, help="default: runs/sweeps/<config stem>")
    p.add_argument("--dry-run", action="store_true", help="print the points and exit (nothing written)")
    _add_launch_options(p)
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from .sweep import default_sweep_dir, plan_sweep, run_sweep

    points = plan_sweep(args.overrides, zip_axes=args.zip)
    if args.dry_run:
        for pt in points:
            print(f"{pt['name']}: {' '.join(pt['overrides'])}")
        return 0
    out = Path(args.out) if args.out else default_sweep_dir(args.config)
    return run_sweep(out, args.config, points, launch_opts=_launch_opts(args), report=not args.no_report)


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in split_values(text, where="value")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in split_values(text, where="value")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _words(text: str) -> List[str]:
    return split_values(text, where="value")


def _study_common(p) -> None:
    p.add_argument("config", metavar="CONFIG", help="run config YAML (with eval.train / eval.test: the downstream set)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                   help="overrides of every point (put them right after CONFIG)")
    p.add_argument("--out", metavar="DIR", default=None, help="sweep directory (default: runs/studies/<config stem>)")
    p.add_argument("--dry-run", action="store_true", help="print the points and the study values and exit")
    _add_launch_options(p)


def add_study(sub) -> None:
    p = sub.add_parser("study", help="DiversitySSL / AdaInf studies built on sweeps",
                       description="Studies built on fastssl sweep: diversity (unique images N under a fixed "
                                   "budget C = N x E) and inflation (real x dup + generated at fixed steps).")
    inner = p.add_subparsers(dest="study_command", metavar="STUDY")
    inner.required = True
    d = inner.add_parser("diversity", help="vary the unique images N at fixed budgets C",
                         description="One point per (budget, N). Every point of a budget sees the same images: "
                                     "steps = round(C / B), halves up (B = data.batch_size x train.grad_accum); "
                                     "the images seen C_eff = steps x B are recorded. N (--unique) is converted to "
                                     "the source's fraction so that the mixture keeps exactly N samples; smaller "
                                     "subsets are nested in larger ones (checked and recorded).")
    _study_common(d)
    d.add_argument("--budget", type=int, nargs="+", required=True, metavar="C", help="images to see per point")
    d.add_argument("--unique", type=_ints, default=None, metavar="N1,N2,...", help="unique images per point")
    d.add_argument("--fractions", type=_floats, default=None, metavar="F1,F2,...",
                   help="fractions of the source's images per point (instead of --unique)")
    d.add_argument("--source", default=None, metavar="NAME", help="the source whose diversity varies (default: first)")
    d.add_argument("--frechet", action="store_true",
                   help="add the Fréchet distance (fixed random-init encoder) between each point's pretraining "
                        "stream and eval.train")
    d.add_argument("--frechet-samples", type=int, default=1000, metavar="K", help="images per side (default 1000)")
    d.set_defaults(func=_cmd_diversity)
    i = inner.add_parser("inflation", help="real x dup + generated at a fixed number of steps, per preset",
                         description="One point per (preset, dup): data.sources.<real>.dup, augment.preset and "
                                     "train.steps set; the real share of each epoch dup x n_real / epoch length "
                                     "is recorded.")
    _study_common(i)
    i.add_argument("--dup", type=_ints, required=True, metavar="D1,D2,...", help="replications of the real source")
    i.add_argument("--preset", type=_words, default=["symmetric", "symmetric_adainf"], metavar="P1,P2,...",
                   help="augmentation presets (default symmetric,symmetric_adainf)")
    i.add_argument("--steps", type=int, default=None, metavar="S", help="steps of every point (default train.steps)")
    i.add_argument("--real", default=None, metavar="NAME", help="the real source (default: the one named real, "
                                                                 "else the first)")
    i.set_defaults(func=_cmd_inflation)


def _run_study(args, kind: str, points, meta) -> int:
    from .sweep import default_sweep_dir, run_sweep

    if args.dry_run:
        for pt in points:
            vals = ", ".join(f"{k}={v}" for k, v in pt["study"].items() if k != "kind")
            print(f"{pt['name']}: {vals}\n    {' '.join(pt['overrides'])}")
        return 0
    out = Path(args.out) if args.out else default_sweep_dir(args.config, kind)
    return run_sweep(out, args.config, points, kind=kind, study=meta, launch_opts=_launch_opts(args),
                     report=not args.no_report)


def _cmd_diversity(args) -> int:
    from .diversity import plan_diversity

    if not Path(args.config).is_file():
        raise ConfigError(f"config file {args.config} does not exist")
    points, meta = plan_diversity(args.config, args.overrides, args.budget, unique=args.unique,
                                  fractions=args.fractions, source=args.source,
                                  frechet=args.frechet_samples if args.frechet else None)
    return _run_study(args, "diversity", points, meta)


def _cmd_inflation(args) -> int:
    from .inflation import plan_inflation

    if not Path(args.config).is_file():
        raise ConfigError(f"config file {args.config} does not exist")
    points, meta = plan_inflation(args.config, args.overrides, args.dup, args.preset, steps=args.steps,
                                  real=args.real)
    return _run_study(args, "inflation", points, meta)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="tables and plots of a sweep or study directory",
                       description="Write SWEEP_DIR/report.csv, report.md, report.json and the plots from the "
                                   "point directories alone (overrides, N, E, C, images seen, real share, eval "
                                   "numbers, wall time, images/sec). Without matplotlib the plots are skipped.")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from .report import write_report
    doc = write_report(args.sweep_dir)
    print((Path(args.sweep_dir) / "report.md").read_text())
    return 0 if doc["rows"] else 1
