"""Sources that fail: the daemon stays up, says why, retries with backoff, and follows the camera
when it comes back (even at another resolution)."""

from __future__ import annotations

import re
import signal
import threading
import time
from datetime import datetime

import numpy as np
import pytest

import framebroker as fb
from framebroker._status import describe_stream
from framebroker.sources import SourceSpec, make_source

from conftest import wait_until
from test_sources import require_gstreamer, start_rtsp_server


def _state(name: str) -> dict:
    return describe_stream(name)


def test_rtsp_server_restart_at_another_resolution(env):
    require_gstreamer()
    server, port = start_rtsp_server(env, "--width", "320", "--height", "240")
    daemon, name = env.serve(f"rtsp://127.0.0.1:{port}/test?latency=0")
    follower = env.worker("follow", name)
    wait_until(lambda: any(e.get("shape") == [240, 320, 3] for e in follower.events), 15, "frames at 320x240")

    server.stop()
    info = wait_until(lambda: (lambda i: i if i["state"] == "reconnecting" else None)(_state(name)), 20, "reconnecting")
    assert info["alive"] and f"127.0.0.1:{port}" in info["reason"], info
    mark = len(follower.events)
    wait_until(lambda: any(e.get("event") == "timeout" for e in follower.events[mark:]), 10, "the reader to time out cleanly")
    assert daemon.popen.poll() is None and follower.popen.poll() is None

    restarted = env.spawn(
        [*server.argv[:3], "--width", "640", "--height", "480"], label="rtsp server again"
    )
    restarted.wait_line(lambda line: line.startswith("ready"), timeout=15)
    wait_until(lambda: any(e.get("shape") == [480, 640, 3] for e in follower.events[mark:]), 40, "frames at the new size")
    assert _state(name)["state"] == "streaming"
    # Frames delivered before the change keep their size; after the first new-size frame no
    # frame of the old size may appear, and no frame of any other size ever.
    shapes = [tuple(e["shape"]) for e in follower.events if e.get("event") == "frame"]
    first_new = shapes.index((480, 640, 3))
    assert set(shapes[:first_new]) == {(240, 320, 3)}
    assert set(shapes[first_new:]) == {(480, 640, 3)}
    with fb.Reader(name, name="late") as cam:
        assert cam.next(timeout=5).shape == (480, 640, 3)


def test_missing_device_is_retried_with_backoff(env):
    daemon, name = env.serve("/dev/video93", None, "--log-level", "debug", wait=False)  # a line per attempt
    daemon.wait_line(lambda line: "attempt 4" in line, timeout=30)
    attempts = []
    for line in daemon.stderr:
        match = re.match(r"(\S+ \S+) framebroker.serve DEBUG: source unavailable: .*attempt (\d+), next in ([\d.]+) s", line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            attempts.append((stamp, int(match.group(2)), float(match.group(3))))
    assert [a[1] for a in attempts[:4]] == [1, 2, 3, 4]
    assert [a[2] for a in attempts[:4]] == [0.5, 1.0, 2.0, 4.0]
    gaps = [(b[0] - a[0]).total_seconds() for a, b in zip(attempts, attempts[1:4])]
    assert gaps[0] < gaps[1] < gaps[2], gaps
    info = _state(name)
    assert info["alive"] and "no such device /dev/video93" in info["reason"]


class _FakeCapture:
    """Stands in for cv2.VideoCapture once the device has gone: read() fails."""

    def read(self, *args):
        return False, None

    def get(self, prop):
        return 0.0

    def release(self):
        pass


def test_v4l2_device_that_disappears_is_reported_as_such(tmp_path):
    device = tmp_path / "video0"
    device.write_bytes(b"")
    # URIs only name devices under /dev; the stand-in lives in a temporary directory.
    source = make_source(SourceSpec("v4l2", str(device), {}, display=str(device)))
    source._capture = _FakeCapture()  # noqa: SLF001 - the camera itself is what we cannot have here
    source._native_shape = (480, 640, 3)  # noqa: SLF001
    buffer = np.empty((480, 640, 3), np.uint8)
    with pytest.raises(fb.SourceError, match="stopped delivering frames"):
        source.read_into(buffer)
    device.unlink()
    with pytest.raises(fb.SourceError, match=f"device {device} disappeared"):
        source.read_into(buffer)
    with pytest.raises(fb.SourceError, match=f"no such device {device}"):
        source.open()
