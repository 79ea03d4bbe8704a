"""The fastssl command: help, one-line errors with nothing written, eval of a checkpoint."""
import subprocess
import sys

import pytest
import yaml

from fastssl.cli import EXIT_USAGE, main


def _cfg(tmp_path, **changes):
    cfg = {
        "data": {"sources": [{"name": "syn", "type": "synthetic", "n": 32, "size": 16}],
                 "batch_size": 16, "num_workers": 0},
        "augment": {"preset": "symmetric", "size": 16},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 2},
        "eval": {"train": {"type": "synthetic", "n": 30, "size": 16},
                 "test": {"type": "synthetic", "n": 20, "size": 16, "split": "test"},
                 "knn_k": 5, "linear_epochs": 2},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("pretrain", "eval", "data", "bench"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "CONFIG" in out and "--resume" in out and "--out" in out and "KEY=VALUE" in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "CHECKPOINT" in capsys.readouterr().out
    # the data and bench groups are wired to their owners' sub-commands
    from fastssl.cli import build_parser
    groups = build_parser()._subparsers._group_actions[0].choices
    for group in ("data", "bench"):
        inner = [a for a in groups[group]._actions if a.__class__.__name__ == "_SubParsersAction"]
        assert inner and inner[0].choices, f"fastssl {group} has no sub-commands"


def _assert_clean_error(rc, err, out_dir, *needles):
    assert rc == EXIT_USAGE
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out_dir.exists(), "a run directory was written for a bad config"


def test_unknown_key_subprocess(tmp_path):
    """Through the real entry point: one line on stderr, exit 2, nothing written."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fastssl", "pretrain", str(_cfg(tmp_path)),
                          "train.stpes=3", "--out", str(out)], capture_output=True, text=True)
    _assert_clean_error(res.returncode, res.stderr, out, "unknown key 'stpes'", "did you mean 'steps'")


@pytest.mark.parametrize("override, needles", [
    ("model.width=wide", ["'model.width'", "expected int", "got str 'wide'"]),
    ("data.batch_sise=8", ["unknown key 'batch_sise'", "batch_size"]),
    ("method.temprature=0.1", ["unknown key 'temprature'", "temperature"]),
    ("augment.preset=nosuchpreset", ["nosuchpreset"]),
])
def test_bad_config_errors(tmp_path, capsys, override, needles):
    out = tmp_path / "run"
    rc = main(["pretrain", str(_cfg(tmp_path)), override, "--out", str(out)])
    _assert_clean_error(rc, capsys.readouterr().err, out, *needles)


def test_missing_data_path(tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "nope" / "gen.npz"
    cfg = _cfg(tmp_path, data__sources=[{"name": "gen", "type": "npz", "path": str(missing)}])
    rc = main(["pretrain", str(cfg), "--out", str(out)])
    _assert_clean_error(rc, capsys.readouterr().err, out, str(missing))
    rc = main(["pretrain", str(tmp_path / "no_such_config.yaml"), "--out", str(out)])
    _assert_clean_error(rc, capsys.readouterr().err, out, "no_such_config.yaml", "does not exist")
    rc = main(["pretrain", str(_cfg(tmp_path)), "--resume", str(tmp_path / "x.pt"), "--out", str(out)])
    _assert_clean_error(rc, capsys.readouterr().err, out, "x.pt")


def test_pretrain_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", str(_cfg(tmp_path)), "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "kNN top-1" in text.out and "random init" in text.out and "chance: 10.00%" in text.out
    assert "images/sec" in text.out
    for target in (out, out / "checkpoints" / "step_00000002.pt", out / "backbone.pt"):
        assert main(["eval", str(target)]) == 0
        printed = capsys.readouterr().out
        assert "kNN top-1:" in printed and "linear-probe top-1:" in printed
    rc = main(["eval", str(tmp_path / "missing.pt")])
    assert rc == EXIT_USAGE and "missing.pt" in capsys.readouterr().err


def test_overrides_may_follow_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", str(_cfg(tmp_path)), "--out", str(out), "train.steps=1", "eval.enabled=false"]) == 0
    assert main(["pretrain", str(_cfg(tmp_path)), "--out", str(out), "--force", "train.steps=1",
                 "eval.enabled=false"]) == 0
    with pytest.raises(SystemExit):
        main(["pretrain", str(_cfg(tmp_path)), "--out", str(out), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
