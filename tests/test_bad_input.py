"""Bad input, table-driven: every case gets a clear message and its documented exit code (or
exception), and the daemon that is running meanwhile keeps serving fresh, intact frames."""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker._layout import LAYOUT_VERSION, MAGIC
from framebroker._process import framebroker_command
from framebroker._status import describe_stream

from conftest import Proc, shm_objects, wait_until


@dataclass
class Case:
    id: str
    args: list = field(default_factory=list)  # CLI arguments; "{live}"/"{new}" are stream names
    api: Optional[Callable[[str, str], object]] = None  # called with (live, new)
    exit: int = 2
    error: Optional[type] = None
    message: str = ""
    segment: Optional[Callable[[int], bytes]] = None  # content to plant at /dev/shm/framebroker.{new}


def garbage(_size: int) -> bytes:
    return b"\x7fELF not a ring at all" + os.urandom(5000)


def truncated(_size: int) -> bytes:
    return MAGIC + struct.pack("<I", LAYOUT_VERSION) + bytes(100)


def other_version(_size: int) -> bytes:
    return MAGIC + struct.pack("<I", LAYOUT_VERSION + 7) + bytes(8192)


def cut_short(_size: int) -> bytes:
    """A real header whose promised size is larger than the file."""
    name = f"tmp{uuid.uuid4().hex[:8]}"
    with fb.Publisher(name, shape=(64, 64, 3), slots=3):
        raw = Path(f"/dev/shm/framebroker.{name}").read_bytes()
    return raw[: len(raw) // 2]


CASES = [
    # --- sources ---------------------------------------------------------------------------------
    Case("scheme-unknown", ["serve", "ftp://camera/x", "--name", "{new}"], message="unknown source scheme 'ftp://'"),
    Case("source-empty", ["serve", "", "--name", "{new}"], message="empty source"),
    Case("test-with-path", ["serve", "test://pattern", "--name", "{new}"], message="test:// takes no path"),
    Case("usb-not-a-number", ["serve", "usb://front", "--name", "{new}"], message="usb:// needs a camera index"),
    Case("csi-not-a-number", ["serve", "csi://left", "--name", "{new}"], message="csi:// needs a sensor number"),
    Case("v4l2-no-dev", ["serve", "v4l2://video0", "--name", "{new}"], message="v4l2:// needs a device path"),
    Case("rtsp-no-host", ["serve", "rtsp:///path", "--name", "{new}"], message="has no host"),
    Case("rtsp-bad-port", ["serve", "rtsp://host:99999/x", "--name", "{new}"], message="malformed RTSP URL"),
    Case("rtsp-negative-latency", ["serve", "rtsp://h/p?latency=-5", "--name", "{new}"], message="latency=-5"),
    Case("file-unknown-option", ["serve", "file:///v.mp4?speed=2", "--name", "{new}"], message="unknown option 'speed'"),
    Case("gst-empty", ["serve", "gst://", "--name", "{new}"], message="gst:// needs a pipeline"),
    Case("gst-unbalanced-quote", ["serve", "gst://videotestsrc name='x", "--name", "{new}"], message="malformed gst:// pipeline"),
    # A typo must not start a daemon that retries forever: usage errors, with the closest scheme.
    Case("scheme-one-slash", ["serve", "test:/", "--name", "{new}"], message="source 'test:/' is not a URI framebroker knows (did you mean test://?)"),
    Case("scheme-no-slashes", ["serve", "usb:0", "--name", "{new}"], message="(did you mean usb://?)"),
    Case("scheme-bare-word", ["serve", "test", "--name", "{new}"], message="source 'test' is a scheme without '://' (did you mean test://?)"),
    Case("scheme-misspelt", ["serve", "tset://", "--name", "{new}"], message="unknown source scheme 'tset://' (did you mean test://?)"),
    # ... and a file that is not there at start is an error (a camera or server is waited for).
    Case("file-missing", ["serve", "/nonexistent/clip.mp4", "--name", "{new}"], exit=1, message="file not found: /nonexistent/clip.mp4"),
    Case("file-missing-relative", ["serve", "no-such-clip.mp4", "--name", "{new}"], exit=1, message="file not found: no-such-clip.mp4 in /"),
    Case("file-is-a-directory", ["serve", "/", "--name", "{new}"], exit=1, message="/ is a directory, not a video file"),
    # --- stream names ------------------------------------------------------------------------------
    Case("name-slash", ["serve", "test://", "--name", "a/b"], message="invalid stream name 'a/b'"),
    Case("name-dotdot", ["serve", "test://", "--name", ".."], message="invalid stream name '..'"),
    Case("name-space", ["serve", "test://", "--name", "front door"], message="invalid stream name"),
    Case("name-200-chars", ["serve", "test://", "--name", "x" * 200], message="use 1-64 characters"),
    Case("status-bad-name", ["status", "../etc"], message="invalid stream name"),
    # --- sizes, rates, options -----------------------------------------------------------------------
    Case("width-negative", ["serve", "test://", "--name", "{new}", "--width", "-640", "--height", "480"], message="--width must be between 16 and 16384"),
    Case("height-absurd", ["serve", "test://", "--name", "{new}", "--width", "640", "--height", "999999"], message="--height must be between"),
    Case("width-not-number", ["serve", "test://", "--name", "{new}", "--width", "wide", "--height", "480"], message="--width must be a whole number"),
    Case("only-width", ["serve", "test://", "--name", "{new}", "--width", "640"], message="give both --width and --height"),
    Case("fps-zero", ["serve", "test://", "--name", "{new}", "--fps", "0"], message="--fps must be > 0"),
    Case("fps-absurd", ["serve", "test://", "--name", "{new}", "--fps", "1e9"], message="--fps must be"),
    Case("fps-nan", ["serve", "test://", "--name", "{new}", "--fps", "nan"], message="--fps must be"),
    Case("slots-too-few", ["serve", "test://", "--name", "{new}", "--slots", "2"], message="--slots must be between 3 and 256"),
    Case("slots-absurd", ["serve", "test://", "--name", "{new}", "--slots", "100000"], message="--slots must be between"),
    Case("format-unknown", ["serve", "test://", "--name", "{new}", "--format", "yuv420"], message="invalid choice: 'yuv420'"),
    Case("group-unknown", ["serve", "test://", "--name", "{new}", "--group", "no-such-group-x"], message="unknown group 'no-such-group-x'"),
    # --- what is already in /dev/shm ----------------------------------------------------------------------
    Case("segment-garbage", ["serve", "test://", "--name", "{new}"], exit=1, message="is not a framebroker ring", segment=garbage),
    Case("segment-truncated", ["serve", "test://", "--name", "{new}"], exit=1, message="is truncated (112 bytes", segment=truncated),
    Case("segment-cut-short", ["serve", "test://", "--name", "{new}"], exit=1, message="where its header promises", segment=cut_short),
    Case("segment-other-version", ["serve", "test://", "--name", "{new}"], exit=1, message=f"layout version {LAYOUT_VERSION + 7}", segment=other_version),
    Case("status-of-garbage", ["status", "{new}"], exit=1, message="incompatible", segment=garbage),
    Case("second-daemon", ["serve", "test://", "--name", "{live}"], exit=1, message="already served by a live daemon (pid"),
    # --- the recorder and triggers --------------------------------------------------------------------------
    Case("record-dir-missing", ["record", "{live}", "-o", "/nonexistent-dir/x.ts"], message="directory /nonexistent-dir does not exist"),
    Case("record-clips-dir-missing", ["record", "{live}", "--clips", "/nonexistent-dir"], message="--clips /nonexistent-dir: no such directory"),
    Case("record-segment-dir-missing", ["record", "{live}", "--segment", "2", "--dir", "/nonexistent-dir"], message="no such directory"),
    Case("record-o-and-segment", ["record", "{live}", "-o", "x.ts", "--segment", "2"], message="give either -o FILE or --segment"),
    Case("record-unknown-encoder", ["record", "{live}", "--encoder", "h265_magic"], message="unknown --encoder 'h265_magic'"),
    Case("record-output-scheme", ["record", "{live}", "-o", "rtmp://host/app"], message="unknown scheme rtmp://"),
    Case("record-negative-duration", ["record", "{live}", "--duration", "-5"], message="--duration must be > 0"),
    Case("record-not-served", ["record", "{new}", "--wait", "0", "-o", "/tmp/never.ts"], exit=1, message="nothing serves it"),
    Case("trigger-no-listener", ["trigger", "{live}", "--label", "person"], exit=1, message="listens for triggers"),
    Case("trigger-not-served", ["trigger", "{new}"], exit=1, message="nothing serves it"),
    Case("trigger-bad-seq", ["trigger", "{live}", "--seq", "-3"], message="--seq must be between 1"),
    # --- the Python API -----------------------------------------------------------------------------------
    Case("api-name-slash", api=lambda live, new: fb.Reader("a/b"), error=ValueError, message="invalid stream name"),
    Case("api-name-type", api=lambda live, new: fb.Reader(b"cam0"), error=TypeError, message="must be a str"),
    Case("api-not-served", api=lambda live, new: fb.Reader(new), error=fb.StreamNotFound, message="framebroker serve SOURCE --name"),
    Case("api-hold-zero", api=lambda live, new: fb.Reader(live, hold=0), error=ValueError, message="hold must be at least 1"),
    Case("api-hold-too-many", api=lambda live, new: fb.Reader(live, hold=50), error=fb.CapacityError, message="--slots"),
    Case("api-garbage-segment", api=lambda live, new: fb.Reader(new), error=fb.IncompatibleSegment, message="not a framebroker ring", segment=garbage),
    Case("api-truncated-segment", api=lambda live, new: fb.Reader(new), error=fb.IncompatibleSegment, message="truncated", segment=truncated),
    Case("api-other-version", api=lambda live, new: fb.Reader(new), error=fb.IncompatibleSegment, message="layout version", segment=other_version),
    Case("api-publisher-on-live", api=lambda live, new: fb.Publisher(live, shape=(48, 64, 3)), error=fb.StreamBusy, message="already served"),
    Case("api-shape-negative", api=lambda live, new: fb.Publisher(new, shape=(-480, 640, 3)), error=ValueError, message="between 1 and 65536"),
    Case("api-shape-channels", api=lambda live, new: fb.Publisher(new, shape=(480, 640, 4)), error=ValueError, message="(height, width, 3)"),
    Case("api-fps-negative", api=lambda live, new: fb.Publisher(new, shape=(48, 64, 3), fps=-30), error=ValueError, message="fps must be between"),
    Case("api-timeout-type", api=lambda live, new: _latest(live, timeout="soon"), error=TypeError, message="timeout"),
    Case("api-timeout-negative", api=lambda live, new: _latest(live, timeout=-1), error=ValueError, message="timeout must be >= 0"),
    Case("api-trigger-no-listener", api=lambda live, new: fb.trigger(live, "x"), error=fb.TriggerError, message="--clips"),
    Case("api-trigger-label", api=lambda live, new: fb.trigger(live, "a\nb"), error=ValueError, message="printable"),
]


def _latest(stream: str, timeout: object) -> object:
    with fb.Reader(stream) as cam:
        return cam.latest(timeout=timeout)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def live_stream():
    """One daemon for the whole table; every case checks it is still serving afterwards."""
    name = f"bad{uuid.uuid4().hex[:8]}"
    daemon = Proc(framebroker_command("serve", "test://", "--name", name, "--fps", "60", "--slots", "6"), "daemon")
    try:
        wait_until(lambda: describe_stream(name).get("seq", 0) > 0, 20, "the daemon to stream")
        yield name, daemon
    finally:
        daemon.stop()
        assert shm_objects(name) == []


def assert_still_serving(name: str, daemon: Proc) -> None:
    assert daemon.popen.poll() is None, daemon.output()
    with fb.Reader(name, name="after-bad-input") as cam:
        first = cam.next(timeout=5)
        assert testpattern.verify(first.array) == first.seq
        second = cam.next(timeout=5)
        assert second.seq > first.seq


def test_the_table_has_at_least_thirty_cases():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, live_stream, env):
    live, daemon = live_stream
    new = env.name("bad")
    planted = None
    if case.segment is not None:
        planted = f"/dev/shm/framebroker.{new}"
        fd = os.open(planted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, case.segment(0))
        os.close(fd)
    try:
        if case.api is not None:
            with pytest.raises(case.error) as raised:  # type: ignore[arg-type]
                case.api(live, new)
            assert case.message in str(raised.value), str(raised.value)
        else:
            args = [arg.replace("{live}", live).replace("{new}", new) for arg in case.args]
            result = env.run_cli(*args, timeout=60)
            output = result.stderr + result.stdout
            assert result.returncode == case.exit, output
            assert case.message in output, output
            assert "Traceback" not in output, output
        if planted is not None:
            assert os.path.exists(planted), "an untrusted object must be left for its owner to remove"
    finally:
        if planted is not None and os.path.exists(planted):
            os.unlink(planted)
    assert_still_serving(live, daemon)
