"""Live outputs: UDP, SRT and RTSP streams that fail and come back by themselves.

``record NAME -o a.ts -o rtsp://... -o srt://... -o udp://...`` sends one encode everywhere. A file
that cannot be written ends the recording (it is the record); a live output's trouble (a server
restarting, a receiver gone, a network down) never reaches the encoder, the files or the other
outputs:

* ``write()``, called by the router, only queues the packet and returns.
* A thread of the output's own, the sender, opens the link, sends, and when the link fails says
  why (``status()``: ``reconnecting``, the reason, the attempts), waits (``BACKOFF_FIRST``,
  doubling up to ``BACKOFF_MAX``) and opens it again. Every link starts at a keyframe, and every
  keyframe carries SPS and PPS (``h264``), so a receiver decodes from the first packet it gets.
* Nothing is queued while the link is down. A link slower than the video does not fall ever
  further behind: when a keyframe comes and the queue holds more than ``BACKLOG_SECONDS`` of
  video (or ``QUEUE_BYTES``), what is queued is dropped (counted) and the stream goes on from
  that keyframe.

SRT and RTSP are sent by a child process that reads MPEG-TS on a pipe (``PipedOutput``). The pipe
is written without blocking: a child that takes nothing for ``STALL_SECONDS`` while connected, or
that does not connect within ``CONNECT_SECONDS``, is killed and the link opened again. ``srt://``
runs Debian's ``ffmpeg`` (PyAV's FFmpeg has no libsrt); ``rtsp://`` runs ``rtsp_publish.py``:
FFmpeg's RTSP muxer through PyAV, in a process of its own because that muxer talks to the server
while PyAV holds the GIL, so a server that accepts the connection and never answers would freeze
every thread of the recorder. UDP is sent from the sender thread with FFmpeg's udp protocol:
there is no connection to lose, only a network error (unreachable) ends its link.

Secrets stay off every command line (``ps`` shows them to every local user): ``${NAME}`` in a URL
reads the environment variable NAME; an RTSP URL reaches its child through a private file
descriptor, and SRT's secret options reach ffmpeg through ``-fpre`` on one. What is shown
(``describe()``, ``status()``, logs) masks them.

A note on threads: the router's thread calls ``write()``; the sender thread does everything on the
link. They share the queue and the ``_accepting``/``_need_keyframe`` flags under ``_cond``. The
counters and the link's state are plain values, each written by the sender only (``dropped`` by
the router's thread only), read by anyone.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable, Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from framebroker.sources import expand_env, redact, url_escape

from .outputs import Muxer, Output, OutputError, OutputStatus
from .packets import PTS_HZ, EncodedPacket, StreamInfo

log = logging.getLogger("framebroker.recorder")

# The wait before opening a failed link again: the first, doubled after each failure up to the
# longest (s); the same as a daemon's for its source.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
# A live output more than this far behind the encoder (s of video queued) starts again at the next
# keyframe: late video is of no use to a live viewer.
BACKLOG_SECONDS = 2.0
QUEUE_BYTES = 16 * 1024 * 1024
# A child that connects in no more than this (s), and once connected takes nothing for this long
# (s), is given up on (a server that accepted the connection and hangs, a frozen receiver).
CONNECT_SECONDS = 10.0
STALL_SECONDS = 5.0
# At the end of a recording: how long what is queued may take to go out, and the child to finish (s).
DRAIN_SECONDS = 2.0
CLOSE_SECONDS = 5.0
POLL_SECONDS = 0.25  # how often the sender looks at its link while it has nothing to send (s)
# MPEG-TS over UDP: 7 TS packets of 188 bytes per datagram, the size every receiver expects and
# one that fits an Ethernet MTU.
UDP_PACKET_SIZE = 7 * 188
# SRT options that carry secrets (mediamtx takes user and password in the streamid): they go to
# ffmpeg through a private file, never on its command line, and are masked wherever shown.
SRT_SECRET_OPTIONS = ("passphrase", "streamid", "srt_streamid")
_SRT_SECRET_SETTING = re.compile(r"\b(" + "|".join(SRT_SECRET_OPTIONS) + r")=[^&\s]*")
_URL_PREFIX = re.compile(r"^[a-z]+://\S*: ")
RTSP_DEFAULT_PORT = 554
RTSP_PUBLISHER = Path(__file__).resolve().with_name("rtsp_publish.py")


class Link(enum.Enum):
    CONNECTING = "connecting"  # the first attempt
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # after a failure: waiting to try again, or trying
    STOPPED = "stopped"


class LiveOutput(Output):
    """A network output with a sender thread of its own that reconnects (see the module doc).

    Subclasses open and close the link and send on it: ``_open(info)``, ``_send(packet)``,
    ``_poll()`` (raises OutputError if the link failed; True once it is known to be up) and
    ``_close(clean)``, all called from the sender thread only, and raising ``OutputError`` with
    the reason, already fit to show, when the link fails.
    """

    waiting_state = "connecting"  # what status says while the link is open but not yet up
    silence = "no answer"  # why it never connected, when no attempt failed

    def __init__(self, shown: str) -> None:
        super().__init__()
        self._shown = shown
        self._cond = threading.Condition()
        self._queue: deque[EncodedPacket] = deque()
        self._queued_bytes = 0
        self._accepting = False  # a link is open: packets are queued, from a keyframe on
        self._need_keyframe = True
        self._stopping = False
        self._drain_deadline = 0.0
        self._wake = threading.Event()  # cuts a backoff short at stop
        self._thread: Optional[threading.Thread] = None
        self._info: Optional[StreamInfo] = None
        self._backoff = BACKOFF_FIRST
        self._down_since: Optional[float] = None  # monotonic, while the link is down
        self._warned_slow = False
        self._unconfirmed_bytes = 0
        self.link = Link.CONNECTING
        self.link_up = False  # the current link is known to be up (connected)
        self.reason = ""  # why the last attempt failed
        self.attempts = 0  # failed attempts since the link was last up
        self.reconnects = 0
        self.ever_connected = False
        self.dropped = 0  # packets dropped because the link was slower than the video
        self.sent_bytes = 0  # H.264 bytes sent (for a piped output: taken by its child)

    def describe(self) -> str:
        return self._shown

    def mask(self, text: str) -> str:
        """``text`` as it may be shown: no credentials in it."""
        return redact(text)

    def status(self) -> OutputStatus:
        if self.link is Link.CONNECTED:
            state = "connected"
        elif self.link is Link.CONNECTING:
            state = self.waiting_state
        else:
            state = self.link.value
        kbps = self._throughput.kbps(self.sent_bytes)
        return OutputStatus(self._shown, state, kbps if self.link_up else None, self.attempts, self.reason, self.reconnects)

    # --- the router's side ----------------------------------------------------------------------------

    def _start(self, info: StreamInfo) -> None:
        self._info = info
        self._thread = threading.Thread(target=self._run, name=f"live {self._shown}", daemon=True)
        self._thread.start()

    def _write(self, packet: EncodedPacket) -> None:
        with self._cond:
            if not self._accepting:
                return
            if self._need_keyframe:
                if not packet.keyframe:
                    return
                self._need_keyframe = False
            full = self._queued_bytes >= QUEUE_BYTES
            if packet.keyframe and self._queue and (full or packet.pts - self._queue[0].pts > BACKLOG_SECONDS * PTS_HZ):
                self._falling_behind(len(self._queue))
                self._queue.clear()
                self._queued_bytes = 0
            elif full:
                self._falling_behind(1)
                self._need_keyframe = True  # what follows cannot be decoded without this packet
                return
            self._queue.append(packet)
            self._queued_bytes += len(packet.data)
            self._cond.notify()

    def _falling_behind(self, packets: int) -> None:
        if not self.link_up:  # a link being opened takes nothing yet: only the newest video is kept
            return
        self.dropped += packets
        if not self._warned_slow:
            self._warned_slow = True
            log.warning(
                "%s cannot keep up with the video: dropping what is queued at each keyframe once it is more than %g s behind",
                self._shown,
                BACKLOG_SECONDS,
            )

    def _stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._drain_deadline = time.monotonic() + DRAIN_SECONDS
            self._cond.notify_all()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(DRAIN_SECONDS + CLOSE_SECONDS + 2.0)
            if self._thread.is_alive():
                log.warning("%s did not close within %g s; left behind", self._shown, DRAIN_SECONDS + CLOSE_SECONDS)
        self.link = Link.STOPPED
        self.link_up = False

    # --- the sender thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._info is not None
        while not self._stopping:
            try:
                with self._cond:  # from now on: the keyframe that opens the link may come while it opens
                    self._accepting = True
                    self._need_keyframe = True
                self._unconfirmed_bytes = 0
                self._open(self._info)
                self._pump()
                self._close(clean=True)
                break
            except OutputError as exc:
                reason = str(exc)
            except Exception as exc:  # a bug, not the network: say so, then carry on like any failure
                reason = self.mask(f"{type(exc).__name__}: {exc}")
                details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                log.error("%s failed unexpectedly (a bug): %s", self._shown, self.mask(details))
            with self._cond:
                self._accepting = False
                self._queue.clear()
                self._queued_bytes = 0
            self.link_up = False
            try:
                self._close(clean=False)
            except Exception as exc:
                log.debug("closing %s: %s", self._shown, exc)
            if self._stopping:
                break
            self._failed(reason)
            if self._wake.wait(self._backoff):
                break
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self.link = Link.STOPPED
        self.link_up = False

    def _pump(self) -> None:
        """Send what is queued until the recording ends (return) or the link fails (OutputError)."""
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(POLL_SECONDS)
                packet = self._queue.popleft() if self._queue else None
                if packet is not None:
                    self._queued_bytes -= len(packet.data)
                stopping = self._stopping
            if packet is None:
                if stopping:
                    return
            else:
                self._send(packet)
                if self.link_up:
                    self.sent_bytes += len(packet.data)
                else:
                    self._unconfirmed_bytes += len(packet.data)  # sent, once the link turns out to be up
            self._check()

    def _check(self) -> None:
        """Raise if the link failed or the recording's end cannot wait for it; note when it is up."""
        if self._stopping and time.monotonic() > self._drain_deadline:
            raise OutputError(f"what was queued could not be sent within {DRAIN_SECONDS:g} s of the end")
        if self._poll() and not self.link_up:
            self._connected()

    def _connected(self) -> None:
        self.link_up = True
        self.link = Link.CONNECTED
        self.sent_bytes += self._unconfirmed_bytes
        if self.ever_connected:
            self.reconnects += 1
        if self._down_since is not None:
            log.info(
                "%s is connected again after %.1f s (%d failed attempts)", self._shown, time.monotonic() - self._down_since, self.attempts
            )
        else:
            log.info("%s is connected", self._shown)
        self.ever_connected = True
        self._down_since = None
        self.attempts = 0
        self.reason = ""
        self._backoff = BACKOFF_FIRST

    def _failed(self, reason: str) -> None:
        self.attempts += 1
        self.reason = reason
        self.link = Link.RECONNECTING
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "%s: %s; trying again in %.1f s, backing off to every %g s (further attempts are logged at debug level); "
                "the recording and the other outputs go on",
                self._shown,
                reason,
                self._backoff,
                BACKOFF_MAX,
            )
        else:
            log.debug("%s: %s (attempt %d, next in %.1f s)", self._shown, reason, self.attempts, self._backoff)

    # --- the link, for subclasses (sender thread only) --------------------------------------------

    def _open(self, info: StreamInfo) -> None:
        raise NotImplementedError

    def _send(self, packet: EncodedPacket) -> None:
        raise NotImplementedError

    def _poll(self) -> bool:
        raise NotImplementedError

    def _close(self, clean: bool) -> None:
        raise NotImplementedError


