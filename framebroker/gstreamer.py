"""GStreamer pipelines in a child process, with nothing secret on its command line.

framebroker's GStreamer sources (``csi://``, ``rtsp://``, ``gst://``) and the recorder's GStreamer
encoders both run a pipeline in a child process that exchanges raw data with them through pipes.
``GstProcess`` is that child::

    from framebroker.gstreamer import GstProcess

    read_end, write_end = os.pipe()
    gst = GstProcess(
        ["rtspsrc", "name=src", "!", "decodebin", "!", "videoconvert", "!", "fdsink", f"fd={write_end}"],
        name="door camera",
        properties={"src": {"location": "rtsp://192.168.1.20/stream1", "user-id": "admin", "user-pw": password}},
        pass_fds=(write_end,),
        secrets=(password,),
    )
    ...  # read frames from read_end
    gst.stop()

Why not ``gst-launch-1.0``: its pipeline description is its command line, and any local user can
read every process's command line in ``/proc/PID/cmdline`` (Debian mounts /proc without
``hidepid``), so an RTSP password would be public. The child here is a small launcher
(``framebroker/_gst_launch.py``) that drives libgstreamer through ctypes, because PyGObject does
not build from PyPI on Debian 12. It receives the description (the same arguments gst-launch-1.0
takes, parsed by the same ``gst_parse_launchv``) and the string ``properties`` of named
elements on a file descriptor: an in-memory file (``memfd_create``) that only this user and
root can open through ``/proc/PID/fd``, like the child's environment. Properties are set after
parsing, byte for byte, so a password needs no quoting. Its command line shows only ``--name``.

Everything the child prints on stderr is kept (the last lines, with ``secrets`` and URL
credentials masked) to say why a pipeline failed: ``error()``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional, Sequence, Union

from ._redact import redact

__all__ = ["GstProcess", "element_available", "parse_caps"]

LAUNCHER = Path(__file__).resolve().with_name("_gst_launch.py")
TAIL_LINES = 30  # stderr lines kept for error messages
_CAPS_PREFIX = "caps "
_CAPS_FIELD = re.compile(r"(\w[\w-]*)=\((\w+)\)([^,]+)")


def _launcher_argv(*args: str) -> list[str]:
    # -I -S: the launcher needs only the standard library; no site packages, no PYTHON* variables.
    return [sys.executable or "python3", "-I", "-S", str(LAUNCHER), *args]


def element_available(name: str) -> bool:
    """True if GStreamer on this machine has the element ``name`` (False without GStreamer)."""
    try:
        result = subprocess.run(_launcher_argv("--has-element", name), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def parse_caps(caps: str) -> dict[str, Any]:
    """Fields of a caps string: ``width``/``height`` as int, ``framerate`` as float, others as text."""
    fields: dict[str, Any] = {}
    for key, kind, value in _CAPS_FIELD.findall(caps):
        value = value.strip()
        if kind == "int":
            fields[key] = int(value)
        elif kind == "fraction":
            num, _, den = value.partition("/")
            fields[key] = float(num) / float(den) if float(den or 0) else 0.0
        else:
            fields[key] = value
    return fields


class GstProcess:
    """A GStreamer pipeline running in a child process until end of stream, an error or ``stop()``.

    ``args`` are the pipeline as gst-launch-1.0 would take them. ``properties`` sets string
    properties of elements named in ``args`` (``name=...``). With ``caps_of``, ``on_caps`` is
    called (from a thread of this object) with ``parse_caps`` of that element's sink pad each
    time it negotiates. ``stdin`` (``subprocess.PIPE`` for ``fdsrc fd=0``) and ``pass_fds`` (for
    ``fdsink fd=N``) are as in ``subprocess.Popen``. ``secrets`` are masked in what is kept of
    the child's stderr. Raises ``OSError`` if the child cannot be started.

    The child runs in a session of its own: a Ctrl-C in the terminal reaches the caller only,
    which decides how the pipeline ends: in order, with end of stream (closing ``stdin`` for
    ``fdsrc``, or ``end_stream()`` for live sources), or at once (``stop()``).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        name: str,
        properties: Optional[Mapping[str, Mapping[str, str]]] = None,
        caps_of: Optional[str] = None,
        on_caps: Optional[Callable[[dict[str, Any]], None]] = None,
        stdin: Union[int, IO[Any], None] = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
        secrets: Sequence[str] = (),
    ) -> None:
        self.name = name
        self._secrets = tuple(secret for secret in secrets if secret)
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._on_caps = on_caps
        config = json.dumps({"args": list(args), "properties": {k: dict(v) for k, v in (properties or {}).items()}, "caps_of": caps_of})
        config_fd = os.memfd_create("framebroker-gst-config")
        try:
            os.write(config_fd, config.encode())
            os.lseek(config_fd, 0, os.SEEK_SET)
            self._popen = subprocess.Popen(
                _launcher_argv("--config-fd", str(config_fd), "--name", name),
                stdin=stdin,
                stdout=subprocess.PIPE if caps_of else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(config_fd, *pass_fds),
                start_new_session=True,
            )
        finally:
            os.close(config_fd)
        self.pid = self._popen.pid
        self.stdin: Optional[IO[bytes]] = self._popen.stdin
        self._threads = [threading.Thread(target=self._keep_stderr, name=f"{name}-stderr", daemon=True)]
        if caps_of:
            self._threads.append(threading.Thread(target=self._follow_caps, name=f"{name}-caps", daemon=True))
        for thread in self._threads:
            thread.start()

    def _keep_stderr(self) -> None:
        assert self._popen.stderr is not None
        for raw in self._popen.stderr:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._lines.append(redact(line, self._secrets))

    def _follow_caps(self) -> None:
        assert self._popen.stdout is not None
        for raw in self._popen.stdout:
            line = raw.decode("utf-8", "replace")
            if line.startswith(_CAPS_PREFIX) and self._on_caps is not None:
                self._on_caps(parse_caps(line[len(_CAPS_PREFIX) :]))

    @property
    def returncode(self) -> Optional[int]:
        return self._popen.returncode

    def poll(self) -> Optional[int]:
        return self._popen.poll()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """The exit code, or None if the child is still running after ``timeout`` seconds."""
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def lines(self) -> list[str]:
        """The last lines the child printed on stderr (secrets masked)."""
        return list(self._lines)

    def error(self) -> str:
        """The most telling line of what the child printed: its first error, else its first
        warning, else its last line; "" if it printed nothing. Waits briefly for the child's
        last words once it has exited."""
        if self._popen.poll() is not None:
            self._threads[0].join(timeout=1.0)
        lines = self.lines
        for prefix in ("ERROR", "WARNING"):
            for line in lines:
                if line.startswith(prefix):
                    return line[len(prefix) + 2 :] if line.startswith(prefix + ": ") else line
        return lines[-1] if lines else ""

    def kill(self) -> None:
        """End the child at once (SIGKILL)."""
        self._signal(signal.SIGKILL)

    def end_stream(self) -> None:
        """Ask the pipeline to finish in order (SIGINT, like ``gst-launch-1.0 -e``): its sources
        send end of stream, what is in flight flows out to the sinks, then the child exits 0.
        Whoever reads the child's output must keep reading until it exits (a sink blocked on a
        full pipe holds the end back); ``wait()`` for that, and ``stop()`` if it does not come."""
        self._signal(signal.SIGINT)

    def stop(self, timeout: float = 3.0) -> Optional[int]:
        """End the child now: SIGTERM, then SIGKILL after ``timeout`` s. Safe to call twice.
        (``end_stream()`` first ends it in order.)"""
        if self.stdin is not None and not self.stdin.closed:
            try:
                self.stdin.close()
            except OSError:
                pass
        if self._popen.poll() is None:
            self._signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self._signal(signal.SIGKILL)
                self._popen.wait()
        for thread in self._threads:
            thread.join(timeout=1.0)
        return self._popen.returncode

    def _signal(self, signum: int) -> None:
        if self._popen.poll() is not None:
            return  # reaped: its pid may belong to someone else by now
        try:
            os.killpg(self._popen.pid, signum)  # its session: anything the pipeline started too
        except ProcessLookupError:
            pass

    def __enter__(self) -> "GstProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
