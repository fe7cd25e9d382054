"""What every camera source provides to the daemon."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .._errors import SourceError
from .._layout import PixelFormat
from ._uri import SourceSpec


class GeometryChanged(Exception):
    """Raised by ``read_into`` when the source's frame size changed; the frame is kept for the
    next ``read_into`` with a buffer of the new ``shape``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(f"frame size changed to {shape[1]}x{shape[0]}")
        self.shape = shape


class SourceRenumbered(SourceError):
    """Raised by a source that relays another machine's frames (``frame_origin``) when their
    numbering starts again (that machine's daemon restarted): the daemon starts a new ring,
    as a restarted daemon would, and opens the source again."""


class Source:
    """A camera (or a stand-in) that fills frames in place.

    Life cycle, driven by the daemon: ``open()`` (raises ``SourceError`` with a reason a human
    can act on), then ``read_into(buffer)`` for each frame, which fills ``buffer`` (shape
    ``self.shape``, the requested pixel format) and returns the capture time on CLOCK_MONOTONIC
    in nanoseconds if the driver reports one (else None: the daemon stamps it on arrival);
    ``close()`` at the end or before a reconnect. ``stop`` is set when the daemon shuts down:
    blocking waits must watch it.

    A source that relays another machine's stream (``zenoh://``) sets ``frame_origin`` to the
    frame's ``(seq, wall_time)`` there in each ``read_into``, and the daemon publishes the frame
    under them; ``info()`` is what the daemon shows in status (``Publisher.set_info``), and
    ``stream`` is the name the daemon serves the source under ("" when nothing does, as in
    ``framebroker check``).
    """

    # False for sources that make every frame themselves on a schedule (test://, files): a late
    # frame from them is late, not lost, so gaps between their timestamps are not drops.
    may_drop_frames = True
    default_size = (480, 640)
    stream = ""
    frame_origin: Optional[Tuple[int, float]] = None

    def __init__(
        self,
        spec: SourceSpec,
        *,
        width: Optional[int],
        height: Optional[int],
        fps: Optional[float],
        pixel_format: str,
        stop: threading.Event,
    ) -> None:
        self.spec = spec
        self.description = spec.display
        self.width = width
        self.height = height
        self.requested_fps = fps
        self.pixel_format = pixel_format
        self.channels = PixelFormat.CHANNELS[PixelFormat.parse(pixel_format)]
        self.stop = stop
        self.shape: tuple[int, ...] = self._shape_for(height or self.default_size[0], width or self.default_size[1])
        self.fps: float = fps or 0.0

    def _shape_for(self, height: int, width: int) -> tuple[int, ...]:
        return (height, width) if self.channels == 1 else (height, width, 3)

    def provisional_shape(self) -> tuple[int, ...]:
        """Shape to size the ring with before the source is open (it may grow later)."""
        return self.shape

    def open(self) -> None:
        raise NotImplementedError

    def read_into(self, out: np.ndarray) -> Optional[int]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def info(self) -> Dict[str, Any]:
        """Key/values for ``framebroker status`` (merged into the stream's ``info``)."""
        return {}


class Pacer:
    """Releases frames at a fixed rate without drifting, sleeping on the stop event."""

    def __init__(self, fps: float, stop: threading.Event) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.stop = stop
        self.next_time: Optional[float] = None

    def wait(self) -> None:
        if self.period <= 0:
            if self.stop.is_set():
                raise SourceError("stopping")
            return
        now = time.monotonic()
        if self.next_time is None or now - self.next_time > 5 * self.period:
            self.next_time = now  # first frame, or we fell far behind: start the schedule afresh
        delay = self.next_time - now
        if delay > 0 and self.stop.wait(delay):
            raise SourceError("stopping")
        self.next_time += self.period


def convert_into(image: np.ndarray, out: np.ndarray, pixel_format: str) -> None:
    """Write a BGR image into ``out`` in ``pixel_format``, resizing if the sizes differ."""
    import cv2  # heavy: imported where used

    if image.shape[:2] != out.shape[:2]:
        image = cv2.resize(image, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_AREA)
    if pixel_format == "bgr":
        if image is not out:
            np.copyto(out, image)
    elif pixel_format == "rgb":
        cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=out)
    else:
        cv2.cvtColor(image, cv2.COLOR_BGR2GRAY, dst=out)
