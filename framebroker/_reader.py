"""The reader side of the ring: ``Reader`` and the ``Frame`` leases it hands out (protocol in ``_ring.py``)."""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
import time
import weakref
from collections import OrderedDict
from types import TracebackType
from typing import Any, Iterator, Optional

import numpy as np
import posix_ipc

from ._errors import CapacityError, ClosedError, FrameBrokerError, FrameReleased, FrameTimeout, SourceEnded, StreamNotFound
from ._layout import (
    ENTRY_FLAGS,
    ENTRY_FLAGS_OFFSET,
    ENTRY_GENERATION,
    ENTRY_GENERATION_OFFSET,
    ENTRY_HELD,
    ENTRY_HELD_OFFSET,
    ENTRY_IDENTITY,
    ENTRY_INFO_OFFSET,
    ENTRY_INFO_SIZE,
    ENTRY_NAME_OFFSET,
    ENTRY_NAME_SIZE,
    ENTRY_PROGRESS,
    ENTRY_PROGRESS_HELD,
    ENTRY_PROGRESS_OFFSET,
    ENTRY_RATE,
    ENTRY_RATE_OFFSET,
    COUNTERS,
    COUNTERS_OFFSET,
    GEOMETRY,
    GEOMETRY_OFFSET,
    HEAD,
    LIVE_OFFSET,
    STATE,
    STATE_OFFSET,
    LOCK_ATTACH,
    LOCK_ENTRY_BASE,
    FLAG_TRIGGERS,
    LOCK_SLOT_BASE,
    MAP_ENTRY,
    META,
    NEWEST_SEQ,
    NEWEST_SEQ_OFFSET,
    REASON_OFFSET,
    REASON_SIZE,
    TABLE_CHANGED,
    TABLE_CHANGED_OFFSET,
    PixelFormat,
    ReaderMode,
    StreamState,
    decode_text,
    encode_text,
    semaphore_name,
    validate_stream_name,
)
from ._ring import LIVENESS_STEP, ORPHAN_STEP
from ._images import save_image
from ._segment import Segment, open_segment
from ._trigger import TriggerInbox

log = logging.getLogger("framebroker.reader")

# How long attaching waits for another attaching process to finish its bookkeeping (seconds).
ATTACH_LOCK_TIMEOUT = 2.0
# How often a reader recomputes the fps it shows in status (nanoseconds).
RATE_WINDOW_NS = 500_000_000

# Bound methods of the structs used on every frame (saves two lookups per use).
_unpack_head = HEAD.unpack_from
_unpack_map = MAP_ENTRY.unpack_from
_unpack_meta = META.unpack_from
_pack_progress = ENTRY_PROGRESS_HELD.pack_into
_FORMAT_NAMES = PixelFormat.NAMES


