"""Event triggers: any process tells the stream's listeners (the recorder's clip writer) "now".

A listener is a Reader that called ``reader.triggers()``: that creates a POSIX message queue named
after the listener's reader-table entry, ``/framebroker.STREAM@trig.EPOCH.ENTRY.GENERATION``, and
sets a flag in that entry. ``trigger()`` walks the live entries with the flag (liveness from their
OFD entry locks, as for status) and puts one small JSON message in each listener's queue, without
waiting: a full queue (a listener that stopped taking triggers) is an error, not a stall. Nothing
crosses a network port.

Naming the queue after the entry gives each listener its own queue (two in one process included)
and ties its liveness to the entry's lock: a queue whose entry is no longer held by the same
generation of reader is stale, whoever made it, and pid reuse cannot make it look alive. When the
daemon restarts, the listener's Reader moves to the new segment and its inbox moves to a queue
named after the new entry.

The queue has the permissions of the stream's segment (0600, or 0660 for the daemon's --group),
so whoever may read the stream may trigger it, and nobody else.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import posix_ipc

from ._errors import ClosedError, StreamNotFound, TriggerError
from ._layout import FLAG_TRIGGERS, LOCK_ENTRY_BASE, trigger_queue_name, trigger_queue_prefix, validate_stream_name
from ._segment import open_segment
from ._table import live_entries, read_entry

if TYPE_CHECKING:
    from ._attachment import Attachment
    from ._frame import Frame

MQUEUE_DIR = "/dev/mqueue"
MESSAGE_SIZE = 1024
# Linux lets an unprivileged process create queues of at most 10 messages (fs.mqueue.msg_max).
QUEUE_DEPTH = 10
MAX_LABEL = 64
# How long one wait in receive() lasts at most, so an inbox that moved to a new queue (daemon
# restart) is picked up by a thread already waiting.
RECEIVE_STEP = 0.25


def _parse_queue_file(stream: str, file_name: str) -> Optional[Tuple[int, int, int]]:
    """(epoch, entry, generation) of a queue file in /dev/mqueue, or None if not one of ours."""
    prefix = trigger_queue_prefix(stream)[1:]
    if not file_name.startswith(prefix):
        return None
    parts = file_name[len(prefix) :].split(".")
    if len(parts) != 3:
        return None
    try:
        return int(parts[0], 16), int(parts[1]), int(parts[2])
    except ValueError:
        return None


@dataclass(frozen=True)
class Trigger:
    """One trigger as a listener receives it.

    ``timestamp_ns`` is the moment it refers to on CLOCK_MONOTONIC (the frame's capture time when
    sent with a frame, else the sending moment); ``seq`` the frame it refers to, if the sender
    named one; ``post_roll`` how many seconds after it the clip should go on (None: the
    listener's own setting).
    """

    label: str
    post_roll: Optional[float]
    timestamp_ns: int
    wall_time: float
    seq: Optional[int]
    sender_pid: int

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "post_roll": self.post_roll,
            "timestamp_ns": self.timestamp_ns,
            "wall_time": self.wall_time,
            "seq": self.seq,
            "sender_pid": self.sender_pid,
        }


def _check_label(label: object) -> str:
    if not isinstance(label, str):
        raise TypeError(f"label must be a str, not {type(label).__name__}")
    if len(label) > MAX_LABEL or any(ord(c) < 32 for c in label):
        raise ValueError(f"label must be at most {MAX_LABEL} printable characters, got {label!r}")
    return label


def trigger(
    stream: str,
    label: str = "",
    *,
    post_roll: Optional[float] = None,
    frame: "Optional[Frame]" = None,
    seq: Optional[int] = None,
    timestamp_ns: Optional[int] = None,
) -> int:
    """Tell every trigger listener of ``stream`` (a recorder with ``--clips``) that something
    happened; returns how many listeners got it.

    The moment is ``frame``'s (its seq and capture time), else ``seq`` and/or ``timestamp_ns``
    (CLOCK_MONOTONIC), else now. The clip goes on ``post_roll`` seconds after it (default: the
    recorder's ``--post-roll``). Raises
    ``TriggerError`` when no listener is attached (or none takes triggers), ``StreamNotFound``
    when nothing serves the stream.
    """
    validate_stream_name(stream)
    label = _check_label(label)
    if post_roll is not None and (isinstance(post_roll, bool) or not isinstance(post_roll, (int, float)) or not 0 <= post_roll <= 3600):
        raise ValueError(f"post_roll must be between 0 and 3600 seconds (or None), got {post_roll!r}")
    if frame is not None:
        seq, timestamp_ns = frame.seq, frame.timestamp_ns
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise ValueError(f"seq must be a frame number >= 1, got {seq!r}")
    now_ns = time.monotonic_ns()
    if timestamp_ns is None:
        timestamp_ns = now_ns
    wall = time.time() - (now_ns - int(timestamp_ns)) / 1e9
    message = json.dumps(
        {
            "v": 1,
            "label": label,
            "post_roll": None if post_roll is None else float(post_roll),
            "timestamp_ns": int(timestamp_ns),
            "wall_time": wall,
            "seq": seq,
            "sender_pid": os.getpid(),
        }
    ).encode()
    listeners = _listeners(stream)
    if not listeners:
        raise TriggerError(
            f"nothing on stream {stream!r} listens for triggers: start a recorder with clips, "
            f"e.g. framebroker record {stream} --clips DIR"
        )
    delivered = 0
    problems = []
    for pid, name in listeners:
        try:
            queue = posix_ipc.MessageQueue(name)
        except posix_ipc.ExistentialError:
            problems.append(f"pid {pid} has no trigger queue")
            continue
        except posix_ipc.PermissionsError:
            problems.append(f"pid {pid}: permission denied (ask for --group access to the stream)")
            continue
        try:
            queue.send(message, timeout=0)
            delivered += 1
        except posix_ipc.BusyError:
            problems.append(f"pid {pid} is not taking triggers (its queue is full)")
        finally:
            queue.close()
    if not delivered:
        raise TriggerError(f"trigger for stream {stream!r} not delivered: {'; '.join(problems)}")
    return delivered


def _listeners(stream: str) -> List[Tuple[int, str]]:
    """(pid, queue name) of every live listener of the stream."""
    segment = open_segment(stream, for_status=True)
    try:
        segment.map(control_writable=False, data_access=None)
        found = []
        for index, offset in live_entries(segment.locks, segment.layout, segment.control):
            entry = read_entry(segment.control, offset)
            if entry["flags"] & FLAG_TRIGGERS:
                found.append((entry["pid"], trigger_queue_name(stream, segment.header.epoch, index, entry["generation"])))
        return found
    finally:
        segment.close()


def remove_stale_queues(stream: str, keep: str = "") -> List[str]:
    """Remove the trigger queues of ``stream`` whose listener is gone; return their names.

    A queue is live while the stream's current segment has its epoch and its entry is locked by
    the reader generation it names. Any other queue of the stream is stale: its listener died
    (kill -9 leaves it behind), or it moved to a new segment and made a new queue there.
    ``keep`` is never removed (the caller's own new queue).
    """
    try:
        names = os.listdir(MQUEUE_DIR)
    except OSError:
        return []  # /dev/mqueue not mounted: nothing to look at, nothing we can do
    ours = [(entry, _parse_queue_file(stream, entry)) for entry in names]
    ours = [(entry, parsed) for entry, parsed in ours if parsed is not None and "/" + entry != keep]
    if not ours:
        return []
    live = set()
    try:
        segment = open_segment(stream, for_status=True)
    except StreamNotFound:
        segment = None  # nothing serves the stream: no queue of it has a live listener
    except Exception:
        return []  # a segment we may not read or cannot trust: leave everything alone
    if segment is not None:
        try:
            segment.map(control_writable=False, data_access=None)
            epoch = segment.header.epoch
            for index in range(segment.layout.table_size):
                if segment.locks.held_by_other(LOCK_ENTRY_BASE + index):
                    live.add((epoch, index, read_entry(segment.control, segment.layout.entry(index))["generation"]))
        finally:
            segment.close()
    removed = []
    for entry, parsed in ours:
        if parsed not in live:
            try:
                posix_ipc.unlink_message_queue("/" + entry)
                removed.append("/" + entry)
            except posix_ipc.Error:
                pass
    return removed


class TriggerInbox:
    """The receiving end, from ``Reader.triggers()``: ``receive(timeout)`` gives the next Trigger
    (or None after the timeout). ``close()`` removes the queue; safe to call twice. It may be used
    from another thread than the Reader's.

    A note on locking: the Reader's thread moves the inbox to a new queue when the daemon
    restarts (``_rebind``) while another thread may be waiting in ``receive()``. ``_lock`` guards
    which queue is current; a wait runs outside it, on a queue that stays open until the waiting
    thread has left it (``_retired`` queues are closed by ``receive``, or by ``close``).
    """

    _queue: Optional[posix_ipc.MessageQueue] = None

    def __init__(self, attachment: "Attachment", on_close: Optional[Callable[[], None]] = None) -> None:
        if not posix_ipc.MESSAGE_QUEUES_SUPPORTED:
            raise TriggerError("this system has no POSIX message queues, which triggers travel through")
        self.stream = attachment.stream
        self._on_close = on_close
        self._lock = threading.Lock()
        self._retired: List[posix_ipc.MessageQueue] = []
        self._receiving = 0
        self._queue = self._create(attachment)

    @property
    def name(self) -> str:
        """The queue's name (it changes when the daemon restarts)."""
        queue = self._queue
        return queue.name if queue is not None else ""

    def _create(self, attachment: "Attachment") -> posix_ipc.MessageQueue:
        segment = attachment.segment
        name = trigger_queue_name(self.stream, attachment.epoch, attachment.entry, attachment.generation)
        mode = segment.mode & 0o660
        try:
            queue = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=mode, max_messages=QUEUE_DEPTH, max_message_size=MESSAGE_SIZE)
        except (posix_ipc.Error, OSError) as exc:
            raise TriggerError(f"cannot create the trigger queue {name}: {exc}") from None
        # mq_open's mode is reduced by the umask; set it exactly where /dev/mqueue is mounted.
        path = os.path.join(MQUEUE_DIR, name.lstrip("/"))
        try:
            if mode & 0o070:
                os.chown(path, -1, segment.gid)
            os.chmod(path, mode)
        except OSError:
            pass
        remove_stale_queues(self.stream, keep=name)
        return queue

    def _rebind(self, attachment: "Attachment") -> None:
        """The Reader moved to a new segment: listen on a queue named after its new entry."""
        with self._lock:
            old = self._queue
            if old is None:
                return
            self._queue = self._create(attachment)
            _unlink_quietly(old)
            if self._receiving:
                self._retired.append(old)
            else:
                old.close()

    def receive(self, timeout: Optional[float] = None) -> Optional[Trigger]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                queue = self._queue
                if queue is None:
                    raise ClosedError(f"the trigger inbox of stream {self.stream!r} is closed")
                self._receiving += 1
            step = RECEIVE_STEP if deadline is None else max(0.0, min(RECEIVE_STEP, deadline - time.monotonic()))
            try:
                raw, _priority = queue.receive(timeout=step)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                raw = None
            finally:
                with self._lock:
                    self._receiving -= 1
                    if not self._receiving:
                        for retired in self._retired:
                            retired.close()
                        self._retired = []
            if raw is not None:
                return _decode(raw)
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        with self._lock:
            queue, self._queue = self._queue, None
        if queue is None:
            return
        if self._on_close is not None:
            self._on_close()
        _unlink_quietly(queue)
        with self._lock:
            if self._receiving:
                self._retired.append(queue)
                return
        queue.close()

    def __enter__(self) -> "TriggerInbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_quietly(queue: posix_ipc.MessageQueue) -> None:
    try:
        queue.unlink()
    except posix_ipc.ExistentialError:
        pass


def _decode(raw: bytes) -> Optional[Trigger]:
    try:
        data = json.loads(raw)
        return Trigger(
            label=_check_label(str(data.get("label", ""))),
            post_roll=None if data.get("post_roll") is None else float(data["post_roll"]),
            timestamp_ns=int(data["timestamp_ns"]),
            wall_time=float(data["wall_time"]),
            seq=None if data.get("seq") is None else int(data["seq"]),
            sender_pid=int(data.get("sender_pid", 0)),
        )
    except (ValueError, KeyError, TypeError):
        return None  # not a trigger we understand: ignore it rather than stop the listener
