"""The producer side of the ring: ``Publisher`` (protocol in ``_ring.py``)."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import posix_ipc

from ._errors import ClosedError
from ._fast import broadcast, compiled
from ._layout import (
    CHANGES_OFFSET,
    COUNTERS,
    GROW_REQUEST,
    GROW_REQUEST_OFFSET,
    GROWTH,
    GROWTH_OFFSET,
    LOCK_TOKEN_BASE,
    MAX_SLOTS,
    RingLayout,
    COUNTERS_OFFSET,
    FRAME_COUNTERS,
    FRAME_COUNTERS_OFFSET,
    ENTRY_FLAGS,
    ENTRY_FLAGS_OFFSET,
    ENTRY_IDENTITY,
    ENTRY_PROGRESS,
    ENTRY_PROGRESS_OFFSET,
    EXTRA_OFFSET,
    FLAG_FUTEX,
    EXTRA_SIZE,
    GEOMETRY,
    GEOMETRY_OFFSET,
    STATE,
    STATE_OFFSET,
    LOCK_SLOT_BASE,
    MAP_ENTRY,
    NO_FRAME,
    META,
    REASON_OFFSET,
    REASON_SIZE,
    SOURCE_OFFSET,
    SOURCE_SIZE,
    STATE_SINCE,
    STATE_SINCE_OFFSET,
    PRODUCER_WAITS,
    PRODUCER_WAITS_OFFSET,
    PixelFormat,
    ReaderMode,
    StreamState,
    encode_text,
    validate_stream_name,
)
from ._lifecycle import Lifecycle
from ._ring import MAX_PENDING_WAKES
from ._segment import DraftSegment, Segment, create_segment, discard_semaphores, free_shm_bytes, resolve_group
from ._table import changes, live_entries, read_entry, remove_listener_queues

log = logging.getLogger("framebroker.publisher")

DEFAULT_SLOTS = 12
AUTO_SLOTS = "auto"  # slots="auto": start at DEFAULT_SLOTS, grow when readers need more
SHRINK_AFTER = 60.0  # seconds a grown ring waits, once readers need no more, before it shrinks
HISTORY_KEPT = 8  # ring size changes status shows (they share the header's 2 KiB of JSON)
# How often a producer that waits for its readers rescans the table anyway (seconds): a reader
# killed with kill -9 cannot say that it is gone.
RESCAN_STEP = 0.05
MAX_FPS = 10_000.0
# Work done about twice a second rather than with every frame (see Publisher._housekeeping).
HOUSEKEEPING_NS = 500_000_000
HOUSEKEEPING_FRAMES = 256

_pack_meta = META.pack_into
_pack_map = MAP_ENTRY.pack_into
_pack_frame_counters = FRAME_COUNTERS.pack_into


def check_shape(shape: object, pixel_format: Optional[str] = None) -> tuple[tuple[int, ...], int]:
    """Validate a frame shape; return it as a tuple with its pixel-format code."""
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape
    ):
        raise TypeError(f"shape must be a tuple of ints such as (480, 640, 3), not {shape!r}")
    dims = tuple(int(d) for d in shape)
    if len(dims) == 3 and dims[2] == 1:
        dims = dims[:2]
    if len(dims) not in (2, 3) or (len(dims) == 3 and dims[2] != 3):
        raise ValueError(f"shape must be (height, width, 3) for colour or (height, width) for gray, got {dims}")
    if not all(1 <= d <= 65536 for d in dims[:2]):
        raise ValueError(f"frame height and width must be between 1 and 65536 pixels, got {dims[0]}x{dims[1]}")
    channels = 1 if len(dims) == 2 else 3
    if pixel_format is None:
        code = PixelFormat.GRAY if channels == 1 else PixelFormat.BGR
    else:
        code = PixelFormat.parse(pixel_format)
        if PixelFormat.CHANNELS[code] != channels:
            raise ValueError(f"pixel format {pixel_format!r} needs {PixelFormat.CHANNELS[code]} channel(s), shape {dims} has {channels}")
    return dims, code


def check_fps(fps: object) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)):
        raise TypeError(f"fps must be a number, not {type(fps).__name__}")
    value = float(fps)
    if not math.isfinite(value) or not 0.0 <= value <= MAX_FPS:
        raise ValueError(f"fps must be between 0 (unknown) and {MAX_FPS:g}, got {fps}")
    return value


def _describe(shape: tuple[int, ...], code: int) -> str:
    return f"{shape[1]}x{shape[0]} {PixelFormat.NAMES[code]}"


class SlotWriter:
    """Context manager returned by ``Publisher.slot()``: a writable view into a free slot.

    The frame is published when the ``with`` block ends without an exception and dropped (never
    shown to readers) if it raises. Set ``writer.timestamp_ns`` inside the block to give the capture
    time the source reported; by default the time at which the block ends is used, since that is
    when a blocking ``cap.read(buf)`` has the frame. A replay may also set ``writer.seq`` and
    ``writer.wall_time`` to the recorded frame's number and wall-clock capture time (see
    ``Publisher.publish``); after the block ``writer.seq`` is the published seq.
    """

    __slots__ = ("_publisher", "_slot", "timestamp_ns", "array", "seq", "wall_time")

    def __init__(self, publisher: "Publisher", timestamp_ns: Optional[int]) -> None:
        self._publisher = publisher
        self._slot = -1
        self.timestamp_ns = timestamp_ns
        self.array: Optional[np.ndarray] = None
        self.seq: Optional[int] = None
        self.wall_time: Optional[float] = None

    def __enter__(self) -> np.ndarray:
        publisher = self._publisher
        publisher._check_open()
        slot = publisher._claim_slot()
        if slot < 0:
            # Every slot is leased: impossible within the slot budget, but never wait for readers.
            publisher._publisher_drops += 1
            self.array = np.empty(publisher._shape, np.uint8)  # written and thrown away
            return self.array
        self._slot = slot
        self.array = publisher._views[slot]
        return self.array

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        publisher = self._publisher
        slot, self._slot = self._slot, -1
        if slot < 0:
            return
        if exc_type is not None:
            publisher._abandon(slot)
            return
        timestamp_ns = self.timestamp_ns
        stamp = time.monotonic_ns() if timestamp_ns is None else int(timestamp_ns)
        if self.seq is None and self.wall_time is None:
            self.seq = publisher._commit(slot, stamp)
        else:
            try:
                seq = publisher._check_replayed(self.seq, self.wall_time)
            except BaseException:
                publisher._abandon(slot)
                raise
            self.seq = publisher._commit(slot, stamp, seq, self.wall_time)


class Publisher:
    """Writes frames into a stream's ring; any program can be a producer.

    ``Publisher("cam0", shape=(480, 640, 3), fps=30)`` creates ``/dev/shm/framebroker.cam0``
    (raises ``StreamBusy`` naming the pid if a live daemon owns it; takes over a stale one).
    ``publish(array)`` copies a frame in once; ``with pub.slot() as buf:`` lets a capture write
    straight into shared memory. ``close()`` (or leaving the ``with`` block) removes the segment
    and its semaphores; readers keep frames they hold and wait for a new producer.

    A Publisher is not thread-safe: publish from one thread. It does not survive ``fork()``.
    """

    _segment: Optional[Segment] = None
    _semaphores: Sequence[posix_ipc.Semaphore] = ()
    _compiled: Any = None  # the extension, if this Publisher runs the compiled path (_fast.py)
    _fast: Any = None  # its frame path for the segment written now
    _futex_readers = 0  # readers that wait on the wake word, woken by one broadcast
    _reader_count = 0
    _state = Lifecycle.CLOSED
    _growable = False
    _max_shm_asked: Optional[int] = None
    _shrink_after = 0.0
    _prepared: "Optional[Tuple[DraftSegment, str]]" = None
    _growing: Optional[threading.Thread] = None
    _grow_failure: "Optional[Tuple[int, int, str]]" = None

    def __init__(
        self,
        stream: str,
        shape: Sequence[int],
        fps: float = 0.0,
        *,
        format: Optional[str] = None,
        slots: Union[int, str] = DEFAULT_SLOTS,
        group: Optional[str] = None,
        source: str = "",
        capacity: Optional[int] = None,
        max_shm: Optional[int] = None,
        shrink_after: float = SHRINK_AFTER,
    ) -> None:
        self._growable = slots == AUTO_SLOTS
        if self._growable:
            slots = DEFAULT_SLOTS
        elif isinstance(slots, bool) or not isinstance(slots, int):
            raise TypeError(f"slots must be an int or {AUTO_SLOTS!r}, not {slots!r}")
        if max_shm is not None and (isinstance(max_shm, bool) or not isinstance(max_shm, int) or max_shm <= 0):
            raise ValueError(f"max_shm must be a number of bytes > 0 (or None for a default), got {max_shm!r}")
        if isinstance(shrink_after, bool) or not isinstance(shrink_after, (int, float)) or not shrink_after >= 0:
            raise ValueError(f"shrink_after must be a number of seconds >= 0, got {shrink_after!r}")
        self._max_shm_asked = max_shm
        self._shrink_after = float(shrink_after)
        self._open(validate_stream_name(stream), shape, fps, format, slots, resolve_group(group), source, capacity, {})

    def _open(
        self,
        ring: str,
        shape: Sequence[int],
        fps: float,
        format: Optional[str],
        slots: int,
        gid: Optional[int],
        source: str,
        capacity: Optional[int],
        extra: Dict[str, Any],
    ) -> None:
        """Make the ring ``ring`` (a stream's, or a results ring: see ``_results.py``), with
        ``extra`` in its header from the start (status shows it)."""
        self._stream = ring
        dims, code = check_shape(shape, format)
        self._fps = check_fps(fps)
        self._gid = gid
        self._slots = slots
        self._source = source
        frame_bytes = int(np.prod(dims))
        if capacity is None:
            capacity = frame_bytes
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError("capacity must be an int (bytes per slot)")
        if capacity < frame_bytes:
            raise ValueError(f"capacity {capacity} is smaller than one {_describe(dims, code)} frame ({frame_bytes} bytes)")
        self._seq = 0
        self._published = 0  # frames (or records) committed; seq counts captures
        self._publisher_drops = 0
        self._source_drops = 0
        self._reconnects = 0
        self._source_errors = 0
        self._extra = dict(extra)
        self._stream_state = StreamState.STARTING
        self._reason = ""
        self._initial_slots = slots
        self._history: List[Dict[str, Any]] = []
        self._compiled = compiled()  # chosen once: a Publisher does not change paths midway
        self._quiet_since = 0.0  # when the readers' holds last fitted the starting size
        self._create(capacity, None, dims, code)
        # By default a growing ring may take half of what /dev/shm has free now, beyond itself.
        self._max_shm = self._max_shm_asked or self._segment.layout.total_size + (free_shm_bytes() or 0) // 2  # type: ignore[union-attr]
        self._write_growth()
        self._state = Lifecycle.OPEN
        self._pid = os.getpid()

    # --- lifecycle -------------------------------------------------------------------------

    def _create(self, capacity: int, replace: Optional[Segment], shape: Tuple[int, ...], code: int) -> None:
        """Make the segment (a new one, or a larger one replacing ``replace``) for frames of
        ``shape``; nothing of this Publisher changes unless that succeeds."""
        segment, semaphores = create_segment(
            self._stream,
            self._slots,
            capacity,
            gid=self._gid,
            describe_frame=_describe(shape, code),
            replace=replace,
        )
        self._take(segment, semaphores, shape, code)

    def _take(self, segment: Segment, semaphores: List[posix_ipc.Semaphore], shape: Tuple[int, ...], code: int) -> None:
        """Start writing into ``segment`` (just published under the stream's name)."""
        self._shape, self._format = shape, code
        self._segment = segment
        self._semaphores = semaphores
        layout = segment.layout
        self._layout = layout
        self._slots = layout.slot_count
        self._control = segment.control
        self._locks = segment.locks
        self._capacity = layout.slot_capacity
        self._slot_seq = [0] * layout.slot_count
        # Slots by how recently they were written, most recent first; see _claim_slot.
        self._recency = list(range(layout.slot_count))
        self._newest_slot = -1
        self._next_slot = -1  # locked ahead for the next frame (see _commit)
        self._rebuild_views()
        self._start_fast()
        self._wake_list: List[posix_ipc.Semaphore] = []
        self._ordered_entries: List[int] = []
        self._holding_entries: List[int] = []
        self._changes_seen = b""
        self._grow_seen = 0  # a new segment's growth requests count from 0
        self._rate_mark = (time.monotonic(), self._published)
        self._measured_fps = 0.0
        self._housekeeping()
        self._write_geometry()
        self._write_text(SOURCE_OFFSET, SOURCE_SIZE, self._source)
        self._write_text(REASON_OFFSET, REASON_SIZE, self._reason)
        self._write_extra()
        if hasattr(self, "_max_shm"):
            self._write_growth()
        STATE_SINCE.pack_into(self._control, STATE_SINCE_OFFSET, time.time())
        FRAME_COUNTERS.pack_into(self._control, FRAME_COUNTERS_OFFSET, self._seq, NO_FRAME, self._stream_state, 0, 0.0)

    def _rebuild_views(self) -> None:
        data = self._segment.data  # type: ignore[union-attr]
        stride = self._layout.slot_stride
        self._views = [
            np.ndarray(self._shape, np.uint8, buffer=data, offset=k * stride) for k in range(self._layout.slot_count)
        ]
        self._frame_bytes = int(np.prod(self._shape))
        shape = self._shape
        # Everything of a slot's metadata record but seq and time is the same for every frame.
        self._meta_geometry = (shape[0], shape[1], shape[2] if len(shape) == 3 else 1, self._format, self._frame_bytes)
        layout = self._layout
        self._meta_offsets = [layout.meta(k) for k in range(layout.slot_count)]
        self._changes_end = CHANGES_OFFSET + layout.table_size
        self._map_offset = layout.map_offset
        self._map_mask = layout.map_size - 1

    def _start_fast(self) -> None:
        """The compiled frame path for the segment just taken (none on the pure-Python path)."""
        self._stop_fast()
        if self._compiled is None:
            return
        layout = self._layout
        self._fast = self._compiled.ProducerPath(
            control=self._control,
            fd=self._segment.fd,  # type: ignore[union-attr]
            slot_count=layout.slot_count,
            meta_offset=layout.meta_offset,
            map_offset=layout.map_offset,
            map_size=layout.map_size,
            changes_offset=GROW_REQUEST_OFFSET,
            changes_size=self._changes_end - GROW_REQUEST_OFFSET,
            recency=self._recency,
            slot_seq=self._slot_seq,
        )
        # It locks the next slot ahead as _lock_a_slot does; a subclass that picks slots its own
        # way (a results ring) does that itself.
        self._locks_ahead_compiled = type(self)._lock_a_slot is Publisher._lock_a_slot

    def _stop_fast(self) -> None:
        """Let the compiled path go of a segment about to be left or closed."""
        fast, self._fast = self._fast, None
        if fast is not None:
            fast.close()

    def close(self) -> None:
        """Remove the segment and its semaphores. Safe to call twice."""
        if self._state is Lifecycle.OPEN:
            self._state = Lifecycle.CLOSED
            self._stop_fast()
            # A forked child must not remove its parent's stream.
            self._close_segment(self._segment, self._semaphores, unlink=os.getpid() == self._pid)
        self._segment = None
        self._semaphores = ()
        self._views = []

    def _close_segment(self, segment: Optional[Segment], semaphores: Sequence[posix_ipc.Semaphore], unlink: bool) -> None:
        discard_semaphores(semaphores, unlink)
        if segment is not None:
            if unlink and segment.control is not None:
                remove_listener_queues(segment.control, segment.layout, self._stream, segment.header.epoch)
            if unlink and segment.still_named():
                try:
                    os.unlink(segment.path)
                except FileNotFoundError:
                    pass
            segment.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        if self._state is Lifecycle.OPEN:
            try:
                self.close()
            except Exception:
                pass

    def _check_open(self) -> None:
        if self._state is not Lifecycle.OPEN:
            raise ClosedError(f"Publisher for stream {self._stream!r} is closed")

    # --- public properties -------------------------------------------------------------------

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def format(self) -> str:
        return PixelFormat.NAMES[self._format]

    @property
    def seq(self) -> int:
        """Sequence number of the last published frame (0 before the first)."""
        return self._seq

    @property
    def slots(self) -> int:
        return self._layout.slot_count

    @property
    def dropped(self) -> int:
        """Frames not published because every slot was leased (never expected within the slot budget)."""
        return self._publisher_drops

    # --- publishing ----------------------------------------------------------------------------

    def publish(
        self,
        array: np.ndarray,
        timestamp_ns: Optional[int] = None,
        *,
        seq: Optional[int] = None,
        wall_time: Optional[float] = None,
    ) -> Optional[int]:
        """Copy ``array`` into the ring as the newest frame; return its seq.

        ``timestamp_ns`` is the capture time on CLOCK_MONOTONIC (``time.monotonic_ns()``);
        it defaults to the moment of this call. A frame of another shape changes the stream's
        geometry (readers see the new shape). Returns None if the frame had to be dropped
        because every slot was leased, which the slot budget rules out.

        A replay of a recording gives each frame its original ``seq`` (increasing; a gap is a
        frame the recording does not have) and ``wall_time`` (epoch seconds of the original
        capture); by default frames are numbered one after another and stamped now.
        """
        timestamp = time.monotonic_ns() if timestamp_ns is None else int(timestamp_ns)
        self._check_open()
        replayed = 0
        if seq is not None or wall_time is not None:
            replayed = self._check_replayed(seq, wall_time)
        if not isinstance(array, np.ndarray):
            raise TypeError(f"publish() takes a numpy array, not {type(array).__name__}")
        if array.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got {array.dtype}")
        if array.shape != self._shape:
            if array.ndim == 3 and array.shape[2] == 1:
                array = array[:, :, 0]  # gray as (h, w, 1): the same pixels, stored as (h, w)
            if array.shape != self._shape:
                self.set_geometry(array.shape)
        slot = self._claim_slot()
        if slot < 0:
            self._publisher_drops += 1
            return None
        try:
            # The compiled path copies large frames around the caches (_fastpath.c says why).
            if self._compiled is None or not self._compiled.copy_frame(self._views[slot], array):
                np.copyto(self._views[slot], array, casting="no")
        except BaseException:
            self._abandon(slot)
            raise
        return self._commit(slot, timestamp, replayed, wall_time)

    def _check_replayed(self, seq: Optional[int], wall_time: Optional[float]) -> int:
        """The seq a replayed frame is published under (0: the next one); ValueError if it
        does not come after the newest."""
        if seq is None:
            return 0
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
            raise TypeError(f"seq must be an int, not {type(seq).__name__}")
        if seq <= self._seq:
            raise ValueError(f"seq must increase: {seq} after {self._seq} (frames are published in order)")
        if wall_time is not None and (isinstance(wall_time, bool) or not isinstance(wall_time, (int, float)) or not math.isfinite(wall_time)):
            raise TypeError(f"wall_time must be a finite number of epoch seconds, not {wall_time!r}")
        return int(seq)

    def slot(self, timestamp_ns: Optional[int] = None) -> SlotWriter:
        """Write a frame in place: ``with pub.slot() as buf: cap.read(buf)``; see ``SlotWriter``."""
        return SlotWriter(self, timestamp_ns)

    def set_geometry(self, shape: Sequence[int], format: Optional[str] = None) -> None:
        """Change the frame shape (a camera came back at another resolution).

        A frame that fits the slots keeps the segment; a larger one makes a new, larger segment
        under the same name, which readers re-attach to by themselves. If that fails (``/dev/shm``
        is full: ``ShmSpaceError``), nothing changed: the stream keeps its old geometry.
        """
        self._check_open()
        if format is None and len(tuple(shape)) == 3 and PixelFormat.CHANNELS[self._format] == 3:
            format = PixelFormat.NAMES[self._format]  # keep rgb/bgr when only the size changes
        dims, code = check_shape(shape, format)
        if dims == self._shape and code == self._format:
            return
        needed = int(np.prod(dims))
        if needed <= self._capacity:
            self._shape, self._format = dims, code
            self._rebuild_views()
            self._write_geometry()
            return
        self._replace_segment(needed, dims, code)

    def _replace_segment(self, capacity: int, shape: Tuple[int, ...], code: int) -> None:
        """Move to a new segment under the same name (larger frames, or a results ring that
        follows a new daemon); readers of the old one move by themselves (state ``replaced``)."""
        old_segment, old_semaphores = self._segment, self._semaphores
        assert old_segment is not None
        self._create(capacity, old_segment, shape, code)
        self._let_go(old_segment, old_semaphores)

    def _let_go(self, old_segment: Segment, old_semaphores: Sequence[posix_ipc.Semaphore]) -> None:
        """Tell the readers of a segment this Publisher moved away from to follow (its frames stay
        as they are: nothing writes them any more), wake them, then close it."""
        STATE.pack_into(old_segment.control, STATE_OFFSET, StreamState.REPLACED)  # type: ignore[arg-type]
        for sem in old_semaphores:
            sem.release()
        broadcast(old_segment.control, self._compiled)
        # The old name now points at the new segment, so only the old semaphores are removed.
        self._close_segment(old_segment, old_semaphores, unlink=True)

    # --- a ring that grows when readers need it (slots="auto") --------------------------------
    #
    # A reader that finds no free token in a growable ring writes a growth request in the header
    # instead of giving up. The producer sees it with the change bytes, works out a larger size
    # (half as large again, at least what was asked), and has a thread make that segment: a
    # large ring takes a while to reserve, and the frame path must not wait for it. Between two
    # frames it then moves to the new segment exactly as for a geometry change: readers follow by
    # themselves, frames they hold stay valid, ordered readers finish the old segment first. Past
    # ``max_shm`` (or MAX_SLOTS) it refuses the request in the header, and the reader gets a
    # CapacityError that names the figure. Some time after readers leave (``shrink_after``) it
    # moves back to its starting size the same way.

    def _consider_growth(self, hold: int, request: int) -> None:
        if self._growing is not None or self._prepared is not None:
            return  # one move at a time: a reader still short after it asks again
        layout = self._layout
        free = sum(1 for token in range(layout.slot_count - 2) if not self._locks.held_by_other(LOCK_TOKEN_BASE + token))
        needed = max(1, hold - free)
        least = layout.slot_count + needed
        if least > MAX_SLOTS:
            self._refuse_growth(request, RingLayout.compute(MAX_SLOTS, self._capacity).total_size)
            return
        slots = min(MAX_SLOTS, max(least, -(-layout.slot_count * 3 // 2)))
        if RingLayout.compute(slots, self._capacity).total_size > self._max_shm:
            slots = least
        size = RingLayout.compute(slots, self._capacity).total_size
        if size > self._max_shm:
            self._refuse_growth(request, size)
            return
        self._start_move(slots, f"a reader needed {needed} more slot(s)", request)

    def _refuse_growth(self, request: int, needed_bytes: int) -> None:
        GROWTH.pack_into(self._control, GROWTH_OFFSET, 1, request, needed_bytes, self._max_shm)

    def _start_move(self, slots: int, why: str, request: int) -> None:
        capacity, describe = self._capacity, _describe(self._shape, self._format)

        def make() -> None:
            try:
                draft = DraftSegment(self._stream, slots, capacity, gid=self._gid, describe_frame=describe, probe=False)
            except Exception as exc:  # noqa: BLE001 - /dev/shm full, and the like: refuse, keep going
                self._grow_failure = (request, RingLayout.compute(slots, capacity).total_size, str(exc))
            else:
                self._prepared = (draft, why)

        self._growing = threading.Thread(target=make, name=f"framebroker-move-{self._stream}", daemon=True)
        self._growing.start()

    def _finish_move(self) -> None:
        """Between two frames: move to the segment made in the background (or say it failed)."""
        failure, self._grow_failure = self._grow_failure, None
        prepared, self._prepared = self._prepared, None
        self._growing = None
        if failure:
            request, needed_bytes, reason = failure
            log.warning("could not grow the ring of stream %r: %s", self._stream, reason)
            self._refuse_growth(request, needed_bytes)
            return
        assert prepared is not None
        draft, why = prepared
        if draft.segment is None or draft.segment.layout.slot_capacity < self._frame_bytes:
            draft.discard()  # the frames grew meanwhile (that move made its own segment)
            return
        old_segment, old_semaphores = self._segment, self._semaphores
        before = self._layout.slot_count
        segment, semaphores = draft.publish(replace=old_segment)
        self._take(segment, semaphores, self._shape, self._format)
        self._history.append({"at": round(time.time(), 3), "from": before, "to": segment.layout.slot_count, "why": why})
        del self._history[:-HISTORY_KEPT]
        self._write_growth()
        assert old_segment is not None
        self._let_go(old_segment, old_semaphores)
        log.info("stream %r: ring %s from %d to %d slots (%s)", self._stream, "grew" if segment.layout.slot_count > before else "shrank", before, segment.layout.slot_count, why)

    def _consider_shrinking(self) -> None:
        """Housekeeping of a grown ring: back to the starting size once readers have needed no
        more than it for ``shrink_after`` seconds."""
        if self._slots <= self._initial_slots or self._growing is not None or self._prepared is not None:
            self._quiet_since = 0.0
            return
        held = sum(1 for token in range(self._slots - 2) if self._locks.held_by_other(LOCK_TOKEN_BASE + token))
        now = time.monotonic()
        if held > self._initial_slots - 2:
            self._quiet_since = 0.0
        elif not self._quiet_since:
            self._quiet_since = now
        elif now - self._quiet_since >= self._shrink_after:
            self._quiet_since = 0.0
            self._start_move(self._initial_slots, "readers left: back to the starting size", 0)

    def _write_growth(self) -> None:
        _, refused, needed, _ = GROWTH.unpack_from(self._control, GROWTH_OFFSET)
        GROWTH.pack_into(self._control, GROWTH_OFFSET, int(self._growable), refused, needed, self._max_shm)
        if self._growable:
            self._extra["ring"] = {"starting_slots": self._initial_slots, "max_shm_bytes": self._max_shm, "history": self._history}
            self._write_extra()

    def _claim_slot(self) -> int:
        """The slot to write the next frame into, locked exclusively; -1 if every candidate is
        leased (see _ring.py). Usually locked already, right after the previous frame."""
        slot = self._next_slot
        if slot >= 0:
            self._next_slot = -1
            return slot
        return self._lock_a_slot()

    def _lock_a_slot(self) -> int:
        newest = self._newest_slot
        try_exclusive = self._locks.try_exclusive
        if not self._ordered_entries:
            for slot in self._recency:
                if slot != newest and try_exclusive(LOCK_SLOT_BASE + slot):
                    return slot
            return -1
        protect_after = self._protect_after()
        slot_seq = self._slot_seq
        recency = self._recency
        # Slots whose frames every ordered reader has consumed, warmest first ...
        for slot in recency:
            if slot != newest and slot_seq[slot] <= protect_after and try_exclusive(LOCK_SLOT_BASE + slot):
                return slot
        # ... then, when a reader lags that far, the oldest frame it still wanted.
        for slot in reversed(recency):
            if slot != newest and slot_seq[slot] > protect_after and try_exclusive(LOCK_SLOT_BASE + slot):
                return slot
        return -1

    def _protect_after(self) -> int:
        """Lowest cursor of the ordered readers: frames after it are kept as long as possible."""
        control = self._control
        lowest = self._seq
        for offset in self._ordered_entries:
            cursor = ENTRY_PROGRESS.unpack_from(control, offset + ENTRY_PROGRESS_OFFSET)[1]
            if cursor and cursor < lowest:
                lowest = cursor
        return lowest

    def _abandon(self, slot: int) -> None:
        """Give a claimed slot back unwritten (the write failed): keep it for the next frame."""
        self._next_slot = slot

    def _commit(self, slot: int, timestamp_ns: int, seq: int = 0, wall: Optional[float] = None, geometry: Optional[tuple] = None) -> int:
        """Publish the slot written: frame ``self.seq + 1`` by default; a replay or a results
        ring gives the frame's own ``seq`` and ``wall`` time, a results ring also the record's
        ``geometry`` (see _results.py)."""
        # The frame path: few calls on purpose (after a frame period of idling each one runs cold).
        if not seq:
            seq = self._seq + 1
        if wall is None:
            # The capture instant on the wall clock (offset refreshed by _housekeeping), so
            # wall_time and timestamp_ns name the same moment.
            wall = timestamp_ns / 1e9 + self._wall_offset
        fast = self._fast
        if fast is not None:
            if self._stream_state != StreamState.STREAMING:
                self.set_state("streaming")
            # Steps 2-6, the slot's recency and the lock-ahead below, in one compiled call that
            # runs the steps of the pure-Python path that follows (_fastpath.c).
            self._next_slot = fast.commit(self, slot, seq, timestamp_ns, wall, geometry or self._meta_geometry, self._locks_ahead_compiled)
        else:
            control = self._control
            _pack_meta(control, self._meta_offsets[slot], seq, timestamp_ns, wall, *(geometry or self._meta_geometry))
            # The unlock is the publishing barrier (see "What orders the frame bytes" in _ring.py).
            self._locks.unlock(LOCK_SLOT_BASE + slot)
            _pack_map(control, self._map_offset + (seq & self._map_mask) * 4, slot)
            if self._stream_state != StreamState.STREAMING:
                self.set_state("streaming")
            _pack_frame_counters(control, FRAME_COUNTERS_OFFSET, seq, slot, StreamState.STREAMING, timestamp_ns, wall)
            # A reader that attached or changed mode since the last rescan is found now, after the
            # HEAD store and before the wake-ups: one that read HEAD before this frame is woken for it.
            if control[GROW_REQUEST_OFFSET : self._changes_end] != self._changes_seen:
                self._refresh_readers()
            # Wake the readers first: what follows is bookkeeping that nobody waits for.
            if self._futex_readers:
                broadcast(control, None)
            for sem in self._wake_list:
                if sem.value < MAX_PENDING_WAKES:
                    sem.release()
            self._slot_seq[slot] = seq
            recency = self._recency
            if recency[0] != slot:
                recency.remove(slot)
                recency.insert(0, slot)
        self._seq = seq
        self._published += 1
        self._newest_slot = slot
        if timestamp_ns >= self._housekeeping_due_ns or self._published >= self._housekeeping_due_count:
            self._housekeeping(timestamp_ns)
        if self._prepared is not None or self._grow_failure:
            self._finish_move()  # a larger (or smaller) ring made in the background: move now
        if self._next_slot < 0:
            # Lock the slot for the next frame now, while everything is in cache: after a frame
            # period of idling the same system call costs ten times as much. Readers that wait for
            # the next frame have given their slots back already, so this is the slot of the frame
            # before. (The compiled path has done it, unless the ring just moved.)
            self._next_slot = self._lock_a_slot()
        return seq

    def _housekeeping(self, timestamp_ns: int = 0) -> None:
        """What does not need doing every frame: about twice a second (by the frames' own capture
        times, or every HOUSEKEEPING_FRAMES frames), recheck who is attached, measure the rate,
        publish the slow counters and re-read the wall clock's offset."""
        self._housekeeping_due_ns = timestamp_ns + HOUSEKEEPING_NS
        self._housekeeping_due_count = self._published + HOUSEKEEPING_FRAMES
        self._refresh_readers()
        now = time.monotonic()
        mark_time, mark_count = self._rate_mark
        if now - mark_time >= 1.0:
            self._measured_fps = (self._published - mark_count) / (now - mark_time)
            self._rate_mark = (now, self._published)
        self._wall_offset = time.time() - time.monotonic_ns() / 1e9
        self._write_counters()
        if self._growable and hasattr(self, "_max_shm"):
            self._consider_shrinking()

    # --- readers ---------------------------------------------------------------------------

    def _refresh_readers(self) -> None:
        """Rescan the reader table: whom to wake, whose frames to keep (ordered readers), whom
        a lockstep producer waits for (ordered readers, and those that have not asked yet)."""
        control = self._control
        self._changes_seen = changes(control, self._layout)
        wake: List[posix_ipc.Semaphore] = []
        futex_readers = 0
        ordered: List[int] = []
        undecided: List[int] = []
        for index, offset in live_entries(self._locks, self._layout, control):
            if ENTRY_FLAGS.unpack_from(control, offset + ENTRY_FLAGS_OFFSET)[0] & FLAG_FUTEX:
                futex_readers += 1  # waits on the wake word: one broadcast wakes them all
            else:
                wake.append(self._semaphores[index])
            mode = ENTRY_IDENTITY.unpack_from(control, offset)[3]
            if mode == ReaderMode.ORDERED:
                ordered.append(offset)
            elif mode == ReaderMode.IDLE:
                undecided.append(offset)
        self._wake_list = wake
        self._futex_readers = futex_readers
        self._reader_count = len(wake) + futex_readers
        self._ordered_entries = ordered
        if self._fast is not None:
            self._fast.set_readers(self._changes_seen, wake, futex_readers, ordered)
        if self._growable:
            request, hold = GROW_REQUEST.unpack_from(control, GROW_REQUEST_OFFSET)
            if request != self._grow_seen:
                self._grow_seen = request
                self._consider_growth(hold, request)
        # A reader that attached but has not asked for a frame yet (a recorder still choosing
        # its encoder) may be about to read in order: lockstep waits for it to say.
        self._holding_entries = ordered + undecided

    def _wake_readers(self) -> None:
        """Post every attached reader (as a publish does) without publishing a frame: a results
        ring's writer saying it skips frames (``_results.py``)."""
        if self._control[GROW_REQUEST_OFFSET : self._changes_end] != self._changes_seen:  # type: ignore[index]
            self._refresh_readers()
        for sem in self._wake_list:
            if sem.value < MAX_PENDING_WAKES:
                sem.release()

    def reader_count(self) -> int:
        """Readers attached right now."""
        self._check_open()
        self._refresh_readers()
        return self._reader_count

    # --- waiting for readers: lockstep -------------------------------------------------------
    #
    # The one place where a producer waits on its readers, and only when it asks to: a replay
    # in lockstep (``framebroker serve FILE --pace lockstep``) publishes frame N+1 only once every
    # ordered reader has taken frame N and asked for the next. The waits sleep on the producer's
    # semaphore, which readers post (while ``PRODUCER_WAITS`` is set) when they attach, detach,
    # change mode or move their cursor; a reader killed with kill -9 posts nothing, so the
    # producer also rescans the table every ``RESCAN_STEP`` while it waits.

    def wait_until_consumed(self, timeout: Optional[float] = None) -> bool:
        """Wait until every ordered reader has taken the newest frame and asked for the next one
        (readers in ``latest()`` or ``next()`` mode never hold the producer back; one that has
        not asked for any frame yet does, until it says how it reads); True then, False if
        ``timeout`` seconds passed first (None: no limit). Readers that die or detach stop
        counting at once (within ``RESCAN_STEP``)."""
        return self._wait_for_readers(lambda: not self._lagging(), timeout)

    def wait_for_readers(self, count: int, timeout: Optional[float] = None) -> bool:
        """Wait until at least ``count`` readers are attached; True then, False on timeout."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a whole number of readers >= 0, got {count!r}")
        return self._wait_for_readers(lambda: self._reader_count >= count, timeout)

    def lagging_readers(self) -> List[Dict[str, Any]]:
        """The ordered readers that have not yet moved past the newest frame: pid, name, and the
        seq of the last frame each took (what ``wait_until_consumed`` waits for)."""
        self._check_open()
        self._refresh_readers()
        return [
            {"pid": entry["pid"], "name": entry["name"], "last_seq": entry["cursor"]}
            for entry in (read_entry(self._control, offset) for offset in self._lagging())
        ]

    def _lagging(self) -> List[int]:
        control, newest = self._control, self._seq
        return [offset for offset in self._holding_entries if ENTRY_PROGRESS.unpack_from(control, offset + ENTRY_PROGRESS_OFFSET)[1] < newest]

    def _wait_for_readers(self, done: Callable[[], bool], timeout: Optional[float]) -> bool:
        self._check_open()
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0):
            raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        # Set before the first look, and left set: a reader that moves on after this store posts.
        PRODUCER_WAITS.pack_into(self._control, PRODUCER_WAITS_OFFSET, 1)
        wake = self._semaphores[-1]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._refresh_readers()
            if done():
                return True
            step = RESCAN_STEP
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                step = min(step, remaining)
            try:
                wake.acquire(step)
                while True:  # posts pile up while the producer works: one look serves them all
                    wake.acquire(0)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass

    # --- what status shows -------------------------------------------------------------------

    def set_state(self, state: str, reason: str = "") -> None:
        """Report the source's state (``starting``, ``streaming``, ``reconnecting``, ``stopped``,
        ``ended``) and why; shown by ``framebroker status``. Readers are woken so that those
        waiting on an ``ended`` stream learn about it at once."""
        self._check_open()
        code = StreamState.parse(state)
        changed = code != self._stream_state
        self._stream_state = code
        self._reason = reason
        self._write_text(REASON_OFFSET, REASON_SIZE, reason)
        self._write_geometry()
        if changed:
            STATE_SINCE.pack_into(self._control, STATE_SINCE_OFFSET, time.time())
            if code == StreamState.RECONNECTING:
                self._reconnects += 1
            if code == StreamState.ENDED:
                self._refresh_readers()
                for sem in self._wake_list:
                    sem.release()
                if self._futex_readers:
                    broadcast(self._control, self._compiled)

    def set_fps(self, fps: float) -> None:
        """The rate the source is configured for (0: unknown), shown by status as configured fps.

        The daemon learns it only when the source opens (a file's own rate, what a camera
        negotiated), after the Publisher was created with the rate the user asked for."""
        self._check_open()
        self._fps = check_fps(fps)

    def add_source_drops(self, count: int) -> None:
        """Count frames the source lost before they reached the ring (shown by status)."""
        self._source_drops += int(count)

    def add_source_error(self) -> None:
        """Count an unexpected error the source raised (a driver fault, a bug; shown by status)."""
        self._source_errors += 1
        self._write_counters()

    def set_info(self, **info: Any) -> None:
        """Extra key/values shown by ``framebroker status`` for this stream (JSON, about 2 KiB in
        all); ValueError, and nothing changed, if they do not fit."""
        extra = {**self._extra, **info}
        self._write_extra(extra)
        self._extra = extra

    def _write_geometry(self) -> None:
        shape = self._shape
        GEOMETRY.pack_into(self._control, GEOMETRY_OFFSET, self._format, shape[0], shape[1], shape[2] if len(shape) == 3 else 1)
        STATE.pack_into(self._control, STATE_OFFSET, self._stream_state)

    def _write_counters(self) -> None:
        COUNTERS.pack_into(
            self._control,
            COUNTERS_OFFSET,
            self._fps,
            self._measured_fps,
            self._source_drops,
            self._publisher_drops,
            self._reconnects,
            self._source_errors,
        )

    def _write_text(self, offset: int, size: int, text: str) -> None:
        self._control[offset : offset + size] = encode_text(text, size)  # type: ignore[index]

    def _write_extra(self, extra: Optional[Dict[str, Any]] = None) -> None:
        text = json.dumps(self._extra if extra is None else extra, separators=(",", ":"))
        if len(text.encode()) >= EXTRA_SIZE:
            raise ValueError(f"stream info too large for the header ({len(text)} bytes, max {EXTRA_SIZE - 1})")
        self._write_text(EXTRA_OFFSET, EXTRA_SIZE, text)
