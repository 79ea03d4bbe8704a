"""``fastssl bench ...`` (and ``python -m benchmarks.cli ...``): the throughput benchmarks.

Subcommands: ``loader``, ``e2e``, ``scaling``, ``augment`` (``benchmarks/bench_augment.py``, when
present), ``lists`` (opening a 10M-row CSV/Parquet file list: ``benchmarks/bench_data.py``),
``data`` (write the benchmark sets) and ``report`` (plots + README section from the
records). Each measuring command writes one JSON record and a PNG under ``benchmarks/results/``
and prints their paths.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from typing import List, Optional

__all__ = ["add_subcommands", "build_parser", "main"]


def _command(args) -> str:
    """The command line that reproduces this run (as typed, after ``fastssl``)."""
    argv = getattr(args, "_argv", None) or sys.argv[1:]
    return "fastssl " + " ".join(shlex.quote(a) for a in argv) if argv else "fastssl bench"


def _done(path) -> int:
    print(f"record: {path}")
    png = str(path).rsplit(".", 1)[0] + ".png"
    if os.path.exists(png):
        print(f"plot:   {png}")
    return 0


def _cmd_loader(args) -> int:
    from .bench_loader import from_args
    return _done(from_args(args, _command(args)))


def _cmd_e2e(args) -> int:
    from .bench_e2e import from_args
    return _done(from_args(args, _command(args)))


def _cmd_scaling(args) -> int:
    from .bench_scaling import from_args
    return _done(from_args(args, _command(args)))


def _cmd_data(args) -> int:
    from .data import make_bench_data
    for s in args.sets:
        d = make_bench_data(s, n=args.n or {"cifar": 4096, "imagenet": 512}[s], root=args.cache)
        print(f"{s}: {d.root} formats={sorted(d.formats)} missing={d.missing}")
    return 0


def _add_lists(p) -> None:
    from .bench_data import add_arguments, from_args
    add_arguments(p)
    p.set_defaults(func=lambda args: _done(from_args(args, _command(args))))


def _add_remote(p) -> None:
    from .bench_remote import add_arguments, from_args
    add_arguments(p)
    p.set_defaults(func=lambda args: _done(from_args(args, _command(args))))


def _cmd_report(args) -> int:
    from .report import main_report
    text = main_report(results=args.results, readme=args.readme, plots=not args.no_plots)
    if args.readme:
        print(f"rewrote the performance block of {args.readme}")
    else:
        print(text)
    return 0


def _add_augment(subparsers) -> None:
    """``bench augment``: delegate to benchmarks.bench_augment (the augment engineer's harness)."""
    try:
        mod = importlib.import_module("benchmarks.bench_augment")
    except ImportError as e:
        p = subparsers.add_parser("augment", help=f"augmentation engine throughput (unavailable: {e})")
        p.set_defaults(func=lambda args, _e=e: _unavailable(_e))
        return
    if hasattr(mod, "add_subcommands"):   # the module wires its own parser
        mod.add_subcommands(subparsers)
        return
    p = subparsers.add_parser("augment", help="augmentation engine throughput (benchmarks/bench_augment.py)")
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(p)
    else:
        p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks/bench_augment.py")
    p.set_defaults(func=lambda args, _m=mod: _run_augment(_m, args))


def _run_augment(mod, args) -> int:
    if hasattr(mod, "from_args"):
        out = mod.from_args(args, _command(args))
        return _done(out) if out is not None else 0
    if hasattr(mod, "main"):
        return int(mod.main(list(getattr(args, "rest", []) or [])) or 0)
    print("benchmarks/bench_augment.py has neither from_args nor main", file=sys.stderr)
    return 2


def _unavailable(err) -> int:
    print(f"fastssl bench augment: not available ({err})", file=sys.stderr)
    return 2


def add_subcommands(subparsers) -> None:
    """Add ``loader``, ``e2e``, ``scaling``, ``augment``, ``data``, ``report`` to ``subparsers``
    (the ``fastssl bench`` group); each sets ``func(args) -> exit status``."""
    from . import bench_e2e, bench_loader, bench_scaling
    p = subparsers.add_parser("loader", help="images/sec per backend and source format vs baselines and the "
                                             "decode-only ceiling, plus a per-stage breakdown")
    bench_loader.add_arguments(p)
    p.set_defaults(func=_cmd_loader)
    p = subparsers.add_parser("e2e", help="training images/sec with real data vs the model-only ceiling")
    bench_e2e.add_arguments(p)
    p.set_defaults(func=_cmd_e2e)
    p = subparsers.add_parser("scaling", help="loader images/sec vs number of workers and batch size")
    bench_scaling.add_arguments(p)
    p.set_defaults(func=_cmd_scaling)
    _add_augment(subparsers)
    p = subparsers.add_parser("lists", help="open a 10M-row CSV/Parquet file list: seconds, peak RSS, worker "
                                            "sharing, vs the old reader (benchmarks/bench_data.py)")
    _add_lists(p)
    p = subparsers.add_parser("remote", help="shards read from an S3 server on loopback (moto) vs local disk: "
                                             "per-sample ranges, batched prefetch, cache (benchmarks/bench_remote.py)")
    _add_remote(p)
    p = subparsers.add_parser("data", help="write the benchmark data sets (cached under .cache/bench)")
    p.add_argument("--sets", type=bench_loader._csv, default=["cifar", "imagenet"])
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--cache", default=None)
    p.set_defaults(func=_cmd_data)
    p = subparsers.add_parser("report", help="re-plot every record; print or write the README perf section")
    p.add_argument("--results", default=str(_results()))
    p.add_argument("--readme", default=None, help="README whose <!-- perf:start/end --> block is rewritten")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=_cmd_report)


def _results():
    from .common import RESULTS
    return RESULTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastssl bench", description="fastssl throughput benchmarks")
    sub = parser.add_subparsers(dest="bench_command", metavar="COMMAND")
    add_subcommands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m benchmarks.cli COMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args._argv = ["bench", *argv]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
