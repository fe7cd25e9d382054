"""What a running ``framebroker up`` tells ``status``, ``check`` and the preview about its children.

Each supervisor keeps one small JSON document, ``/dev/shm/framebroker-up.<pid>.json``, mode 0600
like a private stream, rewritten whole (a new file renamed over the old, so a reader never sees
half of one) whenever a child changes state, and removed when the supervisor exits.

Why /dev/shm, and not ``$XDG_RUNTIME_DIR`` or /run: it is where everything framebroker shares
already lives, the one place that a system service and a person's shell both see (a service
running as its own user has no ``$XDG_RUNTIME_DIR``, a login shell has one of its own, and /run
is root's), a tmpfs (no disk writes, gone at reboot), and the place the service unit already
keeps shared with the rest of the machine. The name cannot be taken for a stream's: segments are
``framebroker.<stream>``, this is ``framebroker-up.<pid>.json``.

A supervisor killed with ``kill -9`` leaves its file behind; the pid in it may be reused later,
so liveness is the pid *and* the process's start time (``/proc/PID/stat``), and a later
``framebroker up`` removes the leftovers of dead supervisors of its user.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

from ._layout import SHM_DIR

STATE_PREFIX = "framebroker-up."
STATE_SUFFIX = ".json"


def state_path(pid: int) -> str:
    return f"{SHM_DIR}/{STATE_PREFIX}{pid}{STATE_SUFFIX}"


def process_start_time(pid: int) -> Optional[int]:
    """When ``pid`` started (clock ticks since boot), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ")": the fields after it are unambiguous.
    fields = stat.rsplit(b")", 1)[1].split()
    return int(fields[19])  # field 22, starttime


class StateFile:
    """The supervisor's side: write the document, remove it at the end."""

    def __init__(self, pid: Optional[int] = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.path = state_path(self.pid)
        self.start_time = process_start_time(self.pid)

    def write(self, document: Dict[str, Any]) -> None:
        document = {"pid": self.pid, "pid_start": self.start_time, **document, "updated": time.time()}
        draft = self.path + ".new"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: private, like a stream without --group
            os.write(fd, json.dumps(document).encode())
        finally:
            os.close(fd)
        os.replace(draft, self.path)

    def remove(self) -> None:
        for path in (self.path, self.path + ".new"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _state_files() -> List[str]:
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(entry for entry in entries if entry.startswith(STATE_PREFIX) and entry.endswith(STATE_SUFFIX))


def remove_dead_state_files() -> List[int]:
    """Remove the files of this user's supervisors that died without removing theirs; their pids."""
    removed = []
    for entry in _state_files():
        path = f"{SHM_DIR}/{entry}"
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(path, "rb") as file:
                document = json.loads(file.read())
        except (OSError, ValueError):
            continue
        pid = document.get("pid")
        if isinstance(pid, int) and process_start_time(pid) != document.get("pid_start"):
            try:
                os.unlink(path)
                removed.append(pid)
            except OSError:
                pass
    return removed


def describe_supervisors(stream: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every supervisor's document, ``alive`` added; with ``stream``, only those that run
    something for it, with only those children."""
    supervisors = []
    for entry in _state_files():
        pid_text = entry[len(STATE_PREFIX) : -len(STATE_SUFFIX)]
        try:
            with open(f"{SHM_DIR}/{entry}", "rb") as file:
                document = json.loads(file.read())
        except PermissionError:
            supervisors.append(
                {"pid": int(pid_text) if pid_text.isdigit() else 0, "alive": None, "children": [],
                 "error": f"no access to {SHM_DIR}/{entry}: another user's framebroker up (its files are private)"}
            )
            continue
        except (OSError, ValueError):  # removed meanwhile, or not ours to understand
            continue
        if not isinstance(document, dict) or not isinstance(document.get("children"), list):
            continue
        pid = document.get("pid")
        document["alive"] = isinstance(pid, int) and process_start_time(pid) == document.get("pid_start")
        if stream is not None:
            document["children"] = [child for child in document["children"] if child.get("stream") == stream]
            if not document["children"]:
                continue
        supervisors.append(document)
    return supervisors


def child_line(child: Dict[str, Any], now: Optional[float] = None) -> str:
    """One child in words: "front/record restarting (3 restarts; last exit: exit code 1: ...)"."""
    now = time.time() if now is None else now
    state = child["state"]
    facts = []
    if child.get("pid") and state == "running":
        facts.append(f"pid {child['pid']}")
    if child.get("next_start") and state == "restarting":
        facts.append(f"next start in {max(0.0, child['next_start'] - now):.1f}s")
    if child.get("waiting_for"):
        facts.append(child["waiting_for"])
    facts.append(f"{child['restarts']} restart{'' if child['restarts'] == 1 else 's'}")
    if child.get("last_exit"):
        facts.append(f"last exit: {child['last_exit']}")
    return f"{child['name']} {state} ({'; '.join(facts)})"


def render_supervisors(supervisors: List[Dict[str, Any]], now: Optional[float] = None) -> List[str]:
    """The supervisor part of ``framebroker status``'s table."""
    from ._status import _age  # the table's own way to write durations (_status imports this module)

    now = time.time() if now is None else now
    lines: List[str] = []
    for supervisor in supervisors:
        if "error" in supervisor:
            lines += [f"supervisor pid {supervisor['pid']}: {supervisor['error']}", ""]
            continue
        if not supervisor["alive"]:
            lines += [
                f"supervisor pid {supervisor['pid']} ({supervisor.get('config', '?')}): gone without cleaning up "
                "(killed?); the next framebroker up removes what it left",
                "",
            ]
            continue
        ready = "ready" if supervisor.get("ready") else "not ready yet"
        lines.append(
            f"supervisor pid {supervisor['pid']}: {supervisor['state']} for {_age(max(0.0, now - supervisor['state_since']))}, "
            f"{ready}   config {supervisor.get('config', '?')}"
        )
        width = max([len("CHILD")] + [len(child["name"]) for child in supervisor["children"]])
        lines.append(f"  {'CHILD':<{width}} {'STATE':<16} {'PID':>7} {'RESTARTS':>8}  {'SINCE':<8}  LAST EXIT")
        for child in supervisor["children"]:
            state = child["state"]
            if state == "restarting" and child.get("next_start"):
                state += f" in {max(0.0, child['next_start'] - now):.0f}s"
            pid = str(child["pid"]) if child.get("pid") else "-"
            since = time.strftime("%H:%M:%S", time.localtime(child["since"])) if child.get("since") else "-"
            last = child.get("last_exit") or ("-" if not child.get("waiting_for") else child["waiting_for"])
            lines.append(f"  {child['name']:<{width}} {state:<16} {pid:>7} {child['restarts']:>8}  {since:<8}  {last}")
        lines.append("")
    return lines


__all__ = [
    "StateFile",
    "child_line",
    "describe_supervisors",
    "process_start_time",
    "remove_dead_state_files",
    "render_supervisors",
    "state_path",
]
