"""framebroker.gstreamer: pipelines in a child that gets everything privately, exactly as given."""

from __future__ import annotations

import subprocess
from pathlib import Path

import framebroker.gstreamer as gstreamer
from framebroker.gstreamer import GstProcess

from conftest import wait_until
from test_sources import require_gstreamer


def test_the_public_surface():
    assert gstreamer.__all__ == ["GstProcess", "element_available", "parse_caps"]


def test_pipeline_and_properties_reach_the_child_off_its_command_line_byte_for_byte(tmp_path):
    require_gstreamer()
    # Quotes, spaces, a backslash, "!": all of it would need escaping in a gst-launch description.
    target = tmp_path / "odd \"name\" it's a\\b ! x.raw"
    caps: list[dict] = []
    with GstProcess(
        ["videotestsrc", "is-live=true", "num-buffers=10", "!", "video/x-raw,width=8,height=6,format=GRAY8,framerate=50/1", "!", "filesink", "name=out"],
        name="test sink",
        properties={"out": {"location": str(target)}},
        caps_of="out",
        on_caps=caps.append,
    ) as gst:
        command_line = Path(f"/proc/{gst.pid}/cmdline").read_bytes()
        assert gst.wait(20) == 0, gst.lines
    assert b"test sink" in command_line, "a label for ps"
    assert b"videotestsrc" not in command_line and b"odd" not in command_line
    assert target.stat().st_size == 10 * 8 * 6, "ten 8x6 gray frames in the file of that very name"
    assert caps and caps[-1]["width"] == 8 and caps[-1]["height"] == 6 and caps[-1]["format"] == "GRAY8"
    assert caps[-1]["framerate"] == 50.0


def test_a_failing_pipeline_says_why_without_its_secrets():
    require_gstreamer()
    with GstProcess(["videotestsrc", "!", "nosuchelement", "!", "fakesink"], name="bad") as gst:
        assert gst.wait(20) == 1
        assert gst.error() == 'pipeline could not be constructed: no element "nosuchelement"'
    gst.stop()  # twice is fine

    secret = "/nonexistent/hunter2-and-more"
    with GstProcess(["filesrc", "name=src", "!", "fakesink"], name="missing file", properties={"src": {"location": secret}}, secrets=(secret,)) as gst:
        assert gst.wait(20) == 1
        assert gst.error().startswith("src: Resource not found.") and "***" in gst.error()
        assert "hunter2" not in "\n".join(gst.lines)

    # Only text properties are set privately; others belong in the description.
    with GstProcess(["videotestsrc", "name=src", "!", "fakesink"], name="typed", properties={"src": {"num-buffers": "3"}}) as gst:
        assert gst.wait(20) == 1
        assert gst.error() == "element 'src' has no text property 'num-buffers'"


def test_element_available():
    require_gstreamer()
    assert gstreamer.element_available("fakesink")
    assert not gstreamer.element_available("nosuchelement")


def test_end_stream_finishes_a_live_pipeline_in_order(tmp_path):
    """end_stream() (SIGINT) sends end of stream from the sources: mp4mux writes its index only
    then, so a file that plays proves the end went through the whole pipeline before the exit."""
    require_gstreamer()
    target = tmp_path / "live.mp4"
    with GstProcess(
        ["videotestsrc", "is-live=true", "!", "video/x-raw,width=160,height=120,framerate=30/1", "!",
         "x264enc", "tune=zerolatency", "speed-preset=ultrafast", "!", "mp4mux", "!", "filesink", "name=out", "buffer-mode=unbuffered"],
        name="live mp4",
        properties={"out": {"location": str(target)}},
    ) as gst:  # fmt: skip
        wait_until(lambda: target.exists() and target.stat().st_size > 4000, 20, "frames in the file")
        gst.end_stream()
        assert gst.wait(20) == 0, gst.lines
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(target)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0 and int(probe.stdout.strip()) > 0, probe.stderr
