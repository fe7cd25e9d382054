"""``framebroker bridge NAME``: a stream's frames, status and results to other machines through Zenoh.

    framebroker bridge cam0 --listen tcp/0.0.0.0:7447          # remote: serve zenoh://cam0?connect=tcp/THIS:7447
    framebroker bridge cam0 --connect tcp/192.168.1.50:7447    # to a Zenoh router, or a remote that listens
    framebroker bridge cam0 --zenoh-config bridge.json5        # endpoints, TLS, access control: Zenoh's own file

The frames are encoded once, by the recorder's pipeline (``framebroker_clients.recorder``: every
frame in order, a bounded queue in front of the encoder, the encoder ``--encoder auto`` picks by a
test encode, hardware where there is one) and each H.264 access unit goes out on
``framebroker/NAME/video`` with its frame's seq, capture time and wall time. Keyframes come every
``--keyframe-interval`` seconds, each with SPS and PPS, so a remote that joins late starts within
that time. Beside the video: the stream's status once a second, and every model's results both
ways (``framebroker.zenoh_link.ResultRelay``). The key expressions and the wire format are described in
``framebroker/zenoh_link.py`` and in docs/bridge.md.

``framebroker status`` shows the bridge as a reader of the stream, with its link (Zenoh peers,
whether anything subscribes), what it sent and the results it carried.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from fractions import Fraction
from types import FrameType
from typing import Any, Deque, Dict, Optional

import framebroker as fb
from framebroker.arguments import float_in, int_in, stream_name
from framebroker.zenoh_link import (
    ResultRelay,
    VideoUnit,
    ZenohMissing,
    check_endpoint,
    endpoints_text,
    open_session,
    peer_count,
    remotes_key,
    session_config,
    status_key,
    video_key,
)

from ._common import add_wait_option, open_reader
from .recorder.encoders import ENCODERS
from .recorder.outputs import Output
from .recorder.packets import EncodedPacket, StreamInfo
from .recorder.recorder import Recorder, RecorderOptions
from .recorder.selection import select_encoder

log = logging.getLogger("framebroker.bridge")

STATUS_PERIOD = 1.0  # seconds between status messages (and checks of the origin daemon's pid)
REMOTE_FRESH = 3.0  # seconds a remote's report (its answer to a status message) counts
STOP_TIMEOUT = 30.0
LATENCY_SAMPLES = 300


def _endpoint(text: str) -> str:
    try:
        return check_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", type=stream_name, help="stream to publish (its key expressions: framebroker/NAME/...)")
    parser.add_argument(
        "--connect", action="append", default=[], type=_endpoint, metavar="ENDPOINT",
        help="Zenoh endpoint to connect to, e.g. tcp/192.168.1.50:7447 (a router, or a remote serve that listens); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--listen", action="append", default=[], type=_endpoint, metavar="ENDPOINT",
        help="Zenoh endpoint to listen on for remotes, e.g. tcp/0.0.0.0:7447; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--zenoh-config", metavar="FILE",
        help="Zenoh config file (JSON5): endpoints, TLS, access control; --connect and --listen add to it. "
        "Multicast scouting stays off unless the file turns it on",
    )  # fmt: skip
    parser.add_argument(
        "--encoder", default="auto", metavar="auto|NAME",
        help=f"H.264 encoder, as for record: auto (default: hardware where one passes a test encode) or one of: {', '.join(ENCODERS)}",
    )  # fmt: skip
    parser.add_argument("--bitrate", type=int_in(1, 10**7, "--bitrate"), metavar="KBPS", help="target bitrate in kbit/s (default: about 0.1 bit per pixel)")
    parser.add_argument(
        "--keyframe-interval", type=float_in(0, 60, "--keyframe-interval"), default=1.0, metavar="S",
        help="a keyframe (with SPS/PPS) at least every S seconds: how long a remote that joins or loses a unit waits (default 1)",
    )  # fmt: skip
    add_wait_option(parser, 10.0)
    parser.add_argument("--reader-name", default="bridge", help="name shown by framebroker status")


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError for what the parser cannot judge (``framebroker up --check`` calls it too)."""
    if args.encoder != "auto" and args.encoder not in ENCODERS:
        raise ValueError(f"unknown --encoder {args.encoder!r}; choose auto or one of: {', '.join(ENCODERS)}")
    if not (args.connect or args.listen or args.zenoh_config):
        raise ValueError(
            "say how remotes reach the bridge: --listen tcp/0.0.0.0:7447 (remotes connect to this machine), "
            "--connect tcp/HOST:7447 (a Zenoh router, or a remote that listens), or --zenoh-config FILE"
        )
    if args.zenoh_config and not os.path.isfile(args.zenoh_config):
        raise ValueError(f"--zenoh-config {args.zenoh_config}: no such file")


