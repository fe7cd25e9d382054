"""framebroker itself, through its public API only, on either frame path.

``framebroker`` runs the compiled frame path (``framebroker/_fastpath.c``); ``framebroker-pure``
the pure-Python one (``FRAMEBROKER_PURE=1`` in the producer's and readers' processes). Both come
from the same installation in the same run, so the two rows compare the paths, not two builds.

Producer: ``fb.Publisher(stream, shape, fps, slots)`` and ``publish(frame, timestamp_ns)``, one
copy into the ring. The ring gets ``max(12, readers + 2)`` slots, the minimum for ``readers``
readers of ``hold=1`` (readers together may hold at most ``slots - 2``).

Reader: ``fb.Reader(stream, hold=1)`` and ``next(timeout)``: the newest frame newer than the last
one, whose ``array`` is a read-only view of the shared ring. Leasing the next frame gives the
previous one back.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

import framebroker as fb
from framebroker import _fast

from . import ProducerEnd, ReaderEnd, RunSpec

DEFAULT_SLOTS = 12
PURE = "framebroker-pure"


def stream_name(spec: RunSpec) -> str:
    return f"fbbench-{spec.tag}"


def prepare(ctx: Any, spec: RunSpec) -> dict:
    return {"stream": stream_name(spec), "slots": max(DEFAULT_SLOTS, spec.readers + 2)}


def cleanup(resources: dict) -> None:
    # A Publisher removes its segment and semaphores when it closes; after a crash the next
    # Publisher of the same name would take them over, but these names are never used again.
    stream = resources["stream"]
    for entry in os.listdir("/dev/shm"):
        if entry == f"framebroker.{stream}" or entry.startswith(f"framebroker.{stream}@") or entry.startswith(f"sem.framebroker.{stream}@"):
            try:
                os.unlink(os.path.join("/dev/shm", entry))
            except OSError:
                pass


def choose_path(transport: str) -> None:
    """Set this process's frame path from the transport's name (each end runs in a process of
    its own); refuse to measure the compiled one as if it were there when it is not."""
    if transport == PURE:
        os.environ[_fast.PURE_VARIABLE] = "1"
        return
    os.environ.pop(_fast.PURE_VARIABLE, None)
    if _fast.compiled() is None:
        raise RuntimeError(f"the compiled frame path is unavailable here: {_fast.why_pure}")


class Producer(ProducerEnd):
    def __init__(self, spec: RunSpec, resources: dict) -> None:
        choose_path(spec.transport)
        self._publisher = fb.Publisher(resources["stream"], shape=spec.shape, fps=spec.fps, slots=resources["slots"])

    def publish(self, frame: np.ndarray, timestamp_ns: int) -> None:
        self._publisher.publish(frame, timestamp_ns=timestamp_ns)

    def close(self) -> None:
        self._publisher.close()


class Reader(ReaderEnd):
    def __init__(self, spec: RunSpec, resources: dict, index: int) -> None:
        choose_path(spec.transport)
        self._reader = fb.Reader(resources["stream"], name=f"bench-reader-{index}", hold=1, wait=10.0)
        self._frame: Optional[fb.Frame] = None

    def wait_next(self, timeout: float) -> Optional[np.ndarray]:
        try:
            self._frame = self._reader.next(timeout=timeout)
        except fb.FrameTimeout:
            return None
        return self._frame.array

    def close(self) -> None:
        self._frame = None
        self._reader.close()
