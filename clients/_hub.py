"""What the preview's hubs share: one worker thread serving any number of viewers.

A hub (``JpegHub`` for the picture, ``ResultHub`` for the models' results) has a worker thread
that does its work once for everyone, and only while someone watches; viewers (one HTTP
connection each) register, wait on the hub's condition variable for something new, and leave.
This class holds the condition, the viewer count and the thread's life cycle; the subclass
writes ``_run`` and what viewers wait for.
"""

from __future__ import annotations

import threading
from typing import Optional


class ViewerHub:
    """A worker thread (``_run``) and the viewers it serves. ``start()``, then ``stop()``."""

    THREAD_NAME = "framebroker-view-hub"

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._viewers = 0
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the worker thread (idle until a viewer comes). Safe to call twice."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Wake every waiting viewer and end the worker thread. Safe to call twice."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def add_viewer(self, limit: int) -> bool:
        """Register a viewer; False if ``limit`` viewers already watch."""
        with self._condition:
            if self._viewers >= limit:
                return False
            self._viewers += 1
            self._condition.notify_all()
            return True

    def remove_viewer(self) -> None:
        with self._condition:
            self._viewers -= 1
            self._condition.notify_all()

    def _run(self) -> None:
        raise NotImplementedError
