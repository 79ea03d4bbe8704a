"""OpenCV's thread pool across ``fork``: forked loader workers must not deadlock.

OpenCV (pip wheels: the ``pthreads`` parallel framework) keeps one process-wide thread pool. Once
a multi-threaded OpenCV call has run in a process (a large ``cv2.GaussianBlur``, ``resize``,
``addWeighted`` ...), a child forked from it inherits the pool's condition variables with their
waiter counts but not its threads. A DataLoader worker that then calls ``cv2.setNumThreads(1)``
(what every loader worker does: one worker per core, no nested threads) reconfigures the pool,
and ``pthread_cond_destroy`` waits forever for waiters that do not exist in the child.

The cure used here: the parent switches OpenCV to one thread just before it forks its workers
(:func:`serial_cv2_while_forking`) and restores its own count right after, so each child starts
with OpenCV already serial; children set the count through :func:`set_cv2_threads`, which only
calls OpenCV when the count differs, so the inherited pool is never touched in the child.
Nothing happens when OpenCV has not been imported.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

__all__ = ["set_cv2_threads", "serial_cv2_while_forking"]


def set_cv2_threads(n: int) -> None:
    """``cv2.setNumThreads(n)`` unless OpenCV already uses ``n`` threads (fork-safe in workers)."""
    import cv2
    if cv2.getNumThreads() != n:
        cv2.setNumThreads(n)


@contextlib.contextmanager
def serial_cv2_while_forking() -> Iterator[None]:
    """Run the block (which forks worker processes) with OpenCV at one thread in this process;
    the previous count is restored afterwards."""
    cv2 = sys.modules.get("cv2")
    if cv2 is None or not hasattr(cv2, "getNumThreads"):
        yield
        return
    before = cv2.getNumThreads()
    if before != 1:
        cv2.setNumThreads(1)
    try:
        yield
    finally:
        if before != 1:
            cv2.setNumThreads(before)
