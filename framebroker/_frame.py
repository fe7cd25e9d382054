"""``Frame``: one leased frame, and ``FrameIterator``, the iterators a Reader hands out."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import numpy as np

from ._errors import FrameReleased, SourceEnded, StreamNotFound
from ._images import save_image
from ._placement import Placement, check_box, placement_of, read_derived_info

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

    A frame of a derived stream (``serve --derive``) is the main frame of the same ``seq``,
    resized and converted; ``source_box(box)`` maps a box found on it to the main frame's pixels
    and ``derived_box(box)`` back (on a main stream's frame both return the box unchanged).

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

    def source_box(self, box: Sequence[float]) -> List[float]:
        """``box`` ([x, y, w, h] in this frame's pixels) in the pixels of the main stream's frame
        of the same seq: what a model that reads ``cam0.det`` publishes on ``cam0``. Floats; round
        them to draw. Right for this very frame even if the camera changed its resolution since.
        A box in a letterbox bar maps outside the main frame. Usable after ``release()`` too."""
        placement = self._placement()
        return list(check_box(box)) if placement is None else placement.to_source(box)

    def derived_box(self, box: Sequence[float]) -> List[float]:
        """The inverse of ``source_box``: ``box`` in main-frame pixels, in this frame's pixels."""
        placement = self._placement()
        return list(check_box(box)) if placement is None else placement.to_target(box)

    def _placement(self) -> Optional[Placement]:
        """How this frame was drawn from its main frame; None for a main stream's frame. Read from
        the ring's header on demand (``_placement.py``), so the frame path carries nothing."""
        if "." not in self.stream:
            return None  # a derived stream is always called MAIN.NAME
        control = self._attachment.control
        if control is not None:
            derived = read_derived_info(control)
        else:
            derived = self._derived_info_of_current_ring()
        if derived is None:
            return None
        found = placement_of(derived, self.seq)
        if found is None:
            raise ValueError(
                f"frame {self.seq} of stream {self.stream!r} is older than the placements its ring keeps: the main "
                "stream changed its resolution several times since; map boxes before holding a frame that long"
            )
        return found[1]

    def _derived_info_of_current_ring(self) -> Optional[dict]:
        """The reader has left the segment this frame came from (it grew, or the reader closed):
        the one serving the stream now keeps the same placements if the same daemon made it."""
        from ._segment import open_segment

        made_by = self._attachment.segment.header.owner_pid
        try:
            segment = open_segment(self.stream, for_status=True)
        except StreamNotFound:
            segment = None
        try:
            if segment is not None and segment.header.owner_pid == made_by:
                segment.map(control_writable=False, data_access=None)
                return read_derived_info(segment.control)
        finally:
            if segment is not None:
                segment.close()
        raise StreamNotFound(
            f"frame {self.seq} of stream {self.stream!r} came from a daemon that is gone (pid {made_by}); "
            "how it was drawn from the main frame went with it: map boxes while its daemon serves the stream"
        )

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
