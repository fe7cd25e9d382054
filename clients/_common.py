"""Small helpers shared by the example clients (public framebroker API only)."""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Iterator, Optional

import framebroker as fb


def exit_on_sigterm() -> None:
    """Turn SIGTERM into a normal exit, so ``with Reader(...)`` blocks close cleanly.

    It raises KeyboardInterrupt, which the framebroker command maps to exit code 0: it is the one
    exception posix_ipc lets out of an interrupted semaphore wait (see ``fb.Reader``).
    """

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


class Every:
    """True at most once per ``seconds`` (for periodic summary lines)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.next = time.monotonic() + seconds

    def __call__(self) -> bool:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + self.seconds
            return True
        return False


def say(text: str) -> None:
    print(text, flush=True)


def fresh_frames(cam: fb.Reader, label: str, timeout: float = 2.0) -> Iterator[fb.Frame]:
    """The freshest frame each time the caller is ready (``next()``), saying so while none come,
    until the stream ends."""
    while True:
        try:
            frame = cam.next(timeout=timeout)
        except fb.FrameTimeout as exc:
            say(f"{label}: waiting: {exc}")
            continue
        except fb.SourceEnded as exc:
            say(f"{label}: {exc}")
            return
        yield frame
