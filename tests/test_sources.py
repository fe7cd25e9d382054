"""Camera sources: URI parsing, credentials, and each kind run for real where this machine can."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import framebroker as fb
from framebroker._status import describe_stream
from framebroker.gstreamer import element_available, parse_caps
from framebroker.sources import expand_env, make_source, parse_source, redact
from framebroker.sources import _gstreamer
from framebroker.sources._gstreamer import CsiSource

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
    for shown in (spec.display, repr(spec), str(spec)):
        assert "alice" not in shown and "s3cr" not in shown, shown
    assert redact("failed: rtsp://bob:pw@h/x and rtsps://u:p@h2/") == "failed: rtsp://***@h/x and rtsps://***@h2/"
    assert redact("rtsp://u:p@ss@h/x") == "rtsp://***@h/x", "a password with @ in it"
    assert redact("rtspsrc user-pw=hunter2 ! x srt://h:1?mode=caller&passphrase=abc") == "rtspsrc user-pw=*** ! x srt://h:1?mode=caller&passphrase=***"
    # The credentials go to rtspsrc as properties, which the GStreamer child gets privately: the
    # description, which is split like a command line, has neither them nor the URL.
    source = make_source(spec)
    pipeline = source.pipeline()
    assert "latency=100" in pipeline and "alice" not in pipeline and "s3cr" not in pipeline and "10.0.0.5" not in pipeline
    assert source.properties() == {"fbsrc": {"location": "rtsp://10.0.0.5:554/stream1?channel=2", "user-id": "alice", "user-pw": "s3cr@t"}}


def test_credentials_from_the_environment(monkeypatch):
    monkeypatch.setenv("FB_TEST_USER", "alice")
    monkeypatch.setenv("FB_TEST_PASSWORD", "p@ss:w0rd/$x")
    spec = parse_source("rtsp://${FB_TEST_USER}:${FB_TEST_PASSWORD}@10.0.0.5/live?latency=50")
    assert (spec.username, spec.password, spec.target) == ("alice", "p@ss:w0rd/$x", "rtsp://10.0.0.5/live")
    assert spec.display == "rtsp://***@10.0.0.5/live?latency=50"
    assert "p@ss:w0rd/$x" in spec.secrets and "w0rd" not in repr(spec)
    gst = parse_source("gst://rtspsrc location=rtsp://h/x user-pw=${FB_TEST_PASSWORD} ! decodebin")
    assert gst.target == "rtspsrc location=rtsp://h/x user-pw='p@ss:w0rd/$x' ! decodebin", "quoted for the pipeline"
    assert gst.display == "gst://rtspsrc location=rtsp://h/x user-pw=*** ! decodebin" and "p@ss:w0rd/$x" in gst.secrets
    assert expand_env("a $HOME ${X} b", environ={"X": "1"}) == ("a $HOME 1 b", ("1",)), "only ${NAME} is expanded"
    with pytest.raises(ValueError, match="environment variable FB_TEST_UNSET is not set"):
        parse_source("rtsp://u:${FB_TEST_UNSET}@h/x")


def test_csi_pipeline_converts_in_nvvidconv_with_no_cpu_conversion():
    source = make_source(parse_source("csi://1?flip=2"), width=1920, height=1080, fps=60)
    assert isinstance(source, CsiSource)
    assert source.pipeline() == (
        "nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=60/1,format=NV12 ! "
        "nvvidconv flip-method=2 ! videorate ! video/x-raw,format=BGRx,width=1920,height=1080,framerate=60/1 ! "
        "fdsink name=fbsink fd={fd} sync=false"
    )
    assert "nvvidconv flip-method=0 ! video/x-raw,format=RGBA ! fdsink" in make_source(parse_source("csi://0"), pixel_format="rgb").pipeline()
    assert "nvvidconv flip-method=0 ! video/x-raw,format=GRAY8 ! fdsink" in make_source(parse_source("csi://0"), pixel_format="gray").pipeline()


def test_rtsp_pipelines_take_only_the_video_and_decode_in_hardware_on_a_jetson(monkeypatch):
    spec = parse_source("rtsp://127.0.0.1:8554/cam?latency=100")
    monkeypatch.setattr(_gstreamer, "_jetson", False)
    assert make_source(spec, width=640, height=360).pipeline() == (
        "rtspsrc name=fbsrc latency=100 protocols=tcp ! application/x-rtp,media=video ! decodebin ! videoconvert ! videoscale ! "
        "video/x-raw,format={BGR,BGRx},width=640,height=360 ! fdsink name=fbsink fd={fd} sync=false"
    )
    monkeypatch.setattr(_gstreamer, "_jetson", True)
    # nvvidconv scales (to the size in the caps after it) and converts, in hardware.
    assert make_source(spec, width=640, height=360).pipeline() == (
        "rtspsrc name=fbsrc latency=100 protocols=tcp ! application/x-rtp,media=video ! parsebin ! nvv4l2decoder ! "
        "nvvidconv ! video/x-raw,format=BGRx,width=640,height=360 ! fdsink name=fbsink fd={fd} sync=false"
    )
    assert make_source(spec, pixel_format="gray", fps=10).pipeline() == (
        "rtspsrc name=fbsrc latency=100 protocols=tcp ! application/x-rtp,media=video ! parsebin ! nvv4l2decoder ! "
        "nvvidconv ! videorate ! video/x-raw,format=GRAY8,framerate=10/1 ! fdsink name=fbsink fd={fd} sync=false"
    )


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
    ],
)
def test_missing_device_keeps_the_daemon_up_reconnecting(env, uri, reason):
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


def require_gstreamer() -> None:
    """GStreamer's library and base plugins (the sources and encoders need no gst-launch-1.0)."""
    if not element_available("videotestsrc"):
        if os.environ.get("CI"):
            pytest.fail("GStreamer is missing: .ci/run must install it")
        pytest.skip("GStreamer is not installed")


