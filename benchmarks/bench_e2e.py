"""``fastssl bench e2e``: training samples/sec of one method + backbone fed by the real data path,
against the same step on synthetic input already on the device (the model-only ceiling).

Three variants, measured in interleaved rounds (each: warm-up steps, then a timed window):

* ``model-only``  -- the training step on random normalised views resident on the device: what
  the model can do when data is free. It is :class:`fastssl.step.TrainStep` built by
  :func:`fastssl.build.build_training` -- the very step ``fastssl pretrain`` takes (method and
  online probe forward, backward, update, EMA), with the method's published optimizer;
* ``real``        -- the same step fed by the run's own data stream (:class:`loaders.stream.Stream`
  via :func:`fastssl.loop.device_batches`: the backend, augmentation where ``augment.where``
  says, the copy to the device);
* ``loader-only`` -- the same stream with no model: what the data path can deliver.

``--where workers,device`` measures ``real`` and ``loader-only`` for each place augmentation can
run, side by side in the same rounds (the first place gets the plain ``real/<backend>/<format>``
keys, the others ``...@<where>``); ``auto`` is the run's default (the loader workers on a CPU-only
machine, the device with a GPU). The resolved places are in the record's ``config.where``.

``real / model-only`` near 1 means compute-bound (the data path keeps up); well below 1 means
data-bound. On a CPU-only machine the loader's workers and the model share the same cores, so
``real`` is below both; on a GPU machine the two run on different hardware.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from .bench_loader import Variant, close_iter, measure_rounds
from .common import write_record
from .data import make_bench_data

__all__ = ["run", "build_run", "verdict", "add_arguments", "from_args"]


def build_run(source_cfg: Dict, *, method: str, backbone: str, width: int, cifar_stem: bool, preset: str,
              size: int, views: int, batch_size: int, num_workers: int, device: str, seed: int = 0,
              backend: str = "torch", mixed_precision: str = "no", channels_last: Optional[bool] = None,
              compile: bool = False, overrides: Sequence[str] = (), where: str = "auto"):
    """``(parts, accelerator, step)``: the training run's own parts and step
    (:func:`fastssl.build.build_training`, :class:`fastssl.step.TrainStep`) for a config that
    reads ``source_cfg`` with ``backend`` (torch: decode + crop in workers; resident: the images
    held on the device, cropped there); ``step(views, labels)`` is one optimizer step as
    ``fastssl pretrain`` takes it (method + online probe, backward, update, EMA). ``overrides``
    (``key=value``, as on the pretrain command line) go on top, e.g. a method's ``vae_path`` or
    ``recipes=[...]``; the recipes are set up as the trainer does, and the variants apply their
    view rewrite before every step."""
    from fastssl.build import build_training
    from fastssl.config import load_config
    from fastssl.step import TrainModule, TrainStep
    from fastssl.trainer import make_accelerator, setup_recipes
    from loaders.base import build_source

    src = {k: v for k, v in source_cfg.items() if k != "name"}
    labels = np.asarray(build_source(src).labels())
    base = {
        "name": "bench-e2e",
        "data": {"sources": [dict(source_cfg)], "seed": seed, "backend": backend, "batch_size": batch_size,
                 "num_workers": num_workers, "on_error": "raise", "image_size": size,
                 "crop_in_decode": backend != "resident", "pin_memory": device.startswith("cuda")},
        "augment": {"preset": preset, "size": size, "where": where},
        "method": {"name": method},
        "model": {"backbone": backbone, "width": width, "cifar_stem": cifar_stem},
        "optim": {"warmup_steps": 0},
        "train": {"steps": 1, "seed": seed, "device": "cpu" if device == "cpu" else "auto",
                  "num_classes": max(2, int(labels.max()) + 1 if labels.size else 2),
                  "mixed_precision": mixed_precision, "channels_last": channels_last, "compile": compile},
        "eval": {"enabled": False},
    }
    cfg = load_config(None, list(overrides), base=base)
    accelerator = make_accelerator(cfg)
    parts = build_training(cfg, device=accelerator.device)
    setup_recipes(parts, accelerator, 1, None)
    specs = list(parts.aug.crop_specs)
    if len(specs) != views or any(s.size != size for s in specs):
        from loaders.errors import ConfigError
        raise ConfigError(f"augment preset '{preset}' makes {len(specs)} views of sizes {[s.size for s in specs]}; "
                          f"this benchmark needs {views} views of {size} px (choose another --preset)")
    objs = [TrainModule(parts.method, parts.probe), parts.optimizer]
    objs += [parts.probe_opt] if parts.probe_opt is not None else []
    prepared = accelerator.prepare(*objs)
    step = TrainStep(accelerator, prepared[0], prepared[1], prepared[2] if len(prepared) > 2 else None,
                     grad_clip=parts.recipe.get("grad_clip"), channels_last=parts.channels_last)
    step.module.train()
    return parts, accelerator, step


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _rewrite(recipes, views, batch=None):
    """The recipes' on-device view rewrite, as the loop applies it before the method."""
    for r in recipes:
        views = r.rewrite_views(views, batch)
    return views


