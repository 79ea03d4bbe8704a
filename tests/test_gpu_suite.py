"""The GPU suite (benchmarks/gpu_suite.py): its CPU dry run end to end, and the budget handling
(a part over its budget is killed with its whole process group, marked timed out, and the next
part still runs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_suite as G

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie waiting to be reaped is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _py(code: str):
    return [sys.executable, "-c", code]


def _suite(parts, out, total=60.0):
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs.txt").touch()
    lines = []
    res = G.run_suite(parts, out=out, env={}, child_env=None, meta={"mode": "test"}, total_budget=total,
                      echo=lines.append)
    return res, lines


def test_part_over_budget_is_killed_with_its_group_and_the_next_part_runs(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    sleeper = _py("import subprocess, sys, time\n"
                  "p = subprocess.Popen(['sleep', '60'])\n"
                  f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
                  "print('sleeping', flush=True)\n"
                  "time.sleep(60)\n")
    parts = [G.Part("sleepy", sleeper, budget=2.0),
             G.Part("next", _py("print('next part ran')"), budget=30.0)]
    t0 = time.monotonic()
    res, lines = _suite(parts, tmp_path / "out")
    assert time.monotonic() - t0 < 20
    assert [r.name for r in res] == ["sleepy", "next"]
    assert res[0].status == "timed out" and not res[0].good
    assert 2.0 <= res[0].seconds < 10
    assert res[1].status == "ok" and res[1].good
    gpid = int(pidfile.read_text())
    for _ in range(50):   # the grandchild (a DataLoader worker, say) went with its group
        if not _alive(gpid):
            break
        time.sleep(0.1)
    assert not _alive(gpid)
    log = (tmp_path / "out" / "logs.txt").read_text()
    assert "===== sleepy" in log and "sleeping" in log and "sleepy: timed out" in log and "next part ran" in log
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(p["name"], p["status"]) for p in doc["parts"]] == [("sleepy", "timed out"), ("next", "ok")]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| sleepy | timed out |" in md and "| next | ok |" in md
    assert any("sleepy: timed out" in ln for ln in lines)


def test_failed_part_and_total_budget(tmp_path):
    parts = [G.Part("fails", _py("import sys; print('boom'); sys.exit(3)"), budget=30.0),
             G.Part("long", _py("import time; time.sleep(60)"), budget=60.0),
             G.Part("late", _py("print('never')"), budget=30.0),
             G.Part("skipped", _py("print('never')"), budget=30.0, skip="no such backend")]
    t0 = time.monotonic()
    res, lines = _suite(parts, tmp_path / "out", total=8.0)
    # "long" got what the total budget left (under 8 s), not its own 60 s; "late" never started
    assert time.monotonic() - t0 < 20
    assert [r.status for r in res] == ["failed (rc 3)", "timed out", "not run (total budget spent)",
                                       "skipped: no such backend"]
    assert res[1].seconds < 10
    assert [r.good for r in res] == [False, False, False, True]
    assert any("boom" in ln for ln in lines)   # a failed part's log tail is echoed
    assert "never" not in (tmp_path / "out" / "logs.txt").read_text()


def test_records_are_tarred_as_each_part_finishes(tmp_path):
    rec = tmp_path / "work" / "p1"
    write = _py(f"import json, pathlib; d = pathlib.Path({str(rec)!r}); "
                "(d / 'e2e-1.json').write_text(json.dumps({'name': 'e2e', 'results': {"
                "'model-only': {'median': 100.0}, 'real/torch/shards': {'median': 90.0}, "
                "'plain-pytorch': {'median': 80.0}}}))")
    parts = [G.Part("e2e-32-torch", write, budget=30.0, records=rec),
             G.Part("after", _py("import time; time.sleep(30)"), budget=1.0)]
    res, _ = _suite(parts, tmp_path / "out")
    assert res[0].headline == {"model-only samples/s": 100.0, "real samples/s": 90.0, "real/model-only": 0.9,
                               "model-only/plain-pytorch": 1.25}
    with tarfile.open(tmp_path / "out" / "records.tar.gz") as tar:
        assert tar.getnames() == ["e2e-32-torch/e2e-1.json"]
    dest = tmp_path / "results"
    got = G.collect(tmp_path / "out", dest)
    assert [p.name for p in got] == ["e2e-1.json"] and json.loads((dest / "e2e-1.json").read_text())["name"] == "e2e"


def test_plan_uses_only_the_e2e_flags_that_exist(tmp_path):
    none = {f: False for f in G.E2E_OPTIONAL} | {"resident": False}
    parts = {p.name: p for p in G.plan(out=tmp_path, work=tmp_path, device="cuda", flags=none)}
    assert list(parts) == list(G.PART_NAMES)
    assert parts["e2e-32-resident"].skip and "--backend" in parts["e2e-32-resident"].skip
    for name in ("e2e-32-torch", "e2e-224"):
        assert "--backend" not in parts[name].cmd and "--mixed-precision" not in parts[name].cmd
        assert "--backend" in parts[name].note
    every = {f: True for f in G.E2E_OPTIONAL} | {"resident": True}
    parts = {p.name: p for p in G.plan(out=tmp_path, work=tmp_path, device="cuda", flags=every)}
    cmd = parts["e2e-224"].cmd
    assert cmd[cmd.index("--backend") + 1] == "torch" and cmd[cmd.index("--mixed-precision") + 1] == "bf16"
    assert "--channels-last" in cmd and "resnet50" in cmd and "--no-cifar-stem" in cmd
    assert cmd[cmd.index("--workers") + 1] == "16"
    r = parts["e2e-32-resident"]
    assert not r.skip and r.cmd[r.cmd.index("--backend") + 1] == "resident"
    loader = parts["loader"].cmd
    for flag, value in (("--sets", "imagenet"), ("--modes", "feed"), ("--backends", "torch"),
                        ("--formats", "shards"), ("--workers", "16")):
        assert loader[loader.index(flag) + 1] == value
    # the full run's budgets (+ ~20 s of set-up) fit the 8 minutes
    assert sum(p.budget for p in parts.values()) + 20 < 480 and G.TOTAL_BUDGET < 480
    cpu = {p.name: p for p in G.plan(out=tmp_path, work=tmp_path, device="cpu", quick=True, flags=every)}
    assert "--mixed-precision" not in cpu["e2e-224"].cmd and "--channels-last" not in cpu["e2e-224"].cmd
    assert cpu["e2e-224"].cmd[cpu["e2e-224"].cmd.index("--width") + 1] == "8"
    with pytest.raises(SystemExit):
        G.plan(out=tmp_path, work=tmp_path, only=["nope"])


@pytest.mark.timeout(600)
def test_cpu_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--device", "cpu", "--quick",
                        "--out", str(out), "--cache", str(tmp_path / "data")],
                       cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=560)
    elapsed = time.monotonic() - t0
    msg = f"rc {p.returncode} after {elapsed:.0f} s\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
    assert p.returncode == 0, msg
    assert sorted(x.name for x in out.iterdir()) == sorted(G.LAYOUT), msg
    doc = json.loads((out / "summary.json").read_text())
    parts = {x["name"]: x for x in doc["parts"]}
    assert list(parts) == list(G.PART_NAMES), msg
    with tarfile.open(out / "records.tar.gz") as tar:
        tarred = set(tar.getnames())
    for name, part in parts.items():
        assert part["status"] == "ok" or part["status"].startswith("skipped: "), (name, part, msg)
        assert set(part["records"]) <= tarred
        if part["status"] == "ok" and name not in ("tests", "data"):
            assert any(r.endswith(".json") for r in part["records"]), (name, part)
            assert part["headline"], (name, part)
    assert parts["tests"]["headline"]["failed"] == 0 and parts["tests"]["headline"]["skipped"] >= 1
    assert "engine/kornia@32px" in parts["augment"]["headline"] or "kornia" in doc["env"]["import_errors"]
    assert "real/model-only" in parts["e2e-32-torch"]["headline"]
    assert any(k.startswith("224px/feed/torch/shards") for k in parts["loader"]["headline"])
    table = (out / "summary.md").read_text()
    assert "| part | status | seconds | headline |" in table
    assert all(f"| {n} |" in table for n in G.PART_NAMES)
    assert "| part | status | seconds | headline |" in p.stdout   # the one table, printed at the end
    env_doc = json.loads((out / "env.json").read_text())
    assert env_doc["python"] and env_doc["versions"]["torch"] and "e2e_flags" in env_doc
