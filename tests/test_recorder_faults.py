"""The recorder against a disk that cannot be written: a read-only directory and a disk that fills
up mid-recording. Both use a small tmpfs in a private mount namespace (``unshare -m``, root only);
/dev/shm is the same as everyone else's, so the recorder reads the test's live daemon."""

from __future__ import annotations

import shlex
import subprocess

import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker._process import framebroker_command

from test_ring_invariants import _can_unshare

pytestmark = pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m for a private tmpfs")


def in_private_mount(env, mount_options: str, *record_args: str, setup: str = "") -> subprocess.CompletedProcess:
    """Run ``framebroker record ...`` with a fresh tmpfs on /mnt/fbtest-<tag> seen only by it."""
    mount_point = f"/tmp/fbmount-{env.tag}"
    command = shlex.join(framebroker_command("record", *record_args))
    script = (
        f"mkdir -p {mount_point} && mount -t tmpfs -o {mount_options} tmpfs {mount_point} && {setup} "
        f"cd {mount_point} && {command}; code=$?; umount -l {mount_point}; exit $code"
    )
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)


def assert_daemon_serves(name: str) -> None:
    with fb.Reader(name, name="after") as cam:
        frame = cam.next(timeout=5)
        assert testpattern.verify(frame.array) == frame.seq


def test_read_only_directory_is_a_clear_error(env):
    daemon, name = env.serve()
    result = in_private_mount(env, "size=4m,ro", name, "-o", "clip.ts", "--wait", "5")
    assert result.returncode == 2, result.stderr
    assert "cannot write in" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert_daemon_serves(name)


def test_full_disk_during_recording_fails_clearly_and_keeps_what_was_written(env):
    daemon, name = env.serve("test://", None, "--width", "640", "--height", "480")
    # 1 MiB fills up after a few seconds at the default bitrate; then check the file that is left.
    check = "ffmpeg -v error -xerror -i clip.ts -fps_mode passthrough -f null - && echo DECODES"
    mount_point = f"/tmp/fbmount-{env.tag}"
    command = shlex.join(framebroker_command("record", name, "-o", "clip.ts", "--duration", "60"))
    script = (
        f"mkdir -p {mount_point} && mount -t tmpfs -o size=1m tmpfs {mount_point} && cd {mount_point} && "
        f"{command}; code=$?; echo EXIT=$code; ls -l clip.ts; {check}; cd /; umount -l {mount_point}"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert "EXIT=1" in result.stdout, result.stdout + result.stderr
    assert "No space left on device" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "DECODES" in result.stdout, "what was written before the disk filled up must still play"
    assert_daemon_serves(name)
