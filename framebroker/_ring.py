"""The ring protocol: how one producer and many readers share frames without waiting on each other.

Byte layout: ``_layout.py``. Lock primitives: ``_locks.py``. The reader table: ``_table.py``.
This docstring is the contract between ``_publisher.py`` (the producer side) and
``_reader.py`` with ``_attachment.py`` (the reader side). The per-frame steps below exist twice,
on the same bytes: in Python in those files, and compiled in ``_fastpath.c`` (one call per frame
on each side: ``ReaderPath.take``/``release``/``wait``, ``ProducerPath.commit``); ``_fast.py``
chooses. Either kind of producer serves either kind of reader.

Actors and who writes what
--------------------------
* The **producer** (one ``Publisher``; the daemon uses one) writes the header's live fields,
  every slot's pixels and metadata record, and the seq -> slot map.
* Each **reader** writes only its own reader-table entry (identity, mode, progress, stats) and
  its own byte of the header's change bytes.
* ``framebroker status`` writes nothing; it maps the control area read-only.

Locks (OFD byte-range locks on the segment file, one byte each, never waited for on the frame path)
--------------------------------------------------------------------------------------------------
* ``LOCK_OWNER``: held exclusively by the producer for its whole life. Free means the daemon is
  dead: a new daemon may take the stream over, readers start looking for the new segment.
* ``LOCK_SLOT_BASE + k``: a reader holds a *shared* lock on slot k for as long as it holds a frame
  from it (the **lease**). The producer takes an *exclusive* lock on a slot while it writes it.
* ``LOCK_ENTRY_BASE + i``: a reader holds it exclusively while attached. Free means entry i is
  unused or its reader is dead; the kernel drops it when the process dies, however it dies.
* ``LOCK_TOKEN_BASE + t``, for t below ``slot_count - 2``: the slot budget, one token per frame a
  reader may hold. A reader takes ``hold`` of them exclusively when it attaches and keeps them
  while attached. The producer never touches them.

Every lock is taken with a non-blocking try, by everyone: nobody ever waits for a lock, so a
process frozen (SIGSTOP) or killed while holding some pins only what it holds.

The mappings of a segment are made through another open file description than the one that
holds the locks (``Segment.map``): a frame view that outlives its Reader keeps the mapping alive,
and must not keep the reader's locks alive with it.

Attaching (reader)
------------------
1. Take ``hold`` token locks (try each; if fewer are free, give them back, pause a few
   milliseconds and try again twice, then fail with ``CapacityError``). Tokens are what makes the
   slot budget exact without a critical section: two readers attaching at once can only ever
   each take what the kernel gave them.
2. Take a free entry lock (one is always free once the tokens are held: each attached reader
   holds at least one token). Write the entry, identity (pid) last, then add one to the entry's
   change byte.
   A reader that waits on the wake word (see "Wake-ups") says so in its entry's flags
   (``FLAG_FUTEX``), written before the identity.
3. Open the entry's wake-up semaphore. Detaching reverses this: clear the identity, close the
   locking descriptor (entry, tokens and leases go at once), add one to the change byte.

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
5. Compare the change bytes with the copy taken at the last rescan; if any differs, rescan the
   reader table (``_table.live_entries``): whom to wake, which readers are ordered.
6. Wake the readers: if any waits on the wake word, add one to it and make one ``FUTEX_WAKE``
   for all of them; post the semaphore of each other reader (unless a post is already pending).
   Bookkeeping nobody waits for (slot recency, the slow counters) comes after.

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

The compiled path (``_fastpath.c``) rests on the same two system calls and adds what C can say
and Python cannot. Before its unlock it issues ``__atomic_thread_fence(__ATOMIC_RELEASE)`` and
after a successful lock ``__atomic_thread_fence(__ATOMIC_ACQUIRE)``: on x86 these only keep the
compiler from moving the record's stores below the call or its loads above it (the kernel's
spin_unlock/spin_lock order the hardware), on aarch64 they are also ``dmb ish``/``dmb ishld``,
barriers the kernel's release and acquire already imply. It stores HEAD's ``newest_seq`` last,
with ``__ATOMIC_RELEASE``, after the map entry, the slot and the state, and readers load it with
``__ATOMIC_ACQUIRE`` before those: a reader that sees the new seq sees the slot that goes with it,
which makes the hint right more often; correctness still comes from the record under the lock.
Frames larger than the core's L2 cache are copied in with non-temporal stores on x86-64
(``copy_frame``), which x86 does not order like other stores: an ``sfence`` follows them, before
the record and the unlock.

Why the producer never waits
----------------------------
Readers never hold anything the producer needs to proceed: the producer only *tries* slot locks,
and each attached reader leases at most ``hold`` slots, as many as the tokens it holds (default 1;
there are ``slot_count - 2`` tokens). So with every reader frozen at its worst moment, at most
``slot_count - 2`` slots are leased, the newest frame's slot is one more, and at least one slot
(the one the producer locked ahead, or another) is always free to write. A reader frozen (SIGSTOP) or killed mid-lease pins only its own budget; a killed one's
locks vanish with it.

Wake-ups
--------
Readers wait in one of two ways, and the producer wakes both kinds every frame:

* **The wake word** (``WAKE_OFFSET``, a 32-bit word in the header's live area): compiled readers
  sleep in ``FUTEX_WAIT`` on it, and flag their entry ``FLAG_FUTEX``. When its rescan found such
  readers, the producer adds one to the word after storing HEAD and calls ``FUTEX_WAKE`` once
  with no limit on the count: one system call for all of them, however many.
  The futex is a shared one (no ``FUTEX_PRIVATE_FLAG``): the word lives in a mapping of
  /dev/shm, and the kernel keys it by the file and the offset, the same in every process. A
  reader reads the word, then HEAD; it sleeps only if HEAD shows nothing new, and then only while
  the word still holds the value it read, which the kernel checks under its own lock: a frame
  published after the reader's HEAD read has already changed the word, so the reader does not
  sleep, or comes after the reader is queued, so ``FUTEX_WAKE`` finds it. A pure-Python producer
  does the same through ``ctypes`` (``syscall(SYS_futex)``, ``_fast.py``); where that system
  call's number is not known, compiled readers use semaphores instead.
* **A semaphore per reader-table entry**, created by the producer: pure-Python readers sleep in
  ``sem_timedwait``; the producer posts after step 5, unless a post is already pending
  (``sem_getvalue`` > 0): that keeps the count bounded for readers that never wait and saves a
  futex wake per frame for readers that are busy. A pending post always reaches a reader that
  goes on to wait, and the reader checks ``newest_seq`` after every wake-up.

Why one broadcast: one post per reader makes the producer's cost grow with its readers. Measured
here (1080p at 30 fps, a compiled producer, the CPU time of its commit, 1 against 16 readers in
``next()``): about +2 us per reader with the broadcast, where the kernel's wake-up of each
sleeper is the only per-reader work, against +4 to +5 us per reader posting each reader's
semaphore, from C or from Python. The wall time of a commit grows faster either way (10 to 16 us
per reader on 2 cores), because the readers it wakes preempt it; that part is the readers' own
work, not the producer's. Waking one reader and letting each woken reader wake the next would
make the producer's cost flat, but a reader stopped (SIGSTOP) or killed between its wake-up and
passing it on would leave the others asleep, which invariant 3 forbids.

A reader that has just attached must be woken by the very next frame: it writes its change byte
(attaching, step 2) before it first reads HEAD, and the producer reads the change bytes after it
stores HEAD and before it wakes anyone (steps 4-6). Either the reader's HEAD read sees the new
frame, or the producer's read of the change bytes sees the reader and wakes it. Each byte has one
writer, so no change can be lost to a concurrent one; the producer keeps the whole run of bytes
it saw and rescans when any byte differs.

That is a store followed by a load on each side, which only a full fence orders. The compiled
path has one on each side: ``__atomic_thread_fence(__ATOMIC_SEQ_CST)`` in ``ProducerPath.commit``
between the HEAD store and the change bytes, and in ``ReaderPath``'s constructor, which attaching
calls after the change byte is written and before HEAD is first read (``mfence`` on x86, ``dmb
ish`` on aarch64). The wake word is stored with ``__ATOMIC_RELEASE`` after HEAD and loaded with
``__ATOMIC_ACQUIRE`` before it, so a reader that sees the word move sees the frame. The pure-Python
path has no fence to issue; what stands in for one is distance: the reader makes system calls
between its store and its load (opening the semaphores), and the producer reads the change bytes
and the semaphores' values hundreds of instructions after storing ``newest_seq``. Had a store not
drained by then, the cost would be one late wake-up, at the next frame or the liveness step, never
a lost or torn frame. Readers also wake every ``LIVENESS_STEP`` seconds while idle to check that
the daemon is alive, which costs a few microseconds, not a busy loop.

Moving to a new segment (larger frames, more slots, back to fewer)
------------------------------------------------------------------
The producer never resizes a segment in place. It makes a new one under a draft name (for a
growing ring, in a thread, so reserving it never delays a frame), links it over the stream's name
between two frames, writes its HEAD with ``newest_seq`` going on from the old one and the slot
``NO_FRAME`` (nothing to lease yet: readers wait, they do not retry), then sets the old segment's
state to ``replaced`` and posts its readers. A reader that sees ``replaced`` first reads what is
left of the old segment in ordered mode (nothing writes it any more, so those frames are final),
then attaches to the new one and goes on with the next seq; frames it holds from the old one
stay valid for as long as it holds them.

A growable ring (``--slots auto``) moves when a reader asks: a reader that finds no free token
writes a growth request (``GROW_REQUEST``, just before the change bytes, so the producer reads
both as one run) and polls the old segment's state for a frame period or two. The producer
answers between two frames: it moves to a ring large enough, or, past its ``max_shm``, writes
the refused request in ``GROWTH`` and the reader raises ``CapacityError``.

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

# How often an idle reader wakes to check that the daemon is alive (seconds).
LIVENESS_STEP = 0.5
# The same while the daemon is gone and the reader looks for its successor.
ORPHAN_STEP = 0.1
# Posts a reader's wake-up semaphore may accumulate (see "Wake-ups" above; _fastpath.c too).
MAX_PENDING_WAKES = 1
