"""``framebroker demo``: the whole system on the embedded test source, in separate processes.

A daemon on ``test://`` (deriving ``NAME.faces``, the gray picture the face detector reads), the
face detector, the motion detector and a plain reader each run in their own process, exactly as a
user would start them; their output is shown with a prefix, and ``framebroker status`` is printed
every few seconds. Ctrl-C (or ``--duration``) stops the consumers, then the daemon, each by pid,
and waits for them.

The output is for a person watching: each line says who speaks once (``[motion] frame 812: ...``,
the child's own "motion: " dropped) and the daemon's log lines lose their date and logger name.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Optional

from ._errors import FrameBrokerError
from ._process import framebroker_command
from ._reader import Reader
from ._status import collect, render_table

SUMMARY_EVERY = 5.0
STOP_GRACE = 5.0
LABEL_WIDTH = len("[motion]")

# "2024-05-01 10:17:06,123 framebroker.serve INFO: message", the daemon's log format.
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ (?P<level>[A-Z]+): (?P<message>.*)")


def _for_a_person(label: str, line: str) -> str:
    """A child's line as the demo shows it: who speaks once, no date, no logger name."""
    log_line = _LOG_LINE.fullmatch(line)
    if log_line is not None:
        level = log_line.group("level")
        line = log_line.group("message") if level == "INFO" else f"{level.lower()}: {log_line.group('message')}"
    elif line.startswith(f"{label}: "):
        line = line[len(label) + 2 :]
    return f"{'[' + label + ']':<{LABEL_WIDTH}} {line}"


def _pump(label: str, stream: IO[bytes], lock: threading.Lock) -> None:
    for raw in stream:
        line = _for_a_person(label, raw.decode("utf-8", "replace").rstrip())
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


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


def run_demo(name: str, duration: Optional[float]) -> int:
    lock = threading.Lock()
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def start(label: str, *args: str) -> subprocess.Popen:
        process = subprocess.Popen(
            framebroker_command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )
        assert process.stdout is not None
        threading.Thread(target=_pump, args=(label, process.stdout, lock), daemon=True).start()
        return process

    # The face detector reads NAME.faces, a small gray picture the daemon makes for it.
    daemon = start("daemon", "serve", "test://", "--name", name, "--width", "640", "--height", "480", "--fps", "30", "--derive", "faces=320x240:gray")
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
        with lock:
            print(f"demo: daemon pid {daemon.pid} serves test:// (640x480, 30 fps) as stream {name!r}", flush=True)
            print("demo: consumers " + ", ".join(f"{label} pid {p.pid}" for label, p in consumers) + "; Ctrl-C stops all", flush=True)
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
                table = render_table(collect(name))
                with lock:
                    sys.stdout.write(f"\n--- framebroker status {name}\n{table}\n")
                    sys.stdout.flush()
            stopping.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(consumers)
        _stop([("daemon", daemon)])
        leftovers = [entry for entry in os.listdir("/dev/shm") if entry.startswith(f"framebroker.{name}")]
        with lock:
            print("demo: stopped" + (f"; left in /dev/shm: {leftovers}" if leftovers else "; /dev/shm is clean"), flush=True)
    return 0
