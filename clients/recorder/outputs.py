"""Outputs: where encoded packets go. A .ts file, segmented .ts files, UDP, SRT.

Every output muxes MPEG-TS with FFmpeg's real muxer (``TsMuxer``, through PyAV) with a 1/90000
time base, so the PTS an encoder gave a packet is the PTS in the file. MPEG-TS needs no trailer:
each packet is flushed to the file (or socket) as it is muxed, so a recorder killed with kill -9
leaves a file that plays up to its last packet. The encoder used is written into each file's
program metadata (service_provider "framebroker", service_name "<stream> encoder=<name>"), which
``ffprobe -show_programs`` shows.

An output starts writing at the first keyframe it is given, so every file and stream begins
where a decoder can start.

A note on locking: ``start()`` and ``stop()`` take the output's lock and check its state;
``write()`` is called only by the ``PacketRouter``, one packet at a time, between the two.
"""

from __future__ import annotations

import csv
import enum
import logging
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Optional, Union
from urllib.parse import parse_qsl, urlsplit

import framebroker as fb

from .packets import PTS_HZ, TIME_BASE, EncodedPacket, StreamInfo, keep_tail

log = logging.getLogger("framebroker.recorder")

# MPEG-TS over UDP: 7 TS packets of 188 bytes per datagram, the size every receiver expects and
# one that fits an Ethernet MTU.
UDP_PACKET_SIZE = 7 * 188
# SRT output: bytes queued for the ffmpeg child before packets are dropped (up to the next
# keyframe) instead of waiting for a slow or absent receiver.
SRT_QUEUE_BYTES = 16 * 1024 * 1024
SRT_STOP_TIMEOUT = 5.0


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class OutputError(fb.FrameBrokerError):
    """An output could not be written (disk full, receiver gone, bad address)."""