def test_csi_without_jetson_says_what_is_missing(env):
    require_gstreamer()
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
    require_gstreamer()
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


@pytest.mark.parametrize("gst_format", ["BGR", "BGRx"])
def test_gst_rows_padded_to_four_bytes_and_fourth_bytes_are_dropped(env, gst_format):
    """GStreamer pads BGR rows to 4 bytes; a 322-pixel-wide frame must still come out right. A
    pipeline that ends in BGRx (as nvvidconv's do) gets no conversion: the daemon drops the
    4th byte as it copies the frame into the ring."""
    require_gstreamer()
    daemon, name = env.serve(
        "gst://videotestsrc is-live=true pattern=solid-color foreground-color=0xff0080ff"
        f" ! video/x-raw,format={gst_format},width=322,height=10,framerate=20/1"
    )
    with fb.Reader(name, name="pad") as cam:
        frame = cam.next(timeout=5)
        assert frame.shape == (10, 322, 3)
        assert (frame.array == np.array([255, 128, 0], np.uint8)).all()


def test_a_gst_pipeline_that_ends_in_nvmm_memory_is_told_what_to_do(env):
    require_gstreamer()
    daemon, name = env.serve("gst://videotestsrc ! video/x-raw(memory:NVMM),format=NV12", wait=False)
    info = wait_until(lambda: (lambda i: i if "system memory" in i.get("reason", "") else None)(describe_stream(name)), 15, "the reason")
    assert "nvvidconv ! video/x-raw,format=BGRx" in info["reason"]


def test_stopping_the_daemon_ends_a_gst_pipeline_with_end_of_stream(env, tmp_path):
    """A branch of the pipeline records to MP4, whose index mp4mux writes only at end of stream:
    the file plays only if stopping the daemon sent end of stream through the whole pipeline
    (as Jetson's Argus camera source needs to close its session) and waited for it."""
    require_gstreamer()
    recording = tmp_path / "branch.mp4"
    daemon, name = env.serve(
        "gst://videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=15/1 ! tee name=t"
        " ! queue ! x264enc tune=zerolatency speed-preset=ultrafast ! mp4mux"
        f" ! filesink location={recording} t. ! queue"
    )
    with fb.Reader(name, name="eos") as cam:
        first = cam.next(timeout=5).seq
        wait_until(lambda: cam.next(timeout=5).seq >= first + 10, 10, "ten more frames")
    assert daemon.stop() == 0
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(recording)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0 and int(probe.stdout.strip()) >= 10, probe.stderr


