"""The reader table: which entries are live, what each says, and the change bytes.

Every reader owns one entry of the table while it is attached (``_ring.py`` explains the
locks). This module is the one place that walks the table: the producer (whom to wake, whose
frames to keep), ``status``, and ``trigger()`` (who listens) all go through ``live_entries``.
Liveness is the entry's OFD lock, held by the reader's open file description: the kernel drops
it when the process dies, so a dead reader's entry is free at once and pid reuse cannot fool it.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import posix_ipc

from ._layout import (
    CHANGES_OFFSET,
    GROW_REQUEST_OFFSET,
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
    ENTRY_PROGRESS_OFFSET,
    ENTRY_RATE,
    ENTRY_RATE_OFFSET,
    FLAG_TRIGGERS,
    LOCK_ENTRY_BASE,
    RingLayout,
    decode_text,
    trigger_queue_name,
)
from ._locks import ByteLocks


def live_entries(locks: ByteLocks, layout: RingLayout, control: Any) -> Iterator[Tuple[int, int]]:
    """``(index, offset)`` of every entry whose reader is attached right now.

    An entry is live while some open file description holds its lock and the reader has written
    its identity (pid): a reader in the middle of attaching (lock taken, identity not yet written)
    is not shown, and neither is one that is detaching (identity cleared before the lock goes).
    """
    for index in range(layout.table_size):
        if locks.held_by_other(LOCK_ENTRY_BASE + index):
            offset = layout.entry(index)
            if ENTRY_IDENTITY.unpack_from(control, offset)[0]:
                yield index, offset


def read_entry(buf: Any, offset: int) -> Dict[str, Any]:
    """Decode one reader-table entry."""
    pid, uid, hold, mode, attached_wall = ENTRY_IDENTITY.unpack_from(buf, offset)
    last_seq, cursor, frames, dropped = ENTRY_PROGRESS.unpack_from(buf, offset + ENTRY_PROGRESS_OFFSET)
    (held,) = ENTRY_HELD.unpack_from(buf, offset + ENTRY_HELD_OFFSET)
    (flags,) = ENTRY_FLAGS.unpack_from(buf, offset + ENTRY_FLAGS_OFFSET)
    fps, last_frame_wall = ENTRY_RATE.unpack_from(buf, offset + ENTRY_RATE_OFFSET)
    (generation,) = ENTRY_GENERATION.unpack_from(buf, offset + ENTRY_GENERATION_OFFSET)
    name = decode_text(buf[offset + ENTRY_NAME_OFFSET : offset + ENTRY_NAME_OFFSET + ENTRY_NAME_SIZE])
    info = decode_text(buf[offset + ENTRY_INFO_OFFSET : offset + ENTRY_INFO_OFFSET + ENTRY_INFO_SIZE])
    return {
        "pid": pid,
        "uid": uid,
        "hold": hold,
        "mode": mode,
        "attached_wall": attached_wall,
        "last_seq": last_seq,
        "cursor": cursor,
        "frames": frames,
        "dropped": dropped,
        "held": held,
        "flags": flags,
        "fps": fps,
        "last_frame_wall": last_frame_wall,
        "generation": generation,
        "name": name,
        "info": info,
    }


def changes(control: Any, layout: RingLayout) -> bytes:
    """The change bytes of every entry, with the growth request before them, to compare with
    the copy taken at the last rescan."""
    return control[GROW_REQUEST_OFFSET : CHANGES_OFFSET + layout.table_size]


def note_change(control: Any, index: int) -> None:
    """Entry ``index`` attached, detached or changed mode: tell the producer to rescan.

    Only the entry's own reader writes its byte, so the increment cannot be lost to a concurrent
    one (a shared counter could: read-modify-write in shared memory is not atomic).
    """
    offset = CHANGES_OFFSET + index
    control[offset] = (control[offset] + 1) & 0xFF


def remove_listener_queue(control: Any, layout: RingLayout, stream: str, epoch: int, index: int) -> None:
    """Remove the trigger queue the reader last in entry ``index`` listened on, if it did.

    Queues are named after their entry, so they can be found without listing /dev/mqueue (which
    is not mounted everywhere): a killed listener's queue goes when the next reader takes its
    entry, or when its segment is removed.
    """
    offset = layout.entry(index)
    if ENTRY_FLAGS.unpack_from(control, offset + ENTRY_FLAGS_OFFSET)[0] & FLAG_TRIGGERS:
        (generation,) = ENTRY_GENERATION.unpack_from(control, offset + ENTRY_GENERATION_OFFSET)
        try:
            posix_ipc.unlink_message_queue(trigger_queue_name(stream, epoch, index, generation))
        except posix_ipc.Error:
            pass  # closed cleanly by its listener already


def remove_listener_queues(control: Any, layout: RingLayout, stream: str, epoch: int) -> None:
    """Remove the trigger queues of every entry of a segment that is going away. Listeners still
    alive move to a queue of their new entry when they attach to the next segment."""
    for index in range(layout.table_size):
        remove_listener_queue(control, layout, stream, epoch, index)
