"""Camera sources: URI parsing, credentials, and each kind run for real where this machine can."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import framebroker as fb
from framebroker._status import describe_stream
from framebroker.sources import make_source, parse_source, redact
from framebroker.sources._gstreamer import CsiSource, RtspSource, parse_caps

from conftest import TESTS, Proc, wait_until


def require(tool: str) -> str:
    """Path of ``tool``; on CI (which installs everything) its absence is a failure, not a skip."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: .ci/run must install it")
        pytest.skip(f"{tool} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, kind, target",
    [
        ("test://", "test", ""),
        ("file:///tmp/a%20b.mp4", "file", "/tmp/a b.mp4"),
        ("/tmp/video.mp4", "file", "/tmp/video.mp4"),
        ("video.mkv?loop=1", "file", "video.mkv"),
        ("v4l2:///dev/video2", "v4l2", "/dev/video2"),
        ("/dev/video0", "v4l2", "/dev/video0"),
        ("usb://1", "v4l2", "/dev/video1"),
        ("csi://0", "csi", "0"),
        ("rtsp://cam.local:8554/live", "rtsp", "rtsp://cam.local:8554/live"),
        ("gst://videotestsrc ! videoconvert", "gst", "videotestsrc ! videoconvert"),
    ],
)
def test_source_uris(uri, kind, target):
    spec = parse_source(uri)
    assert (spec.kind, spec.target) == (kind, target)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("", "empty source"),
        ("ftp://host/x", "unknown source scheme 'ftp://'"),
        ("test://something", "test:// takes no path"),
        ("usb://cam", "usb:// needs a camera index"),
        ("csi://front", "csi:// needs a sensor number"),
        ("v4l2://video0", "v4l2:// needs a device path"),
        ("rtsp:///nohost", "has no host"),
        ("rtsp://h/p?latency=-5", "latency=-5"),
        ("rtsp://h/p?transport=quic", "must be tcp or udp"),
        ("file:///x.mp4?speed=2", "unknown option 'speed'"),
        ("gst://", "gst:// needs a pipeline"),
        ("gst://videotestsrc name='unclosed", "malformed gst:// pipeline"),
        ("csi://0?flip=9", "between 0 and 7"),
    ],
)
def test_bad_source_uris_say_what_is_wrong(uri, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("(", r"\(")):
        parse_source(uri)


def test_rtsp_credentials_never_shown():
    spec = parse_source("rtsp://alice:s3cr%40t@10.0.0.5:554/stream1?latency=100&channel=2")
    assert (spec.username, spec.password) == ("alice", "s3cr@t")
    assert spec.target == "rtsp://10.0.0.5:554/stream1?channel=2", "camera query kept, ours removed"
    assert spec.options == {"latency": "100"}
    assert "alice" not in spec.display and "s3cr" not in spec.display
    assert redact("failed: rtsp://bob:pw@h/x and rtsps://u:p@h2/") == "failed: rtsp://***@h/x and rtsps://***@h2/"
    pipeline = make_source(spec).pipeline()
    assert "user-id=alice" in pipeline and "latency=100" in pipeline and "rtsp://10.0.0.5:554/stream1?channel=2" in pipeline


def test_csi_pipeline_converts_into_nvmm_nv12_then_system_memory():
    source = make_source(parse_source("csi://1?flip=2"), width=1920, height=1080, fps=60)
    assert isinstance(source, CsiSource)
    pipeline = source.pipeline()
    assert pipeline.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=60/1,format=NV12")
    assert "nvvidconv flip-method=2 ! video/x-raw,format=BGRx ! videoconvert" in pipeline
    assert pipeline.endswith("fdsink name=fbsink fd={fd} sync=false")


def test_caps_parsing():
    caps = parse_caps("video/x-raw, width=(int)640, height=(int)480, framerate=(fraction)30000/1001, format=(string)BGR")
    assert caps["width"] == 640 and caps["height"] == 480 and caps["format"] == "BGR"
    assert abs(caps["framerate"] - 29.97) < 0.01


# --- sources that cannot work on this machine fail clearly, and the daemon stays up -------------


@pytest.mark.parametrize(
    "uri, reason",
    [
        ("/dev/video97", "no such device /dev/video97"),
        ("usb://96", "no such device /dev/video96"),
        ("/nonexistent/clip.mp4", "file not found: /nonexistent/clip.mp4"),
    ],
)
def test_missing_device_or_file_keeps_the_daemon_up_reconnecting(env, uri, reason):
    daemon, name = env.serve(uri, wait=False)
    info = wait_until(
        lambda: (lambda i: i if i.get("state") in ("starting", "reconnecting") and reason in i.get("reason", "") else None)(describe_stream(name)),
        10,
        "the reason in status",
    )
    assert info["alive"]
    # "reconnecting": it has failed again after its first attempt, and stays up to retry.
    wait_until(lambda: describe_stream(name)["state"] == "reconnecting", 10, "a retry")
    assert daemon.popen.poll() is None, "the daemon must keep retrying"
    assert reason in "\n".join(daemon.stderr)


def test_csi_without_jetson_says_what_is_missing(env):
    require("gst-launch-1.0")
    daemon, name = env.serve("csi://0", wait=False)
    wait_until(lambda: "nvarguscamerasrc" in describe_stream(name).get("reason", ""), 10, "the csi reason")
    assert "Jetson" in describe_stream(name)["reason"]


