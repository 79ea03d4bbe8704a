"""Config schema: composition, overrides, type checks and unknown keys."""
import textwrap

import pytest

from fastssl.config import RunConfig, apply_overrides, compose, from_dict, load_config, parse_override, to_dict
from loaders.errors import ConfigError


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "configs"
    _write(root / "data" / "d.yaml", """
        data:
          sources: [{name: real, type: synthetic, n: 100}]
          batch_size: 64
        train: {steps: 10, seed: 1}
    """)
    _write(root / "method" / "m.yaml", """
        method: {name: simclr, temperature: 0.5}
        optim: {lr: 0.3}
        train: {steps: 20}
    """)
    _write(root / "recipe" / "r.yaml", """
        defaults: [data/d.yaml, method/m.yaml]
        train: {steps: 30}
        method: {temperature: 0.2}
        model: {width: 16}
    """)
    return root


def test_compose_later_overrides_earlier_and_merges_sections(tree):
    d = compose(tree / "recipe" / "r.yaml")
    assert d["train"] == {"steps": 30, "seed": 1}           # file over defaults, merged key by key
    assert d["method"] == {"name": "simclr", "temperature": 0.2}
    assert d["optim"] == {"lr": 0.3}
    assert d["data"]["batch_size"] == 64
    cfg = load_config(tree / "recipe" / "r.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "r" and cfg.train.steps == 30 and cfg.model.width == 16
    assert cfg.optim.lr == 0.3 and cfg.model.backbone == "resnet18"   # schema default kept


def test_overrides_parse_yaml_scalars(tree):
    cfg = load_config(tree / "recipe" / "r.yaml",
                      ["train.steps=7", "optim.lr=1e-3", "train.resume=null", "data.sources.0.n=50",
                       "method.temperature=0.1", "eval.mean=[0.5, 0.5, 0.5]", "log.out=/tmp/x"])
    assert cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.resume is None
    assert cfg.data["sources"][0]["n"] == 50
    assert cfg.method["temperature"] == 0.1
    assert cfg.eval.mean == [0.5, 0.5, 0.5]
    assert cfg.log.out == "/tmp/x"
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=abc") == (["x"], "abc")
    # int widened to float where a float is expected
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def test_override_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="index 3 out of range"):
        apply_overrides({"data": {"sources": [{}]}}, ["data.sources.3.n=1"])


