"""``multiprocessing.Queue``, one per reader: what most Python camera code starts with.

Producer: copies the frame once (``put`` only queues a reference; a feeder thread pickles it
later, by which time the driver may have reused the buffer, like a capture loop reusing its
buffer), then ``put_nowait`` the copy on every reader's queue. A full queue drops the frame for
that reader: a camera cannot wait for its slowest consumer, and no other transport here waits
either. The feeder threads' pickling and pipe writes run in the producer process, so they count
in its CPU.

Reader: ``get(timeout)`` unpickles a private copy of the frame (not zero-copy, and the check
says so).

Queues hold at most ``QUEUE_DEPTH`` frames: unbounded queues of 6 MB frames grow without limit
when readers fall behind.
"""

from __future__ import annotations

import queue
from typing import Any, Optional

import numpy as np

from . import ProducerEnd, ReaderEnd, RunSpec

QUEUE_DEPTH = 2


def prepare(ctx: Any, spec: RunSpec) -> dict:
    return {"queues": [ctx.Queue(maxsize=QUEUE_DEPTH) for _ in range(spec.readers)]}


def cleanup(resources: dict) -> None:
    for q in resources["queues"]:
        q.close()


class Producer(ProducerEnd):
    def __init__(self, spec: RunSpec, resources: dict) -> None:
        self._queues = resources["queues"]
        self.dropped = 0

    def publish(self, frame: np.ndarray, timestamp_ns: int) -> None:
        snapshot = frame.copy()
        for q in self._queues:
            try:
                q.put_nowait(snapshot)
            except queue.Full:
                self.dropped += 1

    def close(self) -> None:
        for q in self._queues:
            # Frames still queued for readers that have exited would block this process's exit
            # while the feeder thread waits to write them into a pipe nobody reads.
            q.cancel_join_thread()
            q.close()


class Reader(ReaderEnd):
    def __init__(self, spec: RunSpec, resources: dict, index: int) -> None:
        self._queue = resources["queues"][index]

    def wait_next(self, timeout: float) -> Optional[np.ndarray]:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._queue.close()