class Lifecycle(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


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
        attachment: "_Attachment",
        slot: int,
        seq: int,
        timestamp_ns: int,
        wall_time: float,
        shape: tuple[int, ...],
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


class FrameIterator:
    """Iterator over a Reader's frames (``for frame in reader``, ``reader.ordered()``).

    Unlike a generator it survives exceptions: after ``FrameTimeout`` the next ``next()`` waits
    again. It stops when the stream ends (``SourceEnded``).
    """

    __slots__ = ("_reader", "_mode", "_timeout")

    def __init__(self, reader: "Reader", mode: int, timeout: Optional[float]) -> None:
        if timeout is not None:
            _check_timeout(timeout)
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


class _Attachment:
    """A reader's attachment to one segment instance: its entry, semaphore, leases and views."""

    def __init__(self, stream: str, segment: Segment, entry: int, semaphore: posix_ipc.Semaphore) -> None:
        self.stream = stream
        self.segment = segment
        self.layout = segment.layout
        self.slot_count = segment.layout.slot_count
        self.control = segment.control
        self.data = segment.data
        self.locks = segment.locks
        self.entry = entry
        self.entry_offset = segment.layout.entry(entry)
        self.progress_offset = self.entry_offset + ENTRY_PROGRESS_OFFSET
        self.semaphore = semaphore
        self.held: "OrderedDict[int, Frame]" = OrderedDict()  # slot -> frame, oldest first
        # (slot, shape) -> read-only ndarray over that slot: built once, handed out with every
        # frame leased from the slot (building an ndarray costs more than the rest of a lease).
        self.views: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
        self.open = True

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        key = (slot, shape)
        array = self.views.get(key)
        if array is None:
            array = self.views[key] = np.ndarray(shape, np.uint8, buffer=self.data, offset=self.layout.slot_data(slot))
        return array

    def release(self, frame: Frame, publish: bool = True) -> None:
        """Give the frame's slot back; ``publish``: update the held count status shows now
        (the reader's own path writes it with its other figures instead)."""
        frame._released = True
        held = self.held
        if held.get(frame._slot) is frame:
            del held[frame._slot]
            if self.open:
                self.locks.unlock(LOCK_SLOT_BASE + frame._slot)
                if publish:
                    ENTRY_HELD.pack_into(self.control, self.entry_offset + ENTRY_HELD_OFFSET, len(held))

    def detach(self, clear_entry: bool) -> None:
        """Let go of the segment. Frames still held stay readable (their mapping lives on) but no
        longer pin anything: either the segment is gone (daemon restart) or the reader is closing."""
        if not self.open:
            return
        self.open = False
        if clear_entry and self.control is not None:
            try:
                ENTRY_IDENTITY.pack_into(self.control, self.entry_offset, 0, 0, 0, ReaderMode.IDLE, 0.0)
                _bump_table(self.control)
            except (ValueError, TypeError):
                pass
        try:
            self.semaphore.close()
        except posix_ipc.Error:
            pass
        self.control = None
        # Keep self.data: frames held from this segment still view it. The descriptor goes, and
        # with it every lock this attachment held (entry, leases).
        self.segment.data = None
        self.segment.close()


def _bump_table(control: Any) -> None:
    # A hint for the producer to rescan the reader table; a lost concurrent update only delays
    # the rescan until its periodic refresh.
    (value,) = TABLE_CHANGED.unpack_from(control, TABLE_CHANGED_OFFSET)
    TABLE_CHANGED.pack_into(control, TABLE_CHANGED_OFFSET, (value + 1) & 0xFFFFFFFFFFFFFFFF)


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not timeout >= 0:  # also rejects NaN
        raise ValueError(f"timeout must be >= 0 seconds (or None to wait forever), got {timeout}")
    return float(timeout)


_live_readers: "weakref.WeakSet[Reader]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Locks belong to the open file description, which a forked child shares with its parent:
    # if the child used or released them it would drop the parent's leases. Disarm the copies.
    for reader in list(_live_readers):
        reader._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Reader:
    """Attach to a stream and read its frames zero-copy.

    ``Reader("cam0", name="detector")`` attaches (``StreamNotFound`` if nothing serves "cam0";
    with ``wait=S`` it waits up to S seconds for the stream to appear). ``hold`` is how many
    frames this reader may hold at once (default 1); each reader reserves that many slots, and
    attaching fails with ``CapacityError`` if the ring has no room left.

    * ``latest(timeout)``: the newest frame (the same one again if nothing newer arrived).
    * ``next(timeout)``: the first frame newer than the last one returned; waits for it.
    * ``for frame in reader``: repeated ``next()``: always fresh, may skip frames.
    * ``ordered()``: every frame in order; ``frame.dropped`` counts those that were overwritten
      before this reader got to them.

    Asking for a frame beyond the hold budget releases the oldest held frame first. Waiting
    sleeps in the kernel (no polling). If the daemon dies or restarts, the reader attaches to the
    new one by itself; sequence numbers then start again from 1. A Reader is for one thread;
    give each thread (and each forked process) its own.

    Signals: Ctrl-C (KeyboardInterrupt) interrupts a wait as usual. An exception raised by any
    other signal handler during a wait is swallowed by posix_ipc (it reports the interruption
    instead, which the reader treats as a wake-up): have such handlers raise KeyboardInterrupt
    or set a flag your loop checks.
    """

    _attachment: Optional[_Attachment] = None
    _state = Lifecycle.CLOSED

    def __init__(self, stream: str, name: Optional[str] = None, *, hold: int = 1, wait: float = 0.0) -> None:
        self._stream = validate_stream_name(stream)
        if name is None:
            name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        if not isinstance(name, str):
            raise TypeError(f"reader name must be a str, not {type(name).__name__}")
        if len(name.encode("utf-8")) >= ENTRY_NAME_SIZE:
            raise ValueError(f"reader name must be at most {ENTRY_NAME_SIZE - 1} bytes, got {name!r}")
        if isinstance(hold, bool) or not isinstance(hold, int):
            raise TypeError(f"hold must be an int, not {type(hold).__name__}")
        if hold < 1:
            raise ValueError(f"hold must be at least 1 frame, got {hold}")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
        self._name = name
        self._hold = hold
        self._flags = 0
        self._mode = ReaderMode.IDLE
        self._last_seq = 0  # seq of the last frame returned (0: none yet from this segment)
        self._frames = 0
        self._dropped = 0
        self._info = ""
        self._rate_mark = (0, 0)  # (monotonic ns, frames) at the start of the rate window
        self._progress_due = False
        self._fps = 0.0
        self._orphaned = False
        self._reattach_error = ""
        self._seen_newest = -1  # newest_seq at the last call, and since when (see _stale)
        self._seen_at = 0.0
        self._next_check = 0.0
        deadline = time.monotonic() + float(wait)
        while True:
            try:
                self._attachment = self._attach()
                break
            except StreamNotFound:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(ORPHAN_STEP)
        self._state = Lifecycle.OPEN
        _live_readers.add(self)

    # --- attaching ------------------------------------------------------------------------------

    def _attach(self) -> _Attachment:
        segment = open_segment(self._stream)
        try:
            if not segment.owner_alive():
                raise StreamNotFound(
                    f"stream {self._stream!r} is not being served: its daemon (pid {segment.header.owner_pid}) "
                    f"is no longer running. Start it again with framebroker serve ... --name {self._stream}"
                )
            segment.map(control_writable=True, data_access="r")
            entry = self._claim_entry(segment)
            try:
                name = semaphore_name(self._stream, segment.header.epoch, entry)
                semaphore = posix_ipc.Semaphore(name)
            except posix_ipc.ExistentialError:
                raise StreamNotFound(f"stream {self._stream!r} is shutting down") from None
            return _Attachment(self._stream, segment, entry, semaphore)
        except BaseException:
            segment.close()
            raise

    def _claim_entry(self, segment: Segment) -> int:
        locks = segment.locks
        control = segment.control
        layout = segment.layout
        deadline = time.monotonic() + ATTACH_LOCK_TIMEOUT
        while not locks.try_exclusive(LOCK_ATTACH):
            if time.monotonic() >= deadline:
                raise FrameBrokerError(
                    f"could not attach to stream {self._stream!r}: another process has been attaching for "
                    f"{ATTACH_LOCK_TIMEOUT:g} s and seems stuck (stopped?). Resume or kill it, then retry."
                )
            time.sleep(0.002)
        try:
            reserved = 0
            free: list[int] = []
            for index in range(layout.table_size):
                if locks.held_by_other(LOCK_ENTRY_BASE + index):
                    reserved += ENTRY_IDENTITY.unpack_from(control, layout.entry(index))[2]  # type: ignore[arg-type]
                else:
                    free.append(index)
            budget = layout.slot_count - 2
            if reserved + self._hold > budget or not free:
                raise CapacityError(
                    f"stream {self._stream!r} cannot guarantee {self._hold} more held frame(s): its ring has "
                    f"{layout.slot_count} slots, {reserved} of the {budget} that readers may hold are reserved "
                    f"by attached readers. Restart the daemon with --slots {reserved + self._hold + 2} "
                    f"or more, or ask for fewer held frames."
                )
            for index in free:
                if locks.try_exclusive(LOCK_ENTRY_BASE + index):
                    self._write_identity(control, layout.entry(index), index)
                    _bump_table(control)
                    return index
            raise CapacityError(f"stream {self._stream!r}: every reader-table entry is in use; restart the daemon with more --slots")
        finally:
            locks.unlock(LOCK_ATTACH)

    def _write_identity(self, control: Any, offset: int, index: int) -> None:
        # Field by field, identity (with the pid) last: status may read the entry meanwhile,
        # and must not see this reader's pid next to its predecessor's generation.
        (generation,) = ENTRY_GENERATION.unpack_from(control, offset + ENTRY_GENERATION_OFFSET)
        ENTRY_GENERATION.pack_into(control, offset + ENTRY_GENERATION_OFFSET, generation + 1)
        ENTRY_PROGRESS.pack_into(control, offset + ENTRY_PROGRESS_OFFSET, 0, 0, 0, 0)
        ENTRY_HELD.pack_into(control, offset + ENTRY_HELD_OFFSET, 0)
        ENTRY_FLAGS.pack_into(control, offset + ENTRY_FLAGS_OFFSET, self._flags)
        ENTRY_RATE.pack_into(control, offset + ENTRY_RATE_OFFSET, 0.0, 0.0)
        control[offset + ENTRY_NAME_OFFSET : offset + ENTRY_NAME_OFFSET + ENTRY_NAME_SIZE] = encode_text(self._name, ENTRY_NAME_SIZE)
        control[offset + ENTRY_INFO_OFFSET : offset + ENTRY_INFO_OFFSET + ENTRY_INFO_SIZE] = encode_text(self._info, ENTRY_INFO_SIZE)
        ENTRY_IDENTITY.pack_into(control, offset, os.getpid(), os.geteuid(), self._hold, self._mode, time.time())

    def _reattach(self) -> bool:
        """Move to a new segment under the stream's name if a live daemon serves one."""
        old = self._attachment
        try:
            new = self._attach()
        except (FrameBrokerError, OSError) as exc:
            # Kept for the timeout message: "no daemon yet" and "new daemon refuses us" differ.
            self._reattach_error = "" if isinstance(exc, StreamNotFound) else str(exc)
            return False
        if old is not None:
            old.detach(clear_entry=False)
        log.info("reader %r: stream %r has a new daemon (pid %d); re-attached", self._name, self._stream, new.segment.header.owner_pid)
        self._attachment = new
        self._last_seq = 0
        self._orphaned = False
        self._write_progress(new)
        return True

    # --- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Release every held frame and detach. Safe to call twice."""
        if self._state is Lifecycle.CLOSED:
            return
        self._state = Lifecycle.CLOSED
        attachment, self._attachment = self._attachment, None
        if attachment is not None:
            for frame in list(attachment.held.values()):
                attachment.release(frame)
            attachment.detach(clear_entry=True)
        _live_readers.discard(self)

    def _forked(self) -> None:
        self._state = Lifecycle.CLOSED
        attachment, self._attachment = self._attachment, None
        if attachment is not None:
            attachment.open = False
            for frame in attachment.held.values():
                frame._released = True
            attachment.segment.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        if self._state is Lifecycle.OPEN:
            try:
                self.close()
            except Exception:
                pass

    def _current(self) -> _Attachment:
        attachment = self._attachment
        if self._state is not Lifecycle.OPEN or attachment is None:
            raise ClosedError(f"Reader of stream {self._stream!r} is closed")
        return attachment

    # --- public properties --------------------------------------------------------------------------

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def name(self) -> str:
        return self._name

    @property
    def hold(self) -> int:
        return self._hold

    @property
    def dropped(self) -> int:
        """Frames ordered() skipped because they were overwritten before this reader got to them."""
        return self._dropped

    @property
    def shape(self) -> tuple[int, ...]:
        """Current frame shape of the stream."""
        attachment = self._current()
        _fmt, height, width, channels = GEOMETRY.unpack_from(attachment.control, GEOMETRY_OFFSET)  # type: ignore[arg-type]
        return (height, width) if channels == 1 else (height, width, channels)

    @property
    def newest_seq(self) -> int:
        """Sequence number of the newest frame in the ring (0 before the first)."""
        attachment = self._current()
        return NEWEST_SEQ.unpack_from(attachment.control, NEWEST_SEQ_OFFSET)[0]  # type: ignore[arg-type]

    def set_info(self, **info: Any) -> None:
        """Key/values shown next to this reader by ``framebroker status`` (JSON, ~360 bytes)."""
        text = json.dumps(info, separators=(",", ":"))
        if len(text.encode()) >= ENTRY_INFO_SIZE:
            raise ValueError(f"reader info too large ({len(text)} bytes, max {ENTRY_INFO_SIZE - 1})")
        self._info = text
        attachment = self._current()
        offset = attachment.entry_offset + ENTRY_INFO_OFFSET
        attachment.control[offset : offset + ENTRY_INFO_SIZE] = encode_text(text, ENTRY_INFO_SIZE)  # type: ignore[index]

    def triggers(self) -> "TriggerInbox":
        """Listen for event triggers sent to this stream with ``fb.trigger()`` (the recorder's
        clip writer does): returns the inbox to ``receive()`` them from, usable from any thread.
        Triggers reach this reader until the inbox or the reader is closed, across daemon
        restarts too."""
        attachment = self._current()
        segment = attachment.segment
        inbox = TriggerInbox(self._stream, mode=segment.mode & 0o660, gid=segment.gid, on_close=self._stop_listening)
        self._set_flags(self._flags | FLAG_TRIGGERS)
        return inbox

    def _stop_listening(self) -> None:
        if self._state is Lifecycle.OPEN:
            self._set_flags(self._flags & ~FLAG_TRIGGERS)

    def _set_flags(self, flags: int) -> None:
        self._flags = flags
        attachment = self._attachment
        if attachment is not None and attachment.control is not None:
            ENTRY_FLAGS.pack_into(attachment.control, attachment.entry_offset + ENTRY_FLAGS_OFFSET, flags)

    # --- reading ---------------------------------------------------------------------------------------

    def latest(self, timeout: Optional[float] = None) -> Frame:
        """The newest frame; waits up to ``timeout`` seconds (None: forever) only if there is none yet.

        Returns the frame this reader already holds if nothing newer arrived. Raises
        ``FrameTimeout`` if no frame arrives in time, ``SourceEnded`` if the stream ended.
        """
        return self._get(ReaderMode.LIVE, timeout)

    def next(self, timeout: Optional[float] = None) -> Frame:
        """The newest frame, once it is newer than the last frame this reader returned.

        Calling it gives back the oldest held frame first if the hold budget is full (with the
        default ``hold=1``: the previous frame), before waiting, so that frame is released even if
        this call then times out: ``copy()`` what must outlive the call, or hold more."""
        return self._get(ReaderMode.NEXT, timeout)

    def __iter__(self) -> Iterator[Frame]:
        """Fresh frames forever (repeated ``next()``); ends only when the stream ends."""
        return FrameIterator(self, ReaderMode.NEXT, None)

    def ordered(self, timeout: Optional[float] = None) -> "FrameIterator":
        """Every frame in order, starting with the newest; ``frame.dropped`` counts frames missed
        since the previous one. ``timeout`` bounds each wait: ``next()`` on the iterator raises
        ``FrameTimeout`` and the iterator stays usable. Iteration ends when the stream ends."""
        return FrameIterator(self, ReaderMode.ORDERED, timeout)

    @property
    def fps(self) -> float:
        """The stream's frame rate: the one configured for the source, else the measured one
        (0.0 while unknown)."""
        attachment = self._current()
        configured, measured = COUNTERS.unpack_from(attachment.control, COUNTERS_OFFSET)[:2]  # type: ignore[arg-type]
        return float(configured or measured)

    def _get(self, mode: int, timeout: Optional[float]) -> Frame:
        # The frame path: kept to few calls on purpose. After a frame period of idling every new
        # line of code runs cold, and the cold cost dominates (see bench/core_costs.py). So the
        # work that can wait (giving back the previous frame, this reader's figures for status)
        # is done here, before the wait, not after the wake-up.
        attachment = self._attachment
        if attachment is None or self._state is not Lifecycle.OPEN:
            raise ClosedError(f"Reader of stream {self._stream!r} is closed")
        if mode != self._mode:
            self._set_mode(attachment, mode)
        held = attachment.held
        if mode != ReaderMode.LIVE and len(held) >= self._hold:
            # Asking for the next frame gives the oldest held one back now, not once the new one
            # arrives: the producer gets the slot back a frame period sooner, so it can keep
            # writing the same two warm slots.
            attachment.release(next(iter(held.values())), publish=False)
            self._progress_due = True
        if self._progress_due:
            self._write_progress(attachment)
        deadline = None if timeout is None else time.monotonic() + _check_timeout(timeout)
        while True:
            newest, slot, state = _unpack_head(attachment.control, LIVE_OFFSET)  # type: ignore[arg-type]
            if newest != self._seen_newest:
                self._seen_newest = newest
                self._seen_at = 0.0
                special = state == StreamState.ENDED or state == StreamState.REPLACED
            else:
                special = state == StreamState.ENDED or state == StreamState.REPLACED or self._stale()
            if special:
                self._check_stream(attachment, state, mode, newest)
                if self._attachment is not attachment:
                    attachment = self._attachment  # moved to a new segment: start over there
                    assert attachment is not None
                    continue
            last = self._last_seq
            if mode == ReaderMode.LIVE:
                if newest and not self._orphaned:
                    frame = attachment.held.get(slot)
                    if frame is not None and frame.seq == newest:
                        return frame  # nothing newer: the frame this reader already holds
                    held = attachment.held
                    while len(held) >= self._hold:
                        attachment.release(next(iter(held.values())))
                    frame = self._lock_and_check(attachment, slot, newest, mode)
                    if frame is not None:
                        return frame
                    continue
            elif newest > last and not self._orphaned:
                if mode == ReaderMode.ORDERED and last:
                    (slot,) = _unpack_map(attachment.control, attachment.layout.map_entry(last + 1))  # type: ignore[arg-type]
                    frame = self._lock_and_check(attachment, slot, last + 1, mode) or self._oldest_after(attachment, last)
                else:
                    frame = self._lock_and_check(attachment, slot, newest, mode)
                if frame is not None:
                    return frame
                continue
            self._wait(attachment, deadline, 1 if mode == ReaderMode.LIVE else last + 1)
            attachment = self._attachment or attachment

    def _stale(self) -> bool:
        """True, at most once per LIVENESS_STEP, while ``newest_seq`` has not moved for that long.

        Waiting readers learn that the daemon died when their wait times out; this catches the
        readers that never wait (``latest()`` always finds the last frame of a dead daemon).
        """
        now = time.monotonic()
        if not self._seen_at:
            self._seen_at = now
            return False
        if now - self._seen_at < LIVENESS_STEP or now < self._next_check:
            return False
        self._next_check = now + LIVENESS_STEP
        return True

    def _check_stream(self, attachment: _Attachment, state: int, mode: int, newest: int) -> None:
        """React to an ended, replaced or ownerless segment (see "Daemon death" in _ring.py)."""
        if self._orphaned:
            return
        if state == StreamState.REPLACED:
            self._orphaned = True
            self._reattach()
        elif state == StreamState.ENDED:
            if mode == ReaderMode.LIVE or newest <= self._last_seq:
                raise SourceEnded(f"stream {self._stream!r} ended: {self._reason(attachment) or 'its source has no more frames'}")
        elif not attachment.segment.owner_alive():
            log.info("reader %r: the daemon of stream %r is gone; waiting for a new one", self._name, self._stream)
            self._orphaned = True
            self._reattach()

    def _set_mode(self, attachment: _Attachment, mode: int) -> None:
        self._mode = mode
        control = attachment.control
        offset = attachment.entry_offset
        pid, uid, hold, _mode, attached = ENTRY_IDENTITY.unpack_from(control, offset)  # type: ignore[arg-type]
        ENTRY_IDENTITY.pack_into(control, offset, pid, uid, hold, mode, attached)  # type: ignore[arg-type]
        if mode != ReaderMode.ORDERED:
            self._write_progress(attachment)
        _bump_table(control)

    def _lock_and_check(self, attachment: _Attachment, slot: int, target: int, mode: int) -> Optional[Frame]:
        if slot >= attachment.slot_count or slot in attachment.held:
            # A map entry from before the wanted frame was written, or a slot we hold an older
            # frame in (so the wanted one cannot be there): look again.
            return None
        locks = attachment.locks
        if not locks.try_shared(LOCK_SLOT_BASE + slot):
            return None
        seq, timestamp_ns, wall, height, width, channels, fmt, _nbytes = _unpack_meta(attachment.control, attachment.layout.meta(slot))  # type: ignore[arg-type]
        if seq != target:
            locks.unlock(LOCK_SLOT_BASE + slot)
            return None
        dropped = 0
        if mode == ReaderMode.ORDERED and self._last_seq:
            dropped = seq - self._last_seq - 1
            self._dropped += dropped
        shape = (height, width) if channels == 1 else (height, width, channels)
        frame = Frame(attachment, slot, seq, timestamp_ns, wall, shape, _FORMAT_NAMES.get(fmt, "bgr"), dropped, attachment.view(slot, shape))
        attachment.held[slot] = frame
        self._last_seq = seq
        self._frames += 1
        # Written for status at this reader's next call (or close): see _get.
        self._progress_due = True
        return frame

    def _oldest_after(self, attachment: _Attachment, after: int) -> Optional[Frame]:
        """Ordered mode, when the wanted frame is gone: the oldest frame still in the ring."""
        layout = attachment.layout
        control = attachment.control
        candidates = []
        for slot in range(layout.slot_count):
            seq = _unpack_meta(control, layout.meta(slot))[0]  # type: ignore[arg-type]
            if seq > after:
                candidates.append((seq, slot))
        for seq, slot in sorted(candidates):
            frame = self._lock_and_check(attachment, slot, seq, ReaderMode.ORDERED)
            if frame is not None:
                return frame
        return None

    def _write_progress(self, attachment: _Attachment) -> None:
        """This reader's figures for status (and its cursor for the producer), in one write."""
        self._progress_due = False
        control = attachment.control
        if control is None:
            return
        seq = self._last_seq
        frames = self._frames
        cursor = seq if self._mode == ReaderMode.ORDERED else 0
        _pack_progress(control, attachment.progress_offset, seq, cursor, frames, self._dropped, len(attachment.held))  # type: ignore[arg-type]
        # The rate, over about RATE_WINDOW. Clock calls are fine here: this runs before the
        # wait, not on the cold path after a wake-up.
        now = time.monotonic_ns()
        mark_ns, mark_frames = self._rate_mark
        if now - mark_ns >= RATE_WINDOW_NS:
            if mark_ns:
                self._fps = (frames - mark_frames) * 1e9 / (now - mark_ns)
                # With the time the reader last took a frame, which status uses to tell a stalled
                # reader's old rate from a live one.
                ENTRY_RATE.pack_into(control, attachment.entry_offset + ENTRY_RATE_OFFSET, self._fps, time.time())  # type: ignore[arg-type]
            self._rate_mark = (now, frames)

    # --- waiting -------------------------------------------------------------------------------------------

    def _wait(self, attachment: _Attachment, deadline: Optional[float], wanted: int) -> None:
        """Sleep until a post, the deadline or the next liveness check."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise FrameTimeout(self._timeout_message(attachment, wanted))
        step = ORPHAN_STEP if self._orphaned else LIVENESS_STEP
        if deadline is not None:
            step = min(step, deadline - now)
        if self._orphaned:
            # Nothing will post the old semaphore: look for the new daemon every step.
            time.sleep(step)
            self._reattach()
            return
        try:
            attachment.semaphore.acquire(step)
            return
        except posix_ipc.BusyError:
            pass
        except posix_ipc.SignalError:
            # A signal handler ran during the wait. posix_ipc lets KeyboardInterrupt through but
            # replaces any other exception a handler raised; treat it as a wake-up.
            return
        except posix_ipc.Error as exc:
            log.debug("reader %r: waiting on stream %r failed (%r); looking for its daemon", self._name, self._stream, exc)
        if not attachment.segment.owner_alive():
            log.info("reader %r: the daemon of stream %r is gone; waiting for a new one", self._name, self._stream)
            self._orphaned = True
            self._reattach()

    def _reason(self, attachment: _Attachment) -> str:
        control = attachment.control
        if control is None:
            return ""
        return decode_text(control[REASON_OFFSET : REASON_OFFSET + REASON_SIZE])

    def _timeout_message(self, attachment: _Attachment, wanted: int) -> str:
        if self._orphaned:
            if self._reattach_error:
                return f"no frame from stream {self._stream!r}: its daemon restarted but attaching failed: {self._reattach_error}"
            return (
                f"no frame from stream {self._stream!r}: its daemon stopped and no new one serves it yet "
                "(this reader re-attaches by itself when one does)"
            )
        state = STATE.unpack_from(attachment.control, STATE_OFFSET)[0]  # type: ignore[arg-type]
        reason = self._reason(attachment)
        detail = f"; the daemon reports {StreamState.NAMES.get(state, '?')}" + (f": {reason}" if reason else "")
        return f"no new frame from stream {self._stream!r} within the timeout{detail}"
