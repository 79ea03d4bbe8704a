"""What a resume may and may not change (fastssl.state)."""
from fastssl.state import resume_conflicts, world_change_note


def _ckpt(world=2, samples=24, **cfg):
    config = {"data": {"sources": [{"type": "synthetic", "n": 64}], "batch_size": 8, "seed": 0},
              "method": {"name": "simclr", "temperature": 0.2}, "model": {"width": 4}, "recipes": [],
              "train": {"grad_accum": 1, "steps": 10}}
    for k, v in cfg.items():
        section, key = k.split("__")
        config[section][key] = v
    return {"config": config, "world_size": world, "loader": {"plan": {"samples": samples, "world_size": world}}}


def test_same_settings_and_a_longer_run_resume():
    ck = _ckpt()
    longer = _ckpt(train__steps=20)["config"]
    assert resume_conflicts(ck, longer, world=2) == []


def test_every_differing_key_is_named():
    ck = _ckpt()
    now = _ckpt(data__batch_size=16, method__temperature=0.5, model__width=8)["config"]
    diffs = resume_conflicts(ck, now, world=2)
    assert diffs == ["data.batch_size (checkpoint 8, now 16)", "method.temperature (checkpoint 0.2, now 0.5)",
                     "model.width (checkpoint 4, now 8)"]


def test_world_size_changes_only_where_the_plan_splits_evenly():
    # 24 samples per rank x 2 ranks = 48 seen: 1, 2, 3, 4 or 6 ranks can continue exactly; 5 cannot
    ck = _ckpt(world=2, samples=24)
    cfg = ck["config"]
    for world in (1, 3, 4, 6):
        assert resume_conflicts(ck, cfg, world=world) == []
        note = world_change_note(ck, world, batch_size=8)
        assert f"2-process run on {world} processes" in note and f"from 16 to {8 * world}" in note
    (diff,) = resume_conflicts(ck, cfg, world=5)
    assert diff.startswith("world size (checkpoint 2 processes, now 5") and "48 samples" in diff
    assert world_change_note(ck, 2, batch_size=8) == ""
