"""The framebroker command, the example consumers and the demo, run as a user would run them."""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Optional

import pytest

from framebroker._status import describe_stream

from conftest import shm_objects, wait_until


def test_three_consumers_on_one_stream_at_once(env):
    daemon, name = env.serve("test://", None, "--fps", "30")
    faces = env.cli("faces", name, "--frames", "40")
    motion = env.cli("motion", name, "--frames", "60")
    reader = env.cli("read", name, "--verify", "--frames", "90", "--every")
    wait_until(lambda: len(describe_stream(name)["readers"]) == 3, 20, "three readers attached at once")
    for proc in (faces, motion, reader):
        assert proc.wait(timeout=60) == 0, proc.output()
    assert any(re.search(r"faces: seq=\d+ t=\d+", line) for line in faces.stdout), faces.output()
    assert any(re.search(r"motion: seq=\d+ t=\d+ \d+ moving region", line) for line in motion.stdout), motion.output()
    frame_lines = [line for line in reader.stdout if re.match(r"read: seq=\d+ t=\d+ 640x480", line)]
    assert len(frame_lines) == 90
    assert "0 bad" in reader.stdout[-1]


def test_demo_runs_until_ctrl_c_and_ends_cleanly(env):
    name = env.name("demo")
    demo = env.cli("demo", "--name", name)
    # It runs until every consumer has shown output and a status summary has listed each of them.
    for prefix in ("[faces] faces: seq=", "[motion] motion: seq=", "[read] read: seq="):
        demo.wait_line(lambda line: prefix in line, timeout=60)
    for label in ("faces", "motion", "reader"):
        demo.wait_line(lambda line: re.match(rf"^\s+\d+\s+{label}\s", line) is not None, timeout=60)
    assert any(f"stream {name}: streaming" in line for line in demo.stdout), demo.output()
    demo.signal(signal.SIGINT)  # Ctrl-C
    assert demo.wait(timeout=60) == 0, demo.output()
    assert "/dev/shm is clean" in demo.stdout[-1], demo.output()
    assert shm_objects(name) == []


def test_demo_duration_ends_it_by_itself(env):
    name = env.name("demo")
    result = env.run_cli("demo", "--name", name, "--duration", "1", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/dev/shm is clean" in result.stdout
    assert shm_objects(name) == []


def test_status_of_a_missing_stream_exits_1(env):
    name = env.name()
    result = env.run_cli("status", name)
    assert result.returncode == 1
    assert "nothing serves it" in result.stdout


def test_status_json_and_table(env):
    daemon, name = env.serve("test://", None, "--fps", "20")
    reader = env.cli("read", name, "--reader-name", "watcher")

    def measured() -> Optional[dict]:
        """The --json stream once it lists the reader and shows the rate measured at about 20 fps
        (the daemon measures about once a second; the first window may include its start)."""
        result = env.run_cli("status", name, "--json")
        assert result.returncode == 0, result.stderr
        stream = json.loads(result.stdout)["streams"][0]
        return stream if stream["readers"] and 15 <= stream["measured_fps"] <= 25 else None

    stream = wait_until(measured, 20, "the reader and a measured rate of 15-25 fps in status --json")
    assert stream["state"] == "streaming" and stream["pid"] == daemon.pid and stream["source"] == "test://"
    assert (stream["width"], stream["height"], stream["format"]) == (640, 480, "bgr")
    (entry,) = stream["readers"]
    assert entry["name"] == "watcher" and entry["pid"] == reader.pid and entry["mode"] == "next"
    table = env.run_cli("status", name).stdout
    assert f"stream {name}: streaming" in table and "watcher" in table and str(reader.pid) in table


def test_help_lists_every_command(env):
    result = env.run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "status", "demo", "faces", "motion", "read"):
        assert command in result.stdout


@pytest.mark.parametrize("command", [["read"], ["faces"], ["motion"]])
def test_clients_stop_cleanly_on_sigterm_while_waiting(env, command):
    daemon, name = env.serve("test://", None, "--fps", "0.5")
    client = env.cli(*command, name)
    # Its first frame counted: it is waiting for the next one, two seconds away.
    wait_until(lambda: any(r["frames"] >= 1 for r in describe_stream(name)["readers"]), 20, "the client's first frame")
    client.signal(signal.SIGTERM)
    assert client.wait(timeout=5) == 0, client.output()
    wait_until(lambda: not describe_stream(name)["readers"], 2, "the client to leave the table")


def test_clean_removes_only_what_dead_daemons_left(env):
    dead, dead_name = env.serve()
    live, live_name = env.serve()
    dead.signal(signal.SIGKILL)
    dead.wait()
    assert shm_objects(dead_name), "a killed daemon leaves its segment (until reclaimed)"
    foreign = env.name("foreign")
    path = f"/dev/shm/framebroker.{foreign}"
    with open(path, "wb") as handle:
        handle.write(b"someone else's data")
    try:
        # One name at a time (a bare `framebroker clean` sweeps every stream on the machine,
        # including other test runs' deliberately stale ones).
        result = env.run_cli("clean", dead_name)
        assert result.stdout == f"{dead_name}: removed (its daemon, pid {dead.pid}, is gone)\n" and result.returncode == 0
        result = env.run_cli("clean", live_name)
        assert result.stdout == f"{live_name}: live (daemon pid {live.pid}), left alone\n" and result.returncode == 0
        result = env.run_cli("clean", foreign)
        assert result.stdout.startswith(f"{foreign}: left alone: ") and "not a framebroker ring" in result.stdout
        assert result.returncode == 1
        assert shm_objects(dead_name) == []
        assert describe_stream(live_name)["alive"]
        assert open(path, "rb").read() == b"someone else's data"
    finally:
        os.unlink(path)
