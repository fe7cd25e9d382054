"""Results: what each model found on each frame, shared with every process, joined by ``seq``.

A model's results on a stream travel through a ring of their own, ``/dev/shm/framebroker.
STREAM@res.MODEL``, with the layout and the protocol of a frame ring (``_ring.py``): the same
leases, the same reader table and wake-ups, the same owner lock. What differs is the payload and
the numbering:

* A slot holds one **record**: a 32-byte header (the result's number since the writer started,
  when it was published, the stream's epoch) and the result as compact JSON, at most
  ``MAX_RESULT_BYTES``. The slot's metadata record says how many bytes are used.
* A record's ``seq`` is the **frame's** seq, so ``map[seq]`` finds the result of a frame and
  ``get(seq)`` answers exactly. Results are published in frame order; a frame a model skipped
  simply has no record (seqs in the ring are increasing, not consecutive).
* Readers copy a record out under its lease and release it at once: nobody holds a result, a
  reader frozen mid-copy pins one slot for microseconds' worth of work, never the writer.

So everything the frame ring guarantees holds here without a second implementation: a writer
killed at any instruction never leaves a torn record (a record is visible only after the
unlock that publishes it); readers never block the writer; one writer per (stream, model), a
second one refused naming the pid, a dead one taken over by the next; 0600, or 0660 for the
stream's group, like the stream itself.

A daemon restart numbers frames from 1 again. The ring belongs to one daemon's life (its
*epoch*): when the writer publishes the first result for a new daemon, it moves to a new ring
under the same name, as a stream does when its frames grow, and readers follow by themselves.
"""

from __future__ import annotations

import collections
import fcntl
import json
import math
import json.encoder
import json.scanner
import os
import struct
import time
from types import TracebackType
from typing import Any, Deque, Dict, Iterator, List, NamedTuple, Optional, Union

import numpy as np

from ._attachment import Attachment
from ._errors import ClosedError, FrameTimeout, ModelNotFound, ResultExpired, StreamBusy, StreamNotFound
from ._frame import Frame, check_timeout
from ._layout import (
    DEALT_WITH,
    DEALT_WITH_OFFSET,
    EXTRA_OFFSET,
    EXTRA_SIZE,
    HEAD,
    LIVE_OFFSET,
    LOCK_SLOT_BASE,
    MAP_ENTRY,
    META,
    OBJECT_SEPARATOR,
    RESULTS_INFIX,
    SEGMENT_PREFIX,
    SHM_DIR,
    STATE,
    STATE_OFFSET,
    PixelFormat,
    ReaderMode,
    StreamState,
    decode_text,
    results_ring_name,
    validate_model_name,
    validate_stream_name,
)
from ._lifecycle import Lifecycle
from ._locks import _F_OFD_SETLK as _SETLK
from ._locks import _flock as _flock_arg
from ._publisher import Publisher
from ._reader import Reader
from ._segment import Segment, open_segment

