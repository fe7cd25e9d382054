"""A stream's frames, status and results on Zenoh: the key expressions, the wire format, the session.

Both ends use this module: ``framebroker bridge NAME`` (the origin, the machine with the camera)
and the ``zenoh://`` source of ``framebroker serve`` (a remote machine). Everything about one
stream lives under ``framebroker/<stream>/``, where ``<stream>`` is the origin's stream name:

``framebroker/<stream>/video``
    One sample per H.264 access unit (Annex B byte stream, no B-frames: decode order is display
    order), published by the bridge. Every keyframe is an IDR frame with SPS and PPS in front of
    it, and keyframes come at least every ``--keyframe-interval`` seconds, so a receiver that
    joins late (or lost a unit) decodes from the next keyframe on. The sample's attachment is a
    ``VideoUnit`` header (64 bytes, little-endian, below): the frame's ``seq``, capture
    ``timestamp_ns`` (the origin's CLOCK_MONOTONIC), ``wall_time``, size, and the unit's number.
``framebroker/<stream>/status``
    About once a second, JSON: ``{"host": ..., "time": ..., "stream": {...}, "bridge": {...}}``,
    the origin stream's entry of ``framebroker status --json`` and the bridge's own counters.
``framebroker/<stream>/remotes/<zenoh id>``
    Each remote ``serve``'s answer to a status message, JSON: its stream's name, host, link
    figures (latency from capture to its publish, units lost on the link); the bridge shows them.
``framebroker/<stream>/results/<model>``
    JSON, one sample per result: ``{"seq", "wall_time", "origin_pid", "data"}``, where ``seq`` and
    ``wall_time`` are the frame's (they are the same on every machine: a remote stream keeps the
    origin's) and ``origin_pid`` is the pid of the origin's daemon whose frames they are (a
    restarted daemon numbers its frames from 1 again). Both ends publish here: the bridge the
    results of the models that run at the origin, a remote ``serve`` those of the models that run
    on its machine. Each end writes what the other publishes into its local results channel
    (``fb.ResultWriter``), so ``fb.ResultReader`` reads every model's results wherever it ran,
    joined to the same seqs. Nothing is echoed: an end publishes only the models it does not
    write itself, and never receives its own samples.

Sessions: endpoints come from ``--connect`` / ``--listen`` (``connect=`` / ``listen=`` in a
``zenoh://`` URI) or from a Zenoh config file. Nothing depends on multicast scouting: it is off
unless the config file turns it on. Zenoh's shared-memory transport is always off: it only helps
between processes on one machine (framebroker's own rings do that), and it leaves pool files in
/dev/shm when a process is killed.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set

from ._errors import FrameBrokerError, FrameTimeout, ResultExpired
from ._results import ResultReader, ResultWriter, models

log = logging.getLogger("framebroker.zenoh")

KEY_ROOT = "framebroker"
WIRE_VERSION = 1
FLAG_KEYFRAME = 1

# Frames looked back at for results a model published before the relay noticed it (10 s at 30 fps).
BACKLOG_FRAMES = 300

INSTALL_HINT = "install it with: pip install 'framebroker[zenoh]' (the eclipse-zenoh package)"


class ZenohMissing(ImportError):
    """eclipse-zenoh is not installed."""


def import_zenoh() -> Any:
    """The ``zenoh`` module; ``ZenohMissing`` saying how to install it."""
    try:
        import zenoh
    except ImportError as exc:
        raise ZenohMissing(f"Zenoh is not installed ({exc}): {INSTALL_HINT}") from None
    return zenoh


def video_key(stream: str) -> str:
    return f"{KEY_ROOT}/{stream}/video"


def status_key(stream: str) -> str:
    return f"{KEY_ROOT}/{stream}/status"


def remotes_key(stream: str, session_id: str = "*") -> str:
    """One remote's report (``*``: every remote's, to subscribe)."""
    return f"{KEY_ROOT}/{stream}/remotes/{session_id}"


def results_key(stream: str, model: str = "*") -> str:
    """One model's results (``*``: every model's, to subscribe)."""
    return f"{KEY_ROOT}/{stream}/results/{model}"


def model_of(key: str) -> str:
    """The model a results key names (its last chunk)."""
    return key.rsplit("/", 1)[-1]


class VideoUnit(NamedTuple):
    """The attachment of a video sample: what the access unit is and which frame it carries.

    ``unit`` counts the bridge's access units from 1 (a gap is a unit lost on the link);
    ``bridge_id`` is random per bridge process (a new one: the decoder starts afresh at a
    keyframe); ``origin_pid`` is the origin daemon's pid; ``sent_wall`` when the bridge sent it.
    """

    keyframe: bool
    width: int
    height: int
    unit: int
    seq: int
    timestamp_ns: int
    wall_time: float
    bridge_id: int
    origin_pid: int
    sent_wall: float

    # version, flags, width, height, (2 spare), unit, seq, timestamp_ns, wall_time, bridge_id,
    # origin_pid, sent_wall: 64 bytes.
    LAYOUT = struct.Struct("<BBHHxxQQqdQQd")

    def pack(self) -> bytes:
        flags = FLAG_KEYFRAME if self.keyframe else 0
        return self.LAYOUT.pack(
            WIRE_VERSION, flags, self.width, self.height, self.unit, self.seq, self.timestamp_ns,
            self.wall_time, self.bridge_id, self.origin_pid, self.sent_wall,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes) -> "VideoUnit":
        """ValueError for a header of another size or version (another framebroker release)."""
        if len(raw) != cls.LAYOUT.size:
            raise ValueError(f"video header of {len(raw)} bytes, expected {cls.LAYOUT.size}")
        version, flags, width, height, *rest = cls.LAYOUT.unpack(raw)
        if version != WIRE_VERSION:
            raise ValueError(f"video header version {version}, this framebroker reads version {WIRE_VERSION}: update both ends")
        return cls(bool(flags & FLAG_KEYFRAME), width, height, *rest)


def encode_result(seq: int, wall_time: float, origin_pid: int, data: Dict[str, Any]) -> bytes:
    return json.dumps({"seq": seq, "wall_time": wall_time, "origin_pid": origin_pid, "data": data}, separators=(",", ":")).encode()


def decode_result(raw: bytes) -> Dict[str, Any]:
    """ValueError unless it is a result message."""
    message = json.loads(raw)
    if not isinstance(message, dict) or not isinstance(message.get("seq"), int) or not isinstance(message.get("data"), dict):
        raise ValueError("not a framebroker result message")
    if not isinstance(message.get("wall_time"), (int, float)):
        raise ValueError("a result message without the frame's wall_time")
    return message


def monotonic_from_wall(wall_time: float) -> int:
    """The CLOCK_MONOTONIC time (ns) of this machine that corresponds to ``wall_time`` (epoch s).

    Capture times cross machines as wall times, since each machine's monotonic clock starts at
    its own boot: ages and latencies computed from them are as good as the clocks' agreement
    (NTP: milliseconds; one machine: exact)."""
    return time.monotonic_ns() - int((time.time() - wall_time) * 1e9)


def capture_ns(wall_time: float) -> int:
    """``monotonic_from_wall``, never later than now (clocks of two machines may disagree)."""
    return min(monotonic_from_wall(wall_time), time.monotonic_ns())


def session_config(connect: Sequence[str] = (), listen: Sequence[str] = (), config_file: Optional[str] = None) -> Any:
    """A ``zenoh.Config``: the file's (or Zenoh's defaults), then the endpoints given, multicast
    scouting off unless the file turns it on, shared memory off. ValueError naming what is wrong."""
    zenoh = import_zenoh()
    if config_file:
        try:
            config = zenoh.Config.from_file(config_file)
        except Exception as exc:  # zenoh.ZError, or the file's own error
            raise ValueError(f"cannot use Zenoh config file {config_file}: {exc}") from None
    else:
        config = zenoh.Config()
    try:
        if connect:
            config.insert_json5("connect/endpoints", json.dumps(list(connect)))
        if listen:
            config.insert_json5("listen/endpoints", json.dumps(list(listen)))
        elif not config_file:
            # Zenoh's default would listen on every interface at a random port: only what was asked.
            config.insert_json5("listen/endpoints", "[]")
    except Exception as exc:
        raise ValueError(f"bad Zenoh endpoint in {list(connect) + list(listen)}: {exc} (an endpoint looks like tcp/192.168.1.20:7447)") from None
    if config.get_json("scouting/multicast/enabled") is None:
        config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("transport/shared_memory/enabled", "false")
    return config


def check_endpoint(text: str) -> str:
    """``tcp/HOST:PORT`` and the like (ValueError otherwise); Zenoh itself judges the rest."""
    protocol, slash, address = text.partition("/")
    if not slash or not protocol.isalpha() or not address:
        raise ValueError(f"Zenoh endpoint {text!r} is not PROTOCOL/ADDRESS, e.g. tcp/192.168.1.20:7447 or tcp/0.0.0.0:7447")
    return text


def open_session(config: Any) -> Any:
    zenoh = import_zenoh()
    try:
        return zenoh.open(config)
    except Exception as exc:  # zenoh.ZError: a port in use, an address this machine does not have
        raise OSError(f"cannot open a Zenoh session: {exc}") from None


def peer_count(session: Any) -> int:
    """How many Zenoh peers and routers the session is connected to now."""
    info = session.info
    return len(info.peers_zid()) + len(info.routers_zid())


class ResultRelay:
    """Carries results both ways between a local stream and the stream's Zenoh key expressions.

    Out: every model that publishes on the local stream (``fb.models``), except those this relay
    writes itself, is read in order (a ``fb.ResultReader`` and a thread per model) and each result
    is put on ``framebroker/<key_stream>/results/<model>``. In: samples from other sessions on
    those keys are written into the local results channel (``fb.ResultWriter``, all from one
    thread: a writer is for one thread), with the frame's capture time on this machine's clock
    (``capture_ns``).

    ``origin_pid()`` is the pid of the origin daemon the local frames come from (0 while
    unknown): results about another one's frames are dropped.
    """

    POLL = 1.0  # seconds between looks at which models publish locally
    READ_TIMEOUT = 0.5

    def __init__(
        self,
        session: Any,
        key_stream: str,
        local_stream: str,
        origin_pid: Callable[[], int],
        reader_name: str,
    ) -> None:
        self.session = session
        self.key_stream = key_stream
        self.local_stream = local_stream
        self.origin_pid = origin_pid
        self.reader_name = reader_name
        self.received = 0  # results written into the local channel (by the writing thread)
        self.refused = 0  # results that could not be written (out of order, a model name taken)
        self._sent: Dict[str, int] = {}  # results put on Zenoh, per model (by that model's thread)
        self._stop = threading.Event()
        self._incoming: List[Any] = []
        self._incoming_ready = threading.Condition()
        self._written: Set[str] = set()  # models this relay writes locally: never sent out
        self._outgoing: Dict[str, threading.Thread] = {}
        self._threads: List[threading.Thread] = []
        self._subscriber: Any = None

    @property
    def sent(self) -> int:
        """Results put on Zenoh."""
        return sum(self._sent.values())

    def start(self) -> None:
        zenoh = import_zenoh()
        self._subscriber = self.session.declare_subscriber(
            results_key(self.key_stream), self._arrived, allowed_origin=zenoh.Locality.REMOTE
        )
        for target, name in ((self._write_loop, "results-in"), (self._watch_models, "results-out")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        with self._incoming_ready:
            self._incoming_ready.notify_all()
        if self._subscriber is not None:
            try:
                self._subscriber.undeclare()
            except Exception:  # the session may be closed already
                pass
        for thread in self._threads + list(self._outgoing.values()):
            thread.join(timeout=2.0)

    # --- in: the other end's models, written locally ----------------------------------------------

    def _arrived(self, sample: Any) -> None:
        # Zenoh's thread: hand over and return at once.
        with self._incoming_ready:
            if len(self._incoming) < 1000:  # a stuck writer must not grow memory without bound
                self._incoming.append((str(sample.key_expr), sample.payload.to_bytes()))
            self._incoming_ready.notify()

    def _write_loop(self) -> None:
        writers: Dict[str, Any] = {}
        last_seq: Dict[str, int] = {}
        refused_models: Set[str] = set()
        try:
            while not self._stop.is_set():
                with self._incoming_ready:
                    while not self._incoming and not self._stop.is_set():
                        self._incoming_ready.wait(self.READ_TIMEOUT)
                    batch, self._incoming = self._incoming, []
                for key, raw in batch:
                    self._write_one(writers, last_seq, refused_models, model_of(key), raw)
        finally:
            for writer in writers.values():
                writer.close()

    def _write_one(self, writers: Dict[str, Any], last_seq: Dict[str, int], refused_models: Set[str], model: str, raw: bytes) -> None:
        try:
            message = decode_result(raw)
        except ValueError as exc:
            log.debug("ignoring a result on %s: %s", results_key(self.key_stream, model), exc)
            return
        pid = self.origin_pid()
        if pid and message.get("origin_pid") and message["origin_pid"] != pid:
            return  # about the frames of an origin daemon that is gone
        writer = writers.get(model)
        if writer is None:
            if model in refused_models:
                self.refused += 1
                return
            self._written.add(model)  # before it exists: the out side must never pick it up
            try:
                writer = writers[model] = ResultWriter(self.local_stream, model)
            except (FrameBrokerError, ValueError) as exc:
                self._written.discard(model)
                refused_models.add(model)
                self.refused += 1
                log.warning("results of model %r from the other end are not written into stream %r: %s", model, self.local_stream, exc)
                return
        seq, wall = message["seq"], float(message["wall_time"])
        if seq <= last_seq.get(model, 0):
            self.refused += 1  # out of order: the other end restarted, or its model did
            return
        try:
            try:
                # The frame's own capture times, while it is in the local ring (usually: results
                # come back within a few frames)...
                writer.publish(seq, message["data"])
            except ValueError:
                # ... else from its wall time (``ResultWriter`` takes no wall time of its own).
                writer.publish(seq, message["data"], timestamp_ns=capture_ns(wall))
        except (ValueError, TypeError) as exc:  # data a writer refuses
            self.refused += 1
            log.debug("result of model %r for frame %d not written: %s", model, seq, exc)
            return
        last_seq[model] = seq
        self.received += 1

    # --- out: the local models, put on Zenoh ------------------------------------------------------

    def _watch_models(self) -> None:
        while True:
            try:
                local_models = models(self.local_stream)
            except (FrameBrokerError, ValueError, OSError):
                local_models = []
            for model in local_models:
                thread = self._outgoing.get(model)
                if model in self._written or (thread is not None and thread.is_alive()):
                    continue
                thread = threading.Thread(target=self._send_model, args=(model,), name=f"results-out-{model}", daemon=True)
                self._outgoing[model] = thread
                thread.start()
            if self._stop.wait(self.POLL):
                return

    def _send_model(self, model: str) -> None:
        try:
            reader = ResultReader(self.local_stream, model, name=self.reader_name)
        except (FrameBrokerError, ValueError):
            return  # gone again: the watcher starts another thread if it comes back
        try:
            publisher = self.session.declare_publisher(results_key(self.key_stream, model))
            try:
                self._send_results(model, reader, publisher)
            finally:
                publisher.undeclare()
        except Exception as exc:  # noqa: BLE001 - a closed session, a reader whose stream went away
            if not self._stop.is_set():
                log.debug("sending the results of model %r stopped: %s", model, exc)
        finally:
            reader.close()

    def _send_results(self, model: str, reader: ResultReader, publisher: Any) -> None:
        last = 0
        while not self._stop.is_set():
            try:
                results = self._backlog(reader) if not last else reader.ordered(timeout=self.READ_TIMEOUT)
                for result in results:
                    if model in self._written:
                        return  # this end writes the model now (from the other end): no echo
                    if result.seq > last:
                        publisher.put(encode_result(result.seq, result.wall_time, self.origin_pid(), result.data))
                        self._sent[model] = self._sent.get(model, 0) + 1
                        last = result.seq
                    if self._stop.is_set():
                        return
                if last:
                    return  # ordered() ended: the stream ended
            except FrameTimeout:
                if model not in models(self.local_stream):
                    return  # its writer left; a new one gets a new thread

    def _backlog(self, reader: ResultReader) -> List[Any]:
        """The results the model's ring still keeps, oldest first: ``ordered()`` starts at the
        newest, and the model may have published a few before this relay noticed it."""
        newest = reader.latest(timeout=self.READ_TIMEOUT)
        kept = [newest]
        for seq in range(newest.seq - 1, max(0, newest.seq - BACKLOG_FRAMES), -1):
            try:
                result = reader.get(seq, timeout=0)
            except (ResultExpired, FrameTimeout):
                break
            if result is not None:
                kept.append(result)
        return kept[::-1]


def endpoints_text(connect: Iterable[str], listen: Iterable[str], config_file: Optional[str]) -> str:
    """How a session reaches the other end, in a few words, for logs and status."""
    parts = [f"connect {e}" for e in connect] + [f"listen {e}" for e in listen]
    if config_file:
        parts.append(f"config {config_file}")
    return ", ".join(parts) or "Zenoh defaults"
