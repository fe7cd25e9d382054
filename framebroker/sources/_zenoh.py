"""``zenoh://STREAM?connect=ENDPOINT``: a stream that ``framebroker bridge`` publishes on another machine.

The source subscribes to the stream's key expressions (``framebroker.zenoh_link``), decodes its H.264 access
units with FFmpeg (PyAV) and hands each frame to the daemon with the origin's ``seq`` and
``wall_time`` (``frame_origin``), so readers here see the numbers the origin's readers see. The
capture time on this machine's clock is derived from the wall time (``monotonic_from_wall``).

Decoding starts at a keyframe: after joining, after a unit lost on the link, after the bridge
restarted; the units skipped until then are counted, never decoded into a damaged picture. The
results of the models that run here travel back to the origin, and those of the origin's models
are written into this stream's results channel (``ResultRelay``).

When nothing arrives for ``STALL_TIMEOUT`` seconds the source raises ``SourceError`` saying why
as well as it can tell (no peer connected, the origin's camera reconnecting, no bridge for that
stream), so the daemon shows ``reconnecting`` and retries with backoff; readers time out cleanly
meanwhile, and frames flow again once the bridge or the link is back.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np

from .._errors import SourceError
from ._base import GeometryChanged, Source, SourceRenumbered
from ..zenoh_link import (
    ResultRelay,
    VideoUnit,
    ZenohMissing,
    capture_ns,
    endpoints_text,
    open_session,
    peer_count,
    remotes_key,
    session_config,
    status_key,
    video_key,
)

log = logging.getLogger("framebroker.serve")

OPEN_TIMEOUT = 10.0  # seconds to wait for the first keyframe (the bridge sends one every second or so)
STALL_TIMEOUT = 3.0  # seconds without a unit before the link counts as lost
QUEUE_UNITS = 240  # units waiting to be decoded; beyond that the oldest are dropped (a stuck daemon)
STATUS_FRESH = 3.0  # seconds a status message from the bridge stays current
LATENCY_SAMPLES = 300

_PYAV_FORMATS = {"bgr": "bgr24", "rgb": "rgb24", "gray": "gray"}


class ZenohSource(Source):
    """Frames from ``framebroker bridge STREAM`` on another machine, over Zenoh."""

    # Capture times are the origin's: a gap between them is a frame lost on the way (at the
    # origin, in the bridge's queue or on the link), counted as a drop at the source.
    may_drop_frames = True
    _session: Any = None
    _relay: Optional[ResultRelay] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.spec.options
        self.key_stream = self.spec.target
        self.connect: List[str] = list(options.get("connect", ()))
        self.listen: List[str] = list(options.get("listen", ()))
        self.config_file: Optional[str] = options.get("config")
        self._units: Deque[Tuple[VideoUnit, bytes]] = collections.deque()
        self._arrival = threading.Condition()
        self._last_arrival = 0.0  # monotonic s of the last video or status sample
        self._status: Dict[str, Any] = {}
        self._status_at = 0.0
        self._status_arrival = threading.Event()
        self._pending: Optional[Tuple[np.ndarray, VideoUnit]] = None
        # What status shows (``info()``): kept across reconnects.
        self.lost = 0  # units lost on the link (gaps in their numbers)
        self.skipped = 0  # units not decoded while waiting for a keyframe
        self.origin_pid = 0
        self._latencies: Deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._last_seq = 0
        self._problem = ""

    # --- the session --------------------------------------------------------------------------------

    def open(self) -> None:
        import av

        try:
            config = session_config(self.connect, self.listen, self.config_file)
            self._session = open_session(config)
        except (ZenohMissing, ValueError, OSError) as exc:
            raise SourceError(f"{self.description}: {exc}") from None
        self._units.clear()
        self._pending = None
        self._status_arrival.clear()
        self._bridge_id = 0
        self._next_unit = 0
        self._need_keyframe = True
        self._decoder = av.CodecContext.create("h264", "r")
        session = self._session
        self._subscribers = [
            session.declare_subscriber(video_key(self.key_stream), self._video_arrived),
            session.declare_subscriber(status_key(self.key_stream), self._status_arrived),
        ]
        if self.stream:  # a daemon serves this source: results travel both ways
            self._relay = ResultRelay(
                session, self.key_stream, self.stream, lambda: self.origin_pid, reader_name="zenoh-results"
            )
            self._relay.start()
        log.info("zenoh: waiting for %s (%s)", video_key(self.key_stream), endpoints_text(self.connect, self.listen, self.config_file))
        image, unit = self._next_frame(OPEN_TIMEOUT)
        # The origin's frame rate comes with its status, about once a second.
        self._status_arrival.wait(STATUS_FRESH)
        height, width = image.shape[:2]
        self.shape = self._shape_for(height, width)
        self._pending = (image, unit)
        self.fps = self.requested_fps or self._origin_fps()

    def close(self) -> None:
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.stop()
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception as exc:  # noqa: BLE001 - closing what failed
                log.debug("closing the Zenoh session: %s", exc)
        self._pending = None

    def _video_arrived(self, sample: Any) -> None:
        # Zenoh's thread: unpack, queue and return.
        attachment = sample.attachment
        try:
            unit = VideoUnit.unpack(attachment.to_bytes() if attachment is not None else b"")
        except ValueError as exc:
            self._problem = f"unreadable video from {video_key(self.key_stream)}: {exc}"
            return
        with self._arrival:
            if len(self._units) >= QUEUE_UNITS:
                self._units.clear()  # hopelessly behind: start again at the next keyframe
            self._units.append((unit, sample.payload.to_bytes()))
            self._last_arrival = time.monotonic()
            self._arrival.notify()

    def _status_arrived(self, sample: Any) -> None:
        try:
            status = json.loads(sample.payload.to_bytes())
        except ValueError:
            return
        if not isinstance(status, dict):
            return
        self._status, self._status_at = status, time.monotonic()
        self._last_arrival = self._status_at
        self._status_arrival.set()
        session = self._session
        if session is not None:  # answer with this end's figures, for the bridge's status
            report = {"stream": self.stream, "host": socket.gethostname(), **self.info()["remote"]}
            try:
                session.put(remotes_key(self.key_stream, str(session.zid())), json.dumps(report, separators=(",", ":")))
            except Exception as exc:  # noqa: BLE001 - the session is closing
                log.debug("zenoh: reporting to the bridge: %s", exc)

    # --- frames ---------------------------------------------------------------------------------------

    def read_into(self, out: np.ndarray) -> Optional[int]:
        if self._pending is not None:
            image, unit = self._pending
        else:
            image, unit = self._next_frame(STALL_TIMEOUT)
        if image.shape[:2] != out.shape[:2] and self.width is None:
            self._pending = (image, unit)
            raise GeometryChanged(self._shape_for(*image.shape[:2]))
        self._pending = None
        np.copyto(out, image.reshape(out.shape))
        self.frame_origin = (unit.seq, unit.wall_time)
        self._last_seq = unit.seq
        now_wall = time.time()
        self._latencies.append(now_wall - unit.wall_time)
        return capture_ns(unit.wall_time)

    def _next_frame(self, timeout: float) -> Tuple[np.ndarray, VideoUnit]:
        """The next decodable frame after the last one delivered, as an image of the ring's
        format and size; SourceError saying why if none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            unit, payload = self._take(deadline)
            frame = self._decode(unit, payload)
            if frame is None:
                continue
            if unit.seq <= self._last_seq:
                if unit.origin_pid != self.origin_pid:
                    message = (
                        f"{self.description}: the origin's daemon restarted (pid {self.origin_pid} -> {unit.origin_pid}) "
                        "and numbers its frames from 1 again"
                    )
                    self._last_seq, self.origin_pid = 0, unit.origin_pid
                    raise SourceRenumbered(message)
                continue  # a frame already published (the bridge restarted and sent it again)
            self.origin_pid = unit.origin_pid
            return self._convert(frame), unit

    def _take(self, deadline: float) -> Tuple[VideoUnit, bytes]:
        with self._arrival:
            while not self._units:
                if self.stop.is_set():
                    raise SourceError("stopping")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SourceError(f"{self.description}: {self._silence()}")
                self._arrival.wait(min(remaining, 0.25))
            return self._units.popleft()

    def _decode(self, unit: VideoUnit, payload: bytes) -> Any:
        """The decoded frame of one access unit, or None (skipped, or no picture yet)."""
        import av

        if unit.bridge_id != self._bridge_id:
            if self._bridge_id:
                log.info("zenoh: the bridge restarted; decoding again from its next keyframe")
                self._decoder = av.CodecContext.create("h264", "r")
            self._bridge_id, self._need_keyframe = unit.bridge_id, True
        elif unit.unit != self._next_unit:
            self.lost += max(0, unit.unit - self._next_unit)
            self._need_keyframe = True
        self._next_unit = unit.unit + 1
        if self._need_keyframe and not unit.keyframe:
            self.skipped += 1
            return None
        packet = av.Packet(payload)
        packet.pts = unit.seq
        try:
            frames = self._decoder.decode(packet)
        except av.FFmpegError as exc:
            log.debug("zenoh: cannot decode unit %d (frame %d): %s", unit.unit, unit.seq, exc)
            self.skipped += 1
            self._need_keyframe = True
            return None
        self._need_keyframe = False
        return frames[-1] if frames else None

    def _convert(self, frame: Any) -> np.ndarray:
        height, width = (self.height, self.width) if self.width and self.height else (frame.height, frame.width)
        return frame.to_ndarray(width=width, height=height, format=_PYAV_FORMATS[self.pixel_format])

    # --- what went wrong, and what status shows ------------------------------------------------------

    def _silence(self) -> str:
        """Why no video comes, as well as this end can tell."""
        if self._problem:
            return self._problem
        key = video_key(self.key_stream)
        session = self._session
        peers = peer_count(session) if session is not None else 0
        if not peers:
            return f"link down: no Zenoh peer connected ({endpoints_text(self.connect, self.listen, self.config_file)})"
        origin = self._origin()
        if origin and origin.get("state") != "streaming":
            reason = origin.get("reason") or origin.get("error") or ""
            return f"the origin stream {origin.get('name')!r} on {self._status.get('host')} is {origin.get('state')}" + (f": {reason}" if reason else "")
        if origin:
            return f"no video on {key} for {STALL_TIMEOUT:g} s, though the bridge reports the stream streaming"
        return f"connected to {peers} Zenoh peer(s), but nothing publishes {key}: is framebroker bridge {self.key_stream} running there?"

    def _origin(self) -> Dict[str, Any]:
        """The origin stream's status entry, if the bridge sent one lately."""
        if time.monotonic() - self._status_at > STATUS_FRESH:
            return {}
        stream = self._status.get("stream")
        return stream if isinstance(stream, dict) else {}

    def _origin_fps(self) -> float:
        origin = self._origin()
        return float(origin.get("configured_fps") or origin.get("measured_fps") or 0.0)

    def info(self) -> Dict[str, Any]:
        session = self._session
        peers = peer_count(session) if session is not None else 0
        fresh = time.monotonic() - self._last_arrival < STALL_TIMEOUT
        origin = self._origin()
        latencies = sorted(self._latencies)
        remote: Dict[str, Any] = {
            "key": f"framebroker/{self.key_stream}",
            "origin": f"{origin.get('name', self.key_stream)}@{self._status.get('host', '?')}",
            "origin_state": origin.get("state", "unknown"),
            "link": "up" if peers and fresh else ("idle" if peers else "down"),
            "peers": peers,
            "lost": self.lost,
            "skipped": self.skipped,
        }
        if latencies:
            remote["latency_p50_ms"] = round(latencies[len(latencies) // 2] * 1000, 1)
            remote["latency_p99_ms"] = round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1)
        bridge = self._status.get("bridge")
        if isinstance(bridge, dict) and bridge.get("encoder"):
            remote["encoder"] = bridge["encoder"]
        relay = self._relay
        if relay is not None:
            remote["results_in"], remote["results_out"] = relay.received, relay.sent
        return {"remote": remote}
