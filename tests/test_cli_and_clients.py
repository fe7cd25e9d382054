"""The framebroker command, the example consumers and the demo, run as a user would run them."""

from __future__ import annotations

import json
import os
import re
import signal
import time

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


def test_demo_runs_and_ends_cleanly(env):
    name = env.name("demo")
    result = env.run_cli("demo", "--name", name, "--duration", "7", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"stream {name}: streaming" in out
    for label in ("faces", "motion", "reader"):
        assert re.search(rf"^\s+\d+\s+{label}\s", out, re.M), f"{label} missing from the status summary\n{out}"
    assert "[faces] faces: seq=" in out and "[motion] motion: seq=" in out and "[read] read: seq=" in out
    assert "/dev/shm is clean" in out
    assert shm_objects(name) == []


def test_status_of_a_missing_stream_exits_1(env):
    name = env.name()
    result = env.run_cli("status", name)
    assert result.returncode == 1
    assert "nothing serves it" in result.stdout


def test_status_json_and_table(env):
    daemon, name = env.serve("test://", None, "--fps", "20")
    reader = env.cli("read", name, "--reader-name", "watcher")
    wait_until(lambda: describe_stream(name)["readers"], 10, "the reader")
    time.sleep(1.2)
    result = env.run_cli("status", name, "--json")
    assert result.returncode == 0
    document = json.loads(result.stdout)
    stream = document["streams"][0]
    assert stream["state"] == "streaming" and stream["pid"] == daemon.pid and stream["source"] == "test://"
    assert (stream["width"], stream["height"], stream["format"]) == (640, 480, "bgr")
    assert 15 <= stream["measured_fps"] <= 25
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
    wait_until(lambda: describe_stream(name)["readers"], 20, "the client to attach")
    time.sleep(0.3)
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
