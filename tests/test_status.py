"""``framebroker status``: what it shows about streams and readers, run as a user would run it."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time

import framebroker as fb
from framebroker._process import framebroker_command

from conftest import wait_until


def status_json(env, name: str) -> dict:
    """``framebroker status NAME --json``'s one stream (state "absent" before the daemon is up)."""
    result = env.run_cli("status", name, "--json")
    (stream,) = json.loads(result.stdout)["streams"]
    assert result.returncode == (1 if stream["state"] == "absent" else 0), result.stdout + result.stderr
    return stream


def readers_by_name(stream: dict) -> dict:
    return {reader["name"]: reader for reader in stream["readers"]}


def test_fast_slow_and_killed_readers_and_a_killed_daemon(env):
    # No --fps: the configured rate must come from the source itself (test:// runs at 30).
    daemon, name = env.serve("test://")
    fast = env.cli("read", name, "--mode", "ordered", "--reader-name", "fast")
    slow = env.cli("read", name, "--mode", "ordered", "--work-ms", "200", "--reader-name", "slow")
    sampler = env.cli("read", name, "--mode", "latest", "--reader-name", "sampler")

    def slow_has_fallen_behind():
        stream = status_json(env, name)
        readers = readers_by_name(stream)
        if set(readers) != {"fast", "slow", "sampler"}:
            return None
        if readers["slow"]["lag"] and readers["slow"]["dropped"] >= 10 and readers["fast"]["frames"] >= 30:
            return stream
        return None

    stream = wait_until(slow_has_fallen_behind, 30, "the slow reader to lag and drop frames")
    assert stream["state"] == "streaming" and stream["alive"] is True and stream["pid"] == daemon.pid
    assert stream["configured_fps"] == 30
    assert 20 <= stream["measured_fps"] <= 40
    readers = readers_by_name(stream)
    fast_entry, slow_entry = readers["fast"], readers["slow"]
    assert (fast_entry["pid"], slow_entry["pid"], readers["sampler"]["pid"]) == (fast.pid, slow.pid, sampler.pid)
    assert [fast_entry["mode"], slow_entry["mode"], readers["sampler"]["mode"]] == ["ordered", "ordered", "live"]
    # The slow reader takes ~5 of 30 frames a second; the fast one keeps up.
    assert slow_entry["lag"] > 0 and slow_entry["dropped"] >= 10
    assert fast_entry["lag"] <= 3 and fast_entry["dropped"] <= 3, fast_entry
    assert fast_entry["fps"] > 2 * slow_entry["fps"] > 0
    assert slow_entry["held"] <= slow_entry["hold"] == 1
    assert time.time() - 60 < slow_entry["attached_since"] <= time.time()

    table = env.run_cli("status", name).stdout
    assert f"stream {name}: streaming for " in table and "30 configured" in table
    for label, proc in (("fast", fast), ("slow", slow), ("sampler", sampler)):
        assert str(proc.pid) in table and label in table

    slow.signal(signal.SIGKILL)
    # The kernel drops a dead reader's locks at once; status must not show it a moment longer.
    wait_until(lambda: "slow" not in readers_by_name(fb.status(name)["streams"][0]), 2, "the killed reader to vanish")
    assert set(readers_by_name(status_json(env, name))) == {"fast", "sampler"}

    daemon.signal(signal.SIGKILL)
    daemon.wait()
    dead = status_json(env, name)
    assert dead["state"] == "dead" and dead["alive"] is False and dead["measured_fps"] == 0
    table = env.run_cli("status", name).stdout
    assert f"stream {name}: dead: its daemon (pid {daemon.pid}) is gone" in table and f"framebroker clean {name}" in table
    assert "streaming" not in table
    listing = json.loads(env.run_cli("status", "--json").stdout)
    assert [s["state"] for s in listing["streams"] if s["name"] == name] == ["dead"], "a stale stream must be listed"

    # A new daemon takes the stream over and the surviving readers come back by themselves.
    env.serve("test://", name)
    wait_until(lambda: set(readers_by_name(status_json(env, name))) == {"fast", "sampler"}, 15, "readers to re-attach")


def test_reconnecting_shows_why_in_table_and_json(env):
    daemon, name = env.serve("/dev/video94", None, "--fps", "12", wait=False)  # a camera not plugged in
    stream = wait_until(
        lambda: (s := status_json(env, name)).get("state") == "reconnecting" and s,
        20,
        "the daemon to retry the missing camera",
    )
    assert "no such device /dev/video94" in stream["reason"]
    assert stream["alive"] is True and stream["configured_fps"] == 12 and stream["measured_fps"] == 0
    table = env.run_cli("status", name).stdout
    assert f"stream {name}: reconnecting for " in table
    assert "no such device /dev/video94" in table and "12 configured" in table


def test_watch_redraws_in_place_on_a_terminal_and_appends_otherwise(env):
    daemon, name = env.serve("test://", None, "--fps", "10")
    argv = framebroker_command("status", name, "--watch", "--interval", "0.1")

    # On a terminal: cursor home and clear-to-end-of-line, never a growing scroll of tables.
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(argv, stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL, start_new_session=True)
    os.close(terminal)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while seen.count(b"\x1b[H") < 4 and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                seen += os.read(controller, 65536)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        try:
            while select.select([controller], [], [], 0.2)[0]:
                seen += os.read(controller, 65536)
        except OSError:
            pass  # the terminal closed with the process
        os.close(controller)
    assert proc.returncode == 0
    assert seen.count(b"\x1b[H") >= 4, seen[-500:]
    assert b"\x1b[K" in seen and f"stream {name}: streaming".encode() in seen
    assert seen.count(b"\x1b[2J") == 1, "the screen is cleared once, then overwritten (no flicker)"
    assert seen.endswith(b"\x1b[?25h"), "the cursor must be shown again on exit"

    # Not a terminal: plain appended refreshes, no escape sequences.
    piped = env.cli("status", name, "--watch", "--interval", "0.1")
    wait_until(lambda: sum(line.startswith("--- ") for line in piped.stdout) >= 3, 20, "three refreshes")
    piped.stop()
    text = "\n".join(piped.stdout)
    assert "\x1b" not in text and f"stream {name}: streaming" in text
