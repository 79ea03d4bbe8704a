"""Run configuration: one typed schema, YAML composition and ``key.sub=value`` overrides.

A run config is a YAML mapping with the sections of :class:`RunConfig`. A file may list other
files to start from::

    defaults: [data/demo.yaml, method/simclr.yaml]   # relative to the configs/ folder
    train: {steps: 500}

Files are merged in order (``defaults`` first, each one's own ``defaults`` before it, then the
file's own keys); later keys override earlier ones, mappings merge key by key, lists are
replaced, and a mapping with a different ``type`` or ``name`` than the one it lands on replaces
it whole (``eval.train: {type: npz, path: ...}`` over ``{type: cifar, root: ...}``, ``method:
{name: byol}`` over ``{name: simclr, temperature: 0.2}``). ``defaults`` entries are looked up
in the ``configs/`` folders above the file, next to the file, then in the shipped configs
(:data:`CONFIG_ROOT`: the repository's ``configs/`` in a checkout, the package data
``loaders/configs/`` when installed; see :func:`loaders.config_files.config_root`).

Command-line overrides come last, as ``key.sub=value`` strings. Their values are parsed as YAML
scalars (``1e-3`` -> float, ``[1,2]`` -> list, ``{a: 1}`` -> mapping); list items are indexed
by number (``data.sources.0.n=50``). Special forms:

* ``key=null`` (or ``key=~``, or ``key=``) *unsets* the key: it is removed from the composed
  dict, so the schema default (typed sections) or the owning component's default (open
  sections) applies, e.g. ``augment.preset=null``, ``train.steps=null``. ``key=null`` on a list
  item removes the item. (Inside YAML files ``null`` stays a value.)
* ``method=NAME`` / ``data=NAME`` (a bare string for a whole *config group* section) selects
  ``configs/method/NAME.yaml`` / ``configs/data/NAME.yaml`` (composed with its own
  ``defaults``; looked up like ``defaults`` entries). That file's ``method`` (``data``) section
  *replaces* the run's section (no hyper-parameters of the previous method survive); its other
  sections (e.g. ``augment: {preset: asymmetric}``) merge in like a ``defaults`` entry appended
  to the config file's list: over the config's defaults, under the config file's own keys.
  Group selections are applied before all ``key.sub=value`` overrides, whatever their order on
  the command line (``method=byol method.tau_base=0.996`` and the reverse mean the same). An
  unknown name is a ConfigError listing the names in the group folders. (:func:`apply_overrides`
  on a plain dict has no layers: there the other sections merge over the dict.)
* ``augment=NAME`` is ``augment: {preset: NAME}`` (the whole section is replaced; use
  ``augment.preset=NAME`` to keep the other augment keys such as ``size``).

YAML booleans are ``true``/``false`` only (any of true, True, TRUE, false, False, FALSE):
``yes``/``no``/``on``/``off`` stay strings (``train.mixed_precision=no`` is the string "no").
Fields of type ``bool`` also accept the strings yes/no/on/off/true/false in any case
(``train.probe=off`` -> False).

Typed sections (``model``, ``optim``, ``train``, ``eval``, ``log``) are checked here: an
unknown key raises :class:`~loaders.errors.ConfigError` naming the closest valid key, a value
of the wrong type names the key, the expected type and what it got. Open sections are passed
through to the component that owns their schema: ``data`` to ``loaders.pipeline.build_loader``,
``augment`` (``{preset: NAME, **overrides}``) to ``loaders.augment.Augment`` (its placement keys
``where``: auto | device | workers | dali and ``worker_precision``: uint8 | float go to the data
stream, :class:`loaders.stream.Stream`, and are checked here), ``method``
(``{name: NAME, **hparams}``) to ``fastssl.methods.build_method`` and ``recipes`` (a list of
``{name: NAME, **keys}``, e.g. ``[{name: bcl, beta: 0.97}]``) to the recipe registry; here
``recipes`` is only checked to be a list of mappings with a string ``name``.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml

from loaders.config_files import config_root
from loaders.errors import ConfigError, check_keys

__all__ = [
    "RunConfig", "ModelConfig", "OptimConfig", "TrainConfig", "EvalConfig", "LogConfig",
    "CONFIG_ROOT", "GROUPS", "load_yaml", "compose", "load_group", "apply_overrides", "parse_override",
    "from_dict", "load_config", "to_dict", "dump",
]

#: the shipped configs (``defaults`` entries and group files are looked up here last): the
#: repository's ``configs/`` in a checkout, the installed package data otherwise
CONFIG_ROOT = config_root()
#: config groups selectable by name on the command line (``method=byol``, ``data=demo``)
GROUPS = ("method", "data")


@dataclass
class ModelConfig:
    """Backbone: ``fastssl.models.build_backbone(name, cifar_stem=..., width=...)``."""

    backbone: str = "resnet18"
    cifar_stem: bool = True
    #: channels of the first stage (64 = standard ResNet-18)
    width: int = 64
    #: ViT only: input size (None = the first augmented view's size) and patch size
    img_size: Optional[int] = None
    patch_size: int = 16


@dataclass
class OptimConfig:
    """Optimizer and schedule. ``None`` means: the method's published recipe
    (``fastssl.methods.base.RECIPE_DEFAULTS`` overridden by ``Method.defaults`` and by recipe
    keys in the ``method:`` section)."""

    #: lars | sgd | adamw | adam
    name: Optional[str] = None
    #: base learning rate per 256 images; the run uses lr * (batch * world * accumulation) / 256
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    #: LARS trust coefficient
    eta: Optional[float] = None
    #: linear warmup from ``start_lr`` to the scaled lr, in optimizer steps
    warmup_steps: Optional[int] = None
    start_lr: Optional[float] = None
    #: the cosine ends at this (absolute) lr
    final_lr: Optional[float] = None
    #: gradient-norm clip
    clip_grad: Optional[float] = None


@dataclass
class TrainConfig:
    """Training length, precision, checkpoints and the online probe."""

    #: optimizer steps; None = derived from ``data.budget`` (images seen over all ranks)
    steps: Optional[int] = None
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    grad_accum: int = 1
    #: write a checkpoint every this many steps (0 = only at the end)
    checkpoint_every: int = 0
    #: how many step checkpoints are kept (older ones are deleted); 0 = keep all
    keep_checkpoints: int = 2
    #: path to a checkpoint, "auto" (latest in the run directory) or None
    resume: Optional[str] = None
    #: torch.use_deterministic_algorithms + fixed threads: bit-reproducible resume on CPU
    deterministic: bool = False
    #: "auto" (cuda when available) or "cpu"
    device: str = "auto"
    #: torch intra-op threads of each training process (None = torch's default, one per core)
    num_threads: Optional[int] = None
    sync_bn: bool = True
    #: channels-last memory format for convolutional backbones and their input views
    #: (None = on CUDA only, where cuDNN's NHWC kernels are faster; ViTs are never converted)
    channels_last: Optional[bool] = None
    #: compile the backbone with torch.compile (``nn.Module.compile``: same state_dict keys)
    compile: bool = False
    #: torch.compile backend (inductor on GPUs; aot_eager compiles without generating code)
    compile_backend: str = "inductor"
    #: online linear probe on detached backbone features
    probe: bool = True
    #: online probe lr per 256 images (None = the method's classifier_lr, 0.05: 0.1 at batch 512)
    probe_lr: Optional[float] = None
    num_classes: int = 10
    #: stop after this many steps without returning an error (tests; None = run to the end)
    stop_after: Optional[int] = None


@dataclass
class EvalConfig:
    """End-of-run evaluation on frozen features of unaugmented images.

    ``train``/``test`` are source configs (``{"type": "synthetic", ...}``): ``train`` is the
    labelled memory bank for kNN and the probe's training set, ``test`` the held-out split.
    """

    enabled: bool = True
    train: Optional[Dict[str, Any]] = None
    test: Optional[Dict[str, Any]] = None
    image_size: Optional[int] = None
    knn_k: int = 200
    knn_t: float = 0.1
    linear: bool = True
    linear_epochs: int = 100
    linear_optimizer: str = "adam"  # adam | sgd
    linear_lr: float = 1e-2
    linear_weight_decay: float = 5e-6
    linear_batch_size: int = 1000
    batch_size: int = 512
    #: also report kNN of the same encoder at random initialisation
    random_init_baseline: bool = True
    #: normalisation of the eval images (None = the augment preset's mean/std)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    #: long-tail protocol (BCL): linear probes on balanced n-per-class subsets of ``train``
    #: (e.g. [100, 50]), each the mean over ``few_shot_seeds`` subset seeds
    few_shot: List[int] = field(default_factory=list)
    few_shot_seeds: int = 5
    #: accuracies over many (> group_many images per class) / medium / few (< group_few)
    #: classes, counted in the pretraining split (see fastssl.eval.final_eval)
    groups: bool = False
    group_many: int = 100
    group_few: int = 20


@dataclass
class LogConfig:
    """Where and how the run writes its records."""

    #: run directory (overridden by ``fastssl pretrain --out``); None = runs/<config name>
    out: Optional[str] = None
    every: int = 10
    tensorboard: bool = True
    csv: bool = True
    plot: bool = True
    progress: bool = True
    #: write the sample ids of every step to indices_rank{r}.jsonl (reproducibility checks)
    indices: bool = False
    #: Weights & Biases logging: None (off), "offline" or "online"
    wandb: Optional[str] = None


@dataclass
class RunConfig:
    """The whole run. ``data``, ``augment``, ``method`` and ``recipes`` are validated by their owners."""

    data: Dict[str, Any] = field(default_factory=dict)
    augment: Dict[str, Any] = field(default_factory=lambda: {"preset": "symmetric"})
    method: Dict[str, Any] = field(default_factory=lambda: {"name": "simclr"})
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    #: training recipes layered on the method, each ``{name: NAME, **keys}`` (e.g. BCL:
    #: ``{name: bcl, beta: 0.97}``); their keys are checked by the recipe registry
    recipes: List[Dict[str, Any]] = field(default_factory=list)
    #: free-form name of the run (default: the config file's stem)
    name: str = "run"


#: mapping sections whose keys are checked by their owners, not here
_OPEN_SECTIONS = ("data", "augment", "method")
#: list sections of ``{name: ..., ...}`` entries checked by their owners (here: the list shape)
_OPEN_LISTS = ("recipes",)


# ----------------------------------------------------------------------------- YAML files
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``5e4`` as floats (YAML 1.1 wants ``1.0e-3``) and
    reads only true/false (True, TRUE, False, FALSE) as booleans: ``no``/``off``/``yes``/``on``
    stay strings (``mixed_precision: no``)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.add_implicit_resolver(   # (the first call gives _Loader its own copy of the resolver table)
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

#: strings that ``bool`` schema fields accept (case-insensitive)
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read one YAML mapping; ConfigError when the file is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        doc = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(doc).__name__}")
    return doc


def _deep_merge(base: Dict[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    """``top`` over ``base``: mappings merge recursively, everything else is replaced. A mapping
    whose ``type`` or ``name`` differs from the one below it (another data source, another
    method) replaces it whole: keys of a different kind of thing never leak into it."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and not _other_kind(out[k], v):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _other_kind(below: Mapping[str, Any], above: Mapping[str, Any]) -> bool:
    return any(key in below and key in above and below[key] != above[key] for key in ("type", "name"))