class ZenohVideoOutput(Output):
    """Puts each access unit on ``framebroker/<stream>/video`` with its ``VideoUnit`` header.

    Samples go out as soon as they are made (express: no batching) and may be dropped by Zenoh
    when a link cannot keep up (congestion control DROP: a slow remote must not stall the
    encoder); the remote sees the gap in the unit numbers and decodes again from the next
    keyframe. Written by the encoder's delivering thread only (see ``PacketRouter``).
    """

    def __init__(self, session: Any, stream: str, origin_pid: "OriginWatch") -> None:
        super().__init__()
        self._session = session
        self._key = video_key(stream)
        self._origin = origin_pid
        self._bridge_id = random.getrandbits(63) or 1
        self._publisher: Any = None
        self.units = 0
        self.bytes = 0
        self.latencies: Deque[float] = deque(maxlen=LATENCY_SAMPLES)  # capture to sent, seconds

    def describe(self) -> str:
        return f"zenoh {self._key}"

    @property
    def subscribed(self) -> bool:
        publisher = self._publisher
        return bool(publisher is not None and publisher.matching_status)

    def _start(self, info: StreamInfo) -> None:
        import zenoh

        self._publisher = self._session.declare_publisher(self._key, congestion_control=zenoh.CongestionControl.DROP, express=True)
        self._size = (info.width, info.height)

    def _write(self, packet: EncodedPacket) -> None:
        for frame in packet.frames:  # one: the encoders here do not reorder
            self.units += 1
            now = time.time()
            header = VideoUnit(
                packet.keyframe, self._size[0], self._size[1], self.units, frame.seq, frame.timestamp_ns,
                frame.wall_time, self._bridge_id, self._origin.pid, now,
            )  # fmt: skip
            self._publisher.put(packet.data, attachment=header.pack())
            self.bytes += len(packet.data)
            self.latencies.append(now - frame.wall_time)

    def _stop(self) -> None:
        if self._publisher is not None:
            self._publisher.undeclare()
            self._publisher = None


