"""Small helpers shared by the example clients (public framebroker API only)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType
from typing import Any, Iterator, Optional

import framebroker as fb
from framebroker.arguments import float_in, model_name


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


def note(text: str) -> None:
    """A remark about the circumstances (waiting for the stream): stderr, so that stdout holds
    only what the client found."""
    print(text, file=sys.stderr, flush=True)


def add_wait_option(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--wait",
        type=float_in(0, 1e6, "--wait", low_inclusive=True),
        default=default,
        metavar="S",
        help=f"wait up to S seconds for the stream to appear (default {default:g}; 0: fail at once if it is not served)",
    )


def add_model_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--model",
        type=model_name,
        default=default,
        metavar="NAME",
        help=f"publish the results under this model name (default {default}): the preview draws them, "
        "record --results/--trigger-on use them, framebroker status shows them",
    )


def open_reader(stream: str, reader_name: str, wait: float, label: str, **options: Any) -> fb.Reader:
    """Attach to ``stream``; if nothing serves it yet, say once what is waited for and how long."""
    try:
        return fb.Reader(stream, name=reader_name, **options)
    except fb.StreamNotFound as exc:
        if wait <= 0:
            raise
        note(f"{label}: waiting up to {wait:g} s for stream {stream!r} to appear ({exc})")
    try:
        return fb.Reader(stream, name=reader_name, wait=wait, **options)
    except fb.StreamNotFound as exc:
        raise fb.StreamNotFound(f"waited {wait:g} s in vain: {exc}") from None


def age_ms(timestamp_ns: int) -> float:
    """Milliseconds since a frame's capture time (``frame.timestamp_ns``, CLOCK_MONOTONIC like
    ``time.monotonic_ns()``)."""
    return (time.monotonic_ns() - timestamp_ns) / 1e6


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
