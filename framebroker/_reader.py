"""The reader side of the ring: ``Reader`` (protocol in ``_ring.py``).

The Reader owns the reading loop: which frame to lease for each mode, waiting for the next one,
noticing a dead or replaced daemon and moving to its successor. What it holds in one segment
(entry, tokens, leases, views) is an ``Attachment`` (``_attachment.py``); what it hands out is a
``Frame`` (``_frame.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterator, Optional

import posix_ipc

from ._attachment import RATE_WINDOW_NS, Attachment, attach
from ._errors import ClosedError, FrameBrokerError, FrameTimeout, SourceEnded, StreamNotFound
from ._frame import Frame, FrameIterator, check_timeout
from ._layout import (
    COUNTERS,
    COUNTERS_OFFSET,
    ENTRY_INFO_SIZE,
    ENTRY_NAME_SIZE,
    FLAG_TRIGGERS,
    GEOMETRY,
    GEOMETRY_OFFSET,
    HEAD,
    LIVE_OFFSET,
    LOCK_SLOT_BASE,
    MAP_ENTRY,
    META,
    NEWEST_SEQ,
    NO_FRAME,
    NEWEST_SEQ_OFFSET,
    STATE,
    STATE_OFFSET,
    PixelFormat,
    ReaderMode,
    StreamState,
    validate_stream_name,
)
from ._lifecycle import Lifecycle
from ._ring import LIVENESS_STEP, ORPHAN_STEP

if TYPE_CHECKING:
    from ._trigger import TriggerInbox

log = logging.getLogger("framebroker.reader")

# Bound methods of the structs used on every frame (saves two lookups per use).
_unpack_head = HEAD.unpack_from
_unpack_map = MAP_ENTRY.unpack_from
_unpack_meta = META.unpack_from
_FORMAT_NAMES = PixelFormat.NAMES

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
    frames this reader may hold at once (default 1); each reader reserves that many slots. When
    the ring has no room left, a growing ring (``serve --slots auto``, the default) grows for it,
    and attaching then waits about a frame period or two (plus the time the daemon takes to
    reserve the larger ring); a fixed ring, or a growing one at its ``--max-shm``, raises
    ``CapacityError`` naming what to change.

    * ``latest(timeout)``: the newest frame (the same one again if nothing newer arrived).
    * ``next(timeout)``: the newest frame, once it is newer than the last one returned; waits
      for one. Frames that came and went in between are skipped.
    * ``for frame in reader``: repeated ``next()``: always fresh, may skip frames.
    * ``ordered()``: every frame in order; ``frame.dropped`` counts those that were overwritten
      before this reader got to them.

    Asking for a frame beyond the hold budget releases the oldest held frame first. Waiting
    sleeps in the kernel (no polling). If the daemon dies or restarts, the reader attaches to the
    new one by itself; sequence numbers then start again from 1. A Reader is for one thread;
    give each thread (and each forked process) its own.

    Signals: Ctrl-C (KeyboardInterrupt) interrupts a wait as usual. An exception raised by any
    other signal handler during a wait reaches the caller on the compiled frame path, but is
    swallowed by posix_ipc on the pure-Python one (it reports the interruption instead, which the
    reader treats as a wake-up): have such handlers raise KeyboardInterrupt or set a flag your
    loop checks.
    """

    _attachment: Optional[Attachment] = None
    _inbox: "Optional[TriggerInbox]" = None
    _state = Lifecycle.CLOSED
    # Words for messages; a results ring's reader (``_results.py``) says "result" and "writer".
    _NOUN = "frame"
    _PRODUCER = "daemon"

    def __init__(self, stream: str, name: Optional[str] = None, *, hold: int = 1, wait: float = 0.0) -> None:
        self._open(validate_stream_name(stream), f"stream {stream!r}", name, hold, wait)

    def _open(self, ring: str, subject: str, name: Optional[str], hold: int, wait: float) -> None:
        """Attach to the ring ``ring`` (a stream's, or a results ring), ``subject`` in messages."""
        self._stream = ring
        self._subject = subject
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
        # The compiled lease hands out Frames; a reader whose _lease makes something else (a
        # results ring's Reader copies records out) keeps its own.
        self._takes_compiled = type(self)._lease is Reader._lease
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

    def _attach(self) -> Attachment:
        return attach(self._stream, self._name, self._hold, self._mode, self._flags, self._info)

    def _reattach(self, moved: bool = False) -> bool:
        """Attach to the segment that serves the stream's name now: the one its producer moved
        to (``moved``: frames go on numbering there, unless that segment starts afresh, as a
        results ring does for a new daemon), or a new daemon's (numbering starts again)."""
        old = self._attachment
        try:
            new = self._attach()
        except (FrameBrokerError, OSError) as exc:
            # Kept for the timeout message: "no daemon yet" and "new daemon refuses us" differ.
            self._reattach_error = "" if isinstance(exc, StreamNotFound) else str(exc)
            return False
        if old is not None:
            old.detach(clear_entry=False)
        if moved:
            log.debug("reader %r: %s moved to a new segment; followed", self._name, self._subject)
        else:
            log.info("reader %r: %s has a new %s (pid %d); re-attached", self._name, self._subject, self._PRODUCER, new.segment.header.owner_pid)
        self._attachment = new
        if not moved or _unpack_head(new.control, LIVE_OFFSET)[0] < self._last_seq:  # type: ignore[arg-type]
            self._last_seq = 0
        self._orphaned = False
        self._write_progress(new)
        if self._inbox is not None:
            self._inbox._rebind(new)
        return True

    # --- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Release every held frame and detach. Safe to call twice."""
        if self._state is Lifecycle.CLOSED:
            return
        self._state = Lifecycle.CLOSED
        inbox, self._inbox = self._inbox, None
        if inbox is not None:
            inbox.close()
        attachment, self._attachment = self._attachment, None
        if attachment is not None:
            for frame in list(attachment.held.values()):
                attachment.release(frame)
            attachment.detach(clear_entry=True)
        _live_readers.discard(self)

    def _forked(self) -> None:
        self._state = Lifecycle.CLOSED
        self._inbox = None
        attachment, self._attachment = self._attachment, None
        if attachment is not None:
            attachment.open = False
            attachment.close_fast()
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

    def _current(self) -> Attachment:
        attachment = self._attachment
        if self._state is not Lifecycle.OPEN or attachment is None:
            raise ClosedError(f"Reader of {self._subject} is closed")
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
    def shape(self) -> tuple:
        """Current frame shape of the stream."""
        attachment = self._current()
        _fmt, height, width, channels = GEOMETRY.unpack_from(attachment.control, GEOMETRY_OFFSET)  # type: ignore[arg-type]
        return (height, width) if channels == 1 else (height, width, channels)

    @property
    def newest_seq(self) -> int:
        """Sequence number of the newest frame in the ring (0 before the first)."""
        attachment = self._current()
        return NEWEST_SEQ.unpack_from(attachment.control, NEWEST_SEQ_OFFSET)[0]  # type: ignore[arg-type]

    @property
    def fps(self) -> float:
        """The stream's frame rate: the one configured for the source, else the measured one
        (0.0 while unknown)."""
        attachment = self._current()
        configured, measured = COUNTERS.unpack_from(attachment.control, COUNTERS_OFFSET)[:2]  # type: ignore[arg-type]
        return float(configured or measured)

    def set_info(self, **info: Any) -> None:
        """Key/values shown next to this reader by ``framebroker status`` (JSON, ~360 bytes)."""
        text = json.dumps(info, separators=(",", ":"))
        if len(text.encode()) >= ENTRY_INFO_SIZE:
            raise ValueError(f"reader info too large ({len(text)} bytes, max {ENTRY_INFO_SIZE - 1})")
        self._info = text
        self._current().set_info(text)

    def triggers(self) -> "TriggerInbox":
        """Listen for event triggers sent to this stream with ``fb.trigger()`` (the recorder's
        clip writer does): returns the inbox to ``receive()`` them from, usable from any thread.
        Triggers reach this reader until the inbox or the reader is closed, across daemon
        restarts too. One inbox per Reader: a second listener needs a Reader of its own."""
        from ._trigger import TriggerInbox

        attachment = self._current()
        if self._inbox is not None:
            raise ValueError(
                f"this Reader of {self._subject} already listens for triggers: use the inbox it returned, "
                "or open another Reader for a second listener"
            )
        self._inbox = TriggerInbox(attachment, on_close=self._stop_listening)
        self._set_flags(self._flags | FLAG_TRIGGERS)
        return self._inbox

    def _stop_listening(self) -> None:
        self._inbox = None
        if self._state is Lifecycle.OPEN:
            self._set_flags(self._flags & ~FLAG_TRIGGERS)

    def _set_flags(self, flags: int) -> None:
        self._flags = flags
        if self._attachment is not None:
            self._attachment.set_flags(flags)

    # --- reading ---------------------------------------------------------------------------------------

    def latest(self, timeout: Optional[float] = None) -> Frame:
        """The newest frame; waits up to ``timeout`` seconds (None: forever) only if there is none yet.

        Returns the frame this reader already holds if nothing newer arrived. Raises
        ``FrameTimeout`` if no frame arrives in time, ``SourceEnded`` if the stream ended.
        """
        attachment = self._attachment
        if attachment is not None and attachment.fast is not None and self._takes_compiled:
            # A new frame in one compiled call, without a second Python call into _get (after
            # idling, each costs microseconds); None leaves the case to _get's steps.
            frame = attachment.fast.take(self, ReaderMode.LIVE, None)
            if frame is not None:
                return frame
        return self._get(ReaderMode.LIVE, timeout)

    def next(self, timeout: Optional[float] = None) -> Frame:
        """The newest frame, as soon as it is newer than the last frame this reader returned.

        If several frames arrived since, the newest is returned and the others are skipped (use
        ``ordered()`` to get every frame). Waits up to ``timeout`` seconds (None: forever) when
        nothing newer is there yet. Calling it gives back the oldest held frame first if the hold
        budget is full (with the default ``hold=1``: the previous frame), before waiting, so that
        frame is released even if this call then times out: ``copy()`` what must outlive the
        call, or hold more."""
        return self._get(ReaderMode.NEXT, timeout)

    def __iter__(self) -> Iterator[Frame]:
        """Fresh frames forever (repeated ``next()``); ends only when the stream ends."""
        return FrameIterator(self, ReaderMode.NEXT, None)

    def ordered(self, timeout: Optional[float] = None) -> FrameIterator:
        """Every frame in order, starting with the newest; ``frame.dropped`` counts frames missed
        since the previous one. ``timeout`` bounds each wait: ``next()`` on the iterator raises
        ``FrameTimeout`` and the iterator stays usable. Iteration ends when the stream ends."""
        return FrameIterator(self, ReaderMode.ORDERED, timeout)

    def _get(self, mode: int, timeout: Optional[float]) -> Frame:
        # The frame path: kept to few calls on purpose. After a frame period of idling every new
        # line of code runs cold, and the cold cost dominates (see bench/core_costs.py). So the
        # work that can wait (giving back the previous frame, this reader's figures for status)
        # is done here, before the wait, not after the wake-up.
        attachment = self._attachment
        if attachment is None or self._state is not Lifecycle.OPEN:
            raise ClosedError(f"Reader of {self._subject} is closed")
        if mode != self._mode:
            self._mode = mode
            attachment.set_mode(mode)
            self._progress_due = True
        if attachment.fast is None or not self._takes_compiled:  # the compiled take does this first
            held = attachment.held
            if mode != ReaderMode.LIVE and len(held) >= self._hold:
                # Asking for the next frame gives the oldest held one back now, not once the new
                # one arrives: the producer gets the slot back a frame period sooner, so it can
                # keep writing the same two warm slots.
                attachment.release(next(iter(held.values())), publish=False)
                self._progress_due = True
            if self._progress_due:
                self._write_progress(attachment)
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
        while True:
            fast = attachment.fast
            if fast is not None and self._takes_compiled:
                # The usual case in one compiled call: what comes before looking, HEAD, the lease,
                # the Frame, this reader's position moved on, and the wait when nothing is new yet
                # (_fastpath.c). None leaves the rest to the steps below.
                frame = fast.take(self, mode, deadline)
                if frame is False:
                    # A wait to the end of a liveness step or to the deadline, without a frame:
                    # is the daemon still there?
                    if not attachment.segment.owner_alive():
                        self._orphan()
                    attachment = self._attachment or attachment
                    continue
                if frame is not None:
                    return frame
            newest, slot, state = _unpack_head(attachment.control, LIVE_OFFSET)  # type: ignore[arg-type]
            if newest != self._seen_newest:
                self._seen_newest = newest
                self._seen_at = 0.0
                special = state == StreamState.ENDED or state == StreamState.REPLACED
            else:
                # _stale() is for readers that never wait (latest()); the others learn that the
                # daemon died when their wait times out.
                special = state == StreamState.ENDED or state == StreamState.REPLACED or (mode == ReaderMode.LIVE and self._stale())
            if special:
                self._check_stream(attachment, state, mode, newest)
                if self._attachment is not attachment:
                    attachment = self._attachment  # moved to a new segment: start over there
                    assert attachment is not None
                    continue
            last = self._last_seq
            if slot == NO_FRAME:
                pass  # a segment the producer just moved to, without a frame yet: wait for one
            elif mode == ReaderMode.LIVE:
                if newest and not self._orphaned:
                    frame = attachment.held.get(slot)
                    if frame is not None and frame.seq == newest:
                        return frame  # nothing newer: the frame this reader already holds
                    held = attachment.held
                    while len(held) >= self._hold:
                        attachment.release(next(iter(held.values())))
                    frame = self._lease(attachment, slot, newest, mode)
                    if frame is not None:
                        return frame
                    continue
            elif newest > last and not self._orphaned:
                if mode == ReaderMode.ORDERED and last:
                    (slot,) = _unpack_map(attachment.control, attachment.layout.map_entry(last + 1))  # type: ignore[arg-type]
                    frame = self._lease(attachment, slot, last + 1, mode) or self._oldest_after(attachment, last)
                else:
                    frame = self._lease(attachment, slot, newest, mode)
                if frame is not None:
                    return frame
                continue
            self._wait(attachment, deadline, newest)
            attachment = self._attachment or attachment

    def _lease(self, attachment: Attachment, slot: int, target: int, mode: int) -> Optional[Frame]:
        """Lease slot ``slot`` if it holds frame ``target`` (steps 2-4 of "Leasing" in _ring.py)."""
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

    def _oldest_after(self, attachment: Attachment, after: int) -> Optional[Frame]:
        """Ordered mode, when the wanted frame is gone: the oldest frame still in the ring."""
        layout = attachment.layout
        control = attachment.control
        candidates = []
        for slot in range(layout.slot_count):
            seq = _unpack_meta(control, layout.meta(slot))[0]  # type: ignore[arg-type]
            if seq > after:
                candidates.append((seq, slot))
        for seq, slot in sorted(candidates):
            frame = self._lease(attachment, slot, seq, ReaderMode.ORDERED)
            if frame is not None:
                return frame
        return None

    def _write_progress(self, attachment: Attachment) -> None:
        """This reader's figures for status (and its cursor for the producer), in one write."""
        self._progress_due = False
        if attachment.control is None:
            return
        seq = self._last_seq
        frames = self._frames
        ordered = self._mode == ReaderMode.ORDERED
        attachment.write_progress(seq, seq if ordered else 0, frames, self._dropped)
        if ordered:
            attachment.nudge_producer()  # a producer in lockstep waits for this cursor
        # The rate, over about RATE_WINDOW. Clock calls are fine here: this runs before the
        # wait, not on the cold path after a wake-up.
        now = time.monotonic_ns()
        mark_ns, mark_frames = self._rate_mark
        if now - mark_ns >= RATE_WINDOW_NS:
            if mark_ns:
                self._fps = (frames - mark_frames) * 1e9 / (now - mark_ns)
                # With the time the reader last took a frame, which status uses to tell a stalled
                # reader's old rate from a live one.
                attachment.write_rate(self._fps)
            self._rate_mark = (now, frames)

    # --- waiting and liveness --------------------------------------------------------------------------

    def _wait(self, attachment: Attachment, deadline: Optional[float], newest: int) -> None:
        """Sleep until a wake-up, the deadline or the next liveness check; ``newest`` is the
        newest_seq seen when deciding to wait (a reader on the wake word wakes at once if it
        moved since)."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise FrameTimeout(self._timeout_message(attachment))
        step = ORPHAN_STEP if self._orphaned else LIVENESS_STEP
        if deadline is not None:
            step = min(step, deadline - now)
        if self._orphaned:
            # Nothing will post the old semaphore: look for the new daemon every step.
            time.sleep(step)
            self._reattach()
            return
        fast = attachment.fast
        try:
            if fast is not None and fast.futex:
                if fast.wait(step, newest):
                    return
            else:
                attachment.semaphore.acquire(step)
                return
        except posix_ipc.BusyError:
            pass
        except posix_ipc.SignalError:
            # A signal handler ran during the wait. posix_ipc lets KeyboardInterrupt through but
            # replaces any other exception a handler raised; treat it as a wake-up.
            return
        except (posix_ipc.Error, OSError) as exc:
            log.debug("reader %r: waiting on %s failed (%r); looking for its %s", self._name, self._subject, exc, self._PRODUCER)
        if not attachment.segment.owner_alive():
            self._orphan()

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

    def _check_stream(self, attachment: Attachment, state: int, mode: int, newest: int) -> None:
        """React to an ended, replaced or ownerless segment (see "Daemon death" in _ring.py)."""
        if self._orphaned:
            return
        if state == StreamState.REPLACED:
            if mode == ReaderMode.ORDERED and newest > self._last_seq:
                return  # the frames still in this segment first: nothing writes them any more
            self._orphaned = True
            self._reattach(moved=True)
        elif state == StreamState.ENDED:
            if mode == ReaderMode.LIVE or newest <= self._last_seq:
                raise SourceEnded(f"{self._subject} ended: {attachment.reason() or 'its source has no more frames'}")
        elif not attachment.segment.owner_alive():
            self._orphan()

    def _orphan(self) -> None:
        log.info("reader %r: the %s of %s is gone; waiting for a new one", self._name, self._PRODUCER, self._subject)
        self._orphaned = True
        self._reattach()

    def _timeout_message(self, attachment: Attachment) -> str:
        if self._orphaned:
            if self._reattach_error:
                return f"no {self._NOUN} from {self._subject}: its {self._PRODUCER} restarted but attaching failed: {self._reattach_error}"
            return (
                f"no {self._NOUN} from {self._subject}: its {self._PRODUCER} stopped and no new one serves it yet "
                "(this reader re-attaches by itself when one does)"
            )
        state = STATE.unpack_from(attachment.control, STATE_OFFSET)[0]  # type: ignore[arg-type]
        reason = attachment.reason()
        detail = f"; the {self._PRODUCER} reports {StreamState.NAMES.get(state, '?')}" + (f": {reason}" if reason else "")
        return f"no new {self._NOUN} from {self._subject} within the timeout{detail}"