def _check_network_target(url: str, scheme: str, shown: str, default_port: Optional[int] = None) -> None:
    """ValueError unless ``url`` is scheme://HOST:PORT[...]; ``shown`` is how to name it."""
    parts = urlsplit(url)
    try:
        port = parts.port or default_port
    except ValueError:
        port = None
    if parts.scheme != scheme or not parts.hostname or port is None:
        where = "HOST[:PORT]/PATH" if default_port else "HOST:PORT"
        raise ValueError(f"{shown!r} is not a {scheme}://{where} address")


class UdpOutput(LiveOutput):
    """MPEG-TS over UDP (FFmpeg's udp protocol), 7 TS packets per datagram.

    Options in the URL go to FFmpeg (``?ttl=4``, ``?localaddr=``, multicast addresses work). UDP has
    no connection: it is ``connected`` once a packet went out, and only a network error (no route)
    ends the link. A host name is looked up by the sender thread, not by FFmpeg (which would hold
    the GIL, and with it the recorder, while DNS takes its time).
    """

    def __init__(self, url: str) -> None:
        shown = redact(url)
        _check_network_target(url, "udp", shown)
        if "pkt_size" not in dict(parse_qsl(urlsplit(url).query)):
            url += ("&" if urlsplit(url).query else "?") + f"pkt_size={UDP_PACKET_SIZE}"
        super().__init__(shown)
        self.url = url
        self._muxer: Optional[Muxer] = None
        self._sent = False

    def _open(self, info: StreamInfo) -> None:
        parts = urlsplit(self.url)
        try:
            address = socket.getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_DGRAM)[0][4][0]
        except OSError as exc:
            raise OutputError(f"cannot look up {parts.hostname}: {exc}") from None
        host = f"[{address}]" if ":" in address else address
        numeric = urlunsplit((parts.scheme, f"{host}:{parts.port}", parts.path, parts.query, ""))
        self._sent = False
        try:
            self._muxer = Muxer(numeric, info, "mpegts")
        except Exception as exc:
            raise OutputError(self.mask(getattr(exc, "strerror", None) or str(exc))) from None

    def _send(self, packet: EncodedPacket) -> None:
        assert self._muxer is not None
        try:
            self._muxer.mux(packet)
        except OSError as exc:
            raise OutputError(self.mask(getattr(exc, "strerror", None) or str(exc))) from None
        self._sent = True

    def _poll(self) -> bool:
        return self._sent

    def _close(self, clean: bool) -> None:
        muxer, self._muxer = self._muxer, None
        if muxer is not None:
            try:
                muxer.close()
            except OSError:
                if clean:
                    raise


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


