"""The transports ``bench/compare.py`` compares, each behind the same small interface.

Every transport is one module that defines:

* ``prepare(ctx, spec) -> resources``: runs in the orchestrator before any child starts; returns
  whatever picklable objects the children need (``multiprocessing.Queue`` objects can only reach
  a spawned child this way). Most transports return names only and let the producer create;
* ``Producer(spec, resources)`` and ``Reader(spec, resources, index)``, subclasses of the classes
  below, each created in its own spawned process by ``driver.py``;
* ``cleanup(resources)``: runs in the orchestrator after every child has ended, removing whatever
  a crashed child may have left behind.

The driver does everything else (pacing, stamping, timing, checking), identically for all.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional

import numpy as np

# name -> (module, import names of the optional modules it needs). Table order: the subject on
# both of its frame paths (compiled, then pure Python), then the baseline every ratio refers to,
# then the peers. A transport whose modules are missing is reported as skipped, with how to get
# them (INSTALL), never silently left out.
TRANSPORTS = {
    "framebroker": ("transports.framebroker_ring", ("framebroker._fastpath",)),
    "framebroker-pure": ("transports.framebroker_ring", ()),
    "naive": ("transports.naive_shm", ()),
    "mp.Queue": ("transports.mp_queue", ()),
    "zmq": ("transports.zmq_pubsub", ("zmq",)),
    "iceoryx2": ("transports.iceoryx2_pubsub", ("iceoryx2",)),
}
INSTALL = {
    "framebroker._fastpath": "the compiled frame path: install gcc and the Python headers (Debian: python3-dev), then pip install -e .",
    "zmq": "pip install '.[bench]'",
    "iceoryx2": "pip install '.[bench]'",
}
BASELINE = "naive"


@dataclass(frozen=True)
class RunSpec:
    """One measurement: a transport, a frame size, a number of readers. Picklable."""

    transport: str
    tag: str  # unique per run; every shared object's name contains it
    shape: tuple[int, int, int]
    readers: int
    reps: int
    fps: float
    latency_frames: int
    throughput_s: float
    integrity_s: float
    idle_s: float
    hold_s: float
    settle_s: float = 0.05  # between phases, so readers finish the previous one
    options: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


class ProducerEnd:
    """The producer side. ``publish`` gets a private frame the driver may reuse as soon as it
    returns, stamped and timestamped already; it must deliver it to every reader without ever
    waiting for a reader."""

    def publish(self, frame: np.ndarray, timestamp_ns: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ReaderEnd:
    """The reader side. ``wait_next`` gives back the previous frame (if the transport lends
    frames), sleeps until a frame newer than the last one is available or ``timeout`` seconds
    pass, and returns it as a usable numpy array of the run's shape (None on timeout). The array
    stays this reader's until the next ``wait_next``."""

    def wait_next(self, timeout: float) -> Optional[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def missing_packages(name: str) -> list[str]:
    """Import names this transport needs that are not installed (found without importing them)."""
    _module, requires = TRANSPORTS[name]
    return [package for package in requires if importlib.util.find_spec(package) is None]


def load(name: str) -> ModuleType:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; choose from {', '.join(TRANSPORTS)}")
    return importlib.import_module(TRANSPORTS[name][0])
