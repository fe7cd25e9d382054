"""Outputs: where encoded packets go. A file (.ts, .mp4 or .mkv), segmented .ts files, UDP, SRT.

Every output muxes with FFmpeg's real muxers (``Muxer``, through PyAV) with a 1/90000 time base,
so the PTS an encoder gave a packet is the PTS in the file. A file's extension names its
container (``CONTAINERS``); segments, clips and streams are MPEG-TS. MPEG-TS needs no trailer:
each packet is flushed to the file (or socket) as it is muxed, so a recorder killed with kill -9
leaves a file that plays up to its last packet; MP4 is written fragmented and Matroska in short
clusters for the same reason. The encoder used is written into each file's metadata: in
MPEG-TS the program's (service_provider "framebroker", service_name "<stream> encoder=<name>",
``ffprobe -show_programs``), in MP4 and Matroska the title ("<stream> encoder=<name>").

An output starts writing at the first keyframe it is given, so every file and stream begins
where a decoder can start.

A note on locking: ``start()`` and ``stop()`` take the output's lock and check its state;
``write()`` is called only by the ``PacketRouter``, one packet at a time, between the two.
"""

from __future__ import annotations

import csv
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
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import framebroker as fb
from framebroker.sources import expand_env, redact, url_escape

from .lifecycle import Lifecycle, State
from .packets import PTS_HZ, TIME_BASE, EncodedPacket, StreamInfo
from .results import ResultSidecar, Sidecars, sidecar_path

log = logging.getLogger("framebroker.recorder")

# MPEG-TS over UDP: 7 TS packets of 188 bytes per datagram, the size every receiver expects and
# one that fits an Ethernet MTU.
UDP_PACKET_SIZE = 7 * 188
# SRT options that carry secrets (mediamtx takes user and password in the streamid): they go to
# ffmpeg through a private file, never on its command line, and are masked wherever shown.
SRT_SECRET_OPTIONS = ("passphrase", "streamid", "srt_streamid")
_SRT_SECRET_SETTING = re.compile(r"\b(" + "|".join(SRT_SECRET_OPTIONS) + r")=[^&\s]*")
# SRT output: bytes queued for the ffmpeg child before packets are dropped (up to the next
# keyframe) instead of waiting for a slow or absent receiver.
SRT_QUEUE_BYTES = 16 * 1024 * 1024
SRT_STOP_TIMEOUT = 5.0


class OutputError(fb.FrameBrokerError):
    """An output could not be written (disk full, receiver gone, bad address)."""


