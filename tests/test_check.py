"""``framebroker check`` (the self-check) and ``framebroker snapshot``, run as a user would run them."""

from __future__ import annotations

import os
import re

import cv2
import pytest

from framebroker import testpattern
from framebroker._status import describe_stream

from conftest import wait_until


def snapshot_in(output: str) -> str:
    match = re.search(r"^  snapshot: (.+)$", output, re.M)
    assert match, output
    return match.group(1)


def assert_test_picture(path: str, shape: tuple[int, int, int] = (480, 640, 3)) -> int:
    """The file is a decodable picture of a test:// frame; returns the frame's number."""
    image = cv2.imread(path)
    assert image is not None, f"{path} is not an image"
    assert image.shape == shape
    number = testpattern.identify(image)
    assert number is not None and number > 0, f"{path} does not show a test:// frame"
    return number


def test_check_a_source_directly(env, tmp_path):
    out = tmp_path / "seen.png"
    result = env.run_cli("check", "test://", "--seconds", "1", "--fps", "20", "--width", "320", "--height", "240", "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert "checking source test:// (opened directly" in text
    assert re.search(r"320x240 bgr; \d+ frames in [\d.]+ s: [\d.]+ fps measured, 20 configured", text), text
    assert re.search(r"frame age on arrival \(capture to here\): median [\d.]+ ms", text), text
    assert snapshot_in(text) == str(out)
    assert_test_picture(str(out), (240, 320, 3))
    verdict = text.strip().splitlines()[-1]
    assert re.fullmatch(r"OK: frames flow from source test://: 320x240 at [\d.]+ fps", verdict), verdict
    fps = float(re.search(r"at ([\d.]+) fps", verdict).group(1))
    assert 15 <= fps <= 25


def test_check_a_live_stream(env, tmp_path):
    daemon, name = env.serve("test://", None, "--fps", "15")
    out = tmp_path / "last.jpg"
    result = env.run_cli("check", name, "--seconds", "1", "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    assert f"checking stream {name} (served by pid {daemon.pid} from test://), attached as a reader" in text
    assert re.search(r"640x480 bgr; \d+ frames in [\d.]+ s: [\d.]+ fps measured, 15 configured", text), text
    assert snapshot_in(text) == str(out)
    assert_test_picture(str(out))
    assert text.strip().splitlines()[-1].startswith(f"OK: frames flow from stream {name}: 640x480 at ")


def test_check_writes_no_file_unless_asked(env, tmp_path):
    daemon, name = env.serve("test://", None, "--fps", "15")
    # The temporary directory is where a snapshot nobody asked for used to land.
    environment = dict(os.environ, TMPDIR=str(tmp_path))
    for target in (name, "test://"):
        result = env.run_cli("check", target, "--seconds", "0.5", env=environment, cwd=str(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "snapshot" not in result.stdout, result.stdout
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "target, reason",
    [
        ("/nonexistent/dir/clip.mp4", "FAIL: file not found: /nonexistent/dir/clip.mp4"),
        ("/dev/video63", "FAIL: no such device /dev/video63: is the camera plugged in?"),
        ("usb://63", "FAIL: no such device /dev/video63: is the camera plugged in?"),
        ("nosuchthing", "FAIL: nothing called 'nosuchthing': no stream of that name is served"),
    ],
)
def test_check_fails_with_the_reason(env, target, reason):
    assert not os.path.exists("/dev/video63") and not os.path.exists("/dev/video62")
    result = env.run_cli("check", target, "--seconds", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert reason in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("FAIL: ")


def test_check_of_a_stream_without_frames_says_why(env):
    daemon, name = env.serve("/dev/video62", None, wait=False)  # a camera that is not plugged in
    wait_until(lambda: describe_stream(name).get("alive"), 20, "the daemon to come up")
    result = env.run_cli("check", name, "--timeout", "1.5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAIL: no frame from stream {name} within 1.5 s: it is " in result.stdout
    assert "no such device /dev/video62" in result.stdout


def test_check_usage_errors(env):
    listing = env.run_cli("--help").stdout
    assert all(command in listing for command in ("check", "snapshot", "view"))
    result = env.run_cli("check", "ftp://camera")
    assert result.returncode == 2 and "unknown source scheme" in result.stderr
    result = env.run_cli("check", "test://", "-o", "frame.gif")
    assert result.returncode == 2 and "must end in .jpg, .jpeg or .png" in result.stderr


# --- framebroker snapshot ------------------------------------------------------------------------


def test_snapshot_saves_the_current_frame_as_jpeg_and_png(env, tmp_path):
    daemon, name = env.serve("test://", None, "--fps", "15")
    numbers = []
    for file_name in ("now.jpg", "now.png"):
        path = tmp_path / file_name
        result = env.run_cli("snapshot", name, "-o", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(rf"snapshot: saved {re.escape(str(path))} \(640x480 bgr, seq \d+, \d+ ms old\)", result.stdout)
        numbers.append(assert_test_picture(str(path)))
        assert (path.read_bytes()[:4] == b"\x89PNG") == file_name.endswith(".png")
    assert numbers[1] > numbers[0], "each snapshot is the current frame"
    assert sorted(os.listdir(tmp_path)) == ["now.jpg", "now.png"], "no temporary files left behind"


def test_snapshot_fails_clearly_without_a_fresh_frame(env, tmp_path):
    out = tmp_path / "never.jpg"
    name = env.name()
    result = env.run_cli("snapshot", name, "-o", str(out))
    assert result.returncode == 1 and f"no stream {name!r}: nothing serves it" in result.stderr

    daemon, name = env.serve("/dev/video62", None, wait=False)  # a camera that is not plugged in
    wait_until(lambda: describe_stream(name).get("alive"), 20, "the daemon to come up")
    result = env.run_cli("snapshot", name, "-o", str(out), "--timeout", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "snapshot: no fresh frame within 1 s" in result.stderr and "no such device /dev/video62" in result.stderr
    assert not out.exists()

    result = env.run_cli("snapshot", name, "-o", str(tmp_path / "frame.bmp"))
    assert result.returncode == 2 and "must end in .jpg, .jpeg or .png" in result.stderr