def test_unknown_key_names_closest(tree):
    with pytest.raises(ConfigError, match=r"unknown key 'stpes' in config section 'train'; did you mean 'steps'"):
        load_config(tree / "recipe" / "r.yaml", ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'optm'.*did you mean 'optim'"):
        from_dict({"optm": {}})


@pytest.mark.parametrize("override, key, expected, got", [
    ("train.steps=abc", "train.steps", "int or null", "str 'abc'"),
    ("optim.lr=true", "optim.lr", "float or null", "bool True"),
    ("train.deterministic=3", "train.deterministic", "bool", "int 3"),
    ("eval.mean=[a, 1, 2]", "eval.mean[0]", "float", "str 'a'"),
])
def test_wrong_type_names_key_expected_and_got(override, key, expected, got):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and f"expected {expected}" in msg and got in msg


def test_value_checks_and_sections():
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        from_dict({"model": 3})
    with pytest.raises(ConfigError, match="'method' needs a 'name'"):
        from_dict({"method": {"temperature": 0.1}})


def test_missing_default_and_cycle(tmp_path):
    root = tmp_path / "configs"
    _write(root / "a.yaml", "defaults: [nope.yaml]\n")
    with pytest.raises(ConfigError, match="'nope.yaml' not found"):
        compose(root / "a.yaml")
    _write(root / "b.yaml", "defaults: [c.yaml]\n")
    _write(root / "c.yaml", "defaults: [b.yaml]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        compose(root / "b.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip(tree):
    cfg = load_config(tree / "recipe" / "r.yaml")
    assert from_dict(to_dict(cfg)) == cfg


def test_repo_configs_load():
    """Every shipped run config composes and type-checks."""
    from fastssl.config import CONFIG_ROOT
    files = [CONFIG_ROOT / "demo.yaml", *sorted((CONFIG_ROOT / "recipe").glob("*.yaml"))]
    for f in files:
        if f.exists():
            cfg = load_config(f)
            assert cfg.method["name"] and cfg.data.get("sources"), f


# ----------------------------------------------------------------------------- config groups
def test_group_selection_replaces_the_method_section(tree):
    from fastssl.config import CONFIG_ROOT, load_yaml
    byol = load_yaml(CONFIG_ROOT / "method" / "byol.yaml")
    cfg = load_config(tree / "recipe" / "r.yaml", ["method=byol"])
    assert cfg.method == byol["method"]                      # replaced: no simclr temperature left
    assert "temperature" not in cfg.method
    assert cfg.augment == {"preset": "asymmetric"}           # the group file's other section
    assert cfg.optim.lr == 0.3 and cfg.train.steps == 30     # the rest of the run is kept
    # group selections come before key=value overrides, whatever the order on the command line
    for order in (["method.tau_base=0.9", "method=byol"], ["method=byol", "method.tau_base=0.9"]):
        assert load_config(tree / "recipe" / "r.yaml", order).method["tau_base"] == 0.9
    assert load_config(None, ["method=byol"]).method["name"] == "byol"


def test_group_file_merges_under_the_config_files_own_keys(tree):
    _write(tree / "method" / "g.yaml", """
        method: {name: byol}
        train: {steps: 99, seed: 5}
        augment: {preset: asymmetric, size: 16}
    """)
    _write(tree / "method" / "simclr.yaml", "method: {name: simclr, temperature: 0.7}\n")
    _write(tree / "recipe" / "a.yaml", """
        defaults: [recipe/r.yaml]
        augment: {preset: bcl}
        train: {steps: 40}
    """)
    cfg = load_config(tree / "recipe" / "a.yaml", ["method=g"])
    assert cfg.method == {"name": "byol"}
    assert cfg.train.steps == 40 and cfg.train.seed == 5     # own key wins; group over defaults
    assert cfg.augment == {"preset": "bcl", "size": 16}
    # the config's own configs/ tree is searched before the shipped configs
    assert load_config(tree / "recipe" / "r.yaml", ["method=simclr"]).method["temperature"] == 0.7
    # on a plain dict (no layers) the group file's other sections merge over it
    d = apply_overrides({"augment": {"preset": "symmetric", "size": 16},
                         "method": {"name": "simclr", "temperature": 0.5}}, ["method=byol"])
    assert d["augment"] == {"preset": "asymmetric", "size": 16} and "temperature" not in d["method"]


def test_data_and_augment_selection():
    from fastssl.config import CONFIG_ROOT, load_yaml
    base = {"data": {"sources": [{"type": "synthetic", "n": 8}], "budget": 1000}}
    cfg = load_config(None, ["data=demo"], base=base)
    assert cfg.data == load_yaml(CONFIG_ROOT / "data" / "demo.yaml")["data"] and "budget" not in cfg.data
    assert cfg.eval.test["split"] == "test"
    cfg = load_config(None, ["augment=asymmetric"], base={"augment": {"preset": "bcl", "size": 16}})
    assert cfg.augment == {"preset": "asymmetric"}
    assert load_config(None, ["augment.preset=bcl"], base={"augment": {"size": 16}}).augment == \
        {"size": 16, "preset": "bcl"}


def test_unknown_group_name_lists_the_folder_and_names(tree):
    with pytest.raises(ConfigError, match=r"'byl' in config group 'method' \(.*method.*did you mean 'byol'.*simclr"):
        load_config(None, ["method=byl"])
    with pytest.raises(ConfigError, match=r"config group 'data' .*did you mean 'demo'"):
        load_config(tree / "recipe" / "r.yaml", ["data=dmo"])
    with pytest.raises(ConfigError, match=r"'symetric' in augmentation presets.*augment.*did you mean 'symmetric'"):
        load_config(None, ["augment=symetric"])
    _write(tree / "method" / "bad.yaml", "train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="has no 'method' section"):
        load_config(tree / "recipe" / "r.yaml", ["method=bad"])


def test_every_shipped_group_file_selects():
    from fastssl.config import CONFIG_ROOT
    from loaders.augment import list_presets
    demo = CONFIG_ROOT / "demo.yaml"
    for f in sorted((CONFIG_ROOT / "method").glob("*.yaml")):
        assert load_config(demo, [f"method={f.stem}"]).method["name"] == f.stem
    for f in sorted((CONFIG_ROOT / "data").glob("*.yaml")):
        assert load_config(demo, [f"data={f.stem}"]).data["sources"]
    for name in list_presets():
        assert load_config(demo, [f"augment={name}"]).augment == {"preset": name}


# ----------------------------------------------------------------------------- key=null unsets
def test_null_unsets_the_key(tree):
    _write(tree / "recipe" / "aug.yaml", """
        defaults: [recipe/r.yaml]
        augment: {preset: bcl, size: 16}
        data: {sources: [{name: a, type: synthetic, n: 10}, {name: b, type: synthetic, n: 20}]}
    """)
    path = tree / "recipe" / "aug.yaml"
    cfg = load_config(path, ["augment.preset=null"])
    assert cfg.augment == {"size": 16} and "preset" not in cfg.augment
    cfg = load_config(path, ["train.steps=null", "train.seed=~", "model.width=", "data.sources.0=null"])
    assert cfg.train.steps is None and cfg.train.seed == 0 and cfg.model.width == 64
    assert [s["name"] for s in cfg.data["sources"]] == ["b"]
    assert load_config(path, ["augment=null"]).augment == {"preset": "symmetric"}   # schema default
    assert load_config(path, ["log.out=null", "eval.train.n=null"]).log.out is None   # absent: no-op
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(path, ["train.stpes=null"])


# ----------------------------------------------------------------------------- booleans
def test_only_true_false_are_yaml_booleans():
    for word in ("no", "No", "NO", "yes", "on", "off", "On", "y", "n"):
        assert parse_override(f"x={word}") == (["x"], word)
    for word, value in (("true", True), ("True", True), ("TRUE", True),
                        ("false", False), ("False", False), ("FALSE", False)):
        assert parse_override(f"x={word}") == (["x"], value)
    cfg = load_config(None, ["train.mixed_precision=no", "train.probe=off", "log.tensorboard=no",
                             "train.deterministic=YES", "log.csv=On", "train.sync_bn=false"])
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.probe is False and cfg.log.tensorboard is False and cfg.train.sync_bn is False
    assert cfg.train.deterministic is True and cfg.log.csv is True
    with pytest.raises(ConfigError, match=r"'train.probe': expected bool, got str 'maybe'"):
        load_config(None, ["train.probe=maybe"])


def test_yaml_files_keep_no_as_a_string(tmp_path):
    _write(tmp_path / "configs" / "x.yaml", """
        train: {mixed_precision: no, probe: off}
        log: {tensorboard: False}
    """)
    cfg = load_config(tmp_path / "configs" / "x.yaml")
    assert cfg.train.mixed_precision == "no" and cfg.train.probe is False and cfg.log.tensorboard is False
    assert from_dict(to_dict(cfg)) == cfg


# ----------------------------------------------------------------------------- new keys
def test_keep_checkpoints_and_wandb():
    cfg = load_config(None)
    assert cfg.train.keep_checkpoints == 2 and cfg.log.wandb is None and cfg.recipes == []
    assert load_config(None, ["train.keep_checkpoints=0"]).train.keep_checkpoints == 0
    with pytest.raises(ConfigError, match=r"'train.keep_checkpoints': must be >= 0"):
        load_config(None, ["train.keep_checkpoints=-1"])
    for mode in ("offline", "online"):
        assert load_config(None, [f"log.wandb={mode}"]).log.wandb == mode
    with pytest.raises(ConfigError, match=r"'log.wandb': expected null, offline or online"):
        load_config(None, ["log.wandb=yes"])


def test_recipes_section():
    cfg = load_config(None, ["recipes=[{name: bcl, beta: 0.97}]", "recipes.0.beta=0.9"])
    assert cfg.recipes == [{"name": "bcl", "beta": 0.9}]
    assert from_dict(to_dict(cfg)) == cfg
    for bad, where in (("recipes=bcl", r"'recipes': expected a list"),
                       ("recipes=[bcl]", r"'recipes\[0\]': expected a mapping"),
                       ("recipes=[{name: bcl}, {beta: 1}]", r"'recipes\[1\].name': expected str")):
        with pytest.raises(ConfigError, match=where):
            load_config(None, [bad])


def test_train_bcl_was_replaced_by_a_recipe():
    from fastssl.config import CONFIG_ROOT, TrainConfig
    assert not hasattr(TrainConfig(), "bcl") and not hasattr(TrainConfig(), "bcl_beta")
    for override in ("train.bcl=true", "train.bcl_beta=0.9"):
        with pytest.raises(ConfigError, match=r"train.bcl was replaced by recipes: \[\{name: bcl, beta: "):
            load_config(None, [override])
    assert load_config(CONFIG_ROOT / "recipe" / "bcl_i.yaml").recipes == [{"name": "bcl", "beta": 0.97}]


def test_a_different_source_type_or_method_name_replaces_instead_of_merging(tmp_path):
    _write(tmp_path / "configs" / "data" / "c.yaml", """
        eval: {train: {type: cifar, root: data/c, train: true}}
        method: {name: simclr, temperature: 0.2}
    """)
    _write(tmp_path / "configs" / "run.yaml", """
        defaults: [data/c.yaml]
        eval: {train: {type: npz, path: x.npz}}
        method: {name: byol}
    """)
    d = compose(tmp_path / "configs" / "run.yaml")
    assert d["eval"]["train"] == {"type": "npz", "path": "x.npz"}
    assert d["method"] == {"name": "byol"}


def test_configs_and_docstrings_cite_papers_not_missing_files():
    from pathlib import Path

    import fastssl.config as config_module
    from fastssl.config import CONFIG_ROOT
    files = [*CONFIG_ROOT.rglob("*.yaml"), Path(config_module.__file__)]
    for f in files:
        text = f.read_text()
        assert "REFERENCE" not in text and "DESIGN.md" not in text, f


# ----------------------------------------------------------------------------- augment sizes
def test_augment_size_keeps_multicrop_proportions():
    from loaders.augment import Augment
    dino = Augment.from_preset("dino_multicrop", size=112)
    assert [s.size for s in dino.specs] == [112, 112] + [48] * 6
    assert [s.size for s in Augment.from_preset("symmetric", size=16).specs] == [16, 16]
    assert [s.size for s in Augment.from_preset("swav_multicrop", size=32).specs] == [32, 32] + [14] * 6
    pair = Augment.from_preset("dino_multicrop", global_size=160, local_size=64)
    assert [s.size for s in pair.specs] == [160, 160] + [64] * 6
    assert [s.size for s in Augment.from_preset("dino_multicrop", local_size=80).specs] == [224, 224] + [80] * 6
    assert [s.size for s in Augment.from_preset("symmetric", global_size=24).specs] == [24, 24]
    # blur kernels follow the new sizes (the preset fixes none here)
    assert [s.kernel_size for s in dino.specs[1:3]] == [13, 5]
    assert Augment.from_preset("imagenet_simclr", size=32).specs[0].kernel_size == 23   # fixed kernel kept


def test_augment_size_errors():
    from loaders.augment import Augment
    with pytest.raises(ConfigError, match="either 'size' or 'global_size'/'local_size'"):
        Augment.from_preset("dino_multicrop", size=112, global_size=112)
    with pytest.raises(ConfigError, match="'local_size' needs local views"):
        Augment.from_preset("symmetric", local_size=16)
    with pytest.raises(ConfigError, match="'size' must be a positive number of pixels"):
        Augment.from_preset("symmetric", size=0)
    with pytest.raises(ConfigError, match="did you mean 'local_size'"):
        Augment.from_preset("symmetric", locl_size=8)


def test_preset_dir_is_the_config_root():
    from fastssl.config import CONFIG_ROOT
    from loaders.augment import PRESET_DIR
    from loaders.config_files import config_root
    assert PRESET_DIR == config_root() / "augment" and CONFIG_ROOT == config_root()
    assert (config_root() / "method" / "byol.yaml").is_file()
