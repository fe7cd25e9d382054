"""``framebroker up CONFIG.toml``: run what a config file declares, each a supervised child process.

Each child is ``framebroker serve|record|view|... ARGS`` (``_config.ChildSpec``), started as the
demo starts its children (``_process.framebroker_command``) in the config file's directory. The
rules:

* **Order.** A stream's daemon starts first; its readers (recorder, preview, ...) once its segment
  exists. SIGTERM/SIGINT stop every reader, then every daemon (a reader that outlived its
  daemon would only wait for it), each by pid with a grace period before SIGKILL, and what a
  killed daemon left in /dev/shm is removed.
* **Restarts.** A child that dies (a signal, exit code 1) is started again after a backoff that
  doubles from 0.5 s to 30 s, reset when it had run for 10 s. Exit code 2 is a usage error that a
  restart cannot mend: the child stays ``failed`` until a reload. Exit code 0 is a child that
  finished by itself (a file without ``?loop=1``, ``record --duration``): ``finished``. Readers
  survive their daemon's restart (they re-attach by themselves), so a daemon's restart restarts
  nothing else.
* **Logs.** Every line a child writes (stdout and stderr) is written to our stdout as
  ``[front/record] line``; our own log goes to stderr.
* **Reload.** SIGHUP reads the file again: children whose command changed are stopped and started
  anew, removed ones stopped, added ones started, the rest left alone (finished and failed ones
  are started again). A file with problems is reported and the running children kept.
* **systemd** (``_notify``): ``READY=1`` once every stream is settled: it published a frame, or
  its daemon is up and retrying its source (a camera not plugged in must not hold up boot), or
  its daemon has been restarted (it is being retried too); ``WATCHDOG=1`` from this loop, so a
  ping means the loop runs, whatever the cameras do; ``STATUS=`` a one-line summary.
* **Status** (``_supervision``): the children's states go to a small file that ``framebroker
  status``, ``check`` and the preview read.

A note on threads: one thread per child copies its output; everything else (starting, reaping,
stopping, signals) happens in the main thread's loop, which wakes on a signal (SIGCHLD included)
through ``signal.set_wakeup_fd`` or after ``TICK``. Children are started from the main thread
only, which matters for ``PR_SET_PDEATHSIG`` (it follows the thread that forked).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import IO, Callable, Dict, List, Optional

from ._config import ChildSpec, Config, ConfigError, load_config
from ._errors import FrameBrokerError, IncompatibleSegment, StreamBusy
from ._layout import segment_path
from ._notify import SYSTEMD_VARIABLES, Notifier
from ._process import framebroker_command
from ._segment import remove_stale
from ._status import describe_stream
from ._supervision import StateFile, describe_supervisors, remove_dead_state_files

log = logging.getLogger("framebroker.up")

TICK = 0.5  # the loop's longest sleep; signals and child deaths wake it at once
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a child that ran this long before it died starts its backoff afresh
STOP_GRACE = 10.0  # per group (readers, then daemons) between SIGTERM and SIGKILL
READY_TIMEOUT = 60.0  # READY=1 at the latest after this, naming the streams not settled yet
EXIT_USAGE = 2

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _parent_death_signal() -> Optional[Callable[[], None]]:
    """A preexec_fn that makes a child get SIGTERM when the supervisor dies, even by SIGKILL, so
    no camera stays held by an orphan. Resolved here, before any fork: after it, the child may
    only make the one foreign call (no imports, no locks)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the supervisor died before the call above took effect
            os._exit(1)

    return in_child


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Child:
    """One supervised process and its history."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.process: Optional[subprocess.Popen] = None
        self.pump: Optional[threading.Thread] = None
        # starting (now), waiting (for its stream), running, restarting (after a backoff),
        # failed (exit 2), finished (exit 0), stopped
        self.state = self.first_state()
        self.since = time.time()
        self.started = 0.0  # monotonic, of the current run
        self.next_start = 0.0  # monotonic, while restarting
        self.restarts = 0
        self.runs = 0
        self.failures = 0  # in a row, for the backoff
        self.last_exit = ""
        self.last_line = ""

    def first_state(self) -> str:
        return "starting" if self.spec.is_daemon else "waiting"

    def set_state(self, state: str) -> None:
        self.state = state
        self.since = time.time()

    def describe(self, wall_offset: float) -> dict:
        return {
            "name": self.spec.name,
            "stream": self.spec.stream,
            "command": self.spec.command,
            "state": self.state,
            "pid": self.process.pid if self.process is not None else None,
            "restarts": self.restarts,
            "since": self.since,
            "last_exit": self.last_exit,
            "next_start": self.next_start + wall_offset if self.state == "restarting" else None,
            "waiting_for": f"waiting for stream {self.spec.stream}" if self.state == "waiting" else "",
        }


class Supervisor:
    """Runs a Config's children until SIGTERM/SIGINT (``run``); see the module docstring."""

    def __init__(self, config: Config, notifier: Optional[Notifier] = None, out: Optional[IO[str]] = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.out = out or sys.stdout
        self.children: Dict[str, Child] = {spec.name: Child(spec) for spec in config.children}
        self.state = "starting"
        self.state_since = time.time()
        self.ready = False
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._out_lock = threading.Lock()
        self._stop_requested = False
        self._reload_requested = False
        self._changed = True
        self._state_file = StateFile()
        self._preexec = _parent_death_signal()
        self._environment = {key: value for key, value in os.environ.items() if key not in SYSTEMD_VARIABLES}
        self._environment["PYTHONUNBUFFERED"] = "1"  # a child's lines must arrive as it writes them

    # --- signals ------------------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: Optional[FrameType]) -> None:
        self._stop_requested = True

    def _on_reload(self, signum: int, frame: Optional[FrameType]) -> None:
        self._reload_requested = True

    def run(self) -> int:
        """Supervise until asked to stop; 0. Call from the main thread (signals)."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        handlers = {
            signal.SIGTERM: self._on_stop,
            signal.SIGINT: self._on_stop,
            signal.SIGHUP: self._on_reload,
            signal.SIGCHLD: lambda signum, frame: None,  # only to wake the loop when a child dies
        }
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        for pid in remove_dead_state_files():
            log.info("removed the status file of framebroker up pid %d, which died without removing it", pid)
        log.info(
            "running %s: %d stream(s), %d children (pid %d; SIGHUP reloads the file, SIGTERM stops all)",
            self.config.path,
            len(self.config.streams),
            len(self.children),
            os.getpid(),
        )
        try:
            while not self._stop_requested:
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload()
                self._tick()
                timeout = TICK
                due = self.notifier.seconds_to_watchdog()
                if due is not None:
                    timeout = min(timeout, due)
                try:
                    select.select([wake_read], [], [], timeout)
                    while os.read(wake_read, 64):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
        finally:
            try:
                self._shutdown()
            finally:
                signal.set_wakeup_fd(previous_wakeup)
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
                os.close(wake_read)
                os.close(wake_write)
        return 0

    # --- the loop -----------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.process is not None and child.process.poll() is not None:
                self._reap(child)
        for child in self.children.values():
            if child.state == "starting" or (child.state == "restarting" and now >= child.next_start):
                self._start(child)
            elif child.state == "waiting" and self._stream_served(child.spec.stream):
                self._start(child)
        if not self.ready:
            self._check_ready()
        self.notifier.watchdog()
        if self._changed:
            self._changed = False
            self._publish()

    def _daemon_of(self, stream: str) -> Optional[Child]:
        return next((child for child in self.children.values() if child.spec.is_daemon and child.spec.stream == stream), None)

    def _stream_served(self, stream: str) -> bool:
        daemon = self._daemon_of(stream)
        return daemon is not None and daemon.state == "running" and os.path.exists(segment_path(stream))

    def _start(self, child: Child) -> None:
        spec = child.spec
        if child.runs:
            child.restarts += 1
        child.runs += 1
        child.last_line = ""
        self._changed = True
        try:
            process = subprocess.Popen(
                framebroker_command(*spec.argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.config.directory,
                env=self._environment,
                start_new_session=True,  # Ctrl-C reaches only us: we stop the children in order
                preexec_fn=self._preexec,  # type: ignore[arg-type]
            )
        except OSError as exc:
            child.last_exit = f"could not start: {exc}"
            self._schedule_restart(child, ran=0.0)
            return
        child.process = process
        child.started = time.monotonic()
        child.set_state("running")
        assert process.stdout is not None
        child.pump = threading.Thread(target=self._pump, args=(child, process.stdout), name=f"up-{spec.name}", daemon=True)
        child.pump.start()
        log.info("started %s, pid %d: %s", spec.name, process.pid, spec.display())

    def _pump(self, child: Child, stream: IO[bytes]) -> None:
        prefix = f"[{child.spec.name}] "
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                child.last_line = line
            with self._out_lock:
                try:
                    self.out.write(prefix + line + "\n")
                    self.out.flush()
                except (OSError, ValueError):  # our stdout is gone: keep draining the child's pipe
                    pass
        stream.close()

    def _reap(self, child: Child) -> None:
        process = child.process
        assert process is not None and process.returncode is not None
        code = process.returncode
        if child.pump is not None:
            child.pump.join(timeout=1.0)  # its last lines (the error message) first
        child.process = None
        ran = time.monotonic() - child.started
        reason = _exit_reason(code)
        # A CLI that exits 1 or 2 says why on its last line; after a signal that line is
        # whatever it was doing, not a reason.
        child.last_exit = f"{reason}: {child.last_line}" if code > 0 and child.last_line else reason
        self._changed = True
        if code == 0:
            child.set_state("finished")
            log.info("%s finished (exit code 0); not restarted", child.spec.name)
        elif code == EXIT_USAGE:
            child.set_state("failed")
            log.error(
                "%s exited with a usage error, which a restart cannot mend: %s. Fix the config file and reload (SIGHUP)",
                child.spec.name,
                child.last_line or reason,
            )
        else:
            self._schedule_restart(child, ran)

    def _schedule_restart(self, child: Child, ran: float) -> None:
        if ran >= STABLE_AFTER:
            child.failures = 0
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**child.failures)
        child.failures += 1
        child.next_start = time.monotonic() + delay
        child.set_state("restarting")
        self._changed = True
        log.warning("%s died (%s); restarting in %.1f s", child.spec.name, child.last_exit, delay)

    def _check_ready(self) -> None:
        waiting = [stream for stream in self.config.streams if not self._settled(stream)]
        if waiting and time.monotonic() - self.started < READY_TIMEOUT:
            return
        if waiting:
            log.warning(
                "ready after %.0f s although stream(s) %s neither publish nor retry yet (boot goes on; status shows them)",
                READY_TIMEOUT,
                ", ".join(waiting),
            )
        else:
            log.info("ready: every stream publishes or is retrying its source")
        self.ready = True
        self._set_state("running")
        self.notifier.ready(self._summary())

    def _settled(self, stream: str) -> bool:
        """The stream publishes, or is deliberately retrying (its daemon or, above it, us)."""
        daemon = self._daemon_of(stream)
        if daemon is None or daemon.restarts or daemon.state in ("failed", "finished", "restarting", "stopped"):
            return True
        if daemon.process is None:
            return False
        info = describe_stream(stream)
        if not info.get("alive") or info.get("pid") != daemon.process.pid:
            return False
        return info["seq"] > 0 or info["state"] == "reconnecting" or (info["state"] == "starting" and bool(info["reason"]))

    def _set_state(self, state: str) -> None:
        self.state = state
        self.state_since = time.time()
        self._changed = True

    def _summary(self) -> str:
        children = list(self.children.values())
        running = sum(child.state == "running" for child in children)
        restarts = sum(child.restarts for child in children)
        text = f"{len(self.config.streams)} stream(s), {running}/{len(children)} children running, {restarts} restart(s)"
        trouble = [f"{child.spec.name} {child.state}" for child in children if child.state in ("restarting", "failed")]
        if trouble:
            text += ": " + ", ".join(trouble)
        return text if len(text) <= 200 else text[:197] + "..."

    def _publish(self) -> None:
        wall_offset = time.time() - time.monotonic()
        document = {
            "config": self.config.path,
            "started": self.started_wall,
            "state": self.state,
            "state_since": self.state_since,
            "ready": self.ready,
            "children": [child.describe(wall_offset) for child in self.children.values()],
        }
        try:
            self._state_file.write(document)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", self._state_file.path, exc)
        if self.ready:
            self.notifier.status(self._summary())

    # --- reload and stop ----------------------------------------------------------------------

    def _reload(self) -> None:
        log.info("SIGHUP: reading %s again", self.config.path)
        self.notifier.reloading()
        self._set_state("reloading")
        try:
            config = load_config(self.config.path)
        except ConfigError as exc:
            log.error("the file has problems; the running children stay as they are:\n%s", exc)
            self._set_state("running")
            self.notifier.ready(f"reload refused (the file has {len(exc.problems)} problem(s)); " + self._summary())
            return
        wanted = {spec.name: spec for spec in config.children}
        changed = [child for name, child in self.children.items() if wanted.get(name) != child.spec]
        self._stop([child for child in changed if not child.spec.is_daemon])
        self._stop([child for child in changed if child.spec.is_daemon])
        self._remove_leftovers([child.spec.stream for child in changed if child.spec.is_daemon])
        children: Dict[str, Child] = {}
        started_again = []
        for spec in config.children:
            child = self.children.get(spec.name)
            if child is None or child.spec != spec:
                child = Child(spec)
            elif child.state in ("failed", "finished"):
                child.failures = 0
                child.set_state(child.first_state())
                started_again.append(spec.name)
            children[spec.name] = child
        replaced = [child.spec.name for child in changed if child.spec.name in wanted]
        added = [name for name in wanted if name not in self.children]
        removed = [name for name in self.children if name not in wanted]
        self.children = children
        self.config = config
        self._set_state("running")
        log.info(
            "reloaded: restarting %s; adding %s; removed %s; starting again %s; %d unchanged",
            ", ".join(replaced) or "nothing",
            ", ".join(added) or "nothing",
            ", ".join(removed) or "nothing",
            ", ".join(started_again) or "nothing",
            len(children) - len(replaced) - len(added) - len(started_again),
        )
        self.notifier.ready(self._summary())

    def _stop(self, children: List[Child], grace: float = STOP_GRACE) -> None:
        """SIGTERM to each, then wait for all together; SIGKILL to whichever outlives ``grace``."""
        running = [child for child in children if child.process is not None and child.process.poll() is None]
        for child in running:
            assert child.process is not None
            try:
                child.process.send_signal(signal.SIGCONT)  # a stopped child cannot act on SIGTERM
                child.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for child in children:
            process = child.process
            if process is not None:
                while process.poll() is None and time.monotonic() < deadline:
                    self.notifier.watchdog()  # waiting for children is this loop at work, not a hang
                    try:
                        process.wait(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                    except subprocess.TimeoutExpired:
                        pass
                if process.poll() is None:
                    log.warning("%s (pid %d) did not stop within %.0f s of SIGTERM; killing it", child.spec.name, process.pid, grace)
                    process.kill()
                    process.wait()
                if child.pump is not None:
                    child.pump.join(timeout=1.0)
                child.last_exit = _exit_reason(process.returncode) + " (stopped)"
                child.process = None
            child.set_state("stopped")
        self._changed = True

    def _remove_leftovers(self, streams: List[str]) -> None:
        """A daemon killed by us (or that died while we stopped) leaves its segment: remove it.
        Never a live daemon's (StreamBusy) or anything framebroker did not make."""
        for stream in streams:
            try:
                header = remove_stale(stream)
            except (StreamBusy, IncompatibleSegment, OSError):
                continue
            if header is not None:
                log.info("removed what the dead daemon of stream %s (pid %d) left in /dev/shm", stream, header.owner_pid)

    def _shutdown(self) -> None:
        self._set_state("stopping")
        self.notifier.stopping()
        self._publish()
        children = list(self.children.values())
        log.info("stopping: %d reader(s), then %d daemon(s)", sum(not c.spec.is_daemon for c in children), sum(c.spec.is_daemon for c in children))
        try:
            self._stop([child for child in children if not child.spec.is_daemon])
            self._stop([child for child in children if child.spec.is_daemon])
            self._remove_leftovers(self.config.streams)
        finally:
            self._state_file.remove()
            self.notifier.close()
        log.info("stopped")


def run_up(config: Config) -> int:
    """``framebroker up``: refuses a file another live ``up`` already runs (its daemons would be
    refused one by one, forever), else supervises until stopped."""
    for other in describe_supervisors():
        if other.get("alive") and other.get("config") == config.path:
            raise FrameBrokerError(
                f"framebroker up pid {other['pid']} already runs {config.path}: stop it first, "
                f"or make it read the file again with kill -HUP {other['pid']}"
            )
    return Supervisor(config).run()


__all__ = ["Child", "Supervisor", "run_up"]
