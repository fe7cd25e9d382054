"""``Frame``: one leased frame, and ``FrameIterator``, the iterators a Reader hands out."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np

from ._errors import FrameReleased, SourceEnded
from ._images import save_image

if TYPE_CHECKING:
    from ._attachment import Attachment
    from ._reader import Reader


class Frame:
    """One frame leased from the ring: a read-only, zero-copy view plus its metadata.

    ``array`` is a numpy view of shared memory: (H, W, 3) uint8 for bgr/rgb, (H, W) for gray.
    It stays byte-for-byte unchanged until the frame is released: by ``release()``, by leaving
    ``with frame:``, by the Reader handing out a frame beyond its ``hold`` budget (the oldest
    held frame goes first), or by ``Reader.close()``. After that, ``array`` raises
    ``FrameReleased``; a view you kept from before may then change, so ``copy()`` what you keep.

    ``seq`` counts captured frames from 1 for the daemon's life (a gap is a frame this reader did
    not see); ``timestamp_ns`` is the capture time on CLOCK_MONOTONIC (the driver's where it gives
    one, comparable with ``time.monotonic_ns()``); ``wall_time`` is the same instant in epoch
    seconds; ``shape`` and ``format`` ("bgr", "rgb" or "gray") describe the pixels.

    ``torch.from_numpy(frame.array)`` shares the memory without copying. PyTorch warns that the
    array is not writable: the tensor must be treated as read-only too (an in-place op on it
    would fault); ``.clone()`` it to modify it.
    """

    __slots__ = (
        "seq",
        "timestamp_ns",
        "wall_time",
        "shape",
        "format",
        "dropped",
        "stream",
        "_slot",
        "_attachment",
        "_view",
        "_released",
    )

    def __init__(
        self,
        attachment: "Attachment",
        slot: int,
        seq: int,
        timestamp_ns: int,
        wall_time: float,
        shape: Tuple[int, ...],
        pixel_format: str,
        dropped: int,
        view: np.ndarray,
    ) -> None:
        self.seq = seq
        self.timestamp_ns = timestamp_ns
        self.wall_time = wall_time
        self.shape = shape
        self.format = pixel_format
        self.dropped = dropped
        self.stream = attachment.stream
        self._slot = slot
        self._attachment = attachment
        self._view = view
        self._released = False

    @property
    def array(self) -> np.ndarray:
        """Read-only numpy view of the frame in shared memory (no copy)."""
        if self._released:
            raise FrameReleased(
                f"frame {self.seq} of stream {self.stream!r} was released; its slot may hold another frame now. "
                "Keep frames longer with Reader(..., hold=N), or copy() them before asking for the next one."
            )
        return self._view

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        array = self.array
        if copy:
            return array.astype(dtype or array.dtype, copy=True)
        return array if dtype is None else array.astype(dtype)

    def copy(self) -> np.ndarray:
        """A private, writable copy of the pixels, valid forever."""
        return self.array.copy()

    def save(self, path: str, quality: int = 90) -> None:
        """Save the picture as JPEG or PNG (by the file name's extension), atomically: whoever
        reads ``path`` sees the old file or the new one, never half of one."""
        save_image(self.array, self.format, path, quality)

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the slot back to the producer. Safe to call twice."""
        if not self._released:
            self._attachment.release(self)

    def __enter__(self) -> "Frame":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return (
            f"<Frame {self.stream!r} seq={self.seq} {self.shape[1]}x{self.shape[0]} {self.format} "
            f"t={self.timestamp_ns} dropped={self.dropped} {state}>"
        )


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds, or TypeError/ValueError naming what is wrong."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not timeout >= 0:  # also rejects NaN
        raise ValueError(f"timeout must be >= 0 seconds (or None to wait forever), got {timeout}")
    return float(timeout)


class FrameIterator:
    """Iterator over a Reader's frames (``for frame in reader``, ``reader.ordered()``).

    Unlike a generator it survives exceptions: after ``FrameTimeout`` the next ``next()`` waits
    again. It stops when the stream ends (``SourceEnded``).
    """

    __slots__ = ("_reader", "_mode", "_timeout")

    def __init__(self, reader: "Reader", mode: int, timeout: Optional[float]) -> None:
        if timeout is not None:
            check_timeout(timeout)
        self._reader = reader
        self._mode = mode
        self._timeout = timeout

    def __iter__(self) -> "FrameIterator":
        return self

    def __next__(self) -> Frame:
        try:
            return self._reader._get(self._mode, self._timeout)
        except SourceEnded:
            raise StopIteration from None