# --- RTSP against a real server on 127.0.0.1 -------------------------------------------------------------


def system_python_with_gi() -> str:
    python = "/usr/bin/python3"
    if not os.path.exists(python) or subprocess.run([python, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("Debian's python3-gi and gir1.2-gst-rtsp-server-1.0 are missing: .ci/run must install them")
        pytest.skip("needs Debian's python3-gi and gir1.2-gst-rtsp-server-1.0 for the RTSP test server")
    return python


def start_rtsp_server(env, *args: str, environ: Optional[dict] = None) -> tuple[Proc, int]:
    python = system_python_with_gi()
    port = free_port()
    server = env.spawn([python, str(TESTS / "servers" / "rtsp_server.py"), str(port), *args], label="rtsp server", env=environ)
    server.wait_line(lambda line: line.startswith("ready"), timeout=15)
    return server, port


def test_rtsp_with_credentials_streams_and_never_shows_them(env):
    require_gstreamer()
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
    require_gstreamer()
    server, port = start_rtsp_server(env, "--user", "alice", "--password", "s3cret")
    daemon, name = env.serve(f"rtsp://alice:wrongpass@127.0.0.1:{port}/test", wait=False)
    info = wait_until(lambda: (lambda i: i if "Unauthorized" in i.get("reason", "") else None)(describe_stream(name)), 15, "Unauthorized")
    assert info["state"] in ("starting", "reconnecting")
    assert "wrongpass" not in json.dumps(info) and "wrongpass" not in "\n".join(daemon.stderr)


def test_rtsp_takes_the_video_of_a_camera_that_announces_audio_first(env):
    require_gstreamer()
    server, port = start_rtsp_server(env, "--audio-first")
    daemon, name = env.serve(f"rtsp://127.0.0.1:{port}/test?latency=50")
    with fb.Reader(name, name="rtsp") as cam:
        frame = cam.next(timeout=10)
        assert frame.shape == (240, 320, 3)
    log = "\n".join(daemon.stderr)
    assert "retry" not in log and "failed" not in log, f"the first attempt must take the video: {log}"


@pytest.mark.parametrize("codec, decoder", [("h264", "avdec_h264"), ("h265", "avdec_h265")])
def test_the_jetson_rtsp_pipeline_with_stand_ins_for_nvidias_elements(env, monkeypatch, codec, decoder):
    """The Jetson pipeline, run here with software in place of NVIDIA's two elements (decoder:
    avdec; nvvidconv, which scales and writes BGRx to system memory: videoconvert ! videoscale):
    parsebin depayloads and parses either codec, and the 4th byte is dropped on the copy."""
    require_gstreamer()
    server, port = start_rtsp_server(env, "--audio-first", "--codec", codec)
    monkeypatch.setattr(_gstreamer, "_jetson", True)
    source = make_source(parse_source(f"rtsp://127.0.0.1:{port}/test?latency=50"), width=160, height=120)
    jetson = source.pipeline()
    assert "videoconvert" not in jetson and "videoscale" not in jetson
    stand_in = jetson.replace("nvv4l2decoder", decoder).replace("nvvidconv", "videoconvert ! videoscale")
    assert stand_in != jetson
    monkeypatch.setattr(source, "pipeline", lambda: stand_in)
    source.open()
    try:
        assert source.shape == (120, 160, 3)
        frame = np.zeros(source.shape, np.uint8)
        source.read_into(frame)
        assert frame.any() and source._caps["format"] == "BGRx"
    finally:
        source.close()
