"""Suite-wide checks.

`make test` sets FASTSSL_REQUIRE_EXTRAS=1: the optional backends and libraries it installs
(DALI, FFCV, OpenCV, simplejpeg, numba, webdataset, timm, kornia, wandb, submitit, pyarrow,
s3fs, moto, and the region-decode C extension) must import, so a broken install fails loudly
instead of turning their tests into skips. Outside `make test` those tests skip cleanly when an
extra is missing; GPU-only tests skip without CUDA either way.
"""
import importlib
import os

import pytest
import torch

EXTRAS = {"nvidia.dali": "dali", "ffcv": "ffcv", "cv2": "ffcv", "webdataset": "wds", "timm": "vit",
          "kornia": "bench", "simplejpeg": "fast", "wandb": "wandb",
          "submitit": "sweep", "pyarrow": "lists", "s3fs": "remote", "moto.server": "dev", "numba": "fast",
          # built by setup.py from loaders/_jpeg_region.c against the system libjpeg (make setup installs it)
          "loaders._jpeg_region": "the region-decode extension"}


def pytest_sessionstart(session):
    if os.environ.get("FASTSSL_REQUIRE_EXTRAS") != "1":
        return
    missing = []
    for module, extra in EXTRAS.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # an extra that is installed but broken counts as missing
            missing.append(f"{module} ({extra if ' ' in extra else f'fastssl[{extra}]'}): {type(e).__name__}: {e}")
    if missing:
        raise pytest.UsageError("FASTSSL_REQUIRE_EXTRAS=1 but these extras do not import:\n  " + "\n  ".join(missing))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than oversubscribing a shared CPU
    (test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
