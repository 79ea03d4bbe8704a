"""Config schema: composition, overrides, type checks and unknown keys."""
import textwrap

import pytest

from fastssl.config import (RunConfig, apply_overrides, compose, from_dict, load_config, parse_override,
                            to_dict)
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
