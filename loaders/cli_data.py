"""``fastssl data ...``: convert sources to shards or ``.npz``, write the synthetic set, inspect.

Sub-commands (each handler takes the parsed ``argparse.Namespace`` and returns an exit code;
data and config errors print their message and return 2):

- ``shards``    any source -> WebDataset shards with index
- ``npz``       image folder (or any source) -> uncompressed RGB ``.npz``
- ``synthetic`` the synthetic set -> shards, ``.npz`` or an image folder
- ``info``      length, label histogram and first sample locations of any source

A source is given as ``--source type=folder,root=DIR`` (``key=value`` pairs; ints, floats,
true/false/null are converted) or as a YAML file holding one source mapping. Other parts add
commands with :func:`register_data_command` (e.g. ``beton`` by the FFCV backend) before
:func:`add_subcommands` runs. Standalone: ``python -m loaders.cli_data ...``.

Every command with an ``--out`` owns it: a non-empty output is refused unless ``--overwrite``
(replace what an earlier conversion wrote; files no converter manifest lists are never
deleted) or ``--resume`` (continue an interrupted conversion; a single-file output is simply
written again). See :mod:`loaders.convert`.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .base import Source, build_source
from .errors import ConfigError, DataError

__all__ = ["register_data_command", "add_subcommands", "parse_source_spec", "load_source", "main",
           "DATA_COMMANDS", "existing_mode"]

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

#: name -> (help, add_args_fn, run_fn, output)
DATA_COMMANDS: "OrderedDict[str, tuple]" = OrderedDict()


#: modules of other parts that register data commands on import (imported by add_subcommands)
PLUGIN_MODULES = ("loaders.beton",)


#: ``output=`` values of :func:`register_data_command`
OUTPUT_KINDS = ("auto", "file", "self", None)


def register_data_command(name: str, add_args_fn, run_fn: Optional[Run] = None, *, help: str = "",
                          output: Optional[str] = "auto") -> None:
    """Add ``fastssl data NAME``.

    With ``run_fn``: ``add_args_fn(parser)`` declares the arguments of the ``NAME`` parser and
    ``run_fn(args)`` runs it, returning an exit code. Without ``run_fn``: ``add_args_fn(subparsers)``
    adds the ``NAME`` parser itself and sets its ``func`` default. Either way errors become
    exit code 2. Must run before :func:`add_subcommands` (or live in :data:`PLUGIN_MODULES`).

    ``output`` (commands with ``run_fn``): ``"file"`` -- ``--out`` names one file: the command
    gets ``--overwrite``/``--resume`` and an existing ``--out`` is refused without one of them
    before ``run_fn`` runs; ``"auto"`` -- ``"file"`` when the parser has an ``--out`` option;
    ``"self"`` -- the command gets the two flags and handles them itself (``args.overwrite``,
    ``args.resume``; :func:`existing_mode`); ``None`` -- neither.
    """
    if name in DATA_COMMANDS:
        raise ValueError(f"data command '{name}' registered twice")
    if output not in OUTPUT_KINDS:
        raise ValueError(f"data command '{name}': output must be one of {OUTPUT_KINDS}, got {output!r}")
    DATA_COMMANDS[name] = (help, add_args_fn, run_fn, output)


def existing_mode(args: argparse.Namespace) -> str:
    """``"overwrite"``, ``"resume"`` or ``"refuse"`` from ``--overwrite``/``--resume``."""
    if getattr(args, "overwrite", False):
        return "overwrite"
    return "resume" if getattr(args, "resume", False) else "refuse"


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    try:
        g.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out (of a directory, only the files its MANIFEST.json lists)")
        g.add_argument("--resume", action="store_true",
                       help="continue an interrupted conversion into --out (same source and settings; "
                            "a single-file output is written again)")
    except argparse.ArgumentError:  # the command declares them itself
        pass


def _has_option(p: argparse.ArgumentParser, option: str) -> bool:
    return any(option in a.option_strings for a in p._actions)


def _file_output_guard(run_fn: Run) -> Run:
    """Refuse an existing ``--out`` file unless ``--overwrite`` or ``--resume`` (single-file outputs)."""
    def run(args: argparse.Namespace) -> int:
        out = getattr(args, "out", None)
        if out is not None:
            from .convert import check_output_file
            check_output_file(Path(out), existing_mode(args))
        return run_fn(args)
    run.__name__ = getattr(run_fn, "__name__", "run")
    return run


def _guarded(run_fn: Run) -> Run:
    """Turn data/config/file errors into a message on stderr and exit code 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return int(run_fn(args) or 0)
        except (DataError, ConfigError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    run.__name__ = getattr(run_fn, "__name__", "run")
    return run


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command and its sub-commands to an ``argparse`` subparsers object.

    Each leaf parser gets ``func`` (call ``args.func(args)`` to run it; returns the exit code).
    """
    p = subparsers.add_parser("data", help="convert, generate and inspect data sources",
                              description=__doc__.split("\n\n")[0])
    _add_commands(p)
    return p


def _add_commands(parser: argparse.ArgumentParser) -> None:
    import importlib
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:  # that part (or its optional dependency) is not installed
            print(f"note: data commands of {module} unavailable ({e})", file=sys.stderr)
    sub = parser.add_subparsers(dest="data_command", metavar="COMMAND")
    sub.required = True
    for name, (help_, add_args, run_fn, output) in DATA_COMMANDS.items():
        if run_fn is None:
            add_args(sub)
            sp = sub.choices.get(name)
            if sp is not None and sp.get_default("func") is not None:
                sp.set_defaults(func=_guarded(sp.get_default("func")))
            continue
        sp = sub.add_parser(name, help=help_, description=help_)
        add_args(sp)
        if output == "auto":
            output = "file" if _has_option(sp, "--out") else None
        if output is not None:
            _add_output_flags(sp)
        sp.set_defaults(func=_guarded(_file_output_guard(run_fn) if output == "file" else run_fn))


# --------------------------------------------------------------------------------------------
# source specs
# --------------------------------------------------------------------------------------------

def _scalar(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_source_spec(spec: str) -> Dict:
    """``"type=folder,root=DIR"`` or a YAML file path -> a source config mapping."""
    if os.path.isfile(spec) and spec.endswith((".yaml", ".yml", ".json")):
        import yaml
        with open(spec) as f:
            cfg = yaml.safe_load(f)
        if not isinstance(cfg, dict):
            raise ConfigError(f"source file '{spec}' must hold one mapping (type: ..., ...), got {type(cfg).__name__}")
        return cfg
    cfg: Dict = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"source spec '{spec}': '{part}' is not key=value (e.g. type=folder,root=DIR)")
        cfg[key.strip()] = _scalar(value.strip())
    if "type" not in cfg:
        raise ConfigError(f"source spec '{spec}' has no type= (e.g. type=folder,root=DIR)")
    return cfg


def load_source(spec: str) -> Source:
    """Build the source a ``--source`` spec names (registers all of the data layer's types)."""
    from . import shards, sources, synthetic  # noqa: F401  (register source types)
    return build_source(parse_source_spec(spec))


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------

def _add_encoding_args(p: argparse.ArgumentParser, *, default_format: str = "jpg") -> None:
    p.add_argument("--samples-per-shard", type=int, default=10000, help="samples per tar shard (default 10000)")
    p.add_argument("--format", default=default_format, choices=["jpg", "png", "webp"],
                   help=f"image encoding (png = lossless; default {default_format})")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality (default 95)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="type=folder,root=DIR style spec or a YAML file")
    p.add_argument("--out", required=True, help="output directory for the shards")
    _add_encoding_args(p)
    p.add_argument("--resize", type=int, default=None,
                   help="resize the shorter side to this many pixels (the longer one as torchvision's Resize: "
                        "truncated)")
    p.add_argument("--workers", type=int, default=1, help="encoding threads (default 1)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="unreadable samples")


def run_shards(args: argparse.Namespace) -> int:
    from .convert import to_shards
    src = load_source(args.source)
    paths = to_shards(src, args.out, samples_per_shard=args.samples_per_shard, fmt=args.format,
                      quality=args.quality, resize=args.resize, prefix=args.prefix,
                      progress=not args.no_progress, on_error=args.on_error, workers=args.workers,
                      existing=existing_mode(args))
    print(f"wrote {len(paths)} shards ({len(src)} samples max) to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------

def _add_npz_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--root", help="image folder (class subfolders, or flat = unlabelled)")
    g.add_argument("--source", help="any source spec instead of --root")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("--size", type=int, default=None, help="resize every image to SIZE x SIZE")
    p.add_argument("--label", type=int, default=None, help="store this label for all images (e.g. -1)")
    p.add_argument("--workers", type=int, default=1, help="decoding threads (default 1)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="unreadable samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_npz(args: argparse.Namespace) -> int:
    from .convert import folder_to_npz, source_to_npz
    kw = dict(size=args.size, label=args.label, progress=not args.no_progress, on_error=args.on_error,
              workers=args.workers, existing=existing_mode(args))
    if args.root is not None:
        out = folder_to_npz(args.root, args.out, **kw)
    else:
        out = source_to_npz(load_source(args.source), args.out, **kw)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------
# longtail
# --------------------------------------------------------------------------------------------

def _add_longtail_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="a labelled source spec, e.g. type=cifar,root=data/cifar100")
    p.add_argument("--imbalance", type=float, default=100.0, help="head / tail count ratio (default 100)")
    p.add_argument("--split", type=int, default=1, help="split number: the seed of which samples are kept (1..5)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="head class count (default: 90%% of the largest class, the BCL/SDCLR splits)")
    p.add_argument("--out", required=True, help="output .npz; the counts go to <out stem>.counts.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_longtail(args: argparse.Namespace) -> int:
    from .longtail import write_longtail
    rec = write_longtail(load_source(args.source), args.out, imbalance=args.imbalance, split=args.split,
                         max_per_class=args.max_per_class, progress=not args.no_progress)
    counts = rec["counts"]
    print(f"wrote {args.out}: {rec['total']} images, split {rec['split']}, {rec['formula']}")
    print(f"per-class counts (class 0 .. {len(counts) - 1}): {counts}")
    return 0


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------

def _add_synthetic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default="real", choices=["real", "generated"])
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--keep-labels", action="store_true", help="keep the generated variant's labels")
    p.add_argument("--to", default="shards", choices=["shards", "npz", "folder"], help="output kind")
    p.add_argument("--out", required=True, help="output directory (shards, folder) or .npz path")
    _add_encoding_args(p, default_format="png")


def run_synthetic(args: argparse.Namespace) -> int:
    from .convert import source_to_npz, to_folder, to_shards
    from .synthetic import SyntheticSource
    src = SyntheticSource(n=args.n, size=args.size, seed=args.seed, variant=args.variant, split=args.split,
                          num_classes=args.num_classes, keep_labels=args.keep_labels)
    progress, existing = not args.no_progress, existing_mode(args)
    if args.to == "shards":
        to_shards(src, args.out, samples_per_shard=args.samples_per_shard, fmt=args.format, quality=args.quality,
                  prefix=args.prefix, progress=progress, existing=existing)
    elif args.to == "npz":
        source_to_npz(src, args.out, progress=progress, existing=existing)
    else:
        to_folder(src, args.out, fmt=args.format, quality=args.quality, progress=progress, existing=existing)
    print(f"wrote {len(src)} synthetic images ({args.variant}, {args.split}) to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------

def _add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="type=folder,root=DIR style spec or a YAML file")
    p.add_argument("--keys", type=int, default=5, help="how many first samples to locate (default 5)")


def source_info(src: Source, *, keys: int = 5) -> List[str]:
    """Lines describing ``src``: type, name, length, label histogram, first sample locations."""
    labels = np.asarray(src.labels())
    values, counts = np.unique(labels, return_counts=True)
    hist = ", ".join(f"{'unknown' if v < 0 else int(v)}: {int(c)}" for v, c in zip(values, counts))
    lines = [f"type: {src.type_name}", f"name: {src.name}", f"samples: {len(src)}",
             f"classes: {int((values >= 0).sum())}", f"labels: {hist}", "first samples:"]
    lines += [f"  {i}: {src.describe(i)}" for i in range(min(keys, len(src)))]
    return lines


def run_info(args: argparse.Namespace) -> int:
    print("\n".join(source_info(load_source(args.source), keys=args.keys)))
    return 0


register_data_command("shards", _add_shards_args, run_shards, help="any source -> WebDataset shards with index",
                      output="self")
register_data_command("npz", _add_npz_args, run_npz, help="image folder (or any source) -> RGB .npz",
                      output="self")
register_data_command("synthetic", _add_synthetic_args, run_synthetic,
                      help="write the synthetic set as shards, .npz or an image folder", output="self")
register_data_command("longtail", _add_longtail_args, run_longtail,
                      help="a long-tailed split of a labelled source -> .npz + per-class counts", output="file")
register_data_command("info", _add_info_args, run_info, help="length, label histogram and first samples of a source",
                      output=None)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m loaders.cli_data COMMAND ...`` (the same commands as ``fastssl data``)."""
    parser = argparse.ArgumentParser(prog="python -m loaders.cli_data", description=__doc__.split("\n\n")[0])
    _add_commands(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    # run the importable module's main, so commands registered by other modules (which import
    # ``loaders.cli_data``, not ``__main__``) are present
    from loaders.cli_data import main as _main
    sys.exit(_main())
