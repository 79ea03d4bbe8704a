"""A loader forked after OpenCV's thread pool ran in the parent must not deadlock
(loaders.cv2_fork): the workers' cv2.setNumThreads(1) used to hang in pthread_cond_destroy."""
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("cv2")

_SCRIPT = textwrap.dedent("""
    import itertools
    import cv2
    import numpy as np
    from loaders.base import ArraySource
    from loaders.cpu_augment import WorkerAugment
    from loaders.mixture import Mixture
    from loaders.torch_backend import TorchLoader

    x = np.random.default_rng(0).random((1500, 1500), np.float32)
    before = cv2.getNumThreads()
    for _ in range(3):
        cv2.GaussianBlur(x, (0, 0), 3)          # the parent's pool is now in use
    hook = WorkerAugment.from_preset("symmetric", output="uint8", precision="uint8", size=16)
    src = ArraySource(np.zeros((64, 40, 40, 3), np.uint8), labels=np.zeros(64, np.int64))
    loader = TorchLoader([src], Mixture([64], seed=0), batch_size=16, crops=hook.crop_specs,
                         num_workers=2, decoder="cv2", worker_augment=hook)
    for epoch in range(2):                         # workers are forked again for every pass
        n = sum(len(b) for b in itertools.islice(loader, 4))
        cv2.GaussianBlur(x, (0, 0), 3)
    print("ok", n, cv2.getNumThreads() == before)
""")


def test_workers_forked_after_parallel_opencv_do_not_hang():
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", "64", "True"]   # every batch came, the parent's thread count is back
