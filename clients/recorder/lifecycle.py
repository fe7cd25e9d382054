"""The life cycle encoders and outputs share: started once, then stopped (any number of times).

``start()`` and ``stop()`` of each take the object's lock and check its state here; the
subclasses fill in ``_start()`` and ``_stop()``, which run under that lock.
"""

from __future__ import annotations

import enum
import threading
from typing import Callable


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Lifecycle:
    """A state (``State``) and the lock that guards its changes."""

    def __init__(self) -> None:
        self._state = State.NEW
        self._lock = threading.Lock()

    @property
    def state(self) -> State:
        return self._state

    def describe(self) -> str:
        raise NotImplementedError

    def _start_once(self, start: Callable[[], None]) -> None:
        with self._lock:
            if self._state is not State.NEW:
                raise ValueError(f"{self.describe()} was already started")
            start()
            self._state = State.RUNNING

    def _stop_once(self, stop: Callable[[], None]) -> None:
        """Run ``stop`` if running; a stopped object (or one never started) stays stopped."""
        with self._lock:
            running = self._state is State.RUNNING
            self._state = State.STOPPED
            if running:
                stop()
