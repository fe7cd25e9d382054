"""The naive baseline: one shared buffer and one semaphore per reader, zero-copy, and it tears.

Producer: copies each frame into the single shared buffer (``/dev/shm/fbbench-TAG-naive``), then
posts each reader's semaphore unless a post is already pending (so a reader that falls behind
wakes once, not once per frame). Nothing stops it from overwriting the buffer while a reader
looks at it: that is what the torn and changed counts of this transport show.

Reader: sleeps on its semaphore and returns a read-only view of the shared buffer. This is the
fastest anything can be with one copy per frame, which is why every ratio refers to it.
"""

from __future__ import annotations

import mmap
import time
from typing import Any, Optional

import numpy as np
import posix_ipc

from . import ProducerEnd, ReaderEnd, RunSpec

# How long a reader waits for the producer's objects to appear (it starts after the producer
# reported ready, so this only matters on a very loaded machine).
OPEN_TIMEOUT = 10.0


def prepare(ctx: Any, spec: RunSpec) -> dict:
    base = f"/fbbench-{spec.tag}-naive"
    return {"buffer": base, "semaphores": [f"{base}-w{i}" for i in range(spec.readers)]}


def cleanup(resources: dict) -> None:
    for name in resources["semaphores"]:
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            pass
    try:
        posix_ipc.unlink_shared_memory(resources["buffer"])
    except posix_ipc.ExistentialError:
        pass


class Producer(ProducerEnd):
    _map: Optional[mmap.mmap] = None
    _semaphores: tuple = ()

    def __init__(self, spec: RunSpec, resources: dict) -> None:
        self._resources = resources
        try:
            memory = posix_ipc.SharedMemory(resources["buffer"], posix_ipc.O_CREX, mode=0o600, size=spec.nbytes)
            try:
                self._map = mmap.mmap(memory.fd, spec.nbytes)
            finally:
                memory.close_fd()
            self._buffer = np.ndarray(spec.shape, np.uint8, buffer=self._map)
            self._buffer.fill(0)  # touch every page now, not during the first measured frame
            self._semaphores = tuple(posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600) for name in resources["semaphores"])
        except BaseException:
            self.close()
            raise

    def publish(self, frame: np.ndarray, timestamp_ns: int) -> None:
        np.copyto(self._buffer, frame)
        for semaphore in self._semaphores:
            if semaphore.value < 1:
                semaphore.release()

    def close(self) -> None:
        for semaphore in self._semaphores:
            semaphore.close()
        self._semaphores = ()
        self._buffer = None
        _close_map(self._map)
        self._map = None
        cleanup(self._resources)


class Reader(ReaderEnd):
    _map: Optional[mmap.mmap] = None
    _semaphore: Optional[posix_ipc.Semaphore] = None

    def __init__(self, spec: RunSpec, resources: dict, index: int) -> None:
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                memory = posix_ipc.SharedMemory(resources["buffer"], 0, read_only=True)
                self._semaphore = posix_ipc.Semaphore(resources["semaphores"][index])
                break
            except posix_ipc.ExistentialError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            self._map = mmap.mmap(memory.fd, spec.nbytes, prot=mmap.PROT_READ)
        finally:
            memory.close_fd()
        self._view = np.ndarray(spec.shape, np.uint8, buffer=self._map)

    def wait_next(self, timeout: float) -> Optional[np.ndarray]:
        try:
            self._semaphore.acquire(timeout)  # type: ignore[union-attr]
        except posix_ipc.BusyError:
            return None
        return self._view

    def close(self) -> None:
        if self._semaphore is not None:
            self._semaphore.close()
            self._semaphore = None
        self._view = None
        _close_map(self._map)
        self._map = None


def _close_map(mapping: Optional[mmap.mmap]) -> None:
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:
        pass  # the driver still holds a view; the mapping goes when that view does