def private_file(name: str, data: bytes) -> int:
    """An in-memory file (memfd) holding ``data``, for a child to read as ``/dev/fd/N``: only this
    user and root can open it, and nothing of it shows on a command line."""
    fd = os.memfd_create(name)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class PipedOutput(LiveOutput):
    """A live output sent by a child process that reads MPEG-TS on its stdin.

    Subclasses give the child's command line (``_command``) and say which line of its stdout
    means that it is connected (``_is_connected_line``). The recorder muxes exactly as for a
    file and writes the bytes to the child's stdin without blocking (see the module doc). The
    child's last lines on stderr, secrets masked, are the reason when it ends.
    """

    connect_timeout: Optional[float] = CONNECT_SECONDS

    def __init__(self, shown: str, secrets: tuple[str, ...]) -> None:
        super().__init__(shown)
        self._secrets = tuple(secret for secret in secrets if secret)
        self._process: Optional[subprocess.Popen] = None
        self._muxer: Optional[Muxer] = None
        self._chunks = _Chunks()
        self._up = threading.Event()  # the child said it is connected
        self._stderr: deque[str] = deque(maxlen=20)
        self._watchers: list[threading.Thread] = []
        self._opened_at = 0.0

    def _command(self, info: StreamInfo) -> tuple[list[str], int]:
        """The child's argv and a file descriptor to hand it (closed here once it runs; -1: none)."""
        raise NotImplementedError

    def _is_connected_line(self, line: str) -> bool:
        raise NotImplementedError

    def mask(self, text: str) -> str:
        return redact(text, self._secrets)

    def _open(self, info: StreamInfo) -> None:
        argv, fd = self._command(info)
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(fd,) if fd >= 0 else (),
                start_new_session=True,
            )
        except OSError as exc:
            raise OutputError(f"cannot start {argv[0]}: {exc}") from None
        finally:
            if fd >= 0:
                os.close(fd)
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        os.set_blocking(process.stdin.fileno(), False)
        self._process = process
        self._up.clear()
        self._stderr.clear()
        self._opened_at = time.monotonic()
        self._watchers = [
            threading.Thread(target=self._watch_stdout, args=(process.stdout,), name="live-stdout", daemon=True),
            threading.Thread(target=self._keep_stderr, args=(process.stderr,), name="live-stderr", daemon=True),
        ]
        for watcher in self._watchers:
            watcher.start()
        self._chunks = _Chunks()
        self._muxer = Muxer(self._chunks, info, "mpegts")  # type: ignore[arg-type]

    def _watch_stdout(self, stream: IO[bytes]) -> None:
        for raw in stream:
            if not self._up.is_set() and self._is_connected_line(raw.decode("utf-8", "replace").strip()):
                self._up.set()

    def _keep_stderr(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._stderr.append(self.mask(line))

    def _send(self, packet: EncodedPacket) -> None:
        assert self._muxer is not None and self._process is not None and self._process.stdin is not None
        self._muxer.mux(packet)
        data = memoryview(self._chunks.take())
        fd = self._process.stdin.fileno()
        progress = time.monotonic()
        while data:
            self._check()
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                written = 0
            except OSError:  # the child is gone (EPIPE): why, it says on stderr
                raise OutputError(self._reason()) from None
            if written:
                data = data[written:]
                progress = time.monotonic()
                continue
            if self._up.is_set() and time.monotonic() - progress > STALL_SECONDS:
                raise OutputError(f"the receiver took nothing for {STALL_SECONDS:g} s")
            select.select([], [fd], [], POLL_SECONDS)

    def _poll(self) -> bool:
        process = self._process
        assert process is not None
        if process.poll() is not None:
            raise OutputError(self._reason())
        if self._up.is_set():
            return True
        if self.connect_timeout is not None and time.monotonic() - self._opened_at > self.connect_timeout:
            raise OutputError(f"not connected after {self.connect_timeout:g} s")
        return False

    def _reason(self) -> str:
        """Why the child ended: its last words on stderr, else its exit status."""
        process = self._process
        assert process is not None
        try:
            code = process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        for watcher in self._watchers:
            watcher.join(timeout=1.0)  # its last lines
        if self._stderr:
            return _URL_PREFIX.sub("", self._stderr[-1])  # ffmpeg names its output first: we do already
        return f"{Path(str(process.args[0])).name} ended" + (f" with exit code {code}" if code is not None else "")

    def _close(self, clean: bool) -> None:
        muxer, self._muxer = self._muxer, None
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        try:
            if muxer is not None:
                muxer.close()
            tail = self._chunks.take()
            if clean and tail:
                os.write(process.stdin.fileno(), tail)  # what MPEG-TS still had, if the pipe takes it now
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=CLOSE_SECONDS if clean else 0.5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for watcher in self._watchers:
            watcher.join(timeout=1.0)
        if clean and self._up.is_set() and not self.link_up:  # it connected as the recording ended
            self._connected()


class SrtOutput(PipedOutput):
    """MPEG-TS over SRT, sent by an ``ffmpeg`` child (Debian's ffmpeg has libsrt; PyAV's has not):
    ``ffmpeg -f mpegts -i pipe: -c copy -f mpegts srt://...``. URL options (``mode=listener``,
    ``latency=``, ``passphrase=``) go to ffmpeg. ffmpeg opens its output once it has looked at the
    stream, so its first progress report (``-progress``) means the SRT connection is up; a
    listener waits for its caller as long as it takes (``listening``), a caller gives up after
    ``CONNECT_SECONDS`` and tries again.

    Secrets: ``${NAME}`` in the URL reads the environment variable NAME (so the recorder's own
    command line need not hold the passphrase), and the options in ``SRT_SECRET_OPTIONS`` reach
    ffmpeg through ``-fpre``, a file of ``option=value`` lines that ffmpeg applies to the output
    like command-line options, given as ``/dev/fd/N`` of an in-memory file. The URL ffmpeg gets on
    its command line keeps only the other options. ``describe()`` shows the URL as written, with
    the secret options masked.
    """

    def __init__(self, url: str, ffmpeg: str = "ffmpeg") -> None:
        shown = self.describe_url(url)
        expanded, secrets = expand_env(url, url_escape)
        _check_network_target(expanded, "srt", shown)
        parts = urlsplit(expanded)
        public, self._secret_options = [], {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in SRT_SECRET_OPTIONS:
                if "\n" in value or "\r" in value:
                    raise ValueError(f"the SRT option {key} of {shown!r} must be one line")
                self._secret_options[key] = value
            else:
                public.append((key, value))
        super().__init__(shown, secrets + tuple(self._secret_options.values()))
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(public), ""))
        self._ffmpeg = ffmpeg
        if dict(public).get("mode") == "listener":
            self.waiting_state, self.silence = "listening", "no caller came"
            self.connect_timeout = None  # a caller may come at any time

    @staticmethod
    def describe_url(url: str) -> str:
        """``url`` as it may be shown: credentials and secret options masked."""
        return _SRT_SECRET_SETTING.sub(lambda match: f"{match.group(1)}=***", redact(url))

    def mask(self, text: str) -> str:
        return self.describe_url(super().mask(text))

    def _command(self, info: StreamInfo) -> tuple[list[str], int]:
        program = shutil.which(self._ffmpeg)
        if program is None:
            raise OutputError("srt:// output needs the ffmpeg program (with libsrt): apt-get install ffmpeg")
        options = "".join(f"{key}={value}\n" for key, value in self._secret_options.items())
        fd = private_file("framebroker-srt-options", options.encode()) if options else -1
        argv = [
            program, "-hide_banner", "-nostats", "-loglevel", "error",
            # A progress report every half second on stdout: the first one means connected.
            "-progress", "pipe:1", "-stats_period", "0.5",
            # Start forwarding after a short look at the stream (it is ours: one H.264 stream).
            "-probesize", "65536", "-analyzeduration", "500000",
            "-f", "mpegts", "-i", "pipe:0", "-map", "0", "-c", "copy",
            "-metadata", "service_provider=framebroker",
            "-metadata", f"service_name={info.stream} encoder={info.encoder}",
            *(["-fpre", f"/dev/fd/{fd}"] if fd >= 0 else []),
            "-f", "mpegts", self.url,
        ]  # fmt: skip
        return argv, fd

    def _is_connected_line(self, line: str) -> bool:
        return line.startswith("progress=")


