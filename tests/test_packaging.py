"""A non-editable install ships configs/ as package data and finds it without the checkout.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index``) from a copy
of the source tree, so the build writes nothing into the repository; it is unpacked into a
site folder (a pure-Python wheel unpacks to exactly what ``pip install`` puts in site-packages)
and exercised in a subprocess whose ``cwd`` is outside the repository and whose imports come
from that folder, not from the checkout.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: top-level entries not needed to build the wheel (the virtualenv, build outputs, data, tests)
_SKIP_TOP = {".venv", ".git", "build", "dist", "runs", "data", "tests", ".pytest_cache", ".cache", ".whl"}


def _ignore(folder, names):
    skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
    if Path(folder).resolve() == REPO:
        skip |= _SKIP_TOP & set(names)
    return skip


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out), str(src)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("fastssl-*.whl")
    return wheel


_CHECK = textwrap.dedent("""
    import sys
    # only the unpacked copy: drop the checkout's editable-install finder
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    site = sys.argv[1]
    import loaders
    import fastssl.config as C
    from loaders.augment import PRESET_DIR, Augment
    from loaders.config_files import config_root
    for where in (loaders.__file__, C.__file__, config_root(), PRESET_DIR, C.CONFIG_ROOT):
        assert str(where).startswith(site), where
    aug = Augment.from_preset("symmetric")
    assert aug.num_views == 2 and [s.size for s in aug.specs] == [32, 32]
    assert [s.size for s in Augment.from_preset("dino_multicrop", size=112).specs] == [112] * 2 + [48] * 6
    cfg = C.load_config(None, ["method=byol", "data=demo"])
    assert cfg.method["name"] == "byol" and cfg.augment == {"preset": "asymmetric"} and cfg.data["sources"]
    cfg = C.load_config(C.CONFIG_ROOT / "demo.yaml", ["method=byol", "augment=asymmetric"])
    assert cfg.method["name"] == "byol" and cfg.augment == {"preset": "asymmetric"}
    print("installed-ok", config_root())
""")


def test_wheel_ships_configs_and_an_install_finds_them(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "loaders/configs/augment/symmetric.yaml" in names
        assert "loaders/configs/method/byol.yaml" in names
        assert "loaders/config_files.py" in names
        # every YAML of the repository's configs/ is shipped (the package_data globs cover them)
        shipped = {n[len("loaders/configs/"):] for n in names if n.startswith("loaders/configs/")}
        in_repo = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
        assert in_repo <= shipped, sorted(in_repo - shipped)
        site = tmp_path / "site"
        zf.extractall(site)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", _CHECK, str(site)], cwd=outside, env=env,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"installed-ok {site}" in proc.stdout
