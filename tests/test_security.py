"""Who may read a stream: private (0600) by default, a group with --group, nobody else; frames
are read-only for readers. Readers run as another user for real (setpriv), which needs root."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import framebroker


NOBODY = 65534
GROUP = "video"  # the group cameras conventionally belong to; present on Debian

READER_SCRIPT = """
import json, sys
import framebroker as fb
from framebroker import testpattern
try:
    with fb.Reader(sys.argv[1], name="other-user") as cam:
        frame = cam.next(timeout=5)
        print(json.dumps({"ok": True, "seq": frame.seq, "valid": testpattern.verify(frame.array) == frame.seq}))
except fb.FrameBrokerError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
"""


@pytest.fixture(scope="session")
def other_user_python(tmp_path_factory) -> str:
    """A Python that another user can run (the test interpreter may live under /root, mode 0700),
    with numpy and posix_ipc, importing this checkout's framebroker through PYTHONPATH."""
    if os.geteuid() != 0:
        pytest.skip("running a reader as another user needs root (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    base = Path("/usr/bin/python3")
    if not base.exists():
        pytest.skip("needs Debian's /usr/bin/python3 to build a venv other users can run")
    venv = Path(f"/tmp/framebroker-other-user-venv-{sys.version_info[0]}{sys.version_info[1]}")
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import numpy, posix_ipc"], capture_output=True).returncode:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([str(base), "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "numpy", "posix_ipc"], check=True, capture_output=True)
    subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
    return str(python)


def run_as(python: str, stream: str, *, groups: list[int]) -> dict:
    package_root = str(Path(framebroker.__file__).resolve().parent.parent)
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}"]
    command += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    command += [python, "-c", READER_SCRIPT, stream]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": package_root, "HOME": "/tmp"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, cwd="/tmp")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_private_stream_refuses_another_user_and_names_the_remedy(env, other_user_python):
    daemon, name = env.serve()
    outcome = run_as(other_user_python, name, groups=[])
    assert outcome["ok"] is False and outcome["error"] == "AccessDenied", outcome
    assert "permission denied" in outcome["message"] and "--group" in outcome["message"], outcome


def test_group_members_can_read_and_nobody_else(env, other_user_python):
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        pytest.skip(f"group {GROUP} does not exist")
    daemon, name = env.serve("test://", None, "--group", GROUP)
    member = run_as(other_user_python, name, groups=[gid])
    assert member == {"ok": True, "seq": member["seq"], "valid": True}, member
    outsider = run_as(other_user_python, name, groups=[])
    assert outsider["ok"] is False and outsider["error"] == "AccessDenied", outsider


def test_readers_cannot_write_frames(env):
    daemon, name = env.serve()
    with framebroker.Reader(name) as cam:
        frame = cam.next(timeout=5)
        with pytest.raises(ValueError, match="read-only"):
            frame.array[0, 0, 0] = 255
        with pytest.raises(ValueError):
            frame.array.setflags(write=True)
        # Not even through the buffer protocol.
        with pytest.raises((TypeError, ValueError)):
            memoryview(frame.array).cast("B")[0] = 1
