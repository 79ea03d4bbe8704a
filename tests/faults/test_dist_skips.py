"""Two CPU processes (torchrun, gloo) train with on_error: skip over a folder holding corrupt
files: every rank's every batch stays whole, so the loss's all-gather never sees ranks with
different batch sizes; both ranks finish the same steps and the run saw steps x batch x world
real images."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WORKER = Path(__file__).with_name("dist_skip_worker.py")
CORRUPT = {1, 6, 12, 17, 25, 30, 34, 39}  # 8 of 40 files


def write_folder(root: Path) -> set:
    """40 16 px PNGs in two class folders, the files of CORRUPT holding garbage; their paths."""
    rng = np.random.default_rng(0)
    bad = set()
    for i in range(40):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:02d}.png"
        if i in CORRUPT:
            path.write_bytes(b"\x89PNG\r\n not an image")
            bad.add(str(path))
        else:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
            path.write_bytes(buf.getvalue())
    return bad


@pytest.mark.timeout(300)
def test_two_ranks_skip_corrupt_files_and_keep_whole_batches(tmp_path):
    from loaders.sources import ImageFolderSource
    bad_paths = write_folder(tmp_path / "pngs")
    src = ImageFolderSource(root=tmp_path / "pngs")
    bad = {i for i in range(len(src)) if src.path(i) in bad_paths}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path), str(tmp_path / "pngs")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world"] == 2 and r["step"] == 4 and r["steps"] == [1, 2, 3, 4]
        assert [len(ix) for ix in r["indices"]] == [8] * 4  # every batch whole
        assert not {i for ix in r["indices"] for i in ix} & bad  # only real images trained on
        assert all(np.isfinite(r["losses"]))
        assert r["metrics"]["images_seen"] == 4 * 8 * 2  # steps x batch x world, all real
    seen = [i for r in ranks for ix in r["indices"] for i in ix]
    assert len(seen) == 64 and len(set(seen)) == 32  # one epoch (32 readable files) per 64 draws...
    assert any(r["metrics"].get("skipped", 0) > 0 for r in ranks)  # ... around the 8 corrupt ones
    import torch
    ck = torch.load(tmp_path / "run" / "checkpoints" / "step_00000004.pt", weights_only=False)
    assert ck["loader"]["skipped_by_source"]["pngs"] == ck["loader"]["skipped"] > 0