class RtspOutput(PipedOutput):
    """Publishes to an RTSP server that takes publishers (mediamtx, go2rtc, ffmpeg ``-rtsp_flags
    listen``): ANNOUNCE, SETUP and RECORD over TCP (interleaved), by FFmpeg's RTSP muxer in a child
    (``rtsp_publish.py``, see the module doc for why a child). The server then serves the stream
    over RTSP, WebRTC, HLS to whoever asks.

    ``rtsp://[USER:PASSWORD@]HOST[:PORT]/PATH`` (port 554 by default); ``${NAME}`` anywhere in it
    reads the environment variable NAME, percent-encoded. The URL reaches the child on a private
    file descriptor, never its command line; ``describe()`` shows it as written with
    ``USER:PASSWORD@`` masked.
    """

    def __init__(self, url: str, python: Optional[str] = None) -> None:
        shown = redact(url)
        expanded, secrets = expand_env(url, url_escape)
        _check_network_target(expanded, "rtsp", shown, RTSP_DEFAULT_PORT)
        parts = urlsplit(expanded)
        if parts.path.strip("/") == "":
            raise ValueError(f"{shown!r} names no path: publish to rtsp://HOST[:PORT]/PATH (the server serves PATH)")
        credentials = (parts.username or "", parts.password or "")
        super().__init__(shown, secrets + credentials + tuple(unquote(value) for value in credentials))
        self._url = expanded
        self._python = python or sys.executable or "python3"

    def _command(self, info: StreamInfo) -> tuple[list[str], int]:
        config = {"url": self._url, "title": f"{info.stream} encoder={info.encoder}", "parent": os.getpid()}
        fd = private_file("framebroker-rtsp-output", json.dumps(config).encode())
        # -I: the child imports nothing from the working directory or the user's site.
        return [self._python, "-I", str(RTSP_PUBLISHER), "--config-fd", str(fd), "--stream", info.stream], fd

    def _is_connected_line(self, line: str) -> bool:
        return line == "connected"


# The scheme of each live output, for ``make_output``.
LIVE_SCHEMES: dict[str, Callable[[str], LiveOutput]] = {"rtsp": RtspOutput, "srt": SrtOutput, "udp": UdpOutput}


__all__ = [
    "LIVE_SCHEMES",
    "Link",
    "LiveOutput",
    "PipedOutput",
    "RtspOutput",
    "SrtOutput",
    "UdpOutput",
    "private_file",
]
