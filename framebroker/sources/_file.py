"""Video files, decoded with PyAV (FFmpeg) for their exact presentation times.

A file is served at one of three paces (``framebroker serve FILE --pace ...``):

* ``realtime`` (the default): each frame is released when its PTS falls due, counted from the
  first frame, so the stream has the file's own timing, holes and all (a recording whose
  camera stalled for a second replays that second). ``--fps F`` plays the same timeline F / the
  file's rate times faster.
* ``max`` and ``lockstep``: frames are decoded as fast as FFmpeg goes; in lockstep the daemon
  waits for its readers between frames (``_replay.py``), the source itself never waits.

OpenCV cannot do the first: its FFmpeg backend hands out frames without their timestamps.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator, Optional

import numpy as np

from .._errors import SourceEnded, SourceError
from ._base import GeometryChanged, Source

log = logging.getLogger("framebroker.serve")

PACES = ("realtime", "max", "lockstep")
PTS_HZ = 90_000
# A frame this late (seconds) in realtime means the daemon was held up (a stopped process, a
# slow disk): the schedule starts afresh from it rather than rushing frames out to catch up.
LATE_RESET_S = 0.5
_AV_FORMATS = {"bgr": "bgr24", "rgb": "rgb24", "gray": "gray"}


@dataclass(frozen=True)
class FilePosition:
    """Where in the file the frame just read is."""

    frame: int  # 1 for the file's first frame, in this pass
    time_s: float  # its PTS, in seconds from the file's first frame
    pts_ticks: int  # its PTS in 90 kHz ticks, as the file and a recording's index carry it
    pass_number: int  # 1, then 2, 3, ... with ?loop=1


class FileSource(Source):
    """``file:///path.mp4`` or a bare path; ``?loop=1`` starts again at the end."""

    may_drop_frames = False
    _container: Any = None

    def __init__(self, *args: Any, pace: str = "realtime", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if pace not in PACES:
            raise ValueError(f"unknown pace {pace!r}: use {', '.join(PACES)}")
        self.pace = pace
        self.loop = self.spec.options.get("loop", "0") not in ("0", "", "false", "no")
        self.position: Optional[FilePosition] = None
        self.frames: Optional[int] = None  # in the file, when the container says
        self.duration_s: Optional[float] = None
        self.damaged_packets = 0
        self._pending: Any = None
        self._decoded: Optional[Iterator[Any]] = None
        self._pass = 0
        self._frame_in_pass = 0
        self._first_s: Optional[Fraction] = None
        self._last_s: Optional[Fraction] = None  # PTS of the frame just read, and of the one before
        self._previous_s: Optional[Fraction] = None
        self._period_s = Fraction(1, 30)
        self._speed = 1.0
        # Realtime schedule: (monotonic seconds, file seconds) of the frame it is counted from.
        self._anchor: Optional[tuple[float, Fraction]] = None
        self._last_due = 0.0

    def open(self) -> None:
        import av

        path = self.spec.target
        if not os.path.exists(path):
            raise SourceError(f"file not found: {path}")
        if os.path.isdir(path):
            raise SourceError(f"{path} is a directory, not a video file")
        if not os.access(path, os.R_OK):
            raise SourceError(f"permission denied reading {path}")
        self.close()
        try:
            container = av.open(path)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot decode {path}: not a video file FFmpeg can read ({exc})") from None
        if not container.streams.video:
            container.close()
            raise SourceError(f"{path} has no video stream")
        self._container = container
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: decoding is most of a replay's work
        native_h, native_w = stream.codec_context.height, stream.codec_context.width
        if native_h <= 0 or native_w <= 0:
            self.close()
            raise SourceError(f"{path} has a video stream without a size")
        self.shape = self._shape_for(self.height or native_h, self.width or native_w)
        rate = stream.average_rate or stream.guessed_rate
        if not rate or not 0 < rate <= 1000:
            rate = None
        file_fps = float(rate) if rate else 0.0
        self.fps = self.requested_fps or file_fps or 30.0
        self._period_s = 1 / Fraction(rate) if rate else Fraction(1, 30)
        self._speed = self.requested_fps / file_fps if self.requested_fps and file_fps else 1.0
        self.frames = stream.frames or None
        if stream.duration and stream.time_base:
            self.duration_s = float(stream.duration * stream.time_base)
        elif container.duration:
            self.duration_s = container.duration / 1e6  # AV_TIME_BASE: microseconds
        self._pass += 1
        self._frame_in_pass = 0
        self._first_s = None
        self._decoded = self._decode(container, stream)

    @property
    def frame_period_s(self) -> float:
        """The file's nominal frame period (seconds)."""
        return float(self._period_s)

    def _decode(self, container: Any, stream: Any) -> Iterator[Any]:
        """Decoded frames in presentation order. A damaged packet (a recording cut off mid-write)
        is skipped, as players do; a file that cannot be read further ends there."""
        import av

        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError as exc:
                    self.damaged_packets += 1
                    log.debug("%s: skipped a damaged packet: %s", self.spec.target, exc)
                    continue
                yield from frames
        except av.FFmpegError as exc:
            log.warning("%s: cannot read further (%s): treating it as the end of the file", self.spec.target, exc)

    def _next_frame(self) -> Any:
        frame = next(self._decoded, None) if self._decoded is not None else None
        if frame is None and self.loop and self._frame_in_pass:
            self.open()  # again from the start: reopening is exact where seeking in a .ts is not
            frame = next(self._decoded, None) if self._decoded is not None else None
        if frame is None:
            if self.loop:
                raise SourceError(f"{self.spec.target}: no frame could be decoded after starting again")
            raise SourceEnded(f"end of file {self.spec.target}")
        return frame

    def read_into(self, out: np.ndarray) -> Optional[int]:
        """Decode the next frame into ``out``; in realtime, return once its PTS falls due. Its
        capture time is when it is released: now."""
        frame, self._pending = self._pending, None
        if frame is None:
            frame = self._next_frame()
        if self.width is None and self.height is None and (frame.height, frame.width) != out.shape[:2]:
            self._pending = frame
            raise GeometryChanged(self._shape_for(frame.height, frame.width))
        self._convert(frame, out)
        seconds = self._frame_seconds(frame)
        if self.pace == "realtime":
            self._wait_until_due(seconds)
        return time.monotonic_ns()

    def _convert(self, frame: Any, out: np.ndarray) -> None:
        height, width = out.shape[:2]
        resize = {} if (frame.height, frame.width) == (height, width) else {"width": width, "height": height, "interpolation": "AREA"}
        # A view of the converted frame's plane: the copy into the slot is the only copy.
        np.copyto(out, frame.to_ndarray(format=_AV_FORMATS[self.pixel_format], **resize))

    def _frame_seconds(self, frame: Any) -> Fraction:
        """The frame's PTS in seconds; records where it is (``position``)."""
        if frame.pts is not None and frame.time_base:
            seconds = frame.pts * frame.time_base
        else:  # no timestamp: one frame period after the previous frame
            seconds = self._last_s + self._period_s if self._last_s is not None else Fraction(0)
        if self._first_s is None:
            self._first_s = seconds
        self._previous_s, self._last_s = self._last_s, seconds
        self._frame_in_pass += 1
        self.position = FilePosition(
            self._frame_in_pass, float(seconds - self._first_s), round(seconds * PTS_HZ), self._pass
        )
        return seconds

    def _wait_until_due(self, seconds: Fraction) -> None:
        now = time.monotonic()
        previous = self._previous_s
        if self._anchor is None:
            self._anchor = (now, seconds)
        elif previous is None or seconds <= previous:
            # A new pass of a looping file (or a timestamp going back): one frame period on.
            self._anchor = (self._last_due + float(self._period_s) / self._speed, seconds)
        due = self._anchor[0] + float(seconds - self._anchor[1]) / self._speed
        if now - due > LATE_RESET_S:
            log.debug("%s: %.2f s behind the file's timing: timing the following frames from now", self.spec.target, now - due)
            self._anchor, due = (now, seconds), now
        self._last_due = due
        delay = due - now
        if delay > 0 and self.stop.wait(delay):
            raise SourceError("stopping")

    def restart_timing(self) -> None:
        """The frame just read is published now (it was held, e.g. for readers to attach): time
        the following frames from this moment."""
        if self._last_s is not None:
            self._anchor = (time.monotonic(), self._last_s)

    def close(self) -> None:
        self._decoded = None
        self._pending = None
        container, self._container = self._container, None
        if container is not None:
            container.close()
