"""Outputs: where encoded packets go. The ``Output`` base, a file (.ts, .mp4 or .mkv), segmented .ts
files, and the muxer they share; the network outputs (UDP, SRT, RTSP) are in ``live``.

Every output muxes with FFmpeg's real muxers (``Muxer``, through PyAV) with a 1/90000 time base,
so the PTS an encoder gave a packet is the PTS in the file. A file's extension names its
container (``CONTAINERS``); segments, clips and streams are MPEG-TS. MPEG-TS needs no trailer:
each packet is flushed to the file (or socket) as it is muxed, so a recorder killed with kill -9
leaves a file that plays up to its last packet; MP4 is written fragmented and Matroska in short
clusters for the same reason. The encoder used is written into each file's metadata: in
MPEG-TS the program's (service_provider "framebroker", service_name "<stream> encoder=<name>",
``ffprobe -show_programs``), in MP4 and Matroska the title ("<stream> encoder=<name>").

An output starts writing at the first keyframe it is given, so every file and stream begins
where a decoder can start. ``status()`` is what ``framebroker status`` shows about it.

A note on locking: ``start()`` and ``stop()`` take the output's lock and check its state;
``write()`` is called only by the ``PacketRouter``, one packet at a time, between the two.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Optional, Union
from urllib.parse import urlsplit

import framebroker as fb
from framebroker.sources import redact

from .lifecycle import Lifecycle, State
from .packets import PTS_HZ, TIME_BASE, EncodedPacket, StreamInfo
from .results import ResultSidecar, Sidecars, sidecar_path

log = logging.getLogger("framebroker.recorder")

# The bit rate an output shows is measured over about this long (s).
RATE_WINDOW = 2.0


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


class Throughput:
    """The bit rate of a growing byte count, over the last RATE_WINDOW seconds; measured when
    asked (``framebroker status`` asks twice a second), by one thread."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def kbps(self, total_bytes: int) -> int:
        now = time.monotonic()
        samples = self._samples
        samples.append((now, total_bytes))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        then, before = samples[0]
        return round((total_bytes - before) * 8 / 1000 / (now - then)) if now > then else 0


@dataclass(frozen=True)
class OutputStatus:
    """What ``framebroker status`` and the summary line say about one output.

    ``state``: ``writing`` (a file, segments), ``buffering`` or ``writing clip`` (clips),
    ``connecting`` (``listening`` for an SRT listener), ``connected``, ``reconnecting``, ``stopped``.
    ``kbps``: the H.264 it took (a live output: sent) over the last seconds; None while a live
    output is not connected. ``attempts``: failed attempts since the link was last up;
    ``reason``: why the last one failed. ``reconnects``: times the link came back.
    """

    label: str
    state: str
    kbps: Optional[int] = None
    attempts: int = 0
    reason: str = ""
    reconnects: int = 0

    def text(self, label_chars: Optional[int] = None, reason_chars: Optional[int] = None) -> str:
        """``rtsp://***@cam:8554/front reconnecting #3 re=1 (Connection refused)``, with the
        label and the reason cut to at most so many characters (0: no reason)."""
        words = [_shorten(self.label, label_chars), self.state]
        if self.attempts:
            words.append(f"#{self.attempts}")
        if self.kbps is not None:
            words.append(f"{self.kbps}kb/s")
        if self.reconnects:
            words.append(f"re={self.reconnects}")
        if self.reason and reason_chars != 0:
            words.append(f"({_shorten(self.reason, reason_chars)})")
        return " ".join(words)


def _shorten(text: str, limit: Optional[int]) -> str:
    return text if limit is None or len(text) <= limit else text[: max(0, limit - 3)] + "..."


class Output(Lifecycle):
    """Takes encoded packets: ``start(info)``, ``write(packet)`` for each, ``stop()``."""

    def __init__(self) -> None:
        super().__init__()
        self._started_on_keyframe = False
        self.skipped = 0  # packets before the first keyframe, not written
        self.bytes_written = 0  # H.264 bytes of the packets written
        self._throughput = Throughput()

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
        self.bytes_written += len(packet.data)

    def stop(self) -> None:
        self._stop_once(self._stop)

    def status(self) -> OutputStatus:
        """For ``framebroker status``: from one thread at a time (the bit rate is measured here)."""
        state = {State.NEW: "starting", State.RUNNING: "writing"}.get(self._state, self._state.value)
        return OutputStatus(self.describe(), state, self._throughput.kbps(self.bytes_written))

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


def make_output(target: str, index: bool = False, results: Optional[Sidecars] = None) -> Output:
    """The output for one ``-o``: rtsp://HOST[:PORT]/PATH, srt://HOST:PORT[?...], udp://HOST:PORT or
    a FILE.ts, .mp4 or .mkv (ValueError for anything else). ``index`` and ``results`` are for files only."""
    from .live import LIVE_SCHEMES  # live outputs build on this module's Output and Muxer

    scheme = urlsplit(target).scheme if "://" in target else ""
    if scheme in LIVE_SCHEMES:
        return LIVE_SCHEMES[scheme](target)
    if scheme:
        raise ValueError(
            f"-o {redact(target)!r}: unknown scheme {scheme}://; give a file (.ts, .mp4, .mkv), "
            "rtsp://HOST[:PORT]/PATH, srt://HOST:PORT or udp://HOST:PORT"
        )
    try:
        return FileOutput(target, index=index, results=results)
    except ValueError as exc:
        raise ValueError(f"-o {exc}") from None


__all__ = [
    "CONTAINERS",
    "FileOutput",
    "Muxer",
    "Output",
    "OutputError",
    "OutputStatus",
    "SegmentedOutput",
    "SidecarIndex",
    "Throughput",
    "container_for",
    "make_output",
    "segment_stamp",
]