class OriginWatch:
    """The origin stream's status entry, refreshed by ``refresh()``; ``pid`` is its daemon's."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.entry: Dict[str, Any] = {}
        self.pid = 0

    def refresh(self) -> Dict[str, Any]:
        self.entry = fb.status(self.stream)["streams"][0]
        if self.entry.get("alive"):
            self.pid = int(self.entry.get("pid") or 0)
        return self.entry


def _median_ms(samples: Deque[float]) -> Optional[float]:
    ordered = sorted(samples)
    return round(ordered[len(ordered) // 2] * 1000, 1) if ordered else None


class Bridge:
    """The running bridge: a session, the recorder pipeline with a Zenoh output, the results
    relay and the status heartbeat (from the caller's thread, ``tick()``)."""

    def __init__(self, args: argparse.Namespace, session: Any) -> None:
        self.args = args
        self.session = session
        self.origin = OriginWatch(args.name)
        self.origin.refresh()
        self.output = ZenohVideoOutput(session, args.name, self.origin)
        self.relay = ResultRelay(session, args.name, args.name, lambda: self.origin.pid, reader_name=f"{args.reader_name}-results")
        self.status_publisher = session.declare_publisher(status_key(args.name))
        self.remotes: Dict[str, tuple] = {}  # zenoh id -> (monotonic s, the remote's report)
        self.remote_reports = session.declare_subscriber(remotes_key(args.name), self._remote_reported)
        self.recorder: Optional[Recorder] = None
        self.encoder_name = ""
        self._next_status = 0.0

    def _remote_reported(self, sample: Any) -> None:
        try:
            report = json.loads(sample.payload.to_bytes())
        except ValueError:
            return
        if isinstance(report, dict):
            self.remotes[str(sample.key_expr)] = (time.monotonic(), report)

    def link(self) -> Dict[str, Any]:
        """The link's state for status: peers, remotes that report, their worst latency and losses."""
        peers = peer_count(self.session)
        now = time.monotonic()
        reports = [report for seen, report in list(self.remotes.values()) if now - seen < REMOTE_FRESH]
        latencies = [r["latency_p50_ms"] for r in reports if isinstance(r.get("latency_p50_ms"), (int, float))]
        return {
            "out": "zenoh",  # what status looks for to show this reader as a bridge
            "link": "up" if peers and self.output.subscribed else ("idle" if peers else "waiting"),
            "peers": peers,
            "remotes": len(reports),
            "remote_ms": max(latencies) if latencies else None,
            "lost": sum(int(r.get("lost") or 0) for r in reports),
            "sent_ms": _median_ms(self.output.latencies),
            "results_out": self.relay.sent,
            "results_in": self.relay.received,
        }

    def tick(self) -> None:
        """Send the status message when it is due."""
        now = time.monotonic()
        if now < self._next_status:
            return
        self._next_status = now + STATUS_PERIOD
        try:
            entry = self.origin.refresh()
        except (fb.FrameBrokerError, OSError, ValueError) as exc:
            log.debug("reading the stream's status: %s", exc)
            return
        recorder = self.recorder
        bridge = {
            "pid": os.getpid(),
            "encoder": self.encoder_name,
            "units": self.output.units,
            "keyframe_interval_s": self.args.keyframe_interval,
            "dropped_queue": recorder.stats.queue_dropped if recorder else 0,
            **self.link(),
        }
        document = {"host": socket.gethostname(), "time": time.time(), "stream": entry, "bridge": bridge}
        try:
            self.status_publisher.put(json.dumps(document, separators=(",", ":")))
        except Exception as exc:  # noqa: BLE001 - a closed session at shutdown
            log.debug("sending status: %s", exc)

    def close(self) -> None:
        self.relay.stop()
        try:
            self.remote_reports.undeclare()
            self.status_publisher.undeclare()
        except Exception:  # noqa: BLE001 - the session may be gone
            pass


def _usage(message: str) -> int:
    print(f"framebroker bridge: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(args: argparse.Namespace) -> int:
    try:
        check_arguments(args)
        config = session_config(args.connect, args.listen, args.zenoh_config)
    except ValueError as exc:
        return _usage(str(exc))
    except ZenohMissing as exc:
        raise fb.FrameBrokerError(str(exc)) from None
    where = endpoints_text(args.connect, args.listen, args.zenoh_config)
    reader = open_reader(args.name, args.reader_name, args.wait, "bridge")
    try:
        selection = select_encoder(args.encoder)
        session = open_session(config)
    except OSError as exc:
        reader.close()
        raise fb.FrameBrokerError(f"{exc} ({where})") from None
    except BaseException:
        reader.close()
        raise
    bridge: Optional[Bridge] = None
    try:
        bridge = Bridge(args, session)
        bridge.encoder_name = selection.spec.name
        note = {"fallback": selection.fallback_reason} if selection.fallback else {}
        options = RecorderOptions(bitrate_kbps=args.bitrate, keyframe_interval=Fraction(args.keyframe_interval).limit_denominator(1000))
        recorder = Recorder(
            # "zenoh" alone: the key follows from the stream's name, and a reader's info is small.
            reader, selection.spec, [bridge.output], options, output_label="zenoh",
            extra_info=lambda: {**note, **bridge.link()},  # type: ignore[union-attr]
        )  # fmt: skip
        bridge.recorder = recorder
        log.info("bridging stream %r to %s/... (%s), encoder %s", args.name, f"framebroker/{args.name}", where, selection.spec.name)

        def on_signal(signum: int, frame: Optional[FrameType]) -> None:
            recorder.request_stop(f"stopped by {signal.Signals(signum).name}")

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            recorder.start()
            bridge.relay.start()
            stopping_since: Optional[float] = None
            while not recorder.wait(0.2):
                bridge.tick()
                if recorder.end_reason:
                    stopping_since = stopping_since or time.monotonic()
                    if time.monotonic() - stopping_since > STOP_TIMEOUT:
                        raise fb.FrameBrokerError(f"the bridge did not stop within {STOP_TIMEOUT:g} s after it was asked to")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if bridge is not None:
            bridge.close()
        session.close()
        if bridge is None or bridge.recorder is None:
            reader.close()
    stats = recorder.stats
    print(
        f"bridge: {'failed' if recorder.error else 'done'} ({recorder.end_reason}): units={bridge.output.units} "
        f"bytes={bridge.output.bytes} encoder={selection.spec.name} dropped_ring={stats.ring_dropped} "
        f"dropped_queue={stats.queue_dropped} results_out={bridge.relay.sent} results_in={bridge.relay.received}",
        flush=True,
    )
    error = recorder.error
    if error is not None:
        if isinstance(error, (fb.FrameBrokerError, KeyboardInterrupt)):
            raise error
        raise fb.FrameBrokerError(f"the bridge failed: {type(error).__name__}: {error}") from error
    return 0


__all__ = ["Bridge", "OriginWatch", "ZenohVideoOutput", "add_arguments", "check_arguments", "main"]