# --- files -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 2 s, 10 fps H.264 clip made by ffmpeg."""
    ffmpeg = require("ffmpeg")
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    subprocess.run(
        [ffmpeg, "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=10", "-t", "2",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path


def test_file_is_paced_at_its_own_rate_and_ends_clearly(env, clip):
    name = env.name()
    daemon = env.cli("serve", str(clip), "--name", name)
    follower = env.worker("follow", name)
    ended = follower.wait_event("ended", timeout=20)
    assert "ended" in ended["message"] and "end of file" in ended["message"]
    frames = [e for e in follower.events if e.get("event") == "frame"]
    assert 10 <= len(frames) <= 20
    gaps = np.diff([e["ts"] for e in frames]) / 1e6
    assert 85 <= float(np.median(gaps)) <= 115, f"file frames should come every 100 ms, got {np.median(gaps)}"
    assert daemon.wait(timeout=10) == 0


def test_file_loops_when_asked(env, clip):
    daemon, name = env.serve(f"file://{clip}?loop=1")
    with fb.Reader(name, name="loop") as cam:
        seqs = [cam.next(timeout=2).seq for _ in range(35)]  # more than the clip's 20 frames
    assert seqs[-1] >= 35 and daemon.popen.poll() is None


# --- GStreamer pipelines --------------------------------------------------------------------------------


def test_gst_pipeline_source_with_scaling_and_gray(env):
    require("gst-launch-1.0")
    daemon, name = env.serve(
        "gst://videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1",
        None,
        "--width", "160", "--height", "120", "--format", "gray",
    )
    with fb.Reader(name, name="gst") as cam:
        frame = cam.next(timeout=5)
        assert frame.shape == (120, 160) and frame.format == "gray"
    # No --fps: status reports the rate the pipeline negotiated (framerate=30/1), not 0.
    assert describe_stream(name)["configured_fps"] == 30


def test_gst_rows_padded_to_four_bytes_are_unpadded(env):
    """GStreamer pads BGR rows to 4 bytes; a 322-pixel-wide frame must still come out right."""
    require("gst-launch-1.0")
    daemon, name = env.serve(
        "gst://videotestsrc is-live=true pattern=solid-color foreground-color=0xff00ff00 ! video/x-raw,width=322,height=10,framerate=20/1"
    )
    with fb.Reader(name, name="pad") as cam:
        frame = cam.next(timeout=5)
        assert frame.shape == (10, 322, 3)
        assert (frame.array == np.array([0, 255, 0], np.uint8)).all()


# --- RTSP against a real server on 127.0.0.1 -------------------------------------------------------------


def system_python_with_gi() -> str:
    python = "/usr/bin/python3"
    if not os.path.exists(python) or subprocess.run([python, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("Debian's python3-gi and gir1.2-gst-rtsp-server-1.0 are missing: .ci/run must install them")
        pytest.skip("needs Debian's python3-gi and gir1.2-gst-rtsp-server-1.0 for the RTSP test server")
    return python


def start_rtsp_server(env, *args: str) -> tuple[Proc, int]:
    python = system_python_with_gi()
    port = free_port()
    server = env.spawn([python, str(TESTS / "servers" / "rtsp_server.py"), str(port), *args], label="rtsp server")
    server.wait_line(lambda line: line.startswith("ready"), timeout=15)
    return server, port


def test_rtsp_with_credentials_streams_and_never_shows_them(env):
    require("gst-launch-1.0")
    server, port = start_rtsp_server(env, "--user", "alice", "--password", "s3cret")
    daemon, name = env.serve(f"rtsp://alice:s3cret@127.0.0.1:{port}/test?latency=50")
    with fb.Reader(name, name="rtsp") as cam:
        frame = cam.next(timeout=10)
        assert frame.shape == (240, 320, 3)
    status = env.run_cli("status", name, "--json")
    assert status.returncode == 0
    document = json.loads(status.stdout)
    assert document["streams"][0]["source"] == f"rtsp://***@127.0.0.1:{port}/test?latency=50"
    # Nor in the preview's page, status document and Prometheus metrics.
    from test_preview import get, start_view

    view, url = start_view(env, name)
    pages = [get(url + path)[2] for path in ("", "status.json", "metrics")]
    assert f"127.0.0.1:{port}" in pages[2], "the metrics name the source"
    everything = status.stdout + "\n".join(daemon.stdout + daemon.stderr + view.stdout + view.stderr) + "".join(pages)
    assert "s3cret" not in everything and "alice" not in everything


def test_rtsp_wrong_password_is_reported_without_the_password(env):
    require("gst-launch-1.0")
    server, port = start_rtsp_server(env, "--user", "alice", "--password", "s3cret")
    daemon, name = env.serve(f"rtsp://alice:wrongpass@127.0.0.1:{port}/test", wait=False)
    info = wait_until(lambda: (lambda i: i if "Unauthorized" in i.get("reason", "") else None)(describe_stream(name)), 15, "Unauthorized")
    assert info["state"] in ("starting", "reconnecting")
    assert "wrongpass" not in json.dumps(info) and "wrongpass" not in "\n".join(daemon.stderr)
