"""What flows from an encoder to the outputs, and the one place it flows through.

An encoder turns frames into ``EncodedPacket``s: H.264 access units with their PTS (90 kHz ticks
counted from the recording's first capture timestamp), their keyframe flag and the frames they
carry (seq, capture time, wall time). Every packet passes through one ``PacketRouter``, which hands
it to each attached output in encoder order. Outputs (a file, segmented files, UDP, SRT, and later
a pre-roll buffer for event clips) attach to the router; nothing else sees packets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .outputs import Output

PTS_HZ = 90_000  # MPEG-TS clock
TIME_BASE = Fraction(1, PTS_HZ)


def pts_from_ns(delta_ns: int) -> int:
    """Nanoseconds to 90 kHz ticks, rounded to the nearest tick (at most 5.6 us off).

    Each PTS is converted from its own capture-time offset, so rounding never accumulates.
    """
    return (delta_ns * 9 + 50_000) // 100_000  # 90 kHz = 9 ticks per 100,000 ns


@dataclass(frozen=True)
class FrameStamp:
    """Where a frame came from: its ring seq, capture and wall time, and the PTS it was given."""

    seq: int
    timestamp_ns: int  # capture time, CLOCK_MONOTONIC
    wall_time: float  # epoch seconds
    pts: int  # 90 kHz ticks since the recording's first frame


@dataclass(frozen=True)
class EncodedPacket:
    """One H.264 access unit (Annex B byte stream) as an encoder produced it."""

    data: bytes
    pts: int
    dts: int
    keyframe: bool
    frames: tuple[FrameStamp, ...]  # the frames this packet carries (one, as no encoder here reorders)

    @property
    def seconds(self) -> float:
        return self.pts / PTS_HZ


@dataclass(frozen=True)
class StreamInfo:
    """What outputs need to know about the video before the first packet."""

    stream: str  # the framebroker stream recorded
    width: int
    height: int
    encoder: str  # the encoder actually used, written into every file's metadata


class PacketRouter:
    """Fans each encoded packet out to the attached outputs, in encoder order.

    A note on locking: encoders deliver from their own thread (the encode thread for PyAV codecs,
    the pipe-reading thread for GStreamer), and outputs may be attached or detached from any
    thread. One lock covers delivery and the list of outputs, so an output sees one packet at a
    time, in order, and is never written after ``detach()`` returns. An output attached after the
    stream was opened is started at once; it receives packets from the next one on, so an output
    that must begin on a keyframe (a file, a clip) waits for ``packet.keyframe`` itself.

    An exception from an output propagates to the encoder that delivered the packet, which ends
    the recording with that error: a file that cannot be written is not a recording.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outputs: list["Output"] = []
        self._info: Optional[StreamInfo] = None
        self._closed = False
        self.frames = 0  # frames delivered (for progress and status)

    def attach(self, output: "Output") -> None:
        with self._lock:
            if self._closed:
                raise ValueError("the router is closed")
            if self._info is not None:
                output.start(self._info)
            self._outputs.append(output)

    def detach(self, output: "Output") -> None:
        with self._lock:
            if output in self._outputs:
                self._outputs.remove(output)
                output.stop()

    def open(self, info: StreamInfo) -> None:
        """The encoder is running: start every attached output with the stream's description."""
        with self._lock:
            if self._info is not None:
                raise ValueError("the router was already opened")
            self._info = info
            started: list["Output"] = []
            try:
                for output in self._outputs:
                    output.start(info)
                    started.append(output)
            except BaseException:
                for output in started:
                    try:
                        output.stop()
                    except Exception:
                        pass
                raise

    def deliver(self, packet: EncodedPacket) -> None:
        with self._lock:
            for output in self._outputs:
                output.write(packet)
            self.frames += len(packet.frames)

    def close(self) -> None:
        """Stop every output (each is stopped even if another fails; the first error is raised)."""
        with self._lock:
            self._closed = True
            outputs, self._outputs = self._outputs, []
        error: Optional[BaseException] = None
        for output in outputs:
            try:
                output.stop()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
