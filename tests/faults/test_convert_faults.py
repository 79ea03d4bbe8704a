"""Converters own their output (MANIFEST.json, --overwrite, --resume) and resize like torchvision."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from loaders import cli_data
from loaders.base import ArraySource
from loaders.cli_data import main
from loaders.convert import to_folder, to_shards
from loaders.errors import DataError
from loaders.shards import ShardSource
from loaders.sources import ImageFolderSource, NPZSource

N = 11
MANIFEST_NAME = "MANIFEST.json"  # the documented name


def _folder(root, n=N, seed=0):
    imgs = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def _shards_cli(root, out, *extra, per_shard=3):
    return main(["shards", "--source", f"type=folder,root={root}", "--out", str(out), "--samples-per-shard",
                 str(per_shard), "--format", "png", "--no-progress", *extra])


def _tars(out):
    return sorted(p.name for p in out.glob("*.tar"))


def _assert_exactly_the_source(out, root):
    src, got = ImageFolderSource(root=root), ShardSource(path=out)
    assert len(got) == len(src)
    assert len({got.key(i) for i in range(len(got))}) == len(got)  # each sample once
    for i in range(len(src)):
        assert got.read(i) == src.read(i)


# ------------------------------------------------------------------------ refuse / overwrite

def test_rerun_with_other_samples_per_shard_is_refused(tmp_path, capsys):
    root, out = _folder(tmp_path / "imgs"), tmp_path / "out"
    assert _shards_cli(root, out, per_shard=3) == 0
    capsys.readouterr()
    assert _shards_cli(root, out, per_shard=5) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err and "--resume" in err
    assert _tars(out) == [f"shard-{k:06d}.tar" for k in range(4)]  # untouched
    assert _shards_cli(root, out, "--overwrite", per_shard=5) == 0
    assert _tars(out) == [f"shard-{k:06d}.tar" for k in range(3)]
    _assert_exactly_the_source(out, root)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["complete"] and m["samples"] == N and m["settings"]["samples_per_shard"] == 5
    assert set(m["files"]) | {MANIFEST_NAME} == set(os.listdir(out))  # the old shards are gone


def test_files_no_manifest_lists_are_never_deleted(tmp_path, capsys):
    root, out = _folder(tmp_path / "imgs"), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _shards_cli(root, out) == 2
    assert "notes.txt" in capsys.readouterr().err
    for flag in ("--overwrite", "--resume"):
        assert _shards_cli(root, out, flag) == 2
        err = capsys.readouterr().err
        assert "notes.txt" in err and "never deleted" in err
    assert _shards_cli(root, tmp_path / "out2") == 0
    (tmp_path / "out2" / "old.tar").write_bytes((tmp_path / "out2" / "shard-000000.tar").read_bytes())
    assert _shards_cli(root, tmp_path / "out2", "--overwrite") == 2
    assert "old.tar" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


def test_shards_source_reads_the_manifest_shards_only(tmp_path, capsys):
    root, out = _folder(tmp_path / "imgs"), tmp_path / "out"
    assert _shards_cli(root, out) == 0
    (out / "stray.tar").write_bytes((out / "shard-000000.tar").read_bytes())
    capsys.readouterr()
    _assert_exactly_the_source(out, root)
    assert len(ShardSource(path=out)) == N
    err = capsys.readouterr().err
    assert err.count("stray.tar") == 1 and "ignoring 1 other" in err  # named once


# ------------------------------------------------------------------------ resume

class _Interrupt(BaseException):
    pass


def test_interrupted_conversion_resumes_to_identical_shards(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs")
    to_shards(ImageFolderSource(root=root), tmp_path / "clean", samples_per_shard=3, fmt="png", progress=False)
    src = ImageFolderSource(root=root)
    read = src.read

    def failing(i):
        if i == 7:  # after 2 whole shards, inside the third
            raise _Interrupt()
        return read(i)
    monkeypatch.setattr(src, "read", failing)
    out = tmp_path / "out"
    with pytest.raises(_Interrupt):
        to_shards(src, out, samples_per_shard=3, fmt="png", progress=False)
    assert _tars(out) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(DataError, match="unfinished conversion.*--resume"):
        ShardSource(path=out)
    with pytest.raises(DataError, match="--overwrite.*--resume|--resume.*--overwrite"):
        to_shards(ImageFolderSource(root=root), out, samples_per_shard=3, fmt="png", progress=False)
    with pytest.raises(DataError, match="samples_per_shard=3.*4"):
        to_shards(ImageFolderSource(root=root), out, samples_per_shard=4, fmt="png", progress=False,
                  existing="resume")
    paths = to_shards(ImageFolderSource(root=root), out, samples_per_shard=3, fmt="png", progress=False,
                      existing="resume")
    assert [p.name for p in paths] == _tars(tmp_path / "clean") == _tars(out)
    for name in _tars(out):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    _assert_exactly_the_source(out, root)


def test_killed_conversion_resumes_from_the_command_line(tmp_path, capsys):
    root, out = _folder(tmp_path / "imgs"), tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # the child is killed while writing the fourth shard: no cleanup at all
        try:
            read = ImageFolderSource.read
            ImageFolderSource.read = lambda self, i: os._exit(9) if i == 10 else read(self, i)
            _shards_cli(root, out)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert "shard-000003.tar.tmp" in os.listdir(out) and len(_tars(out)) == 3
    assert _shards_cli(root, out, "--resume") == 0
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME] + [f"shard-{k:06d}.tar{e}" for k in range(4)
                                                                for e in ("", ".idx")])
    _assert_exactly_the_source(out, root)
    assert _shards_cli(root, out, "--resume") == 0  # complete: nothing to do
    assert len(ShardSource(path=out)) == N


def test_folder_output_resume_and_overwrite(tmp_path, monkeypatch, capsys):
    imgs = np.random.default_rng(3).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(9) % 3
    to_folder(ArraySource(imgs, labels, name="a"), tmp_path / "clean", progress=False)
    src = ArraySource(imgs, labels, name="a")
    read = src.read

    def failing(i):
        if i == 5:
            raise _Interrupt()
        return read(i)
    monkeypatch.setattr(src, "read", failing)
    with pytest.raises(_Interrupt):
        to_folder(src, tmp_path / "f", progress=False)
    with pytest.raises(DataError, match="unfinished conversion"):
        to_folder(ArraySource(imgs, labels, name="a"), tmp_path / "f", progress=False)
    first = tmp_path / "f" / "001" / "00000001.png"
    before = first.stat().st_mtime_ns
    (tmp_path / "f" / "002" / "00000005.png.tmp").write_bytes(b"torn")  # as a kill mid-write leaves it
    to_folder(ArraySource(imgs, labels, name="a"), tmp_path / "f", progress=False, existing="resume")
    assert first.stat().st_mtime_ns == before  # written before the interruption: kept, not redone
    assert not list((tmp_path / "f").rglob("*.tmp"))
    got, clean = ImageFolderSource(root=tmp_path / "f"), ImageFolderSource(root=tmp_path / "clean")
    assert len(got) == 9 and all(got.read(i) == clean.read(i) for i in range(9))
    # the synthetic command's folder output is owned the same way
    args = ["synthetic", "--n", "6", "--size", "8", "--to", "folder", "--out", str(tmp_path / "syn"), "--no-progress"]
    assert main(args) == 0 and main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0 and len(ImageFolderSource(root=tmp_path / "syn")) == 6


# ------------------------------------------------------------------------ single-file outputs

def test_npz_and_beton_outputs_refuse_an_existing_file(tmp_path, capsys):
    out = tmp_path / "s.npz"
    args = ["synthetic", "--n", "5", "--size", "8", "--to", "npz", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert main(["npz", "--source", "type=synthetic,n=3,size=8", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert len(NPZSource(path=out)) == 5
    for flag in ("--overwrite", "--resume"):
        assert main(["npz", "--source", "type=synthetic,n=3,size=8", "--out", str(out), "--no-progress", flag]) == 0
        assert len(NPZSource(path=out)) == 3
    pytest.importorskip("ffcv")
    capsys.readouterr()
    beton = tmp_path / "x.beton"
    beton.write_bytes(b"an earlier file")
    assert main(["beton", "--source", "type=synthetic,n=3,size=8", "--out", str(beton), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and beton.read_bytes() == b"an earlier file"


def test_plugin_commands_with_out_get_the_same_guard(tmp_path, capsys):
    calls = []
    cli_data.register_data_command("unit-test-writer", lambda p: p.add_argument("--out", required=True),
                                   lambda a: calls.append(a.out) or 0, help="test")
    try:
        existing = tmp_path / "x.bin"
        existing.write_bytes(b"x")
        assert main(["unit-test-writer", "--out", str(existing)]) == 2 and not calls
        assert main(["unit-test-writer", "--out", str(existing), "--overwrite"]) == 0 and calls == [str(existing)]
        assert main(["unit-test-writer", "--out", str(tmp_path / "new.bin")]) == 0
    finally:
        cli_data.DATA_COMMANDS.pop("unit-test-writer")


# ------------------------------------------------------------------------ --resize like torchvision

@pytest.mark.parametrize("h,w", [(40, 56), (56, 40), (33, 100), (100, 33), (37, 37), (15, 64), (61, 47)])
def test_resize_matches_torchvision(tmp_path, h, w):
    from torchvision.transforms import InterpolationMode, Resize
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    paths = to_shards(ArraySource(img[None], np.array([0])), tmp_path, fmt="png", resize=24, progress=False)
    out = ShardSource(path=paths).decode(0)[0]
    pil = Image.fromarray(img)
    tw, th = Resize(24)(pil).size
    assert out.shape == (th, tw, 3)  # torchvision truncates the long side: 40x56 -> 24x33, not 24x34
    ref = np.asarray(Resize(24, interpolation=InterpolationMode.BICUBIC)(pil))
    assert np.abs(out.astype(int) - ref).max() <= 1  # the same PIL filter: the same pixels
