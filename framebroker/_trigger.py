"""Event triggers: any process tells the stream's listeners (the recorder's clip writer) "now".

A listener is a Reader that called ``reader.triggers()``: that creates a POSIX message queue
``/framebroker.STREAM@trig.PID`` and sets a flag in the reader's table entry. ``trigger()`` finds the
live entries with the flag (liveness from their OFD entry locks, as for status) and puts one
small JSON message in each listener's queue, without waiting: a full queue (a listener that stopped
taking triggers) is an error, not a stall. Nothing crosses a network port.

The queue has the permissions of the stream's segment (0600, or 0660 for the daemon's --group),
so whoever may read the stream may trigger it, and nobody else.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import posix_ipc

from ._errors import ClosedError, TriggerError
from ._layout import ENTRY_FLAGS, ENTRY_FLAGS_OFFSET, ENTRY_IDENTITY, FLAG_TRIGGERS, LOCK_ENTRY_BASE, OBJECT_SEPARATOR, SEGMENT_PREFIX, validate_stream_name
from ._segment import open_segment

if TYPE_CHECKING:
    from ._reader import Frame

MQUEUE_DIR = "/dev/mqueue"
MESSAGE_SIZE = 1024
# Linux lets an unprivileged process create queues of at most 10 messages (fs.mqueue.msg_max).
QUEUE_DEPTH = 10
MAX_LABEL = 64


def queue_name(stream: str, pid: int) -> str:
    return f"/{SEGMENT_PREFIX}{stream}{OBJECT_SEPARATOR}trig.{pid}"


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
    listeners = _listener_pids(stream)
    if not listeners:
        raise TriggerError(
            f"nothing on stream {stream!r} listens for triggers: start a recorder with clips, "
            f"e.g. framebroker record {stream} --clips DIR"
        )
    delivered = 0
    problems = []
    for pid in listeners:
        try:
            queue = posix_ipc.MessageQueue(queue_name(stream, pid))
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


def _listener_pids(stream: str) -> list[int]:
    segment = open_segment(stream, for_status=True)
    try:
        segment.map(control_writable=False, data_access=None)
        control = segment.control
        assert control is not None
        pids = []
        for index in range(segment.layout.table_size):
            offset = segment.layout.entry(index)
            (flags,) = ENTRY_FLAGS.unpack_from(control, offset + ENTRY_FLAGS_OFFSET)
            if flags & FLAG_TRIGGERS and segment.locks.held_by_other(LOCK_ENTRY_BASE + index):
                pids.append(ENTRY_IDENTITY.unpack_from(control, offset)[0])
        return pids
    finally:
        segment.close()


def _remove_stale_queues(stream: str) -> None:
    """Remove trigger queues of this stream whose listener process is gone (killed listeners
    cannot remove their own)."""
    prefix = queue_name(stream, 0)[1:-1]  # "framebroker.STREAM@trig."
    try:
        names = os.listdir(MQUEUE_DIR)
    except OSError:
        return  # /dev/mqueue not mounted: nothing to look at, nothing we can do
    for entry in names:
        if not entry.startswith(prefix) or not entry[len(prefix) :].isdigit():
            continue
        try:
            os.kill(int(entry[len(prefix) :]), 0)
        except ProcessLookupError:
            try:
                posix_ipc.unlink_message_queue("/" + entry)
            except posix_ipc.Error:
                pass
        except PermissionError:
            pass  # alive, someone else's


class TriggerInbox:
    """The receiving end, from ``Reader.triggers()``: ``receive(timeout)`` gives the next Trigger
    (or None after the timeout). ``close()`` removes the queue; safe to call twice. It may be used
    from another thread than the Reader's."""

    _queue: Optional[posix_ipc.MessageQueue] = None

    def __init__(self, stream: str, mode: int, gid: int, on_close: Optional[Callable[[], None]] = None) -> None:
        if not posix_ipc.MESSAGE_QUEUES_SUPPORTED:
            raise TriggerError("this system has no POSIX message queues, which triggers travel through")
        self.stream = stream
        self.name = queue_name(stream, os.getpid())
        self._on_close = on_close
        _remove_stale_queues(stream)
        try:
            queue = posix_ipc.MessageQueue(
                self.name, posix_ipc.O_CREAT, mode=mode, max_messages=QUEUE_DEPTH, max_message_size=MESSAGE_SIZE
            )
        except (posix_ipc.Error, OSError) as exc:
            raise TriggerError(f"cannot create the trigger queue {self.name}: {exc}") from None
        self._queue = queue
        # A queue left by an earlier process with our pid may hold its triggers: start empty.
        while True:
            try:
                queue.receive(timeout=0)
            except posix_ipc.BusyError:
                break
        self._apply_permissions(mode, gid)

    def _apply_permissions(self, mode: int, gid: int) -> None:
        # mq_open's mode is reduced by the umask; set it exactly where /dev/mqueue is mounted.
        path = os.path.join(MQUEUE_DIR, self.name.lstrip("/"))
        try:
            if mode & 0o070:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
        except OSError:
            pass

    def receive(self, timeout: Optional[float] = None) -> Optional[Trigger]:
        queue = self._queue
        if queue is None:
            raise ClosedError(f"the trigger inbox of stream {self.stream!r} is closed")
        try:
            raw, _priority = queue.receive(timeout=timeout)
        except posix_ipc.BusyError:
            return None
        except posix_ipc.SignalError:
            return None
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

    def close(self) -> None:
        queue, self._queue = self._queue, None
        if queue is not None:
            if self._on_close is not None:
                self._on_close()
            try:
                queue.unlink()
            except posix_ipc.ExistentialError:
                pass
            queue.close()

    def __enter__(self) -> "TriggerInbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
