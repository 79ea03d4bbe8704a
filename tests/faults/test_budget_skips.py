"""A budget-sized run over data with corrupt files: skipped samples are replaced, so the plan's
budget runs out before the last step; the run ends there, logged and checkpointed, and says how
many images it trained on (a fixed-budget study never overstates it)."""
import pytest
from test_skips import write_folder

from fastssl.config import load_config
from fastssl.metrics_log import read_metrics
from fastssl.trainer import train
from loaders.errors import ConfigError


def _cfg(tmp_path, root, *overrides):
    base = {
        "name": "budget",
        "data": {"sources": [{"name": "pngs", "type": "folder", "root": str(root)}], "batch_size": 16,
                 "num_workers": 0, "budget": 64, "on_error": "skip", "max_skip_fraction": 0.5},
        "augment": {"preset": "symmetric", "size": 12},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16},
        "model": {"width": 4},
        "optim": {"warmup_steps": 1},
        "train": {"num_classes": 2},
        "eval": {"enabled": False},
        "log": {"out": str(tmp_path / "run"), "every": 1, "progress": False, "tensorboard": False, "plot": False},
    }
    return load_config(None, list(overrides), base=base)


def test_budget_run_ends_where_the_plan_ends(tmp_path, capsys):
    root = tmp_path / "pngs"
    write_folder(root, 64, corrupt={1, 9, 17, 40, 50, 63})
    res = train(_cfg(tmp_path, root))
    # 64 plan positions, 6 unreadable: 58 images, so 3 whole batches of 16 (the 4th cannot fill)
    assert res.step == 3
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[-1]["images_seen"] == 48
    assert recs[-1]["skipped"] == recs[-1]["skipped/pngs"] > 0
    err = capsys.readouterr().err
    assert "budget ran out at step 3 of 4" in err and "48 images were trained on" in err
    assert (tmp_path / "run" / "checkpoints" / "step_00000003.pt").exists()
    assert (tmp_path / "run" / "backbone.pt").exists()
    # with train.steps fixed the same shortfall is an error that names the numbers
    with pytest.raises(ConfigError, match=r"ran out at step 3 of 4.*6 samples skipped"):
        train(_cfg(tmp_path, root, "train.steps=4"), force=True)