def model_only(step, *, batch_size: int, size: int, views: int, device, seed: int = 0,
               recipes=()) -> Iterator[Tuple[None, int]]:
    """Endless training steps on fixed random views (and labels) already on ``device`` (with the
    recipes' view rewrite, which is part of the step's cost)."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    vs = [torch.randn(batch_size, 3, size, size, generator=g).to(device) for _ in range(views)]
    labels = torch.zeros(batch_size, dtype=torch.int64, device=device)
    while True:
        step(_rewrite(recipes, vs), labels, progress=0.5)
        _sync(device)
        yield None, batch_size


def plain_pytorch(*, method: str, backbone: str, width: int, cifar_stem: bool, batch_size: int, size: int,
                  views: int, device, mixed_precision: str = "no", channels_last: bool = False,
                  compile: bool = False, seed: int = 0) -> Iterator[Tuple[None, int]]:
    """A reference training loop written plainly here, not through fastssl's trainer: the same
    model and loss (the registered method), the same optimizer (its published recipe), the
    same memory format, autocast and compile settings, on fixed random views on the device."""
    import torch

    from fastssl.methods import build_method
    from fastssl.models import build_backbone
    from fastssl.optim import build_optimizer

    torch.manual_seed(seed)
    net, feat = build_backbone(backbone, cifar_stem=cifar_stem, width=width)
    model = build_method(method, backbone=net, feat_dim=feat).to(device)
    r = model.recipe
    opt = build_optimizer(r["optimizer"], model.param_groups(), lr=r["lr"] * batch_size / 256,
                          weight_decay=r["weight_decay"], **{k: r[k] for k in ("momentum", "eta", "clip", "betas")})
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    if compile:
        model.backbone.compile()
    g = torch.Generator(device="cpu").manual_seed(seed)
    vs = [torch.randn(batch_size, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt)
          for _ in range(views)]
    kind = torch.device(device).type
    model.train()
    while True:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            loss = model(vs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_momentum(0.5)
        _sync(device)
        yield None, batch_size


def real_data(parts, accelerator, *, step=None, seed: int = 0, stream=None) -> Iterator[Tuple[None, int]]:
    """Endless training steps (or, with ``step=None``, loader + augmentation only) on the run's
    own data stream (``stream``: another place augmentation runs; default ``parts.stream``),
    as the trainer iterates it (:func:`fastssl.loop.device_batches`)."""
    from fastssl.loop import device_batches

    device = accelerator.device
    batches = device_batches(stream if stream is not None else parts.stream)
    try:
        for views, batch in batches:
            if step is not None:
                step(_rewrite(parts.recipes, views, batch), batch.label, progress=0.5)
            _sync(device)
            yield None, len(batch)
    finally:
        close_iter(batches)
        del batches


def verdict(real: float, model: float, loader: Optional[float] = None) -> Dict:
    """``data-bound`` or ``compute-bound`` from the medians, with the ratio that decides it."""
    r = real / model
    out = {"kind": "verdict", "real_over_model_only": r,
           "bound": "compute-bound" if r >= 0.9 else "data-bound",
           "text": (f"compute-bound: real data reaches {100 * r:.0f}% of the model-only rate" if r >= 0.9 else
                    f"data-bound: real data reaches {100 * r:.0f}% of the model-only rate "
                    f"(the model idles ~{100 * (1 - r):.0f}% of the time)")}
    if loader:
        out["loader_over_model_only"] = loader / model
    return out


def run(*, method: str = "simclr", backbone: str = "resnet18", width: int = 64, cifar_stem: bool = True,
        dataset: str = "cifar", n: int = 2048, fmt: str = "shards", batch_size: Optional[int] = None,
        num_workers: Optional[int] = None, views: int = 2, preset: Optional[str] = None, repeats: int = 3,
        window_s: float = 10.0, warmup: int = 2, device: Optional[str] = None, cache=None, out_dir=None,
        command: Optional[str] = None, progress: bool = True, seed: int = 0, backend: str = "torch",
        mixed_precision: str = "no", channels_last: Optional[bool] = None, compile: bool = False,
        overrides: Sequence[str] = (), baseline_method: Optional[str] = None, wheres: Sequence[str] = ("auto",)):
    """Measure model-only, plain-pytorch, real and loader-only rates; write a record (+ PNG) and
    return its path. ``overrides``: config ``key=value`` on top (a method's files, ``recipes``);
    the plain loop is then left out (it builds the method from its defaults only).
    ``baseline_method``: also the model-only rate of that method (same model, data, preset, no
    overrides) in the same rounds, and the per-step cost ratio against it."""
    import torch

    from .bench_loader import DEFAULT_PRESETS
    from .report import plot_record

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = batch_size or (256 if device.startswith("cuda") else 32)
    cores = num_workers or len(os.sched_getaffinity(0))
    data = make_bench_data(dataset, n=n, root=cache, progress=progress)
    if fmt not in data.formats:
        fmt = "folder"
    size, preset = data.out_size, preset or DEFAULT_PRESETS[dataset]
    model_kw = dict(method=method, backbone=backbone, width=width, cifar_stem=cifar_stem)
    speed = dict(mixed_precision=mixed_precision, channels_last=channels_last, compile=compile)
    run_kw = dict(**speed, preset=preset, size=size, views=views, batch_size=batch_size, num_workers=cores,
                  device=device, seed=seed, backend=backend)
    wheres = list(wheres) or ["auto"]
    parts, accelerator, step = build_run(data.source_config(fmt), **model_kw, **run_kw, overrides=overrides,
                                         where=wheres[0])
    dev = accelerator.device
    tag = f"{backend}/{fmt}"
    shape = dict(batch_size=batch_size, size=size, views=views, device=dev, seed=seed)
    variants = [Variant("model-only", "model", lambda: model_only(step, **shape, recipes=parts.recipes))]
    if not overrides:
        plain = {**model_kw, **speed, "channels_last": parts.channels_last}
        variants.append(Variant("plain-pytorch", "baseline", lambda: plain_pytorch(**plain, **shape)))
    if baseline_method:
        _, _, base_step = build_run(data.source_config(fmt), **{**model_kw, "method": baseline_method}, **run_kw)
        variants.append(Variant(f"model-only/{baseline_method}", "baseline",
                                lambda: model_only(base_step, **shape)))
    streams = {"": parts.stream}
    for w in wheres[1:]:
        streams[f"@{w}"] = parts.stream.with_where(w)
    for suffix, st in streams.items():
        variants += [
            Variant(f"real/{tag}{suffix}", "e2e", lambda st=st: real_data(parts, accelerator, step=step, stream=st)),
            Variant(f"loader-only/{tag}{suffix}", "ours", lambda st=st: real_data(parts, accelerator, stream=st)),
        ]
    res = measure_rounds(variants, repeats=repeats, seconds=window_s, warmup=warmup, progress=progress)
    _verdicts(res, tag, baseline_method)
    config = {**model_kw, "dataset": dataset, "n": n, "view_px": size, "format": fmt, "backend": backend,
              "batch_size": batch_size, "views": views, "num_workers": cores, "device": device,
              "torch_threads": torch.get_num_threads(), "preset": preset, "repeats": repeats, "window_s": window_s,
              "warmup_steps": warmup, "generator": data.generator, "seed": seed, **speed,
              "overrides": list(overrides), "baseline_method": baseline_method,
              "channels_last_used": parts.channels_last,
              "where": {f"{tag}{k}": st.where for k, st in streams.items()}, "where_requested": wheres,
              "step": "fastssl.step.TrainStep (method + online probe, as fastssl pretrain)",
              "plain-pytorch": "the same method module and optimizer in a plain loop (no probe, no trainer)",
              "unit": "training samples/s (each sample = `views` views)"}
    path = write_record("e2e", config=config, results=res, command=command, directory=out_dir or _results())
    plot_record(path)
    return path


def _verdicts(res: Dict, tag: str, baseline_method: Optional[str] = None) -> None:
    """Medians per variant, the data-bound verdict and fastssl's step against the plain loop."""
    from .common import summarize
    for v in res.values():
        if v.get("values"):
            v.update(summarize(v["values"]))
    if all(res[k].get("values") for k in ("model-only", f"real/{tag}")):
        res["verdict"] = verdict(res[f"real/{tag}"]["median"], res["model-only"]["median"],
                                 res[f"loader-only/{tag}"].get("median"))
    if all(res.get(k, {}).get("values") for k in ("model-only", "plain-pytorch")):
        r = res["model-only"]["median"] / res["plain-pytorch"]["median"]
        res["step-vs-plain"] = {"kind": "verdict", "model_only_over_plain_pytorch": r,
                                "text": f"fastssl's training step runs at {r:.2f}x the plain PyTorch loop"}
    base = f"model-only/{baseline_method}" if baseline_method else None
    if base and all(res.get(k, {}).get("values") for k in ("model-only", base)):
        r = res[base]["median"] / res["model-only"]["median"]
        res["cost-vs-baseline"] = {"kind": "verdict", "step_cost_over_baseline": r,
                                   "text": f"a step costs {r:.2f}x a {baseline_method} step (model-only rates)"}


def _results():
    from .common import RESULTS
    return RESULTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="simclr")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=int, default=64, help="backbone base width (64 = standard ResNet-18)")
    p.add_argument("--no-cifar-stem", action="store_true", help="ImageNet stem (7x7 conv + max-pool)")
    p.add_argument("--dataset", default="cifar", help="cifar (32 px) or imagenet (224 px)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--format", default="shards", help="shards | npz | folder")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on the CPU")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=float, default=10.0, help="seconds timed per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="steps before timing")
    p.add_argument("--device", default=None)
    p.add_argument("--preset", default=None, help="default: symmetric, at the set's size")
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--backend", default="torch", choices=["torch", "resident", "dali"],
                   help="torch: decode + crop in loader workers; resident: images held on the device; "
                        "dali: a DALI pipeline (with --where dali it runs the whole recipe)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last model and views (default: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (both loops)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override on top of the benchmark's run (repeatable), e.g. method.vae_path=... "
                        "or 'recipes=[{name: isicle}]'")
    p.add_argument("--where", default="auto",
                   help="where augmentation runs, comma-separated to compare side by side: auto | device | "
                        "workers | dali (e.g. workers,device)")
    p.add_argument("--baseline-method", default=None,
                   help="also measure this method's model-only rate in the same rounds (per-step cost ratio)")


def from_args(args, command: str):
    return run(method=args.method, backbone=args.backbone, width=args.width, cifar_stem=not args.no_cifar_stem,
               dataset=args.dataset, n=args.n, fmt=args.format, batch_size=args.batch_size,
               num_workers=args.workers, repeats=args.repeats, window_s=args.window, warmup=args.warmup,
               device=args.device, preset=args.preset, cache=args.cache, out_dir=args.out, command=command,
               backend=args.backend, mixed_precision=args.mixed_precision, channels_last=args.channels_last,
               compile=args.compile, overrides=args.overrides, baseline_method=args.baseline_method,
               wheres=[w.strip() for w in args.where.split(",") if w.strip()])
