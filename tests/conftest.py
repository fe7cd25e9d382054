"""Fixtures: unique stream names, real processes ended by pid, and a /dev/shm leak check."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from framebroker._process import framebroker_command
from framebroker._status import describe_stream

TESTS = Path(__file__).resolve().parent
WORKERS = str(TESTS / "workers.py")


class Proc:
    """A child process whose stdout lines are collected as they come (JSON ones parsed)."""

    def __init__(self, argv: list[str], label: str, env: Optional[dict] = None, stdin: Any = subprocess.DEVNULL) -> None:
        self.label = label
        self.argv = argv
        self.hung = False  # did not end within stop()'s timeout after SIGTERM
        # Python children dump every thread's traceback on SIGABRT (see stop()).
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONFAULTHANDLER", "1")
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=stdin,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.events: list[dict] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr, False), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, stream: Any, sink: list[str], is_stdout: bool) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sink.append(line)
            if is_stdout:
                self.lines.put(line)
                if line.startswith("{"):
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        pass

    def wait_event(self, name: str, timeout: float = 20.0, after: int = 0) -> dict:
        """The first JSON event called ``name`` (beyond the first ``after`` events)."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while time.monotonic() < deadline:
            for event in self.events[after:]:
                if event.get("event") == name:
                    return event
            if self.popen.poll() is not None and not any(t.is_alive() for t in self._threads):
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        for event in self.events[after:]:
            if event.get("event") == name:
                return event
        raise AssertionError(f"{self.label}: no {name!r} event within {timeout} s\n{self.output()}")

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stdout) + list(self.stderr):
                if predicate(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{self.label}: expected line not seen within {timeout} s\n{self.output()}")

    def wait(self, timeout: float = 30.0) -> int:
        code = self.popen.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def output(self) -> str:
        return f"--- stdout of {self.label} ---\n" + "\n".join(self.stdout[-60:]) + f"\n--- stderr ---\n" + "\n".join(self.stderr[-60:])

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def finish(self, timeout: float = 30.0) -> dict:
        """Stop a worker that runs until stopped (SIGTERM) and return its closing ``done`` report."""
        self.signal(signal.SIGTERM)
        return self.wait_event("done", timeout=timeout)

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """End the process by pid: SIGCONT (in case it is frozen), SIGTERM, then SIGKILL."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Where was it stuck? SIGABRT makes a Python child print every thread's
                # traceback (PYTHONFAULTHANDLER), which a failing teardown then shows.
                self.hung = True
                os.kill(self.pid, signal.SIGABRT)
                try:
                    self.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(self.pid, signal.SIGKILL)
                    self.popen.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        return self.popen.returncode


def shm_objects(name: str) -> list[str]:
    prefix = (f"framebroker.{name}", f"sem.framebroker.{name}@")
    return sorted(
        entry
        for entry in os.listdir("/dev/shm")
        if entry == prefix[0] or entry.startswith(prefix[0] + "@") or entry.startswith(prefix[1])
    )


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll with backoff until ``predicate()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


class Env:
    """Per-test resources: unique names, processes (ended by pid at teardown), leak checks."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.tag = f"t{os.getpid()}x{uuid.uuid4().hex[:8]}"
        self.names: list[str] = []
        self.procs: list[Proc] = []
        self.require_clean = True
        self.test = request.node.name

    def name(self, hint: str = "s") -> str:
        name = f"{self.tag}-{hint}{len(self.names)}"
        self.names.append(name)
        return name

    def spawn(self, argv: list[str], label: str = "", **kwargs: Any) -> Proc:
        proc = Proc(argv, label or argv[-1], **kwargs)
        self.procs.append(proc)
        return proc

    def worker_argv(self, role: str, stream: str) -> list[str]:
        return [sys.executable, WORKERS, role, stream]

    def worker(self, role: str, stream: str, *args: str) -> Proc:
        return self.spawn([*self.worker_argv(role, stream), *args], label=f"worker {role}")

    def cli(self, *args: str, **kwargs: Any) -> Proc:
        return self.spawn(framebroker_command(*args), label="framebroker " + " ".join(args[:2]), **kwargs)

    def run_cli(self, *args: str, timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run(framebroker_command(*args), capture_output=True, text=True, timeout=timeout, **kwargs)

    def serve(self, source: str = "test://", name: Optional[str] = None, *args: str, wait: bool = True) -> tuple[Proc, str]:
        """Start ``framebroker serve`` and return once it streams (or, wait=False, at once)."""
        name = name or self.name("cam")
        proc = self.cli("serve", source, "--name", name, *args)
        if wait:
            self.wait_streaming(name, proc)
        return proc, name

    def wait_streaming(self, name: str, proc: Optional[Proc] = None, timeout: float = 20.0) -> dict:
        def check() -> Optional[dict]:
            if proc is not None and proc.popen.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.popen.returncode}\n{proc.output()}")
            info = describe_stream(name)
            return info if info["state"] == "streaming" and info.get("alive") and info["seq"] > 0 else None

        return wait_until(check, timeout, f"stream {name} to stream")

    def teardown(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        leaked = [obj for name in self.names for obj in shm_objects(name)]
        for obj in leaked:
            try:
                os.unlink(f"/dev/shm/{obj}")
            except OSError:
                pass
        if leaked and self.require_clean:
            hung = "".join(f"\n{proc.label} did not end after SIGTERM (its traceback, if Python, is in its stderr):\n{proc.output()}" for proc in self.procs if proc.hung)
            raise AssertionError(f"{self.test} left objects in /dev/shm: {leaked}{hung}")


# Tests that take a minute or more, or a browser (markers registered in pyproject.toml): each
# is also marked "slow", so `pytest -m "not slow"` is the quick run.
SLOW_KINDS = ("soak", "chaos", "bench", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def env(request: pytest.FixtureRequest):
    environment = Env(request)
    yield environment
    environment.teardown()


# What a hardware encoder's failure must name on a machine without that hardware: the reason it
# cannot work there. Where the hardware is present, the encoder must simply work.
MISSING_NVENC = ("libcuda", "CUDA", "no NVENC capable device", "not in this FFmpeg build")  # no driver, GPU or build
MISSING_JETSON = ('no element "nvvidconv"', 'no element "nvv4l2h264enc"')  # not a Jetson's GStreamer


def works_or_says_why(reason: Optional[str], causes: tuple[str, ...]) -> None:
    """An encoder probe's outcome: None (it works) or a reason naming one of ``causes``."""
    assert reason is None or any(cause.lower() in reason.lower() for cause in causes), reason


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def ffmpeg_decode(path: "str | Path", timeout: float = 120) -> subprocess.CompletedProcess:
    """Decode a whole video with ffmpeg, stopping at the first broken frame (-xerror). The timing
    is passed through: recordings carry capture times (variable rate), not a fixed frame rate, so
    the output keeps the file's own 1/90000 s time base (-enc_time_base -1); in one guessed from
    the rate, two frames closer than a frame period (a daemon catching up under load) would
    share a timestamp and make ffmpeg complain about a file that is fine."""
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-fps_mode", "passthrough", "-enc_time_base", "-1", "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