def segment_stamp(wall_time: float) -> str:
    """``20261121-101530.123Z``: UTC, so names sort in time order across DST changes."""
    whole = int(wall_time)
    millis = int(round((wall_time - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(whole)) + f".{millis:03d}Z"


class TsMuxer:
    """FFmpeg's MPEG-TS muxer writing to a path, a URL or a Python file-like object."""

    def __init__(self, target: Union[str, IO[bytes]], info: StreamInfo) -> None:
        import av

        self._av = av
        # flush_packets: hand every muxed packet to the file or socket at once (no 32 KiB
        # buffering), which is what bounds the loss on kill -9.
        self._container: Any = av.open(target, "w", format="mpegts", container_options={"flush_packets": "1"})
        try:
            self._container.metadata["service_provider"] = "framebroker"
            self._container.metadata["service_name"] = f"{info.stream} encoder={info.encoder}"
            stream = self._container.add_stream("h264")
            stream.width = info.width
            stream.height = info.height
            stream.time_base = TIME_BASE
            self._stream = stream
        except BaseException:
            self._container.close()
            raise

    def mux(self, packet: EncodedPacket) -> None:
        out = self._av.Packet(packet.data)
        out.pts = packet.pts
        out.dts = packet.dts
        out.time_base = TIME_BASE
        out.is_keyframe = packet.keyframe
        out.stream = self._stream
        self._container.mux(out)

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.close()


class SidecarIndex:
    """``<file>.csv`` next to a .ts: one row per frame, to join ML results (by seq) to the video.

    Columns: seq, pts (90 kHz ticks, as in the file), pts_time (seconds), wall_time (epoch seconds
    of capture), timestamp_ns (CLOCK_MONOTONIC capture time). Line-buffered, like the video.
    """

    COLUMNS = ("seq", "pts", "pts_time", "wall_time", "timestamp_ns")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w", buffering=1, newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(self.COLUMNS)

    def add(self, packet: EncodedPacket) -> None:
        for stamp in packet.frames:
            self._writer.writerow((stamp.seq, stamp.pts, f"{stamp.pts / PTS_HZ:.6f}", f"{stamp.wall_time:.6f}", stamp.timestamp_ns))

    def close(self) -> None:
        self._file.close()


class Output:
    """Takes encoded packets: ``start(info)``, ``write(packet)`` for each, ``stop()``."""

    def __init__(self) -> None:
        self._state = State.NEW
        self._lock = threading.Lock()
        self._started_on_keyframe = False
        self.skipped = 0  # packets before the first keyframe, not written

    @property
    def state(self) -> State:
        return self._state

    def describe(self) -> str:
        raise NotImplementedError

    def start(self, info: StreamInfo) -> None:
        with self._lock:
            if self._state is not State.NEW:
                raise ValueError(f"output {self.describe()} was already started")
            self._start(info)
            self._state = State.RUNNING

    def write(self, packet: EncodedPacket) -> None:
        if self._state is not State.RUNNING:
            raise ValueError(f"output {self.describe()} is {self._state.value}, not running")
        if not self._started_on_keyframe:
            if not packet.keyframe:
                self.skipped += 1
                return
            self._started_on_keyframe = True
        try:
            self._write(packet)
        except OSError as exc:
            raise OutputError(f"writing {self.describe()} failed: {exc}") from None

    def stop(self) -> None:
        with self._lock:
            if self._state is not State.RUNNING:
                self._state = State.STOPPED
                return
            self._state = State.STOPPED
            self._stop()

    def _start(self, info: StreamInfo) -> None:
        raise NotImplementedError

    def _write(self, packet: EncodedPacket) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError


class FileOutput(Output):
    """One .ts file (overwritten if it exists), with an optional sidecar index next to it."""

    def __init__(self, path: Union[str, Path], index: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.index_path = self.path.with_suffix(".csv") if index else None
        self._muxer: Optional[TsMuxer] = None
        self._index: Optional[SidecarIndex] = None
        self.first_pts: Optional[int] = None
        self.last_pts: Optional[int] = None
        self._complete_size = 0

    def describe(self) -> str:
        return str(self.path)

    def _start(self, info: StreamInfo) -> None:
        try:
            # "file:" so FFmpeg never reads a name like "cam:0.ts" as a protocol.
            self._muxer = TsMuxer("file:" + str(self.path.resolve()), info)
            if self.index_path is not None:
                self._index = SidecarIndex(self.index_path)
        except OSError as exc:
            if self._muxer is not None:
                self._muxer.close()
            raise OutputError(f"cannot write {self.path}: {exc}") from None

    def _write(self, packet: EncodedPacket) -> None:
        assert self._muxer is not None
        try:
            self._muxer.mux(packet)
        except OSError:
            # A full disk cut the last packet short: end the file at the last complete one, so
            # what was recorded plays without a broken frame at its end.
            try:
                os.truncate(self.path, self._complete_size)
            except OSError:
                pass
            raise
        # Each mux writes whole TS packets and flushes them: the file now ends on a boundary.
        self._complete_size = os.path.getsize(self.path)
        if self._index is not None:
            self._index.add(packet)
        if self.first_pts is None:
            self.first_pts = packet.pts
        self.last_pts = packet.pts

    def _stop(self) -> None:
        muxer, self._muxer = self._muxer, None
        index, self._index = self._index, None
        try:
            if muxer is not None:
                muxer.close()
        finally:
            if index is not None:
                index.close()


class SegmentedOutput(Output):
    """A new file every ``seconds``, each starting on a keyframe, with a sidecar index each.

    Files are ``DIR/<prefix>-<UTC start>.ts`` (the capture wall time of their first frame) and
    ``.csv``. A cut happens at the first keyframe at or after each multiple of ``seconds`` of
    recording time; encoders that force keyframes on time (FFmpeg's) put one exactly there.
    With ``keep``, the oldest files of this prefix in DIR (earlier runs' too) are deleted so that
    at most ``keep`` remain.
    """

    def __init__(self, directory: Union[str, Path], prefix: str, seconds: Fraction, keep: Optional[int] = None) -> None:
        super().__init__()
        if seconds <= 0:
            raise ValueError(f"segment length must be > 0 s, got {seconds}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 file, got {keep}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.seconds = Fraction(seconds)
        self.keep = keep
        self._ticks = self.seconds * PTS_HZ
        self._info: Optional[StreamInfo] = None
        self._current: Optional[FileOutput] = None
        self._segment = -1
        self._pattern = re.compile(re.escape(prefix) + r"-\d{8}-\d{6}\.\d{3}Z(?:-\d+)?\.ts")
        self.files: list[Path] = []  # every file this output created, in order
        self.deleted: list[Path] = []

    def describe(self) -> str:
        return f"{self.directory}/{self.prefix}-*.ts every {float(self.seconds):g} s"

    def _start(self, info: StreamInfo) -> None:
        if not self.directory.is_dir():
            raise OutputError(f"segment directory {self.directory} does not exist")
        self._info = info

    def _segment_of(self, pts: int) -> int:
        return int(pts * self._ticks.denominator // self._ticks.numerator)

    def _write(self, packet: EncodedPacket) -> None:
        if packet.keyframe and (self._current is None or self._segment_of(packet.pts) > self._segment):
            self._cut(packet)
        assert self._current is not None
        self._current.write(packet)

    def _cut(self, packet: EncodedPacket) -> None:
        if self._current is not None:
            self._current.stop()
        wall = packet.frames[0].wall_time if packet.frames else time.time()
        stem = f"{self.prefix}-{segment_stamp(wall)}"
        path = self.directory / f"{stem}.ts"
        serial = 0
        while path.exists() or path in self.files:
            serial += 1
            path = self.directory / f"{stem}-{serial}.ts"
        assert self._info is not None
        current = FileOutput(path, index=True)
        current.start(self._info)
        self._current = current
        self._segment = self._segment_of(packet.pts)
        self.files.append(path)
        log.info("segment %s", path)
        self._prune()

    def _prune(self) -> None:
        if self.keep is None:
            return
        current = self._current.path if self._current is not None else None
        # The current file may not exist yet: FFmpeg creates it with the first packet.
        found = {p for p in self.directory.iterdir() if self._pattern.fullmatch(p.name)}
        ours = sorted(found | ({current} if current is not None else set()))
        for old in ours[: max(0, len(ours) - self.keep)]:
            if old == current:
                continue
            for victim in (old, old.with_suffix(".csv")):
                try:
                    victim.unlink()
                except FileNotFoundError:
                    pass
            self.deleted.append(old)
            log.info("deleted old segment %s (--keep %d)", old, self.keep)

    def _stop(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.stop()


def _network_target(url: str, scheme: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.hostname or parts.port is None:
        raise ValueError(f"{url!r} is not a {scheme}://HOST:PORT address")
    return parts.hostname, parts.port


class UdpOutput(Output):
    """MPEG-TS over UDP (FFmpeg's udp protocol), 7 TS packets per datagram.

    Options in the URL go to FFmpeg (``?ttl=4``, ``?localaddr=``, multicast addresses work).
    UDP has no connection: nothing fails when no one listens.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        _network_target(url, "udp")
        query = dict(parse_qsl(urlsplit(url).query))
        if "pkt_size" not in query:
            url += ("&" if urlsplit(url).query else "?") + f"pkt_size={UDP_PACKET_SIZE}"
        self.url = url
        self._muxer: Optional[TsMuxer] = None

    def describe(self) -> str:
        return self.url

    def _start(self, info: StreamInfo) -> None:
        try:
            self._muxer = TsMuxer(self.url, info)
        except Exception as exc:
            raise OutputError(f"cannot send to {self.url}: {exc}") from None

    def _write(self, packet: EncodedPacket) -> None:
        assert self._muxer is not None
        self._muxer.mux(packet)

    def _stop(self) -> None:
        muxer, self._muxer = self._muxer, None
        if muxer is not None:
            muxer.close()


class _Chunks:
    """A write-only file object collecting what the muxer writes, taken after each packet."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class SrtOutput(Output):
    """MPEG-TS over SRT, sent by an ``ffmpeg`` child (Debian's ffmpeg has libsrt; PyAV's has not).

    We mux exactly as for a file and pipe the bytes to ``ffmpeg -f mpegts -i pipe: -c copy -f
    mpegts srt://...``. A writer thread feeds the child from a bounded queue, so a slow or absent
    receiver never blocks encoding: when the queue is full, packets are dropped up to the next
    keyframe and counted. If the child ends (connection refused or lost), the recording fails with
    the child's reason. URL options (``mode=listener``, ``latency=``, ``passphrase=``) go to ffmpeg.
    """

    def __init__(self, url: str, ffmpeg: str = "ffmpeg") -> None:
        super().__init__()
        _network_target(url, "srt")
        self.url = url
        self._ffmpeg = ffmpeg
        self._process: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._dropping = False
        self._stderr: deque[str] = deque(maxlen=20)
        self._error: Optional[str] = None
        self._writer: Optional[threading.Thread] = None
        self.dropped = 0

    def describe(self) -> str:
        return re.sub(r"(passphrase=)[^&]*", r"\1***", self.url)

    def _start(self, info: StreamInfo) -> None:
        program = shutil.which(self._ffmpeg)
        if program is None:
            raise OutputError("srt:// output needs the ffmpeg program (with libsrt): apt-get install ffmpeg")
        argv = [
            program, "-hide_banner", "-loglevel", "error",
            # Start forwarding after a short look at the stream (it is ours: one H.264 stream).
            "-probesize", "65536", "-analyzeduration", "500000",
            "-f", "mpegts", "-i", "pipe:0", "-map", "0", "-c", "copy",
            "-metadata", "service_provider=framebroker",
            "-metadata", f"service_name={info.stream} encoder={info.encoder}",
            "-f", "mpegts", self.url,
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
            )
        except OSError as exc:
            raise OutputError(f"cannot start ffmpeg for {self.describe()}: {exc}") from None
        self._chunks = _Chunks()
        self._muxer = TsMuxer(self._chunks, info)  # type: ignore[arg-type]
        self._writer = threading.Thread(target=self._feed, name="srt-writer", daemon=True)
        self._writer.start()
        keep_tail(self._process.stderr, self._stderr, "srt-stderr")  # type: ignore[union-attr,arg-type]

    def _feed(self) -> None:
        process = self._process
        assert process is not None and process.stdin is not None
        while True:
            data = self._queue.get()
            if data is None:
                break
            with self._queued_lock:
                self._queued_bytes -= len(data)
            try:
                process.stdin.write(data)
                process.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                try:
                    process.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    pass
                self._error = self._reason()
                return

    def _reason(self) -> str:
        code = self._process.returncode if self._process is not None else None
        detail = " / ".join(self._stderr) or "no message"
        return f"SRT output {self.describe()} stopped (ffmpeg exit {code}): {detail}"

    def _write(self, packet: EncodedPacket) -> None:
        if self._error is not None:
            raise OutputError(self._error)
        if self._dropping and not packet.keyframe:
            self.dropped += 1
            return
        with self._queued_lock:
            full = self._queued_bytes >= SRT_QUEUE_BYTES
        if full:
            if not self._dropping:
                log.warning("SRT output %s cannot keep up; dropping packets up to the next keyframe", self.describe())
            self._dropping = True
            self.dropped += 1
            return
        self._dropping = False
        self._muxer.mux(packet)
        data = self._chunks.take()
        with self._queued_lock:
            self._queued_bytes += len(data)
        self._queue.put(data)

    def _stop(self) -> None:
        try:
            self._muxer.close()
            tail = self._chunks.take()
            if tail:
                self._queue.put(tail)
        finally:
            self._queue.put(None)
            if self._writer is not None:
                self._writer.join(timeout=SRT_STOP_TIMEOUT)
            process = self._process
            if process is not None:
                try:
                    assert process.stdin is not None
                    process.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
                try:
                    process.wait(timeout=SRT_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.terminate()
                    try:
                        process.wait(timeout=2.0)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
        if self._error is not None:
            raise OutputError(self._error)


def make_output(target: str, index: bool = False) -> Output:
    """The output for ``-o``: udp://HOST:PORT, srt://HOST:PORT[?...] or a file path."""
    scheme = urlsplit(target).scheme if "://" in target else ""
    if scheme == "udp":
        return UdpOutput(target)
    if scheme == "srt":
        return SrtOutput(target)
    if scheme:
        raise ValueError(f"-o {target!r}: unknown scheme {scheme}://; give a file path, udp://HOST:PORT or srt://HOST:PORT")
    return FileOutput(target, index=index)


__all__ = [
    "FileOutput",
    "Output",
    "OutputError",
    "SegmentedOutput",
    "SidecarIndex",
    "SrtOutput",
    "TsMuxer",
    "UdpOutput",
    "make_output",
    "segment_stamp",
]
