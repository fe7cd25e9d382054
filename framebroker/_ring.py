"""The ring protocol: how one producer and many readers share frames without waiting on each other.

Byte layout: ``_layout.py``. Lock primitives: ``_locks.py``. This docstring is the contract
between ``_publisher.py`` (the producer side) and ``_reader.py`` (the reader side).

Actors and who writes what
--------------------------
* The **producer** (one ``Publisher``; the daemon uses one) writes the header's live fields,
  every slot's pixels and metadata record, and the seq -> slot map.
* Each **reader** writes only its own reader-table entry (identity, mode, progress, stats).
* ``framebroker status`` writes nothing; it maps the control area read-only.

Locks (OFD byte-range locks on the segment file, one byte each, never waited for on the frame path)
--------------------------------------------------------------------------------------------------
* ``LOCK_OWNER``: held exclusively by the producer for its whole life. Free means the daemon is
  dead: a new daemon may take the stream over, readers start looking for the new segment.
* ``LOCK_SLOT_BASE + k``: a reader holds a *shared* lock on slot k for as long as it holds a frame
  from it (the **lease**). The producer takes an *exclusive* lock on a slot while it writes it.
* ``LOCK_ENTRY_BASE + i``: a reader holds it exclusively while attached. Free means entry i is
  unused or its reader is dead; the kernel drops it when the process dies, however it dies.
* ``LOCK_ATTACH``: serialises attaching readers while they check the slot budget and claim an
  entry. The producer never touches it.

Publishing frame ``s`` (producer)
---------------------------------
1. Pick a slot ``k``: never the newest frame's slot; by preference the most recently written slot
   that no ordered reader still needs (its bytes are likely still in cache, which makes the copy
   faster than into a cold slot), else the oldest slot ordered readers still need.
   ``try_exclusive(LOCK_SLOT_BASE + k)``; if a reader holds a lease on it, try the next slot.
   Never wait: the slot budget (below) guarantees a free slot exists. This step is done right
   after publishing the previous frame (the producer holds the next slot's lock between frames),
   because after a frame period of idling the same system call costs ten times as much.
2. Write the pixels into slot ``k``, then its metadata record (seq ``s``, timestamps, geometry).
3. ``unlock(LOCK_SLOT_BASE + k)``.
4. Store ``map[s % map_size] = k``, then the header's HEAD (``newest_seq = s``, its slot ``k``,
   the state) in one write.
5. Post each attached reader's wake-up semaphore (unless a post is already pending). Bookkeeping
   nobody waits for (slot recency, the slow counters, the reader list) comes after.

Leasing a frame (reader)
------------------------
1. Read HEAD (``newest_seq``, its slot ``k``, the state) in one read; in ordered mode want
   ``cursor + 1`` and look its slot up in the map. Both are hints: nothing below trusts them.
2. ``try_shared(LOCK_SLOT_BASE + k)``. If that fails the producer is rewriting the slot: go to 1.
3. Under the lock, read the slot's metadata. If its seq is not the one wanted, the slot was reused:
   unlock and go to 1 (ordered mode: take the oldest newer frame and count the gap as dropped).
4. Hand out a read-only numpy view of slot ``k``. The frame is now immutable for as long as the
   lock is held, because the producer cannot take the exclusive lock it needs to write.
5. Release = ``unlock(LOCK_SLOT_BASE + k)``: explicitly, by closing the Reader, by the kernel when
   the process dies, or by asking for another frame beyond the hold budget. ``next()`` and
   ``ordered()`` release *before* they wait, so readers that wait for the next frame hold
   nothing when it is published and the producer can keep rewriting the same two slots.

What orders the frame bytes before the sequence number that publishes them (x86 and ARM)
-----------------------------------------------------------------------------------------
The sequence number a reader trusts is the one in the slot's metadata record, read while it holds
the slot's shared lock. The producer stores pixels and record *before* its ``fcntl`` unlock
(step 3); the reader loads them *after* its ``fcntl`` lock succeeds (step 2). Both calls enter the
kernel's lock code, which serialises them under the inode's ``flc_lock`` spinlock: the unlock's
spin_unlock is a release and the lock's spin_lock an acquire, so every store the producer made
before unlocking happens-before every load the reader makes after locking. That holds on x86 (TSO)
and on aarch64 (where the kernel's release/acquire emit the barriers), and it covers both the
pixels and the record. In the other direction, a reader's loads of a frame happen-before its
unlock, which happens-before the producer's exclusive lock, which precedes the overwrite: a slow
reader can never see a frame change under it.

``newest_seq`` and the map are plain stores read without locks. A reader that sees them early
(before the pixels are visible) or stale only wastes an attempt: step 3 rejects any slot whose
record does not carry the wanted seq, and the record is read under the lock.

Why the producer never waits
----------------------------
Readers never hold anything the producer needs to proceed: the producer only *tries* slot locks,
and each attached reader reserves at most ``hold`` slots (default 1, checked at attach time against
``slot_count - 2``). So with every reader frozen at its worst moment, at most ``slot_count - 2``
slots are leased, the newest frame's slot is one more, and at least one slot (the one the
producer locked ahead, or another) is always free to write. A reader frozen (SIGSTOP) or killed mid-lease pins only its own budget; a killed one's
locks vanish with it.

Wake-ups
--------
One counting semaphore per reader-table entry, created by the producer. A reader that finds
nothing new sleeps in ``sem_timedwait``; the producer posts after step 4, unless a post is already
pending (``sem_getvalue`` > 0): that keeps the count bounded for readers that never wait and
saves a futex wake per frame for readers that are busy. A pending post always reaches a reader
that goes on to wait, and the reader checks ``newest_seq`` after every wake-up. (The producer reads
the semaphore's value long after storing ``newest_seq``, hundreds of instructions later: had the
store not drained by then, the cost would be one late wake-up, at the next frame or the liveness
step, never a lost frame.) Readers also wake every ``LIVENESS_STEP`` seconds while idle to check
that the daemon is alive, which costs a few microseconds, not a busy loop.

Daemon death and restart
------------------------
A reader checks ``LOCK_OWNER`` when a wait times out, and, so that readers which never wait
(``latest()`` always finds the last frame) notice too, whenever ``newest_seq`` has not moved for
``LIVENESS_STEP``. It reads the header state on every call. A reader that finds the owner lock
free (or the state ``replaced``) keeps its current mapping (frames it holds stay valid: nothing
writes that segment any more), stops handing out frames from it, and looks for a new segment under
the stream's name every ``ORPHAN_STEP``. When a live one appears it attaches to it and goes on; its
sequence numbers start again from 1. A finite source that ends sets the state ``ended``: readers
get what is left, then ``SourceEnded``.
"""

from __future__ import annotations

from ._layout import (
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
    decode_text,
)

# How often an idle reader wakes to check that the daemon is alive (seconds).
LIVENESS_STEP = 0.5
# The same while the daemon is gone and the reader looks for its successor.
ORPHAN_STEP = 0.1
# Posts a reader's wake-up semaphore may accumulate (see "Wake-ups" above).
MAX_PENDING_WAKES = 1


def read_entry(buf: "bytes | memoryview", offset: int) -> dict:
    """Decode one reader-table entry (for status and the producer's bookkeeping)."""
    pid, uid, hold, mode, attached_wall = ENTRY_IDENTITY.unpack_from(buf, offset)
    last_seq, cursor, frames, dropped = ENTRY_PROGRESS.unpack_from(buf, offset + ENTRY_PROGRESS_OFFSET)
    (held,) = ENTRY_HELD.unpack_from(buf, offset + ENTRY_HELD_OFFSET)
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
        "fps": fps,
        "last_frame_wall": last_frame_wall,
        "generation": generation,
        "name": name,
        "info": info,
    }