def segment_stamp(wall_time: float) -> str:
    """``20261121-101530.123Z``: UTC, so names sort in time order across DST changes."""
    whole = int(wall_time)
    millis = int(round((wall_time - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(whole)) + f".{millis:03d}Z"


# The container each file extension names: FFmpeg's muxer, and what to call it.
CONTAINERS = {".ts": ("mpegts", "MPEG-TS"), ".mp4": ("mp4", "fragmented MP4"), ".mkv": ("matroska", "Matroska")}
# Each muxer's options.
#   flush_packets: every muxed packet goes to the file or socket at once (no 32 KiB buffering),
#     which is what bounds the loss on kill -9.
#   MP4 is fragmented: an empty moov at the start (written once the first packet gives the
#     H.264 parameters: delay_moov) and a self-contained moof+mdat fragment at every keyframe
#     and at least every half second, so a killed recorder leaves a file that plays up to its
#     last complete fragment. A plain MP4 is unplayable until its index is written at the end.
#   Matroska: a new cluster at least every half second, for the same reason.
_MUXER_OPTIONS = {
    "mpegts": {"flush_packets": "1"},
    "mp4": {"movflags": "frag_keyframe+empty_moov+default_base_moof+delay_moov", "frag_duration": "500000", "flush_packets": "1"},
    "matroska": {"cluster_time_limit": "500", "flush_packets": "1"},
}


def container_for(path: Union[str, Path]) -> str:
    """The FFmpeg muxer for a file name; ValueError naming the extensions that work."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINERS:
        names = [f"{ext} ({label})" for ext, (_, label) in CONTAINERS.items()]
        known = ", ".join(names[:-1]) + " or " + names[-1]
        found = f"extension {suffix}" if suffix else "no extension"
        raise ValueError(f"{path}: {found}; the file name must end in {known}")
    return CONTAINERS[suffix][0]


class Muxer:
    """One of FFmpeg's muxers (``mpegts``, ``mp4``, ``matroska``) writing to a path, a URL or a
    Python file-like object, with the stream's time base of 1/90000 where the container allows
    it (Matroska counts milliseconds: its PTS are within 0.5 ms)."""

    def __init__(self, target: Union[str, IO[bytes]], info: StreamInfo, container: str) -> None:
        import av

        self._av = av
        self._container: Any = av.open(target, "w", format=container, container_options=dict(_MUXER_OPTIONS[container]))
        try:
            metadata = self._container.metadata
            if container == "mpegts":  # the program's name, as MPEG-TS receivers show it
                metadata["service_provider"] = "framebroker"
                metadata["service_name"] = f"{info.stream} encoder={info.encoder}"
            else:
                metadata["title"] = f"{info.stream} encoder={info.encoder}"
                metadata["comment"] = "recorded by framebroker"
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
    """``<file>.csv`` next to a video file: one row per frame, to join ML results (by seq) to the video.

    Columns: seq, pts (90 kHz ticks, as in .ts and .mp4 files; Matroska rounds them to
    milliseconds), pts_time (seconds), wall_time (epoch seconds of capture), timestamp_ns
    (CLOCK_MONOTONIC capture time). Line-buffered, like the video.
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


class Output(Lifecycle):
    """Takes encoded packets: ``start(info)``, ``write(packet)`` for each, ``stop()``."""

    def __init__(self) -> None:
        super().__init__()
        self._started_on_keyframe = False
        self.skipped = 0  # packets before the first keyframe, not written

    def start(self, info: StreamInfo) -> None:
        self._start_once(lambda: self._start(info))

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
        except OSError as exc:  # FFmpeg's message may name the URL, credentials and all
            raise OutputError(f"writing {self.describe()} failed: {redact(str(exc))}") from None

    def stop(self) -> None:
        self._stop_once(self._stop)

    def _start(self, info: StreamInfo) -> None:
        raise NotImplementedError

    def _write(self, packet: EncodedPacket) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError


class FileOutput(Output):
    """One file (overwritten if it exists) in the container its extension names (``CONTAINERS``;
    ValueError for another), with an optional sidecar index next to it, and with ``results``
    (``record --results``) the models' results of its frames (``FILE.results.jsonl``)."""

    def __init__(self, path: Union[str, Path], index: bool = False, results: Optional[Sidecars] = None) -> None:
        super().__init__()
        self.container = container_for(path)
        self.path = Path(path)
        self.index_path = self.path.with_suffix(".csv") if index else None
        self._results = results
        self._muxer: Optional[Muxer] = None
        self._index: Optional[SidecarIndex] = None
        self._sidecar: Optional[ResultSidecar] = None
        self._complete_size = 0

    def describe(self) -> str:
        return str(self.path)

    def _start(self, info: StreamInfo) -> None:
        try:
            # "file:" so FFmpeg never reads a name like "cam:0.ts" as a protocol.
            self._muxer = Muxer("file:" + str(self.path.resolve()), info, self.container)
            if self.index_path is not None:
                self._index = SidecarIndex(self.index_path)
            if self._results is not None:
                self._sidecar = self._results.open(self.path, self.container)
        except OSError as exc:
            if self._muxer is not None:
                self._muxer.close()
            if self._index is not None:
                self._index.close()
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
        if self._sidecar is not None:
            self._sidecar.frames_written(packet.frames)

    def _stop(self) -> None:
        muxer, self._muxer = self._muxer, None
        index, self._index = self._index, None
        sidecar, self._sidecar = self._sidecar, None
        try:
            if muxer is not None:
                muxer.close()
        finally:
            if index is not None:
                index.close()
            if sidecar is not None:
                sidecar.finish()  # closed once the models' results for its last frames are in


class SegmentedOutput(Output):
    """A new file every ``seconds``, each starting on a keyframe, with a sidecar index each (and a
    results sidecar each, with ``results``).

    Files are ``DIR/<prefix>-<UTC start>.ts`` (the capture wall time of their first frame) and
    ``.csv``. A cut happens at the first keyframe at or after each multiple of ``seconds`` of
    recording time; encoders that force keyframes on time (FFmpeg's) put one exactly there.
    With ``keep``, the oldest files of this prefix in DIR (earlier runs' too) are deleted so that
    at most ``keep`` remain.
    """

    def __init__(
        self, directory: Union[str, Path], prefix: str, seconds: Fraction, keep: Optional[int] = None, results: Optional[Sidecars] = None
    ) -> None:
        super().__init__()
        if seconds <= 0:
            raise ValueError(f"segment length must be > 0 s, got {seconds}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 file, got {keep}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.seconds = Fraction(seconds)
        self.keep = keep
        self._results = results
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
        current = FileOutput(path, index=True, results=self._results)
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
            for victim in (old, old.with_suffix(".csv"), sidecar_path(old)):
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


def _check_network_target(url: str, scheme: str, shown: str) -> None:
    """ValueError unless ``url`` is scheme://HOST:PORT[...]; ``shown`` is how to name it."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != scheme or not parts.hostname or port is None:
        raise ValueError(f"{shown!r} is not a {scheme}://HOST:PORT address")


class UdpOutput(Output):
    """MPEG-TS over UDP (FFmpeg's udp protocol), 7 TS packets per datagram.

    Options in the URL go to FFmpeg (``?ttl=4``, ``?localaddr=``, multicast addresses work).
    UDP has no connection: nothing fails when no one listens.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        _check_network_target(url, "udp", redact(url))
        query = dict(parse_qsl(urlsplit(url).query))
        if "pkt_size" not in query:
            url += ("&" if urlsplit(url).query else "?") + f"pkt_size={UDP_PACKET_SIZE}"
        self.url = url
        self._muxer: Optional[Muxer] = None

    def describe(self) -> str:
        return redact(self.url)

    def _start(self, info: StreamInfo) -> None:
        try:
            self._muxer = Muxer(self.url, info, "mpegts")
        except Exception as exc:
            raise OutputError(f"cannot send to {self.describe()}: {redact(str(exc))}") from None

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

    Secrets stay off every command line: ``${NAME}`` in the URL reads the environment variable
    NAME (so the recorder's own command line need not hold the passphrase), and the options in
    ``SRT_SECRET_OPTIONS`` reach ffmpeg through ``-fpre``, a file of ``option=value`` lines that
    ffmpeg applies to the output like command-line options, given as ``/dev/fd/N`` of an
    in-memory file (memfd) that only this user and root can open. The URL ffmpeg gets on its
    command line keeps only the other options. ``describe()`` shows the URL as written, with the
    secret options masked.
    """

    def __init__(self, url: str, ffmpeg: str = "ffmpeg") -> None:
        super().__init__()
        expanded, self._secrets = expand_env(url, url_escape)
        _check_network_target(expanded, "srt", self.describe_url(url))
        parts = urlsplit(expanded)
        public, self._secret_options = [], {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in SRT_SECRET_OPTIONS:
                if "\n" in value or "\r" in value:
                    raise ValueError(f"the SRT option {key} of {self.describe_url(url)!r} must be one line")
                self._secret_options[key] = value
            else:
                public.append((key, value))
        self._secrets += tuple(self._secret_options.values())
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(public), ""))
        self._shown = self.describe_url(url)
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

    @staticmethod
    def describe_url(url: str) -> str:
        """``url`` as it may be shown: credentials and secret options masked."""
        return _SRT_SECRET_SETTING.sub(lambda match: f"{match.group(1)}=***", redact(url))

    def describe(self) -> str:
        return self._shown

    def _options_file(self) -> int:
        """An in-memory file holding the secret options as ``-fpre`` reads them; -1 if none."""
        if not self._secret_options:
            return -1
        fd = os.memfd_create("framebroker-srt-options")
        os.write(fd, "".join(f"{key}={value}\n" for key, value in self._secret_options.items()).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _start(self, info: StreamInfo) -> None:
        program = shutil.which(self._ffmpeg)
        if program is None:
            raise OutputError("srt:// output needs the ffmpeg program (with libsrt): apt-get install ffmpeg")
        options_fd = self._options_file()
        argv = [
            program, "-hide_banner", "-loglevel", "error",
            # Start forwarding after a short look at the stream (it is ours: one H.264 stream).
            "-probesize", "65536", "-analyzeduration", "500000",
            "-f", "mpegts", "-i", "pipe:0", "-map", "0", "-c", "copy",
            "-metadata", "service_provider=framebroker",
            "-metadata", f"service_name={info.stream} encoder={info.encoder}",
            *(["-fpre", f"/dev/fd/{options_fd}"] if options_fd >= 0 else []),
            "-f", "mpegts", self.url,
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(options_fd,) if options_fd >= 0 else (),
                start_new_session=True,
            )
        except OSError as exc:
            raise OutputError(f"cannot start ffmpeg for {self.describe()}: {exc}") from None
        finally:
            if options_fd >= 0:
                os.close(options_fd)
        self._chunks = _Chunks()
        self._muxer = Muxer(self._chunks, info, "mpegts")  # type: ignore[arg-type]
        self._writer = threading.Thread(target=self._feed, name="srt-writer", daemon=True)
        self._writer.start()
        threading.Thread(target=self._keep_stderr, name="srt-stderr", daemon=True).start()

    def _keep_stderr(self) -> None:
        """The last lines ffmpeg prints (secrets masked), to tell why it ended."""
        process = self._process
        assert process is not None and process.stderr is not None
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._stderr.append(self.describe_url(redact(line, self._secrets)))

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


def make_output(target: str, index: bool = False, results: Optional[Sidecars] = None) -> Output:
    """The output for ``-o``: udp://HOST:PORT, srt://HOST:PORT[?...] or a FILE.ts, .mp4 or .mkv
    (ValueError for anything else). ``index`` and ``results`` are for files only."""
    scheme = urlsplit(target).scheme if "://" in target else ""
    if scheme == "udp":
        return UdpOutput(target)
    if scheme == "srt":
        return SrtOutput(target)
    if scheme:
        raise ValueError(
            f"-o {redact(target)!r}: unknown scheme {scheme}://; give a file (.ts, .mp4, .mkv), udp://HOST:PORT or srt://HOST:PORT"
        )
    try:
        return FileOutput(target, index=index, results=results)
    except ValueError as exc:
        raise ValueError(f"-o {exc}") from None


__all__ = [
    "CONTAINERS",
    "FileOutput",
    "Output",
    "OutputError",
    "SegmentedOutput",
    "SidecarIndex",
    "SrtOutput",
    "Muxer",
    "UdpOutput",
    "container_for",
    "make_output",
    "segment_stamp",
]
