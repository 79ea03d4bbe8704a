"""The ``fastssl`` command: ``pretrain``, ``eval``, ``data``, ``bench``, ``sweep``, ``study`` and ``report``.

Errors in the user's input (unknown config key, wrong type, missing data file ...) end the
command with one line on stderr and exit status 2, before anything is written; a run stopped
by a non-finite loss exits with status 3.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="self-supervised pretraining from a YAML config",
        description="Pretrain an encoder. CONFIG is a YAML file (may list 'defaults'); "
                    "OVERRIDES are key.sub=value pairs, e.g. train.steps=100 optim.lr=0.3.")
    p.add_argument("config", metavar="CONFIG", help="run config YAML (e.g. configs/demo.yaml)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="config overrides (YAML values)")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="checkpoint to resume from, or 'auto' for the run directory's latest")
    p.add_argument("--out", metavar="DIR", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true",
                   help="start over in a run directory that holds an earlier run (its files are removed)")
    p.set_defaults(func=_cmd_pretrain)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="kNN and linear-probe top-1 of a checkpoint on frozen features",
        description="Extract features of unaugmented images (the config's eval.train and eval.test "
                    "sources) and print kNN top-1 and linear-probe top-1, then a table of every number "
                    "with its definition. Long-tail protocol (BCL): --few-shot and --groups (they override "
                    "eval.few_shot / eval.groups of the run's config). The numbers and definitions are "
                    "written to --out, by default RUN/eval_cli.json when CHECKPOINT is a run directory "
                    "(the trainer's eval.json is left as it is).")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a training checkpoint (.pt), a backbone.pt next to its config.yaml, or a run directory")
    p.add_argument("--data", metavar="YAML", default=None,
                   help="YAML with 'train:' and 'test:' source configs (overrides the run's eval data)")
    p.add_argument("--no-linear", action="store_true",
                   help="kNN only: no linear probe, so no few-shot probes either (kNN group accuracies remain)")
    p.add_argument("--few-shot", metavar="N", type=int, nargs="*", default=None,
                   help="linear probes on balanced N-per-class subsets of eval.train, e.g. --few-shot 100 50 "
                        "(eval.few_shot; the flag alone: none)")
    p.add_argument("--few-shot-seeds", metavar="S", type=int, default=None,
                   help="subset seeds averaged per few-shot size (eval.few_shot_seeds, default 5)")
    p.add_argument("--groups", action=argparse.BooleanOptionalAction, default=None,
                   help="accuracies over many / medium / few classes, counted in the run's pretraining data "
                        "(else in eval.train's labels) (eval.groups)")
    p.add_argument("--group-many", metavar="M", type=int, default=None,
                   help="many: more than M images per class (eval.group_many, default 100)")
    p.add_argument("--group-few", metavar="F", type=int, default=None,
                   help="few: fewer than F images per class (eval.group_few, default 20)")
    p.add_argument("--out", metavar="JSON", default=None,
                   help="write every number and its definition here (default: RUN/eval_cli.json for a run "
                        "directory, no file for a checkpoint file)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_cmd_eval)


def _add_optional_group(sub, name: str, module: str, help_text: str, *, owns_group: bool) -> None:
    """Wire ``module.add_subcommands``; each leaf parser it adds sets ``func``.

    ``owns_group``: the module adds ``fastssl NAME`` itself (``loaders.cli_data``); otherwise it
    fills the ``fastssl NAME`` group made here (``benchmarks.cli``). If the module cannot be
    imported, ``fastssl NAME`` says so instead of failing at start-up.
    """
    try:
        mod = __import__(module, fromlist=["add_subcommands"])
        add = getattr(mod, "add_subcommands")
    except (ImportError, AttributeError) as e:
        p = sub.add_parser(name, help=f"{help_text} (unavailable: {e})")
        p.set_defaults(func=lambda args, _e=e: _unavailable(name, module, _e))
        return
    if owns_group:
        add(sub)
        return
    p = sub.add_parser(name, help=help_text, description=help_text)
    inner = p.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
    inner.required = True
    add(inner)


def _unavailable(name: str, module: str, err: Exception) -> int:
    print(f"fastssl {name}: not available ({module} cannot be imported: {err})", file=sys.stderr)
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastssl",
        description="Self-supervised visual pretraining built around a fast, exact data path.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(sub)
    _add_eval(sub)
    _add_optional_group(sub, "data", "loaders.cli_data", "data tools: convert, inspect and check sources",
                        owns_group=True)
    _add_optional_group(sub, "bench", "benchmarks.cli", "throughput benchmarks of the data path and the model",
                        owns_group=False)
    _add_studies(sub)
    return parser


def _add_studies(sub) -> None:
    """``sweep``, ``study diversity|inflation`` and ``report`` (:mod:`fastssl.studies`)."""
    from .studies.commands import add_report, add_study, add_sweep

    add_sweep(sub)
    add_study(sub)
    add_report(sub)


def _cmd_pretrain(args) -> int:
    from .config import load_config
    from .trainer import NonFiniteLoss, train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    try:
        result = train(cfg, out=args.out, force=args.force)
    except NonFiniteLoss as e:
        print(f"fastssl pretrain: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0 if result is not None else 1


def _cmd_eval(args) -> int:
    from pathlib import Path

    from loaders.errors import ConfigError

    from .config import load_yaml
    from .eval import evaluate_checkpoint, format_table, write_json

    flags = {"few_shot": args.few_shot, "few_shot_seeds": args.few_shot_seeds, "groups": args.groups,
             "group_many": args.group_many, "group_few": args.group_few}
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.few_shot and args.no_linear:
        raise ConfigError("--few-shot: few-shot accuracies are linear probes; drop --no-linear")
    if args.few_shot:
        overrides["linear"] = True      # asked for probes: run them even if the run's eval.linear is off
    if args.no_linear:
        overrides["few_shot"] = []
    target = Path(args.checkpoint)
    out = Path(args.out) if args.out else (target / "eval_cli.json" if target.is_dir() else None)
    if out is not None and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    data = load_yaml(args.data) if args.data else None
    doc = evaluate_checkpoint(args.checkpoint, data=data, linear=not args.no_linear, device=args.device,
                              overrides=overrides)
    print(f"kNN top-1: {100 * doc['eval/knn_top1']:.2f}%")
    if doc.get("eval/linear_top1") is not None:
        print(f"linear-probe top-1: {100 * doc['eval/linear_top1']:.2f}%")
    print(format_table({k: v for k, v in doc.items() if k.startswith("eval/")}, doc["definitions"]))
    if out is not None:
        print(f"wrote {write_json(out, doc)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``fastssl`` and ``python -m fastssl``; returns the exit status."""
    from loaders.errors import ConfigError, DataError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may follow options (``pretrain CFG --resume auto train.steps=9``)
        if getattr(args, "command", None) in ("pretrain", "sweep", "study") and \
                all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the message's layout
        print(f"fastssl {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastssl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
