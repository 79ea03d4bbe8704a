"""One error contract: every user error ends ``fastssl pretrain`` with ONE line on stderr naming
the key or file and the problem, exit status 2, and nothing written."""
import sys

import pytest
from test_cli import _cfg as cli_config

from fastssl.cli import EXIT_USAGE, main


def _cfg(tmp_path):
    """test_cli's tiny run, without eval sources and the plot."""
    return cli_config(tmp_path, eval__enabled=False, eval__train=None, eval__test=None, log__plot=False)


BAD = [  # (overrides, words the one line must hold)
    (["train.stpes=3"], ["unknown key 'stpes'", "steps"]),
    (["model.width=wide"], ["'model.width'", "expected int"]),
    (["data.batch_size=0"], ["data.batch_size"]),
    (["data.batch_size=-4"], ["data.batch_size"]),
    (["data.backend_options={timeout_s: 5}"], ["timeout_s"]),
    (["data.backend=nosuch"], ["nosuch"]),
    (["data.sources=[{type: npz, path: /nonexistent/gen.npz}]"], ["/nonexistent/gen.npz"]),
    (["data.sources=[{type: folder, root: /nonexistent/train}]"], ["/nonexistent/train"]),
    (["data.sources=[{type: synthetic, n: 8, size: 16, colour: red}]"], ["colour"]),
    (["recipes=[{name: bcll}]"], ["bcll", "bcl"]),
    (["recipes=[{name: bcl, betta: 0.9}]"], ["betta", "beta"]),
    (["optim.warmup_steps=5"], ["warm-up (5 steps", "run (2 steps)"]),
    (["method=nosuch"], ["nosuch"]),
    (["augment.preset=nosuch"], ["nosuch"]),
    (["method.temprature=0.1"], ["temprature", "temperature"]),
    (["train.num_classes=2", "data.sources=[{type: synthetic, n: 32, size: 16}]"], ["train.num_classes"]),
    (["eval.enabled=true", "eval.train={type: synthetic, n: 8, size: 16}"], ["eval.train", "eval.test"]),
    (["train.mixed_precision=fp8"], ["train.mixed_precision"]),
    (["--resume", "/nonexistent/step_00000002.pt"], ["/nonexistent/step_00000002.pt"]),
]


def _one_line(err: str, needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("fastssl pretrain: error: "), line
    assert "Traceback" not in err and len(line) < 400, line
    for n in needles:
        assert n in line, line
    return line


@pytest.mark.parametrize("overrides, needles", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, overrides, needles):
    out = tmp_path / "run"
    rc = main(["pretrain", str(_cfg(tmp_path)), "--out", str(out), *overrides])
    assert rc == EXIT_USAGE
    _one_line(capsys.readouterr().err, needles)
    assert not out.exists(), "a run directory was written for a bad input"


def test_errors_against_an_existing_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cfg = str(_cfg(tmp_path))
    assert main(["pretrain", cfg, "--out", str(out), "train.checkpoint_every=1", "train.steps=2",
                 "train.stop_after=1"]) == 0
    capsys.readouterr()
    files = sorted(p.name for p in out.rglob("*"))
    cases = [
        (["train.steps=2"], ["already holds a run", "--resume auto", "--force"]),          # used directory
        (["--resume", "auto", "data.batch_size=8"], ["cannot resume", "data.batch_size (checkpoint 16, now 8)"]),
        (["--resume", "auto", "method.temperature=0.5"], ["cannot resume", "method.temperature"]),
    ]
    for extra, needles in cases:
        assert main(["pretrain", cfg, "--out", str(out), *extra]) == EXIT_USAGE
        _one_line(capsys.readouterr().err, needles)
    # a missing optional extra names the package
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["pretrain", cfg, "--out", str(out), "--force", "log.wandb=offline"]) == EXIT_USAGE
    _one_line(capsys.readouterr().err, ["log.wandb=offline", "fastssl[wandb]"])
    assert sorted(p.name for p in out.rglob("*")) == files, "an error changed the run directory"
