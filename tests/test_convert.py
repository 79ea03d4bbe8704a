"""Converters (to shards, to .npz, to a folder) and the `fastssl data` commands."""
import argparse
import io

import numpy as np
import pytest
from PIL import Image

from loaders.base import ArraySource
from loaders.cli_data import (
    DATA_COMMANDS,
    add_subcommands,
    main,
    parse_source_spec,
    register_data_command,
    run_info,
    run_npz,
    run_shards,
    run_synthetic,
)
from loaders.convert import encode_image, folder_to_npz, resize_image, sniff_format, source_to_npz, to_folder, to_shards
from loaders.errors import ConfigError, DataError, SampleError
from loaders.shards import ShardSource
from loaders.sources import ImageFolderSource, NPZSource
from loaders.synthetic import SyntheticSource


def _images(n, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _folder(root, imgs, labels, fmt="png"):
    for i, (img, lab) in enumerate(zip(imgs, labels)):
        d = root / f"c{lab}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))
    return root


def test_sniff_and_encode():
    img = _images(1)[0]
    for fmt in ("jpg", "png", "webp"):
        assert sniff_format(encode_image(img, fmt)) == fmt
    assert sniff_format(b"GIF89a....") is None
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_image(img, "png")))), img)
    assert resize_image(_images(1, 20, 40)[0], 10).shape == (10, 20, 3)
    assert resize_image(_images(1, 20, 40)[0], 10, shorter_side=False).shape == (10, 10, 3)


def test_to_shards_copies_matching_bytes(tmp_path):
    imgs = _images(5)
    _folder(tmp_path / "f", imgs, [0, 1, 0, 1, 1], fmt="jpg")
    src = ImageFolderSource(root=tmp_path / "f")
    paths = to_shards(src, tmp_path / "out", samples_per_shard=2, fmt="jpg", progress=False)
    assert len(paths) == 3
    out = ShardSource(path=tmp_path / "out")
    assert len(out) == 5
    np.testing.assert_array_equal(out.labels(), src.labels())
    for i in range(5):
        assert out.read(i) == src.read(i)  # byte-identical: no re-encoding


def test_to_shards_png_lossless_from_arrays_and_resize(tmp_path):
    imgs, labels = _images(4, 12, 16), np.array([3, 1, 4, 1])
    src = ArraySource(imgs, labels)
    to_shards(src, tmp_path / "png", fmt="png", progress=False)
    out = ShardSource(path=tmp_path / "png")
    for i in range(4):
        img, lab = out.decode(i)
        np.testing.assert_array_equal(img, imgs[i])
        assert lab == labels[i]
    to_shards(src, tmp_path / "small", fmt="jpg", resize=6, progress=False, workers=2)
    small = ShardSource(path=tmp_path / "small")
    assert small.decode(2)[0].shape == (6, 8, 3)
    np.testing.assert_array_equal(small.labels(), labels)


def test_to_shards_corrupt_sample_raise_or_skip(tmp_path):
    _folder(tmp_path / "f", _images(3), [0, 0, 0])
    (tmp_path / "f" / "c0" / "001.png").write_bytes(b"broken")
    src = ImageFolderSource(root=tmp_path / "f")
    with pytest.raises(SampleError, match="001.png"):
        to_shards(src, tmp_path / "a", fmt="jpg", progress=False)
    assert not list((tmp_path / "a").glob("*.tar"))  # the aborted shard was never committed
    to_shards(src, tmp_path / "b", fmt="jpg", progress=False, on_error="skip")
    assert len(ShardSource(path=tmp_path / "b")) == 2