def _config_roots(path: Optional[Path]) -> List[Path]:
    """Where ``defaults`` entries and group files of the config ``path`` are looked up, in order:
    the ``configs/`` folders above it, its own folder, then :data:`CONFIG_ROOT`."""
    roots = [] if path is None else [p for p in [path.parent, *path.parents] if p.name == "configs"]
    if path is not None:
        roots.append(path.parent)
    roots.append(CONFIG_ROOT)
    return list(dict.fromkeys(roots))


def _find_default(entry: str, path: Path) -> Path:
    for root in _config_roots(path):
        cand = root / entry
        if cand.is_file():
            return cand
    raise ConfigError(f"{path}: 'defaults' entry '{entry}' not found under "
                      f"{', '.join(str(r) for r in _config_roots(path))}")


def _compose_layers(path: Union[str, Path], _seen: Sequence[Path] = ()):
    """``(defaults merged, the file's own keys)`` of ``path``; :func:`compose` merges the two."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {path} includes itself through 'defaults'")
    doc = load_yaml(path)
    defaults = doc.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of config files, got {type(defaults).__name__}")
    merged: Dict[str, Any] = {}
    for entry in defaults:
        merged = _deep_merge(merged, compose(_find_default(str(entry), path), (*_seen, path)))
    return merged, doc


def compose(path: Union[str, Path], _seen: Sequence[Path] = ()) -> Dict[str, Any]:
    """Merge ``path`` with its ``defaults`` (recursively) into one plain dict."""
    merged, doc = _compose_layers(path, _seen)
    return _deep_merge(merged, doc)


def load_group(group: str, name: str, roots: Optional[Sequence[Path]] = None) -> Dict[str, Any]:
    """The composed ``{group}/{name}.yaml`` from the first of ``roots`` (default: only
    :data:`CONFIG_ROOT`) that has it: what ``method=byol`` / ``data=demo`` selects."""
    roots = list(dict.fromkeys(roots or [CONFIG_ROOT]))
    name = name.removesuffix(".yaml")
    for root in roots:
        cand = root / group / f"{name}.yaml"
        if cand.is_file():
            doc = compose(cand)
            if not isinstance(doc.get(group), Mapping):
                raise ConfigError(f"config group file {cand} has no '{group}' section to select with {group}={name}")
            return doc
    folders = ", ".join(str(r / group) for r in roots)
    available = sorted({p.stem for r in roots for p in (r / group).glob("*.yaml")})
    check_keys({name: None}, available, f"config group '{group}' ({folders})")
    raise ConfigError(f"config group '{group}': {name}.yaml not found in {folders}")


def _check_preset(name: str) -> str:
    """``name`` when it is an augmentation preset, else ConfigError listing the presets."""
    from loaders.augment import PRESET_DIR, list_presets
    check_keys({name: None}, list_presets(), f"augmentation presets for augment={name} ({PRESET_DIR})")
    return name


# ----------------------------------------------------------------------------- overrides
def parse_override(text: str):
    """``"train.steps=100"`` -> ``(["train", "steps"], 100)``; the value is a YAML scalar
    (``None`` for ``null``, ``~`` or nothing: the key is unset)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from e
    return key.split("."), value


