"""What every benchmark frame carries, so a reader can prove it was whole and stayed whole.

Frame layout (any size, uint8, C-contiguous):

* the first 16 bytes and the last 16 bytes both hold ``(n, timestamp_ns)`` as two little-endian
  u64: the frame's identity and the CLOCK_MONOTONIC time taken *before* the producer started
  writing it (so the copy into the transport counts as latency);
* every other byte holds one fill value chosen by the frame number (``FILLS``), so consecutive
  frames differ everywhere and a frame overwritten half way shows two fills.

A reader reads the head, the tail and ``SPOT_COUNT`` bytes spread over the whole frame when the
array becomes usable: a head that differs from the tail, or a spot that does not hold the head's
fill, is a **torn** frame. It reads the same bytes again after holding the frame for a while:
any difference is a **changed** frame. Both checks cost a few microseconds, whatever the size.

``n`` packs the phase of the run (``KIND_*``), the repetition and a counter that never repeats
during a run; the counter picks the fill.
"""

from __future__ import annotations

import struct
from typing import Optional

import numpy as np

STAMP = struct.Struct("<QQ")
STAMP_BYTES = STAMP.size  # 16

# The phases of one measurement, in the top byte of n.
KIND_WARMUP = 1
KIND_LATENCY = 2
KIND_THROUGHPUT = 3
KIND_INTEGRITY = 4
KIND_END = 5
KIND_NAMES = {KIND_WARMUP: "warmup", KIND_LATENCY: "latency", KIND_THROUGHPUT: "throughput", KIND_INTEGRITY: "integrity", KIND_END: "end"}
KIND_SHIFT = 56
REP_SHIFT = 48
COUNTER_MASK = (1 << REP_SHIFT) - 1

# Distinct, non-zero fill values: a frame of zeros (fresh memory) never passes as a real frame.
# Eight of them, so a tear between frames up to seven apart shows in the fill as well as the stamps.
FILLS = tuple((37 + 29 * k) % 256 for k in range(8))
SPOT_COUNT = 64


def frame_number(kind: int, rep: int, counter: int) -> int:
    return (kind << KIND_SHIFT) | (rep << REP_SHIFT) | (counter & COUNTER_MASK)


def split_number(n: int) -> tuple[int, int, int]:
    """``(kind, rep, counter)`` of a frame number."""
    return n >> KIND_SHIFT, (n >> REP_SHIFT) & 0xFF, n & COUNTER_MASK


def fill_of(n: int) -> int:
    return FILLS[(n & COUNTER_MASK) % len(FILLS)]


class SourceFrames:
    """The producer's private frames: one per fill value, stamped just before each publish.

    A capture loop that decodes into the same few buffers looks like this; transports that send
    asynchronously therefore copy before ``publish`` returns (see each transport's docstring).
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.frames = [np.full(shape, fill, np.uint8) for fill in FILLS]
        self._tail = self.frames[0].nbytes - STAMP_BYTES

    def stamped(self, n: int, timestamp_ns: int) -> np.ndarray:
        frame = self.frames[(n & COUNTER_MASK) % len(FILLS)]
        STAMP.pack_into(frame, 0, n, timestamp_ns)
        STAMP.pack_into(frame, self._tail, n, timestamp_ns)
        return frame


class FrameCheck:
    """Reads a frame's identity and integrity signature (``read``) and judges it (``torn``)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        nbytes = int(np.prod(shape))
        if nbytes < 2 * STAMP_BYTES + SPOT_COUNT:
            raise ValueError(f"frames of shape {shape} are too small to carry their identity")
        self.nbytes = nbytes
        self._tail = nbytes - STAMP_BYTES
        # Evenly spread over everything between the stamps, including the first and last byte.
        self._spots = np.linspace(STAMP_BYTES, nbytes - STAMP_BYTES - 1, SPOT_COUNT).astype(np.intp)
        self._expected = {fill: bytes([fill]) * SPOT_COUNT for fill in FILLS}

    def read(self, array: np.ndarray) -> tuple[tuple[int, int], tuple[int, int], bytes]:
        """``(head, tail, spots)``: compare two readings to see whether the frame changed."""
        head = STAMP.unpack_from(array, 0)
        tail = STAMP.unpack_from(array, self._tail)
        spots = array.reshape(-1)[self._spots].tobytes()
        return head, tail, spots

    def torn(self, head: tuple[int, int], tail: tuple[int, int], spots: bytes) -> bool:
        if head != tail:
            return True
        expected: Optional[bytes] = self._expected.get(fill_of(head[0]))
        return spots != expected