def test_folder_to_npz_stores_rgb_not_bgr(tmp_path):
    (tmp_path / "gen").mkdir()
    red = np.zeros((5, 7, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "gen" / "red.png")
    out = folder_to_npz(tmp_path / "gen", tmp_path / "gen.npz", label=-1, progress=False)
    with np.load(out) as z:
        img, lab = z["image"], z["label"]
    assert img.shape == (1, 5, 7, 3) and lab.tolist() == [-1]
    assert img[0, 0, 0].tolist() == [255, 0, 0]
    assert not list(tmp_path.glob("*.tmp"))
    src = NPZSource(path=out)
    assert src.memmapped  # written uncompressed so workers can map it
    assert src.read(0)[0][2, 3].tolist() == [255, 0, 0]


def test_folder_to_npz_labels_sizes(tmp_path):
    imgs = _images(4, 10, 10)
    _folder(tmp_path / "f", imgs, [0, 1, 1, 0])
    out = folder_to_npz(tmp_path / "f", tmp_path / "a.npz", progress=False)
    src = NPZSource(path=out)
    np.testing.assert_array_equal(src.labels(), [0, 0, 1, 1])  # class folders sorted, files sorted
    np.testing.assert_array_equal(src.images[0], imgs[0])
    np.testing.assert_array_equal(src.images[1], imgs[3])
    Image.fromarray(_images(1, 6, 9)[0]).save(tmp_path / "f" / "c1" / "odd.png")
    with pytest.raises(DataError, match="odd.png.*size="):
        folder_to_npz(tmp_path / "f", tmp_path / "b.npz", progress=False)
    out = folder_to_npz(tmp_path / "f", tmp_path / "b.npz", size=4, progress=False, workers=2)
    assert NPZSource(path=out).images.shape == (5, 4, 4, 3)


def test_source_to_npz_and_to_folder_roundtrip(tmp_path):
    syn = SyntheticSource(n=20, size=16, seed=3)
    out = source_to_npz(syn, tmp_path / "s.npz", progress=False)
    src = NPZSource(path=out)
    np.testing.assert_array_equal(np.asarray(src.images), syn.images)
    np.testing.assert_array_equal(src.labels(), syn.labels())
    to_folder(syn, tmp_path / "folder", progress=False)
    back = ImageFolderSource(root=tmp_path / "folder")
    # classes 000..009 sorted numerically; within a class, files in sample order
    order = np.argsort(syn.labels(), kind="stable")
    np.testing.assert_array_equal(back.labels(), syn.labels()[order])
    for i in (0, 7, 19):
        np.testing.assert_array_equal(back.decode(i)[0], syn.images[order[i]])
    gen = SyntheticSource(n=4, size=16, variant="generated")
    to_folder(gen, tmp_path / "flat", progress=False)
    assert ImageFolderSource(root=tmp_path / "flat").labels().tolist() == [-1] * 4


# ---------------------------------------------------------------------------------- CLI

def test_parse_source_spec(tmp_path):
    assert parse_source_spec("type=synthetic,n=10,variant=generated,keep_labels=true,name=x") == {
        "type": "synthetic", "n": 10, "variant": "generated", "keep_labels": True, "name": "x"}
    y = tmp_path / "s.yaml"
    y.write_text("type: folder\nroot: /data\n")
    assert parse_source_spec(str(y)) == {"type": "folder", "root": "/data"}
    with pytest.raises(ConfigError, match="no type="):
        parse_source_spec("root=/x")
    with pytest.raises(ConfigError, match="not key=value"):
        parse_source_spec("type=folder,oops")


def _ns(**kw):
    return argparse.Namespace(**kw)


def test_cli_handlers(tmp_path, capsys):
    rc = run_synthetic(_ns(n=12, size=16, seed=0, variant="real", split="train", num_classes=10, keep_labels=False,
                           to="shards", out=str(tmp_path / "sh"), samples_per_shard=5, format="png", quality=95,
                           prefix="shard", no_progress=True))
    assert rc == 0 and len(ShardSource(path=tmp_path / "sh")) == 12
    rc = run_shards(_ns(source=f"type=shards,path={tmp_path / 'sh'}", out=str(tmp_path / "sh2"), samples_per_shard=100,
                        format="jpg", quality=90, prefix="re", resize=None, workers=1, on_error="raise",
                        no_progress=True))
    assert rc == 0 and [p.name for p in (tmp_path / "sh2").glob("*.tar")] == ["re-000000.tar"]
    rc = run_npz(_ns(root=None, source=f"type=shards,path={tmp_path / 'sh'}", out=str(tmp_path / "a.npz"), size=None,
                     label=-1, workers=1, on_error="raise", no_progress=True))
    assert rc == 0 and NPZSource(path=tmp_path / "a.npz").labels().tolist() == [-1] * 12
    capsys.readouterr()
    assert run_info(_ns(source=f"type=npz,path={tmp_path / 'a.npz'}", keys=2)) == 0
    out = capsys.readouterr().out
    assert "samples: 12" in out and "unknown: 12" in out and "a.npz:image[1]" in out


def test_cli_parser_and_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fastssl")
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "synthetic", "--n", "6", "--to", "npz", "--out", str(tmp_path / "s.npz"),
                              "--no-progress"])
    assert args.func(args) == 0 and len(NPZSource(path=tmp_path / "s.npz")) == 6
    args = parser.parse_args(["data", "info", "--source", f"type=folder,root={tmp_path / 'missing'}"])
    assert args.func(args) == 2
    assert "missing" in capsys.readouterr().err
    args = parser.parse_args(["data", "info", "--source", "type=synthetic,n=4,colour=red"])
    assert args.func(args) == 2 and "unknown key 'colour'" in capsys.readouterr().err
    # standalone entry point
    assert main(["info", "--source", "type=synthetic,n=5", "--keys", "1"]) == 0


def test_register_data_command():
    calls = []
    name = "unit-test-cmd"
    register_data_command(name, lambda p: p.add_argument("--x", type=int), lambda a: calls.append(a.x) or 0,
                          help="test")
    try:
        parser = argparse.ArgumentParser()
        add_subcommands(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["data", name, "--x", "3"])
        assert args.func(args) == 0 and calls == [3]
        with pytest.raises(ValueError, match="twice"):
            register_data_command(name, lambda p: None, lambda a: 0)
    finally:
        DATA_COMMANDS.pop(name)
