"""A reader's attachment to one segment instance: its slot budget, its table entry, its wake-up
semaphore, its leases and views (the reader side of ``_ring.py``, minus the reading loop).

Attaching takes no lock that another attaching process could hold for long: the slot budget is
a set of token locks (``LOCK_TOKEN_BASE + t``), one per frame a reader may hold, each taken with a
non-blocking try; the entry is another try-lock. A reader frozen (SIGSTOP) half way through
attaching pins only the tokens and the entry it already has, never anyone else's attach.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import posix_ipc

from ._errors import CapacityError, StreamNotFound
from ._fast import compiled, readers_use_futex
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
    ENTRY_PROGRESS_HELD,
    ENTRY_PROGRESS_OFFSET,
    ENTRY_RATE,
    ENTRY_RATE_OFFSET,
    FLAG_FUTEX,
    LOCK_ENTRY_BASE,
    LOCK_SLOT_BASE,
    LOCK_TOKEN_BASE,
    GROW_REQUEST,
    GROW_REQUEST_OFFSET,
    GROWTH,
    GROWTH_OFFSET,
    STATE,
    STATE_OFFSET,
    StreamState,
    PixelFormat,
    PRODUCER_WAITS,
    PRODUCER_WAITS_OFFSET,
    REASON_OFFSET,
    REASON_SIZE,
    ReaderMode,
    decode_text,
    encode_text,
    producer_semaphore_name,
    semaphore_name,
)
from ._ring import LIVENESS_STEP
from ._segment import Segment, open_segment
from ._table import note_change, remove_listener_queue

from ._frame import Frame

# How often a reader recomputes the fps it shows in status (nanoseconds).
RATE_WINDOW_NS = 500_000_000
# Attaching readers that contend for the last tokens may each get some and give them back; a
# short pause and another try sorts that out before anyone is told the ring is full.
TOKEN_ATTEMPTS = 3
TOKEN_RETRY_PAUSE = 0.005
# A growable ring: how long an attaching reader waits for the producer to move to a larger
# segment (reserving a few hundred MiB can take a second on a slow board), how often it looks,
# and how many times it tries when other readers take the new room first.
GROW_WAIT = 10.0
GROW_POLL = 0.005
GROW_ROUNDS = 4


class Attachment:
    """One reader's hold on one segment instance (see the module docstring).

    ``held`` maps slot -> Frame for the frames leased now, oldest first (a plain dict: the
    compiled path updates it too); ``views`` caches one read-only ndarray per (slot, shape),
    since building an ndarray costs more than a lease. ``fast`` is the compiled frame path
    (``_fast.py``), None on the pure-Python one; ``wake_flags`` is ``FLAG_FUTEX`` when this
    reader waits on the header's wake word rather than on its semaphore.
    """

    semaphore: posix_ipc.Semaphore = None  # type: ignore[assignment]  # opened last by attach()
    producer_semaphore: Optional[posix_ipc.Semaphore] = None
    fast: Any = None
    wake_flags = 0

    def __init__(self, stream: str, segment: Segment, entry: int, tokens: List[int]) -> None:
        self.stream = stream
        self.segment = segment
        self.layout = segment.layout
        self.slot_count = segment.layout.slot_count
        self.control = segment.control
        self.data = segment.data
        self.locks = segment.locks
        self.entry = entry
        self.tokens = tokens
        self.entry_offset = segment.layout.entry(entry)
        self.progress_offset = self.entry_offset + ENTRY_PROGRESS_OFFSET
        self.generation = ENTRY_GENERATION.unpack_from(segment.control, self.entry_offset + ENTRY_GENERATION_OFFSET)[0]  # type: ignore[arg-type]
        self.held: Dict[int, Frame] = {}
        self.views: Dict[Tuple[int, Tuple[int, ...]], np.ndarray] = {}
        self.open = True

    @property
    def epoch(self) -> int:
        return self.segment.header.epoch

    def view(self, slot: int, shape: Tuple[int, ...]) -> np.ndarray:
        key = (slot, shape)
        array = self.views.get(key)
        if array is None:
            array = self.views[key] = np.ndarray(shape, np.uint8, buffer=self.data, offset=self.layout.slot_data(slot))
        return array

    def release(self, frame: "Frame", publish: bool = True) -> None:
        """Give the frame's slot back; ``publish``: update the held count status shows now
        (the reader's own path writes it with its other figures instead)."""
        if self.fast is not None:
            self.fast.release(frame, publish)
            return
        frame._released = True
        held = self.held
        if held.get(frame._slot) is frame:
            del held[frame._slot]
            if self.open:
                self.locks.unlock(LOCK_SLOT_BASE + frame._slot)
                if publish:
                    ENTRY_HELD.pack_into(self.control, self.entry_offset + ENTRY_HELD_OFFSET, len(held))  # type: ignore[arg-type]

    # --- the entry --------------------------------------------------------------------------------

    def write_identity(self, name: str, hold: int, mode: int, flags: int, info: str) -> None:
        # Field by field, identity (with the pid) last: status may read the entry meanwhile,
        # and must not see this reader's pid next to its predecessor's figures.
        control, offset = self.control, self.entry_offset
        remove_listener_queue(control, self.layout, self.stream, self.epoch, self.entry)  # a killed predecessor's
        ENTRY_GENERATION.pack_into(control, offset + ENTRY_GENERATION_OFFSET, self.generation + 1)  # type: ignore[arg-type]
        self.generation += 1
        ENTRY_PROGRESS_HELD.pack_into(control, offset + ENTRY_PROGRESS_OFFSET, 0, 0, 0, 0, 0)  # type: ignore[arg-type]
        ENTRY_FLAGS.pack_into(control, offset + ENTRY_FLAGS_OFFSET, flags | self.wake_flags)  # type: ignore[arg-type]
        ENTRY_RATE.pack_into(control, offset + ENTRY_RATE_OFFSET, 0.0, 0.0)  # type: ignore[arg-type]
        self._write_text(ENTRY_NAME_OFFSET, ENTRY_NAME_SIZE, name)
        self._write_text(ENTRY_INFO_OFFSET, ENTRY_INFO_SIZE, info)
        ENTRY_IDENTITY.pack_into(control, offset, os.getpid(), os.geteuid(), hold, mode, time.time())  # type: ignore[arg-type]
        note_change(control, self.entry)
        self.nudge_producer()

    def set_mode(self, mode: int) -> None:
        control, offset = self.control, self.entry_offset
        pid, uid, hold, _old, attached = ENTRY_IDENTITY.unpack_from(control, offset)  # type: ignore[arg-type]
        ENTRY_IDENTITY.pack_into(control, offset, pid, uid, hold, mode, attached)  # type: ignore[arg-type]
        note_change(control, self.entry)
        self.nudge_producer()

    def set_flags(self, flags: int) -> None:
        if self.open:
            ENTRY_FLAGS.pack_into(self.control, self.entry_offset + ENTRY_FLAGS_OFFSET, flags | self.wake_flags)  # type: ignore[arg-type]

    def set_info(self, text: str) -> None:
        self._write_text(ENTRY_INFO_OFFSET, ENTRY_INFO_SIZE, text)

    def write_progress(self, last_seq: int, cursor: int, frames: int, dropped: int) -> None:
        ENTRY_PROGRESS_HELD.pack_into(self.control, self.progress_offset, last_seq, cursor, frames, dropped, len(self.held))  # type: ignore[arg-type]

    def nudge_producer(self) -> None:
        """Wake the producer if it waits for its readers (lockstep): this one just attached,
        changed mode, moved on or is leaving."""
        control, sem = self.control, self.producer_semaphore
        if control is not None and sem is not None and PRODUCER_WAITS.unpack_from(control, PRODUCER_WAITS_OFFSET)[0]:
            try:
                sem.release()
            except posix_ipc.Error:
                pass

    def write_rate(self, fps: float) -> None:
        ENTRY_RATE.pack_into(self.control, self.entry_offset + ENTRY_RATE_OFFSET, fps, time.time())  # type: ignore[arg-type]

    def _write_text(self, field: int, size: int, text: str) -> None:
        offset = self.entry_offset + field
        self.control[offset : offset + size] = encode_text(text, size)  # type: ignore[index]

    def reason(self) -> str:
        """Why the daemon is in its state (empty when there is nothing to say)."""
        control = self.control
        if control is None:
            return ""
        return decode_text(control[REASON_OFFSET : REASON_OFFSET + REASON_SIZE])

    # --- the compiled frame path ------------------------------------------------------------------

    def start_fast(self) -> None:
        """Use the compiled frame path from now on (attach() calls it once the entry is written)."""
        module = compiled()
        if module is None:
            return
        layout = self.layout
        self.fast = module.ReaderPath(
            control=self.control,
            fd=self.segment.fd,
            slot_count=layout.slot_count,
            meta_offset=layout.meta_offset,
            map_offset=layout.map_offset,
            map_size=layout.map_size,
            entry_offset=self.entry_offset,
            attachment=self,
            held=self.held,
            view=self.view,
            frame_type=Frame,
            format_names=PixelFormat.NAMES,
            stream=self.stream,
            futex=bool(self.wake_flags & FLAG_FUTEX),
            rate_window_ns=RATE_WINDOW_NS,
            liveness_step=LIVENESS_STEP,
        )

    def close_fast(self) -> None:
        """Back to the pure-Python path (detaching, or a forked child): the compiled one lets go
        of the mapping and the descriptor, which are about to close."""
        fast, self.fast = self.fast, None
        if fast is not None:
            fast.close()

    # --- leaving ------------------------------------------------------------------------------------

    def detach(self, clear_entry: bool) -> None:
        """Let go of the segment. Frames still held stay readable (their mapping lives on) but no
        longer pin anything: either the segment is gone (daemon restart) or the reader is closing.

        The order matters to the producer and to status: the identity goes first (status stops
        listing the reader), then the descriptor and with it every lock of this attachment (entry,
        tokens, leases: the mappings hold another description, see ``Segment.map``), then the
        change byte, so the producer's rescan finds the entry already free.
        """
        if not self.open:
            return
        self.open = False
        self.close_fast()
        control = self.control
        if clear_entry and control is not None:
            ENTRY_IDENTITY.pack_into(control, self.entry_offset, 0, 0, 0, ReaderMode.IDLE, 0.0)  # type: ignore[arg-type]
        if self.semaphore is not None:
            try:
                self.semaphore.close()
            except posix_ipc.Error:
                pass
        segment = self.segment
        segment.close_descriptor()
        if clear_entry and control is not None:
            note_change(control, self.entry)
        self.nudge_producer()
        if self.producer_semaphore is not None:
            try:
                self.producer_semaphore.close()
            except posix_ipc.Error:
                pass
        # Keep self.data: frames held from this segment still view it.
        segment.data = None
        segment.close()
        self.control = None


def attach(stream: str, name: str, hold: int, mode: int, flags: int, info: str) -> Attachment:
    """Attach to the segment that serves ``stream`` now: map it, reserve ``hold`` tokens, claim
    an entry, write this reader's identity. Raises StreamNotFound, CapacityError, ...

    A growable ring (``serve --slots auto``) with too few free tokens is asked to grow; this
    then waits for the producer to move to the larger segment (about a frame period, plus the
    time to reserve it) and attaches there.
    """
    for _ in range(GROW_ROUNDS):
        segment = open_segment(stream)
        try:
            if not segment.owner_alive():
                raise StreamNotFound(
                    f"stream {stream!r} is not being served: its daemon (pid {segment.header.owner_pid}) "
                    f"is no longer running. Start it again with framebroker serve ... --name {stream}"
                )
            segment.map(control_writable=True, data_access="r")
            try:
                tokens = _reserve_tokens(segment, hold)
            except CapacityError:
                if not _ask_to_grow(segment, hold):
                    raise
                segment.close()
                continue  # the ring moved to a larger segment: attach there
            attachment = Attachment(stream, segment, _claim_entry(segment), tokens)
            # Decided before the entry is written: the producer reads it with the identity.
            attachment.wake_flags = FLAG_FUTEX if readers_use_futex() else 0
            attachment.write_identity(name, hold, mode, flags, info)
            # Opened after the change byte is written: these system calls stand between that store
            # and this reader's first read of HEAD ("Wake-ups" in _ring.py).
            try:
                attachment.producer_semaphore = posix_ipc.Semaphore(producer_semaphore_name(stream, segment.header.epoch))
                attachment.semaphore = posix_ipc.Semaphore(semaphore_name(stream, segment.header.epoch, attachment.entry))
            except posix_ipc.ExistentialError:
                raise StreamNotFound(f"stream {stream!r} is shutting down") from None
            attachment.nudge_producer()  # attached (write_identity could not post yet)
            attachment.start_fast()
            return attachment
        except BaseException:
            segment.close()
            raise
    raise CapacityError(f"stream {stream!r}: its ring grew {GROW_ROUNDS} times and other readers took the room each time; try again")


def _ask_to_grow(segment: Segment, hold: int) -> bool:
    """Ask a growable ring for room for ``hold`` more frames; True once it moved to a larger
    segment, False if it cannot grow; CapacityError if it refuses (``--max-shm``)."""
    control = segment.control
    growable, _, _, max_shm = GROWTH.unpack_from(control, GROWTH_OFFSET)  # type: ignore[arg-type]
    if not growable:
        return False
    request = (GROW_REQUEST.unpack_from(control, GROW_REQUEST_OFFSET)[0] + 1) & 0xFFFFFFFF  # type: ignore[arg-type]
    GROW_REQUEST.pack_into(control, GROW_REQUEST_OFFSET, request, hold)  # type: ignore[arg-type]
    deadline = time.monotonic() + GROW_WAIT
    while time.monotonic() < deadline:
        # Polled, not waited for: a reader without an entry has no semaphore yet, and this lasts
        # a frame period or two (the producer answers between two frames).
        if STATE.unpack_from(control, STATE_OFFSET)[0] == StreamState.REPLACED:  # type: ignore[arg-type]
            return True
        _, refused, needed, max_shm = GROWTH.unpack_from(control, GROWTH_OFFSET)  # type: ignore[arg-type]
        if refused == request:
            slots = segment.layout.slot_count
            raise CapacityError(
                f"stream {segment.stream!r} cannot guarantee {hold} more held frame(s): its ring ({slots} slots, "
                f"{_mib(segment.layout.total_size)}) would need {_mib(needed)} to grow, past its limit of "
                f"{_mib(max_shm)}. Restart the daemon with a larger --max-shm (and the room in /dev/shm for it), "
                "or ask for fewer held frames."
            )
        if not segment.owner_alive():
            return False
        time.sleep(GROW_POLL)
    return False


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _reserve_tokens(segment: Segment, hold: int) -> List[int]:
    """Take ``hold`` of the ring's token locks: the slots this reader may hold, guaranteed."""
    locks = segment.locks
    budget = segment.layout.slot_count - 2
    for attempt in range(TOKEN_ATTEMPTS):
        taken: List[int] = []
        for token in range(budget):
            if locks.try_exclusive(LOCK_TOKEN_BASE + token):
                taken.append(token)
                if len(taken) == hold:
                    return taken
        for token in taken:
            locks.unlock(LOCK_TOKEN_BASE + token)
        if hold > budget:
            break
        time.sleep(TOKEN_RETRY_PAUSE * (attempt + 1))
    reserved = sum(1 for token in range(budget) if locks.held_by_other(LOCK_TOKEN_BASE + token))
    stream, slots = segment.stream, segment.layout.slot_count
    raise CapacityError(
        f"stream {stream!r} cannot guarantee {hold} more held frame(s): its ring has {slots} slots, "
        f"{reserved} of the {budget} that readers may hold are reserved by attached readers. Restart the "
        f"daemon with --slots {reserved + hold + 2} or more, or ask for fewer held frames."
    )


def _claim_entry(segment: Segment) -> int:
    """A free reader-table entry, locked. One always exists once the tokens are taken: every
    attached reader holds at least one token, so fewer readers than tokens are attached."""
    locks = segment.locks
    for index in range(segment.layout.table_size):
        if locks.try_exclusive(LOCK_ENTRY_BASE + index):
            return index
    raise CapacityError(f"stream {segment.stream!r}: every reader-table entry is in use; restart the daemon with more --slots")
