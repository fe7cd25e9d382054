"""The byte layout of a ring segment: names, offsets, field formats, constants.

A stream ``NAME`` lives in one POSIX shared-memory object, ``/dev/shm/framebroker.NAME``,
plus one wake-up semaphore per reader-table entry, ``/dev/shm/sem.framebroker.NAME@EPOCH.wI``.
A model's results on that stream are a ring of the same layout whose slots hold records
instead of frames: ``/dev/shm/framebroker.NAME@res.MODEL`` (``_results.py``). The protocol and
this layout serve both; a *ring name* is a stream name or ``STREAM@res.MODEL``.
Everything is little-endian (x86_64 and aarch64 both are) and laid out as::

    offset 0            header            static geometry, then the daemon's live fields
    meta_offset         slot metadata     one 64-byte record per slot (seq, timestamps, shape)
    map_offset          seq -> slot map   map_size uint32 entries, indexed by seq % map_size
    table_offset        reader table      one 512-byte entry per reader (pid, name, mode, stats)
    data_offset         slot data         slot_count frames, slot_stride bytes apart

``data_offset`` is a multiple of 64 KiB so a reader can map the frame area on its own,
read-only, on any page size (aarch64 kernels use 4, 16 or 64 KiB pages).

The protocol that uses these bytes (who writes what, and in which order) is described
in ``framebroker/_ring.py``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "framebroker."
# "@" cannot appear in a stream name, so "framebroker.cam@..." can never be mistaken
# for the objects of a stream that is itself called "cam.something".
OBJECT_SEPARATOR = "@"

MAGIC = b"FRMBRKR\x00"
LAYOUT_VERSION = 4  # 4: the wake word (WAKE_OFFSET) and FLAG_FUTEX: a version 3 producer would never wake a compiled reader

HEADER_SIZE = 4096
META_RECORD_SIZE = 64
ENTRY_SIZE = 512
DATA_ALIGNMENT = 64 * 1024  # the largest page size aarch64 Linux uses
SLOT_ALIGNMENT = 4096

MAX_SLOTS = 256
MIN_SLOTS = 3  # newest frame + one being written + at least one for a reader
MAX_FRAME_BYTES = 1 << 31  # 2 GiB: far above 8K RGB, far below anything sane

STREAM_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Byte offsets used as OFD lock targets on the segment file (advisory, never read or written).
LOCK_OWNER = 0  # the daemon holds it exclusively for its whole life
LOCK_SLOT_BASE = 1024  # + slot index: readers share, the producer takes it exclusively to write
LOCK_ENTRY_BASE = 2048  # + entry index: a reader holds it exclusively while attached
LOCK_TOKEN_BASE = 4096  # + token index: one per frame a reader may hold (its slot budget), exclusive


class PixelFormat:
    """Pixel formats stored in the ring (uint8 samples)."""

    BGR = 1
    RGB = 2
    GRAY = 3

    NAMES = {BGR: "bgr", RGB: "rgb", GRAY: "gray"}
    CHANNELS = {BGR: 3, RGB: 3, GRAY: 1}

    @classmethod
    def parse(cls, name: str) -> int:
        for code, text in cls.NAMES.items():
            if text == name:
                return code
        raise ValueError(f"unknown pixel format {name!r}: use one of bgr, rgb, gray")


class StreamState:
    """The daemon's view of its source, as shown by ``framebroker status``."""

    STARTING = 1
    STREAMING = 2
    RECONNECTING = 3
    STOPPED = 4
    ENDED = 5  # a finite source reached its end; the daemon is exiting
    REPLACED = 6  # this segment was superseded by a larger one under the same name

    NAMES = {
        STARTING: "starting",
        STREAMING: "streaming",
        RECONNECTING: "reconnecting",
        STOPPED: "stopped",
        ENDED: "ended",
        REPLACED: "replaced",
    }

    @classmethod
    def parse(cls, name: str) -> int:
        for code, text in cls.NAMES.items():
            if text == name:
                return code
        raise ValueError(f"unknown stream state {name!r}: use one of {', '.join(cls.NAMES.values())}")


