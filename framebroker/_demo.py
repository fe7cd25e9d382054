"""``framebroker demo``: the whole system on the embedded test source, in separate processes.

A daemon on ``test://`` (deriving ``NAME.faces``, the gray picture the face detector reads),
the face detector and the motion detector (each publishing its results as a model), a plain
reader and the browser preview (which draws the models' boxes over the picture) each run in
their own process, exactly as a user would start them; their output is shown with a prefix, the
preview's address once, and ``framebroker status`` (streams, readers, models) every few
seconds. Ctrl-C (or ``--duration``) stops the consumers, then the daemon, each by pid, and
waits for them.

The output is for a person watching, on a terminal 100 columns wide: each line says who speaks
once (``[motion] frame 812: ...``, the child's own "motion: " dropped), the daemon's log lines
lose their date and logger name, and a longer line is folded (between a status line's fields
where it can).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Optional

from ._errors import FrameBrokerError
from ._process import framebroker_command
from ._reader import Reader
from ._status import collect, render_table

SUMMARY_EVERY = 5.0
STOP_GRACE = 5.0
LABEL_WIDTH = len("[motion]")
# Lines are folded to fit this many columns (a terminal of 100 shows them without wrapping).
WIDTH = 99
# How long the preview may take to say where it listens (s).
VIEW_START = 10.0

# "2024-05-01 10:17:06,123 framebroker.serve INFO: message", the daemon's log format.
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ (?P<level>[A-Z]+): (?P<message>.*)")
# The preview's first line: "view: stream NAME at http://HOST:PORT/ (...)".
_VIEW_LINE = re.compile(r"view: stream \S+ at (?P<url>http://\S+/) ")


def _for_a_person(label: str, line: str) -> str:
    """A child's line as the demo shows it: who speaks once, no date, no logger name."""
    log_line = _LOG_LINE.fullmatch(line)
    if log_line is not None:
        level = log_line.group("level")
        line = log_line.group("message") if level == "INFO" else f"{level.lower()}: {log_line.group('message')}"
    elif line.startswith(f"{label}: "):
        line = line[len(label) + 2 :]
    return f"{'[' + label + ']':<{LABEL_WIDTH}} {line}"


def _fit(line: str, width: int = WIDTH) -> list[str]:
    """``line`` folded into lines of at most ``width`` columns, between the fields of a status
    line (three spaces) where it can, else at a space; continuation lines are indented four
    more than the line."""
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    lines = []
    while len(line) > width:
        cut = line.rfind("   ", len(indent), width + 1)
        if cut <= len(indent):
            cut = line.rfind(" ", len(indent), width + 1)
        if cut <= len(indent):
            break  # one word longer than the line: leave it whole
        lines.append(line[:cut].rstrip())
        line = indent + line[cut:].strip()
    return lines + [line]


def _say(lock: threading.Lock, text: str) -> None:
    with lock:
        for line in text.splitlines() or [""]:
            for part in _fit(line):
                sys.stdout.write(part + "\n")
        sys.stdout.flush()


def _pump(label: str, stream: IO[bytes], lock: threading.Lock, take: Optional[Callable[[str], bool]] = None) -> None:
    """Show a child's lines; ``take(line)`` may claim one for the demo to say in its own words."""
    for raw in stream:
        text = raw.decode("utf-8", "replace").rstrip()
        if take is not None and take(text):
            continue
        _say(lock, _for_a_person(label, text))


def _stop(processes: list[tuple[str, subprocess.Popen]]) -> None:
    for _, process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for _, process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _Preview:
    """``framebroker view`` as a child: where it listens, once it says so."""

    def __init__(self) -> None:
        self.url = ""
        self.said = threading.Event()

    def take(self, line: str) -> bool:
        found = _VIEW_LINE.match(line)
        if found is None:
            return False
        self.url = found.group("url")
        self.said.set()
        return True


def run_demo(name: str, duration: Optional[float], port: int = 8080) -> int:
    lock = threading.Lock()
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def start(label: str, *args: str, take: Optional[Callable[[str], bool]] = None) -> subprocess.Popen:
        process = subprocess.Popen(
            framebroker_command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )
        assert process.stdout is not None
        threading.Thread(target=_pump, args=(label, process.stdout, lock, take), daemon=True).start()
        return process

    def start_preview(on_port: int) -> tuple[subprocess.Popen, _Preview]:
        preview = _Preview()
        process = start("view", "view", name, "--port", str(on_port), take=preview.take)
        deadline = time.monotonic() + VIEW_START
        while not preview.said.wait(0.1) and process.poll() is None and time.monotonic() < deadline:
            pass
        return process, preview

    # The face detector reads NAME.faces, a small gray picture the daemon makes for it.
    daemon = start(
        "daemon", "serve", "test://", "--name", name, "--width", "640", "--height", "480", "--fps", "30", "--derive", "faces=320x240:gray"
    )
    consumers: list[tuple[str, subprocess.Popen]] = []
    try:
        try:
            Reader(name, name="demo-probe", wait=10.0).close()
        except FrameBrokerError as exc:
            print(f"framebroker demo: the daemon did not come up: {exc}", file=sys.stderr)
            return 1
        consumers = [
            ("faces", start("faces", "faces", name)),
            ("motion", start("motion", "motion", name)),
            ("read", start("read", "read", name, "--verify")),
        ]
        view, preview = start_preview(port)
        if not preview.url and view.poll() is not None and port != 0:
            _say(lock, f"demo: port {port} is taken (see above); the preview takes a free one")
            view, preview = start_preview(0)
        consumers.append(("view", view))
        _say(lock, f"demo: daemon pid {daemon.pid} serves test:// (640x480, 30 fps) as stream {name!r}")
        _say(lock, "demo: consumers " + ", ".join(f"{label} pid {p.pid}" for label, p in consumers) + "; Ctrl-C stops all")
        if preview.url:
            _say(lock, f"demo: open {preview.url} for the picture with the models' boxes (faces, motion)")
        else:
            _say(lock, "demo: the preview did not start (see its lines above)")
        started = time.monotonic()
        next_summary = started + 2.0
        while not stopping.is_set():
            if duration is not None and time.monotonic() - started >= duration:
                break
            if daemon.poll() is not None:
                print(f"framebroker demo: the daemon exited with {daemon.returncode}", file=sys.stderr)
                return 1
            if time.monotonic() >= next_summary:
                next_summary += SUMMARY_EVERY
                _say(lock, f"\n--- framebroker status {name}\n{render_table(collect(name))}")
            stopping.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(consumers)
        _stop([("daemon", daemon)])
        leftovers = [entry for entry in os.listdir("/dev/shm") if entry.startswith(f"framebroker.{name}")]
        _say(lock, "demo: stopped" + (f"; left in /dev/shm: {leftovers}" if leftovers else "; /dev/shm is clean"))
    return 0