def _group_selection(keys: List[str], value: Any) -> bool:
    """``method=NAME`` / ``data=NAME``: a bare string for a whole group section."""
    return len(keys) == 1 and keys[0] in GROUPS and isinstance(value, str)


def apply_overrides(cfg: Dict[str, Any], overrides: Sequence[str], *,
                    roots: Optional[Sequence[Path]] = None) -> Dict[str, Any]:
    """Apply ``key.sub=value`` strings to a plain dict, in order (see the module docstring:
    ``key=null`` unsets, ``augment=NAME`` picks a preset, ``method=NAME``/``data=NAME`` select a
    group file from ``roots``, default :data:`CONFIG_ROOT`; here its other sections merge over
    ``cfg``)."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        if _group_selection(keys, value):
            doc = load_group(keys[0], value, roots)
            cfg = _deep_merge(cfg, {k: v for k, v in doc.items() if k != keys[0]})
            cfg[keys[0]] = doc[keys[0]]
            continue
        if keys == ["augment"] and isinstance(value, str):
            value = {"preset": _check_preset(value)}
        if value is None:    # unset: a misspelt key would otherwise pass silently
            _check_schema_key(keys)
        node = _walk(cfg, keys, text, create=value is not None)
        if node is None:     # unsetting a key under a section that is not there: nothing to do
            continue
        last = keys[-1]
        if isinstance(node, list):
            i = _list_index(node, last, ".".join(keys))
            if value is None:
                del node[i]
            else:
                node[i] = value
        elif value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


def _check_schema_key(keys: List[str]) -> None:
    """ConfigError (closest match) when ``keys`` names no top-level section or typed-section key."""
    check_keys({keys[0]: None}, [f.name for f in dataclasses.fields(RunConfig)], "the run config")
    section = typing.get_type_hints(RunConfig)[keys[0]]
    if dataclasses.is_dataclass(section) and len(keys) > 1:
        check_keys({keys[1]: None}, [f.name for f in dataclasses.fields(section)], f"config section '{keys[0]}'")


def _walk(cfg: Dict[str, Any], keys: List[str], text: str, *, create: bool):
    """The dict or list that holds ``keys[-1]``; missing sections are created when ``create``,
    else None is returned."""
    node: Any = cfg
    for i, k in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, k, where)]
        elif node.get(k) is not None:
            node = node[k]
        elif not create:
            return None
        else:
            node[k] = {}
            node = node[k]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override '{text}': '{where}' is a {type(node).__name__}, not a section")
    return node


def _list_index(node: list, k: str, where: str) -> int:
    try:
        i = int(k)
    except ValueError:
        raise ConfigError(f"override key '{where}': '{k}' indexes a list; use a number") from None
    if not -len(node) <= i < len(node):
        raise ConfigError(f"override key '{where}': index {i} out of range (list has {len(node)} items)")
    return i


# ----------------------------------------------------------------------------- typing
def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _check_type(value, tp, key: str):
    """Return ``value`` (ints widened to float where a float is expected) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = typing.get_args(tp)
        non_null = [a for a in args if a is not type(None)]
        if value is None and len(non_null) < len(args):
            return None
        if len(non_null) == 1:  # Optional[X]: X's own message is the precise one
            try:
                return _check_type(value, non_null[0], key)
            except ConfigError:
                if non_null[0] in (int, float, str, bool):
                    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, "
                                      f"got {type(value).__name__} {value!r}") from None
                raise
        errors = []
        for arg in args:
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            (arg,) = typing.get_args(tp) or (Any,)
            return [_check_type(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin in (dict, Dict):
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported schema type {tp} for {key}")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build_section(cls, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(values, fields, f"config section '{where}'")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = _build_section(hints[k], v, f"{where}.{k}" if where else k)
        else:
            kwargs[k] = _check_type(v, hints[k], f"{where}.{k}" if where else k)
    return cls(**kwargs)


def from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Type-check a plain dict against the schema and return a :class:`RunConfig`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a run config must be a mapping, got {type(d).__name__}")
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    check_keys(d, fields, "the run config")
    _check_removed(d)
    kwargs: Dict[str, Any] = {}
    for name in _OPEN_SECTIONS:
        if name in d:
            v = d.pop(name)
            if not isinstance(v, Mapping):
                raise ConfigError(f"config section '{name}' must be a mapping, got {type(v).__name__} {v!r}")
            kwargs[name] = copy.deepcopy(dict(v))
    for name in _OPEN_LISTS:
        if name in d:
            kwargs[name] = _check_named_list(d.pop(name), name)
    if "method" in kwargs and "name" not in kwargs["method"]:
        raise ConfigError("config section 'method' needs a 'name' (e.g. simclr)")
    if "augment" in kwargs and isinstance(kwargs["augment"].get("preset", ""), str) is False:
        raise ConfigError(f"config key 'augment.preset': expected str, got {kwargs['augment']['preset']!r}")
    cfg = _build_section(RunConfig, d, "")
    for k, v in kwargs.items():
        setattr(cfg, k, v)
    _validate(cfg)
    return cfg


def _check_removed(d: Mapping[str, Any]) -> None:
    """Keys that moved elsewhere: a ConfigError that says where to, not just 'unknown key'."""
    train = d.get("train")
    if isinstance(train, Mapping):
        for k in ("bcl", "bcl_beta"):
            if k in train:
                beta = train.get("bcl_beta", 0.97)
                raise ConfigError(f"config key 'train.{k}': train.bcl was replaced by "
                                  f"recipes: [{{name: bcl, beta: {beta}}}]")


def _check_named_list(value: Any, key: str) -> List[Dict[str, Any]]:
    """``recipes``: a list of mappings, each with a string ``name`` (the rest is the owner's)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key '{key}': expected a list of {{name: ..., ...}} mappings, "
                          f"got {type(value).__name__} {value!r}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"config key '{key}[{i}]': expected a mapping such as {{name: bcl, beta: 0.97}}, "
                              f"got {type(entry).__name__} {entry!r}")
        if not isinstance(entry.get("name"), str):
            raise ConfigError(f"config key '{key}[{i}].name': expected str (the entry's name), "
                              f"got {entry.get('name')!r}")
        out.append(copy.deepcopy(dict(entry)))
    return out


def _validate(cfg: RunConfig) -> None:
    """Value checks that types alone do not catch."""
    t = cfg.train
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"config key 'train.mixed_precision': expected no, fp16 or bf16, got {t.mixed_precision!r}")
    if t.device not in ("auto", "cpu"):
        raise ConfigError(f"config key 'train.device': expected auto or cpu, got {t.device!r}")
    if t.grad_accum < 1:
        raise ConfigError(f"config key 'train.grad_accum': must be >= 1, got {t.grad_accum}")
    if t.num_threads is not None and t.num_threads < 1:
        raise ConfigError(f"config key 'train.num_threads': must be >= 1, got {t.num_threads}")
    if t.steps is not None and t.steps < 1:
        raise ConfigError(f"config key 'train.steps': must be >= 1, got {t.steps}")
    if t.checkpoint_every < 0:
        raise ConfigError(f"config key 'train.checkpoint_every': must be >= 0, got {t.checkpoint_every}")
    if t.keep_checkpoints < 0:
        raise ConfigError(f"config key 'train.keep_checkpoints': must be >= 0 (0 = keep all), got {t.keep_checkpoints}")
    validate_eval(cfg.eval)
    if cfg.log.every < 1:
        raise ConfigError(f"config key 'log.every': must be >= 1, got {cfg.log.every}")
    if cfg.log.wandb not in (None, "offline", "online"):
        raise ConfigError(f"config key 'log.wandb': expected null, offline or online, got {cfg.log.wandb!r}")
    if cfg.optim.warmup_steps is not None and cfg.optim.warmup_steps < 0:
        raise ConfigError(f"config key 'optim.warmup_steps': must be >= 0, got {cfg.optim.warmup_steps}")
    _validate_placement(cfg.augment)


def _validate_placement(section: Mapping[str, Any]) -> None:
    """``augment.where`` / ``augment.worker_precision``: the values the data stream knows."""
    from loaders.stream import WHERE, WORKER_PRECISIONS
    for key, allowed in (("where", WHERE), ("worker_precision", WORKER_PRECISIONS)):
        if key in (section or {}) and section[key] not in allowed:
            raise ConfigError(f"config key 'augment.{key}': expected {' | '.join(allowed)}, got {section[key]!r}")


def validate_eval(ev: EvalConfig) -> None:
    """Value checks of the ``eval`` section (also run on ``fastssl eval``'s flag overrides)."""
    if ev.linear_optimizer not in ("adam", "sgd"):
        raise ConfigError(f"config key 'eval.linear_optimizer': expected adam or sgd, got {ev.linear_optimizer!r}")
    bad = [n for n in ev.few_shot if n < 1]
    if bad:
        raise ConfigError(f"config key 'eval.few_shot': shots per class must be >= 1, got {ev.few_shot}")
    if len(set(ev.few_shot)) != len(ev.few_shot):
        raise ConfigError(f"config key 'eval.few_shot': each shot count once, got {ev.few_shot}")
    if ev.few_shot and not ev.linear:
        raise ConfigError(f"config key 'eval.few_shot': few-shot accuracies are linear probes; "
                          f"set eval.linear: true or eval.few_shot: [] (got {ev.few_shot})")
    if ev.few_shot_seeds < 1:
        raise ConfigError(f"config key 'eval.few_shot_seeds': must be >= 1, got {ev.few_shot_seeds}")
    if ev.group_few < 1:
        raise ConfigError(f"config key 'eval.group_few': must be >= 1, got {ev.group_few}")
    if ev.group_many <= ev.group_few:
        raise ConfigError(f"config key 'eval.group_many': must be > eval.group_few ({ev.group_few}), "
                          f"got {ev.group_many}")


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = (),
                *, base: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """Compose ``path`` (over ``base``), apply ``overrides``, type-check.

    Layers, lowest first: ``base``; the file's ``defaults``; the group files selected by
    ``method=NAME`` / ``data=NAME`` overrides (all sections but the selected one); the file's own
    keys; the selected sections (replacing the run's); then the ``key.sub=value`` overrides in
    order. Group files are looked up like ``defaults`` entries of ``path``. The run's ``name``
    defaults to the config file's stem.
    """
    roots = _config_roots(None if path is None else Path(path).resolve())
    groups, rest = [], []
    for text in overrides:
        keys, value = parse_override(text)
        if _group_selection(keys, value):
            groups.append((keys[0], load_group(keys[0], value, roots)))
        else:
            rest.append(text)
    lower, own = _compose_layers(path) if path is not None else ({}, {})
    d = _deep_merge(dict(base or {}), lower)
    for group, doc in groups:
        d = _deep_merge(d, {k: v for k, v in doc.items() if k != group})
    d = _deep_merge(d, {k: v for k, v in own.items() if k not in {g for g, _ in groups}})
    for group, doc in groups:
        d[group] = copy.deepcopy(doc[group])
    if path is not None:
        d.setdefault("name", Path(path).stem)
    return from_dict(apply_overrides(d, rest, roots=roots))


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """Plain nested dict (YAML/JSON-serialisable), the inverse of :func:`from_dict`."""
    return dataclasses.asdict(cfg)


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