MAX_RESULT_BYTES = 64 * 1024
# number, published_ns (CLOCK_MONOTONIC), the stream's epoch, length of the JSON that follows.
RECORD = struct.Struct("<QQQI4x")
RECORD_CAPACITY = RECORD.size + MAX_RESULT_BYTES
# A slot, as the frame shape the ring is made with (rows of 4 KiB: a row may not pass 65536).
_RING_SHAPE = (-(-RECORD_CAPACITY // 4096), 4096)
# Results kept: about a second at 30 fps, for get(seq) of a frame a little behind. Each slot is
# a record's worth of /dev/shm (68 KiB), so a ring is about 2 MiB.
DEFAULT_KEEP = 32
# How often the writer looks again at which daemon serves the stream, when it publishes by seq.
_LATENCY_WINDOW = 512  # results the writer's p50/p99 latency in status is taken over

_unpack_meta = META.unpack_from
_unpack_head = HEAD.unpack_from
_unpack_record = RECORD.unpack_from
_unpack_map = MAP_ENTRY.unpack_from
_fcntl = fcntl.fcntl


class Result(NamedTuple):
    """One model's result for one frame.

    ``seq``, ``timestamp_ns`` and ``wall_time`` are the frame's (its capture time); ``published_ns``
    is when the model published it, on the same CLOCK_MONOTONIC, so ``latency_ns`` is capture to
    result. ``data`` is the dict the model published; detections follow the convention
    ``{"objects": [{"box": [x, y, w, h], "label": str, "score": float, "id": int}]}`` in pixels of
    the frame they were computed on. ``dropped`` counts this model's results the reader missed
    just before this one (iteration only; results are dropped when a reader falls more than the
    ring's length behind). ``number`` counts the writer's results from 1. A Result is immutable
    (a named tuple: made by one C call on the read path).
    """

    stream: str
    model: str
    seq: int
    timestamp_ns: int
    wall_time: float
    published_ns: int
    data: Dict[str, Any]
    number: int
    dropped: int = 0

    @property
    def latency_ns(self) -> int:
        return self.published_ns - self.timestamp_ns

    @property
    def objects(self) -> List[Dict[str, Any]]:
        """``data["objects"]``, or an empty list."""
        objects = self.data.get("objects")
        return objects if isinstance(objects, list) else []


_new_result = tuple.__new__  # Result(...) without a Python-level __new__: the read path is short


def _json_default(value: Any) -> Any:
    # What models hand over most: numpy scalars and arrays (boxes, scores).
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# The C encoder and scanner behind json.dumps/json.loads, called directly: the Python layers
# around them cost more than the work on a cold cache (a model publishes once per frame).
_c_encode = (
    json.encoder.c_make_encoder(None, _json_default, json.encoder.encode_basestring, None, ":", ",", False, False, False)
    if json.encoder.c_make_encoder is not None
    else None
)
_c_scan = json.scanner.c_make_scanner(json.JSONDecoder()) if json.scanner.c_make_scanner is not None else None


def encode_result(data: object) -> bytes:
    """``data`` as compact JSON; TypeError/ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise TypeError(f"a result is a dict (JSON object), not {type(data).__name__}")
    try:
        if _c_encode is not None:
            payload = "".join(_c_encode(data, 0)).encode("utf-8")
        else:
            payload = json.dumps(data, separators=(",", ":"), allow_nan=False, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"result data must be JSON-serialisable (numbers finite): {exc}") from None
    except RecursionError:
        raise ValueError("result data must be JSON-serialisable: it refers to itself") from None
    if len(payload) > MAX_RESULT_BYTES:
        raise ValueError(
            f"result too large: {len(payload)} bytes encoded, at most {MAX_RESULT_BYTES} (64 KiB); "
            "publish less (boxes, not masks), or keep large data elsewhere and publish where it is"
        )
    return payload


def _decode(raw: bytes) -> Dict[str, Any]:
    text = raw.decode("utf-8")
    return _c_scan(text, 0)[0] if _c_scan is not None else json.loads(text)  # type: ignore[no-any-return]


class _StreamWatch:
    """The stream's current segment, mapped read-only: which daemon serves it (its epoch), and
    what its frames' capture times were (for results published by seq alone)."""

    _segment: Optional[Segment] = None

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self._open()

    def _open(self) -> None:
        segment = open_segment(self.stream, for_status=True)
        try:
            segment.map(control_writable=False, data_access=None)
        except BaseException:
            segment.close()
            raise
        self._segment = segment

    @property
    def segment(self) -> Segment:
        """The current segment; reopened when the stream moved to a new one."""
        segment = self._segment
        assert segment is not None
        if STATE.unpack_from(segment.control, STATE_OFFSET)[0] == StreamState.REPLACED or not segment.still_named():
            try:
                fresh = open_segment(self.stream, for_status=True)
            except StreamNotFound:
                return segment  # between two daemons: the last one's view is all there is
            fresh.map(control_writable=False, data_access=None)
            segment.close()
            self._segment = segment = fresh
        return segment

    def capture_time(self, seq: int) -> Optional[tuple]:
        """(timestamp_ns, wall_time) of frame ``seq`` if it is still in the ring."""
        segment = self.segment
        layout, control = segment.layout, segment.control
        for slot in range(layout.slot_count):
            found, timestamp_ns, wall = _unpack_meta(control, layout.meta(slot))[:3]  # type: ignore[arg-type]
            if found == seq:
                return timestamp_ns, wall
        return None

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None


class _RecordRing(Publisher):
    """The producer side of a results ring: a Publisher whose slots hold records."""

    def __init__(self, ring: str, gid: Optional[int], keep: int, extra: Dict[str, Any]) -> None:
        self._open(ring, _RING_SHAPE, 0.0, "gray", keep + 2, gid, "", None, extra)

    def _rebuild_views(self) -> None:
        super()._rebuild_views()
        self._flat = [view.reshape(-1) for view in self._views]

    def _lock_a_slot(self) -> int:
        # Always the least recently written slot: the ring keeps as many results as it has
        # slots, for get(seq) of frames a little behind. (A frame ring prefers its warm slots,
        # since copying a large frame into a cold one costs; a record is small.)
        newest = self._newest_slot
        try_exclusive = self._locks.try_exclusive
        for slot in reversed(self._recency):
            if slot != newest and try_exclusive(LOCK_SLOT_BASE + slot):
                return slot
        return -1

    def write(self, seq: int, timestamp_ns: int, wall: float, number: int, stream_epoch: int, payload: bytes) -> int:
        slot = self._claim_slot()
        if slot < 0:
            self._publisher_drops += 1  # every slot leased at once: ruled out by the slot budget
            return -1
        used = RECORD.size + len(payload)
        flat = self._flat[slot]
        RECORD.pack_into(flat, 0, number, time.monotonic_ns(), stream_epoch, len(payload))
        flat[RECORD.size : used] = np.frombuffer(payload, np.uint8)
        return self._commit(slot, timestamp_ns, seq, wall, (1, used, 1, PixelFormat.GRAY, used))

    def skip(self, seq: int) -> None:
        """The model is done with every frame up to ``seq``: say so, and wake waiting readers."""
        DEALT_WITH.pack_into(self._control, DEALT_WITH_OFFSET, seq)
        self._wake_readers()

    def renew(self, extra: Dict[str, Any]) -> None:
        """Move to a fresh ring under the same name (a new daemon serves the stream)."""
        self._extra.update(extra)
        self._seq = 0
        self._replace_segment(self._capacity, self._shape, self._format)


class ResultWriter:
    """Publishes one model's results on a stream: ``ResultWriter("cam0", "faces")``.

    ``publish(frame, {"objects": [...]})`` joins the result to that frame (its seq and capture
    time); ``publish(seq, data, timestamp_ns=...)`` to a frame known by number (without
    ``timestamp_ns`` the capture time is looked up in the stream's ring, where the frame must
    still be). Results go in frame order: a seq at or below the last one published is refused.
    ``data`` is a JSON-serialisable dict (numpy numbers and arrays are converted) of at most 64
    KiB encoded; larger is a ``ValueError`` naming the size.

    One writer per (stream, model): a second one gets ``StreamBusy`` naming the writer's pid; a
    dead writer's ring is taken over. The ring has the stream's permissions (0600, or 0660 for
    the daemon's ``--group``). ``close()`` removes it. The stream must be served when the writer
    starts (``wait=S`` waits up to S seconds for it); a daemon that restarts later is followed.
    Not thread-safe: publish from one thread.
    """

    _ring: Optional[_RecordRing] = None
    _watch: Optional[_StreamWatch] = None
    _state = Lifecycle.CLOSED

    def __init__(self, stream: str, model: str, *, keep: int = DEFAULT_KEEP, wait: float = 0.0) -> None:
        self._stream = validate_stream_name(stream)
        self._model = validate_model_name(model)
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise TypeError(f"keep must be an int, not {type(keep).__name__}")
        if not 1 <= keep <= 250:
            raise ValueError(f"keep must be between 1 and 250 results, got {keep}")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
        deadline = time.monotonic() + wait
        while True:
            try:
                self._watch = _StreamWatch(self._stream)
                break
            except StreamNotFound:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        try:
            stream_segment = self._watch.segment
            self._stream_epoch = stream_segment.header.epoch
            gid = stream_segment.gid if stream_segment.mode & 0o070 else None
            extra = {"stream": self._stream, "model": self._model, "stream_epoch": self._stream_epoch, "results": 0}
            try:
                self._ring = _RecordRing(results_ring_name(self._stream, self._model), gid, keep, extra)
            except StreamBusy as exc:
                raise StreamBusy(
                    f"model {self._model!r} on stream {self._stream!r} already has a writer (pid {exc.pid}): "
                    f"stop it (kill {exc.pid}) or publish under another model name",
                    pid=exc.pid,
                ) from None
        except BaseException:
            self._watch.close()
            raise
        self._number = 0
        self._last_seq = 0
        self._latencies: Deque[int] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._next_stats = 0.0
        self._state = Lifecycle.OPEN

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def model(self) -> str:
        return self._model

    def publish(
        self,
        frame: Union[Frame, int],
        data: Dict[str, Any],
        *,
        timestamp_ns: Optional[int] = None,
        wall_time: Optional[float] = None,
    ) -> None:
        """Publish ``data`` as this model's result for ``frame`` (a Frame, or a frame's seq; with
        a seq, ``timestamp_ns`` and ``wall_time`` may give the frame's capture time, as a relay
        of another machine's results knows it)."""
        ring = self._open_ring()
        payload = encode_result(data)
        if wall_time is not None:
            if isinstance(frame, Frame) or timestamp_ns is None:
                raise TypeError("wall_time goes with a seq and its timestamp_ns (a Frame has its own)")
            if isinstance(wall_time, bool) or not isinstance(wall_time, (int, float)) or not math.isfinite(wall_time):
                raise TypeError(f"wall_time must be a finite number of epoch seconds, not {wall_time!r}")
        seq, epoch, stamp, wall = self._frame(frame, timestamp_ns, need_time=True)
        if wall_time is not None:
            wall = float(wall_time)
        if not self._advance(ring, seq, epoch):
            return  # a frame of a daemon that is gone: its results have nobody to join them
        self._number += 1
        ring.write(seq, stamp, wall, self._number, epoch, payload)
        self._latencies.append(time.monotonic_ns() - stamp)
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + 0.5
            self._write_stats(ring)

    def skip(self, frame: Union[Frame, int]) -> None:
        """Say that this model will publish nothing for ``frame`` (a Frame, or a frame's seq), nor
        for any frame before it it has not published a result for: a reader's ``get()`` of those
        frames then answers None at once instead of waiting for a later result. Optional: a model
        that publishes a later frame's result says the same implicitly."""
        ring = self._open_ring()
        seq, epoch, _stamp, _wall = self._frame(frame, None, need_time=False)
        if self._advance(ring, seq, epoch):
            ring.skip(seq)

    def _open_ring(self) -> _RecordRing:
        ring = self._ring
        if ring is None or self._state is not Lifecycle.OPEN:
            raise ClosedError(f"ResultWriter of model {self._model!r} on stream {self._stream!r} is closed")
        return ring

    def _frame(self, frame: Union[Frame, int], timestamp_ns: Optional[int], need_time: bool) -> tuple:
        """(seq, the daemon's epoch, capture timestamp_ns, wall time) of the frame a result is for."""
        if isinstance(frame, Frame):
            if frame.stream.startswith(self._stream + "."):
                raise ValueError(
                    f"frame {frame.seq} is from the derived stream {frame.stream!r}: publish its result on {self._stream!r} "
                    "by seq, publish(frame.seq, data, timestamp_ns=frame.timestamp_ns, wall_time=frame.wall_time), "
                    "with its boxes mapped to the main frame through frame.source_box(box)"
                )
            if frame.stream != self._stream:
                raise ValueError(f"frame {frame.seq} is from stream {frame.stream!r}, this writer publishes on {self._stream!r}")
            if timestamp_ns is not None:
                raise TypeError("timestamp_ns is the frame's own when a Frame is given; pass it only with a seq")
            return frame.seq, frame._attachment.epoch, frame.timestamp_ns, frame.wall_time
        if not isinstance(frame, (int, np.integer)) or isinstance(frame, bool):
            raise TypeError(f"takes a Frame or a frame's seq (int), not {type(frame).__name__}")
        seq = int(frame)
        if seq < 1:
            raise ValueError(f"seq must be a frame number >= 1, got {seq}")
        epoch = self._watch.segment.header.epoch  # type: ignore[union-attr]
        if not need_time:
            return seq, epoch, 0, 0.0
        if timestamp_ns is None:
            found = self._watch.capture_time(seq)  # type: ignore[union-attr]
            if found is None:
                raise ValueError(
                    f"frame {seq} of stream {self._stream!r} is no longer in its ring, so its capture time is "
                    "unknown: pass timestamp_ns= (CLOCK_MONOTONIC), or publish with the Frame"
                )
            return (seq, epoch, *found)
        if isinstance(timestamp_ns, bool) or not isinstance(timestamp_ns, (int, np.integer)):
            raise TypeError(f"timestamp_ns must be an int (CLOCK_MONOTONIC ns), not {type(timestamp_ns).__name__}")
        stamp = int(timestamp_ns)
        return seq, epoch, stamp, time.time() - (time.monotonic_ns() - stamp) / 1e9

    def _advance(self, ring: _RecordRing, seq: int, epoch: int) -> bool:
        """Check that ``seq`` comes after the last frame dealt with (following a new daemon to a
        new ring); False for a frame of a daemon that is gone."""
        if epoch != self._stream_epoch:
            if epoch != self._watch.segment.header.epoch:  # type: ignore[union-attr]
                return False
            self._stream_epoch = epoch
            self._last_seq = 0
            ring.renew({"stream_epoch": epoch})
        if seq <= self._last_seq:
            raise ValueError(
                f"results are published in frame order: seq {seq} comes after {self._last_seq} "
                f"(model {self._model!r} on stream {self._stream!r})"
            )
        self._last_seq = seq
        return True

    def _write_stats(self, ring: _RecordRing) -> None:
        ordered = sorted(self._latencies)
        p50 = ordered[len(ordered) // 2] / 1e6 if ordered else 0.0
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6 if ordered else 0.0
        ring.set_info(results=self._number, latency_p50_ms=round(p50, 2), latency_p99_ms=round(p99, 2))

    def close(self) -> None:
        """Remove the results ring; readers wait for a new writer. Safe to call twice."""
        if self._state is Lifecycle.OPEN:
            self._state = Lifecycle.CLOSED
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        if self._state is Lifecycle.OPEN:
            try:
                self.close()
            except Exception:
                pass


class _RecordReader(Reader):
    """The reader side of a results ring: a Reader that copies each record out and lets go."""

    _NOUN = "result"
    _PRODUCER = "writer"

    def __init__(self, stream: str, model: str, name: Optional[str], wait: float) -> None:
        self.model = model
        self._display_stream = stream
        self._last_number = 0
        self._oldest_first = False
        self._epochs: Dict[int, int] = {}  # id(attachment) -> the stream epoch its ring is for
        self._open(results_ring_name(stream, model), f"model {model!r} of stream {stream!r}", name, 1, wait)

    def _reattach(self) -> bool:
        moved = super()._reattach()
        if moved:
            self._last_number = 0
        return moved

    def _lease(self, attachment: Attachment, slot: int, target: int, mode: int) -> Optional[Result]:  # type: ignore[override]
        """Copy the record of frame ``target`` out of ``slot`` under a lease, then let it go.

        The lock calls go straight to fcntl with the argument prepared for the slot (see
        ByteLocks): this is the whole read path of a result, run cold once per frame.
        """
        if slot >= attachment.slot_count:
            return None
        fd, lock, unlock = attachment.segment.fd, self._share_args[slot], self._unlock_args[slot]
        try:
            _fcntl(fd, _SETLK, lock)
        except BlockingIOError:
            return None
        try:
            seq, timestamp_ns, wall, _h, _w, _c, _fmt, used = _unpack_meta(attachment.control, attachment.layout.meta(slot))  # type: ignore[arg-type]
            if seq != target or used < RECORD.size:
                return None
            start = attachment.layout.slot_data(slot)
            raw = attachment.data[start : start + used]  # type: ignore[index]
        finally:
            _fcntl(fd, _SETLK, unlock)
        number, published_ns, _epoch, length = _unpack_record(raw)
        data = _decode(raw[RECORD.size : RECORD.size + length])
        dropped = 0
        if mode == ReaderMode.ORDERED:
            # Only iteration moves the cursor: get() and latest() look, wherever they look.
            if self._last_number and number > self._last_number:
                dropped = number - self._last_number - 1
                self._dropped += dropped
            self._last_number = number
            self._last_seq = seq
        self._frames += 1
        self._progress_due = True
        return _new_result(Result, (self._display_stream, self.model, seq, timestamp_ns, wall, published_ns, data, number, dropped))

    def _attach(self) -> Attachment:
        attachment = super()._attach()
        slots = range(attachment.slot_count)
        self._share_args = [_flock_arg(fcntl.F_RDLCK, LOCK_SLOT_BASE + k) for k in slots]
        self._unlock_args = [_flock_arg(fcntl.F_UNLCK, LOCK_SLOT_BASE + k) for k in slots]
        return attachment

    def start_at_oldest(self) -> None:
        """The next ordered result is the oldest the ring keeps (not the newest)."""
        self._oldest_first = True

    def _get(self, mode: int, timeout: Optional[float]) -> Result:  # type: ignore[override]
        if self._oldest_first and mode == ReaderMode.ORDERED:
            self._oldest_first = False
            attachment = self._current()
            if self._mode != mode:
                self._mode = mode
                attachment.set_mode(mode)
            found = self._oldest_after(attachment, 0)
            if found is not None:
                return found  # type: ignore[return-value]
        return super()._get(mode, timeout)  # type: ignore[return-value]

    def stream_epoch(self, attachment: Attachment) -> int:
        """The epoch of the daemon whose frames this results ring is about."""
        epoch = self._epochs.get(id(attachment))
        if epoch is None:
            try:
                info = json.loads(decode_text(attachment.control[EXTRA_OFFSET : EXTRA_OFFSET + EXTRA_SIZE]))  # type: ignore[index]
                epoch = int(info.get("stream_epoch", 0))
            except (ValueError, TypeError):
                epoch = 0
            if epoch:  # 0: the writer has not written its header yet; look again next time
                self._epochs = {id(attachment): epoch}
        return epoch

    def find(self, seq: int, timeout: Optional[float], frame_epoch: int) -> Optional[Result]:
        """``get``: the result of frame ``seq``, None if the model skipped it (see ResultReader)."""
        attachment = self._current()
        if self._mode != ReaderMode.LIVE:
            self._mode = ReaderMode.LIVE
            attachment.set_mode(ReaderMode.LIVE)
        deadline = None
        while True:
            newest, _slot, state = _unpack_head(attachment.control, LIVE_OFFSET)  # type: ignore[arg-type]
            if state == StreamState.REPLACED:
                self._orphaned = True
                self._reattach()
                attachment = self._current()
                continue
            ring_epoch = self.stream_epoch(attachment) if frame_epoch else 0
            current = not frame_epoch or not ring_epoch or ring_epoch == frame_epoch
            if current and newest >= seq and not self._orphaned:
                # The common case first, in few steps: the map names the slot, the lease checks it.
                (slot,) = _unpack_map(attachment.control, attachment.layout.map_entry(seq))  # type: ignore[arg-type]
                found = self._lease(attachment, slot, seq, ReaderMode.LIVE)
                if found is not None:
                    return found
                found = self._search(attachment, seq)
                if found is not False:
                    return found  # type: ignore[return-value]
                continue  # being rewritten this very moment: look again (it is then gone)
            if current and not self._orphaned and DEALT_WITH.unpack_from(attachment.control, DEALT_WITH_OFFSET)[0] >= seq:  # type: ignore[arg-type]
                return None  # the model said it skips this frame (and publishes nothing later yet)
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + check_timeout(timeout)
            if self._progress_due:
                self._write_progress(attachment)  # figures for status: before waiting, not after
            try:
                self._wait(attachment, deadline, newest)
            except FrameTimeout:
                raise FrameTimeout(
                    f"no result yet for frame {seq} from model {self.model!r} of stream {self._display_stream!r} "
                    f"(its newest is for frame {newest if current else 'of an earlier daemon'})"
                ) from None
            attachment = self._current()

    def _search(self, attachment: Attachment, seq: int) -> "Union[Optional[Result], bool]":
        """The map did not lead to frame ``seq``'s record: look at every slot. The result, None if
        the model skipped the frame, False to look again; ResultExpired if it is no longer kept."""
        layout = attachment.layout
        seqs = [_unpack_meta(attachment.control, layout.meta(k))[0] for k in range(layout.slot_count)]  # type: ignore[arg-type]
        if seq in seqs:
            return self._lease(attachment, seqs.index(seq), seq, ReaderMode.LIVE) or False
        kept = [s for s in seqs if s]
        if kept and seq < min(kept):
            raise ResultExpired(
                f"the result of frame {seq} is no longer kept by model {self.model!r} of stream "
                f"{self._display_stream!r} (it keeps {len(kept)}, from frame {min(kept)}): ask sooner, or iterate"
            )
        return None  # the model published a later frame's result and none for this one


class ResultReader:
    """Reads one model's results on a stream: ``ResultReader("cam0", "faces")``.

    * ``get(seq_or_frame, timeout)``: the result for exactly that frame, or None if the model
      skipped it (it published a later frame's result and none for this one). Waits up to
      ``timeout`` seconds (None: forever) while the model has not got that far: ``FrameTimeout``
      then. ``ResultExpired`` if the frame is older than the results the ring keeps. Given a
      ``Frame``, only a result computed on that very daemon's frame counts.
    * ``latest(timeout)``: the newest result; ``FrameTimeout`` if none comes in time.
    * ``for r in reader`` (or ``ordered(timeout)``): every result in order; ``r.dropped``
      counts results this reader missed before ``r`` (it fell a whole ring behind).

    ``StreamNotFound`` if nothing serves the stream, ``ModelNotFound`` if no writer publishes the
    model (``wait=S`` waits up to S seconds for it). Waiting sleeps in the kernel. A writer that
    restarts, and a writer that follows a restarted daemon, are followed by themselves. A reader
    is for one thread.
    """

    _reader: Optional[_RecordReader] = None

    def __init__(self, stream: str, model: str, name: Optional[str] = None, *, wait: float = 0.0) -> None:
        validate_stream_name(stream)
        validate_model_name(model)
        try:
            self._reader = _RecordReader(stream, model, name, wait)
        except StreamNotFound as exc:
            try:
                open_segment(stream, for_status=True).close()
            except StreamNotFound:
                raise exc from None
            raise ModelNotFound(
                f"no model {model!r} on stream {stream!r}: nothing publishes its results "
                f"(models publishing now: {', '.join(models(stream)) or 'none'}). Start the model, "
                f"or wait for it with ResultReader(..., wait=SECONDS)"
            ) from None
        self._stream, self._model = stream, model
        self._latest: Optional[Result] = None

    def _records(self) -> _RecordReader:
        reader = self._reader
        if reader is None:
            raise ClosedError(f"ResultReader of model {self._model!r} on stream {self._stream!r} is closed")
        return reader

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def model(self) -> str:
        return self._model

    @property
    def dropped(self) -> int:
        """Results this reader missed while iterating."""
        return self._records().dropped

    def get(self, seq: Union[int, Frame], timeout: Optional[float] = None) -> Optional[Result]:
        """The result for frame ``seq`` (an int or a Frame), or None if the model skipped it."""
        epoch = 0
        if isinstance(seq, Frame):
            if seq.stream != self._stream:
                raise ValueError(f"frame {seq.seq} is from stream {seq.stream!r}, not {self._stream!r}")
            seq, epoch = seq.seq, seq._attachment.epoch
        elif isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
            raise TypeError(f"get() takes a frame's seq (int) or a Frame, not {type(seq).__name__}")
        if seq < 1:
            raise ValueError(f"seq must be a frame number >= 1, got {seq}")
        return self._records().find(int(seq), timeout, epoch)

    def latest(self, timeout: Optional[float] = None) -> Result:
        """The newest result; waits up to ``timeout`` seconds only while there is none."""
        reader = self._records()
        cached = self._latest
        if cached is not None and reader._attachment is not None:
            newest = _unpack_head(reader._attachment.control, LIVE_OFFSET)[0]  # type: ignore[arg-type]
            if newest == cached.seq and not reader._orphaned:
                return cached
        self._latest = result = reader._get(ReaderMode.LIVE, timeout)  # type: ignore[assignment]
        return result

    def ordered(self, timeout: Optional[float] = None, *, oldest: bool = False) -> Iterator[Result]:
        """Every result in order, from the newest (or, ``oldest=True``, from the oldest the ring
        still keeps); ``timeout`` bounds each wait (``FrameTimeout``, the iterator stays usable)."""
        reader = self._records()
        if oldest:
            reader.start_at_oldest()
        return reader.ordered(timeout)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Result]:
        return self.ordered(None)

    def close(self) -> None:
        """Detach. Safe to call twice."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def __enter__(self) -> "ResultReader":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()


def model_ring_names(stream: str) -> List[str]:
    """Models with a results ring in /dev/shm for ``stream`` (live or left by a dead writer)."""
    prefix = f"{SEGMENT_PREFIX}{stream}{RESULTS_INFIX}"
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(e[len(prefix) :] for e in entries if e.startswith(prefix) and OBJECT_SEPARATOR not in e[len(prefix) :])


def models(stream: str) -> List[str]:
    """The models publishing results on ``stream`` now (a live writer each), sorted."""
    validate_stream_name(stream)
    live = []
    for model in model_ring_names(stream):
        try:
            segment = open_segment(results_ring_name(stream, model), for_status=True)
        except Exception:  # noqa: BLE001 - another user's, or half gone: not publishing for us
            continue
        try:
            if segment.owner_alive():
                live.append(model)
        finally:
            segment.close()
    return live