class ReaderMode:
    """How a reader last asked for frames (shown by status; ORDERED also protects history)."""

    IDLE = 0
    LIVE = 1  # latest()
    NEXT = 2  # next() / iteration
    ORDERED = 3  # ordered()

    NAMES = {IDLE: "idle", LIVE: "live", NEXT: "next", ORDERED: "ordered"}


def _validate_name(name: object, what: str, example: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, not {type(name).__name__}")
    if not STREAM_NAME_RE.fullmatch(name) or set(name) == {"."}:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ValueError(
            f"invalid {what} name {shown!r}: use 1-64 characters from A-Z a-z 0-9 _ . - "
            f"(not only dots), for example {example!r}"
        )
    return name


def validate_stream_name(name: object) -> str:
    """Return ``name`` if it is a valid stream name, else raise TypeError/ValueError."""
    return _validate_name(name, "stream", "cam0")


RESULTS_INFIX = f"{OBJECT_SEPARATOR}res."


def validate_model_name(name: object) -> str:
    """Return ``name`` if it is a valid model name (the rules of stream names)."""
    return _validate_name(name, "model", "faces")


def results_ring_name(stream: str, model: str) -> str:
    """The ring name of ``model``'s results on ``stream`` (both already validated)."""
    return f"{stream}{RESULTS_INFIX}{model}"


def segment_path(stream: str) -> str:
    return f"{SHM_DIR}/{SEGMENT_PREFIX}{stream}"


def semaphore_name(stream: str, epoch: int, entry: int) -> str:
    """posix_ipc name of the wake-up semaphore of one reader-table entry."""
    return f"/{SEGMENT_PREFIX}{stream}{OBJECT_SEPARATOR}{epoch:016x}.w{entry}"


def producer_semaphore_name(stream: str, epoch: int) -> str:
    """posix_ipc name of the semaphore readers post to wake a producer that waits for them
    (lockstep, ``Publisher.wait_until_consumed``)."""
    return f"/{SEGMENT_PREFIX}{stream}{OBJECT_SEPARATOR}{epoch:016x}.p"


def semaphore_file_prefix(stream: str) -> str:
    """File-name prefix in /dev/shm of every semaphore that belongs to ``stream``."""
    return f"sem.{SEGMENT_PREFIX}{stream}{OBJECT_SEPARATOR}"


def trigger_queue_prefix(stream: str) -> str:
    """posix_ipc name prefix of every trigger queue of ``stream`` (``_trigger.py``)."""
    return f"/{SEGMENT_PREFIX}{stream}{OBJECT_SEPARATOR}trig."


def trigger_queue_name(stream: str, epoch: int, entry: int, generation: int) -> str:
    """posix_ipc name of the trigger queue of the listener in one reader-table entry."""
    return f"{trigger_queue_prefix(stream)}{epoch:016x}.{entry}.{generation}"


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# --- header -------------------------------------------------------------------------------------

# Static part, written once before the segment becomes visible under its name.
STATIC = struct.Struct("<8sIIQiIdQIIQQQQIIQQQ136s")  # 256 bytes; the name fits STREAM@res.MODEL
# magic, version, header_size, epoch, owner_pid, owner_uid, created_wall, created_mono_ns,
# slot_count, table_size, slot_stride, slot_capacity, meta_offset, map_offset, map_size,
# page_alignment, table_offset, data_offset, total_size, name

# Live part: one writer (the producer); everyone else reads it without locks.
LIVE_OFFSET = 320
# What a reader reads on every call, in one go: newest_seq, the slot it is in, the stream state.
HEAD = struct.Struct("<QII")
# HEAD's slot in a segment that has no frame of its own yet: one the producer just moved to
# (larger frames, more slots), whose newest_seq goes on from the segment it replaces.
NO_FRAME = 0xFFFFFFFF
NEWEST_SEQ = struct.Struct("<Q")
NEWEST_SEQ_OFFSET = LIVE_OFFSET
STATE = struct.Struct("<I")
STATE_OFFSET = LIVE_OFFSET + 12
# What the producer writes with every frame, in one go: HEAD, then the frame's capture time
# (CLOCK_MONOTONIC ns) and the same instant on the wall clock.
FRAME_COUNTERS = struct.Struct("<QIIQd")
FRAME_COUNTERS_OFFSET = LIVE_OFFSET
GEOMETRY = struct.Struct("<IIII")  # format, height, width, channels
GEOMETRY_OFFSET = LIVE_OFFSET + 32
# Written every half second or so: configured_fps, measured_fps, source_drops, publisher_drops,
# reconnects, source_errors.
COUNTERS = struct.Struct("<ddQQQQ")
COUNTERS_OFFSET = LIVE_OFFSET + 56
STATE_SINCE = struct.Struct("<d")
STATE_SINCE_OFFSET = LIVE_OFFSET + 104
# Non-zero while the producer waits for its readers (lockstep, waiting for N readers): readers
# then post the producer's semaphore when they attach, detach, change mode or move on.
PRODUCER_WAITS = struct.Struct("<I")
PRODUCER_WAITS_OFFSET = LIVE_OFFSET + 112
# A ring that grows when readers need more slots (``--slots auto``): growable, the last growth
# request it refused, the bytes that growth needed, and the most it may take (``--max-shm``).
GROWTH = struct.Struct("<IIQQ")
GROWTH_OFFSET = LIVE_OFFSET + 116
# A results ring only (_results.py): the newest frame its model has dealt with, by publishing a
# result for it or by saying it skips it; a reader asking for an older frame that has no record
# knows at once that the model skipped it.
DEALT_WITH = struct.Struct("<Q")
DEALT_WITH_OFFSET = LIVE_OFFSET + 140
# The wake word: the producer adds 1 whenever it wakes its readers (a frame, a state change, a
# move), then wakes with one FUTEX_WAKE every reader sleeping in FUTEX_WAIT on it (those whose
# entry has FLAG_FUTEX). See "Wake-ups" in _ring.py.
WAKE = struct.Struct("<I")
WAKE_OFFSET = LIVE_OFFSET + 148
REASON_OFFSET = 512
REASON_SIZE = 512
SOURCE_OFFSET = 1024
SOURCE_SIZE = 512
EXTRA_OFFSET = 1536  # JSON written by the daemon: options shown by status (group, format, ...)
EXTRA_SIZE = 2288  # up to the growth request below
# One byte per reader-table entry, each written only by that entry's reader: it adds 1 when it
# attaches, changes mode or detaches, so the producer, comparing the whole run with the copy it
# saw last, knows when to rescan the table. One writer per byte: no update can be lost.
CHANGES_OFFSET = HEADER_SIZE - 256
CHANGES_SIZE = 256  # >= the largest table (MAX_SLOTS - 2 entries)
# Just before them, what an attaching reader that found no free token writes to ask a growable
# ring for more slots: a request count and the frames it wants to hold. Several may write at
# once (a lost increment is harmless: any change makes the producer look). The producer reads
# this and the change bytes as one run of bytes.
GROW_REQUEST = struct.Struct("<II")
GROW_REQUEST_OFFSET = CHANGES_OFFSET - GROW_REQUEST.size
assert EXTRA_OFFSET + EXTRA_SIZE <= GROW_REQUEST_OFFSET, "the header's fields must not overlap"

# --- per-slot metadata ---------------------------------------------------------------------------

META = struct.Struct("<QQdIIIIQ")
# seq, timestamp_ns, wall_time, height, width, channels, format, nbytes

# --- seq -> slot map -----------------------------------------------------------------------------

MAP_ENTRY = struct.Struct("<I")

# --- reader table entry --------------------------------------------------------------------------

ENTRY_IDENTITY = struct.Struct("<iIIId")  # pid, uid, hold, mode, attached_wall   at +0
ENTRY_PROGRESS = struct.Struct("<QQQQ")  # last_seq, cursor, frames, dropped      at +24
ENTRY_PROGRESS_OFFSET = 24
ENTRY_PROGRESS_HELD = struct.Struct("<QQQQI")  # the same and held, in one write, per frame
ENTRY_HELD = struct.Struct("<I")  # frames held right now                            at +56
ENTRY_HELD_OFFSET = 56
ENTRY_FLAGS = struct.Struct("<I")  # what the reader offers, how to wake it (FLAG_*)  at +60
ENTRY_FLAGS_OFFSET = 60
FLAG_TRIGGERS = 1  # listens for event triggers (framebroker/_trigger.py)
FLAG_FUTEX = 2  # waits on the header's wake word, not on its semaphore: woken by one broadcast
ENTRY_RATE = struct.Struct("<dd")  # fps, last_frame_wall                           at +64
ENTRY_RATE_OFFSET = 64
ENTRY_GENERATION = struct.Struct("<Q")  #                                            at +80
ENTRY_GENERATION_OFFSET = 80
ENTRY_NAME_OFFSET = 88
ENTRY_NAME_SIZE = 56
ENTRY_INFO_OFFSET = 144  # JSON written by the reader itself (the recorder: encoder, drops)
ENTRY_INFO_SIZE = ENTRY_SIZE - ENTRY_INFO_OFFSET


def encode_text(text: str, size: int) -> bytes:
    """UTF-8, cut to fit ``size`` bytes with a NUL left over, never splitting a character."""
    raw = text.encode("utf-8")[: size - 1]
    return raw.decode("utf-8", "ignore").encode("utf-8").ljust(size, b"\0")


def decode_text(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True)
class RingLayout:
    """Where everything sits in a segment of ``slot_count`` slots of ``slot_capacity`` bytes."""

    slot_count: int
    slot_capacity: int
    table_size: int
    map_size: int
    slot_stride: int
    meta_offset: int
    map_offset: int
    table_offset: int
    data_offset: int
    total_size: int

    @classmethod
    def compute(cls, slot_count: int, slot_capacity: int) -> RingLayout:
        if isinstance(slot_count, bool) or not isinstance(slot_count, int):
            raise TypeError(f"slots must be an int, not {type(slot_count).__name__}")
        if not MIN_SLOTS <= slot_count <= MAX_SLOTS:
            raise ValueError(f"slots must be between {MIN_SLOTS} and {MAX_SLOTS}, got {slot_count}")
        if not 0 <= slot_capacity <= MAX_FRAME_BYTES:
            raise ValueError(
                f"a frame of {slot_capacity} bytes is outside 0..{MAX_FRAME_BYTES}: check width, height and format"
            )
        # Every reader holds at least one frame and the producer needs the newest frame plus one
        # slot to write into, so the table never needs more entries than this.
        table_size = slot_count - 2
        assert table_size <= CHANGES_SIZE, "one change byte per entry must fit in the header"
        map_size = 1
        while map_size < 4 * slot_count:
            map_size *= 2
        meta_offset = HEADER_SIZE
        map_offset = meta_offset + slot_count * META_RECORD_SIZE
        table_offset = _align(map_offset + map_size * MAP_ENTRY.size, 64)
        data_offset = _align(table_offset + table_size * ENTRY_SIZE, DATA_ALIGNMENT)
        slot_stride = _align(max(slot_capacity, 1), SLOT_ALIGNMENT)
        total_size = data_offset + slot_count * slot_stride
        return cls(
            slot_count=slot_count,
            slot_capacity=slot_capacity,
            table_size=table_size,
            map_size=map_size,
            slot_stride=slot_stride,
            meta_offset=meta_offset,
            map_offset=map_offset,
            table_offset=table_offset,
            data_offset=data_offset,
            total_size=total_size,
        )

    def meta(self, slot: int) -> int:
        return self.meta_offset + slot * META_RECORD_SIZE

    def map_entry(self, seq: int) -> int:
        return self.map_offset + (seq % self.map_size) * MAP_ENTRY.size

    def entry(self, index: int) -> int:
        return self.table_offset + index * ENTRY_SIZE

    def slot_data(self, slot: int) -> int:
        """Offset of a slot's pixels, relative to ``data_offset``."""
        return slot * self.slot_stride
