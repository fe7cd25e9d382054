"""``framebroker demo``: the whole system on the embedded test source, in separate processes.

A daemon on ``test://``, the face detector, the motion detector and a plain reader each run in
their own process, exactly as a user would start them; their output is shown with a prefix, and
a status summary is printed every few seconds. Ctrl-C (or ``--duration``) stops the consumers,
then the daemon, each by pid, and waits for them.
"""

from __future__ import annotations

import os
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


def _pump(prefix: str, stream: IO[bytes], lock: threading.Lock) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip()
        with lock:
            sys.stdout.write(f"[{prefix}] {line}\n")
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

    daemon = start("daemon", "serve", "test://", "--name", name, "--width", "640", "--height", "480", "--fps", "30")
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
            print(
                f"demo: daemon pid {daemon.pid} serves test:// as stream {name!r}; consumers: "
                + ", ".join(f"{label} pid {p.pid}" for label, p in consumers)
                + ". Ctrl-C to stop.",
                flush=True,
            )
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
                    sys.stdout.write("\n" + table + "\n")
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
