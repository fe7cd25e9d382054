"""Who may read a stream: private (0600) by default, a group with --group, nobody else; frames
are read-only for readers. Readers run as another user for real (setpriv), which needs root.
Credentials (RTSP, SRT) are on no process's command line and in nothing framebroker shows."""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest

import framebroker
from framebroker.sources import parse_source

from conftest import wait_until


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


# --- credentials ----------------------------------------------------------------------------------


def command_lines() -> dict[int, str]:
    """Every process's command line, as any local user can read it in /proc/PID/cmdline."""
    lines = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:  # ended meanwhile
                continue
            lines[int(entry)] = raw.replace(b"\0", b" ").decode("utf-8", "replace")
    return lines


def test_no_credential_on_any_command_line_nor_in_anything_shown(env, tmp_path):
    """A daemon reads an RTSP camera that checks a user and password; a recorder serves the
    stream over SRT with a passphrase. The user hands both to framebroker through the environment
    (``${NAME}`` in the URLs); the GStreamer child gets the RTSP credentials and ffmpeg the
    passphrase through private file descriptors. While all of it runs, no process's command line
    holds a credential; nor do repr(), the logs, ``status`` (JSON and table), the preview's pages
    and its metrics. Frames flowing from the camera prove the credentials reached it; the receiver
    decoding the SRT stream proves the passphrase did.

    What is not checked: the environments (/proc/PID/environ), where the secrets are on purpose:
    Linux shows a process's environment only to its own user and root, as it does its file
    descriptors, while command lines are public.
    """
    from test_preview import get, start_view
    from test_recorder import decode, free_udp_port, udp_port_bound
    from test_sources import require_gstreamer, start_rtsp_server

    require_gstreamer()
    tag = uuid.uuid4().hex[:8]
    user, password, passphrase = f"cam-{tag}", f"p@ss:{tag}/w#rd", f"srt-{tag}-phrase"
    secrets = (user, password, urllib.parse.quote(password, safe=""), passphrase)
    environment = {**os.environ, "FB_CAM_USER": user, "FB_CAM_PASSWORD": password, "FB_SRT_PASSPHRASE": passphrase}

    server, rtsp_port = start_rtsp_server(env, "--user-env", "FB_CAM_USER", "--password-env", "FB_CAM_PASSWORD", environ=environment)
    name = env.name("cam")
    source = f"rtsp://${{FB_CAM_USER}}:${{FB_CAM_PASSWORD}}@127.0.0.1:{rtsp_port}/test?latency=50"
    daemon = env.cli("serve", source, "--name", name, env=environment)
    env.wait_streaming(name, daemon)
    srt_port = free_udp_port()
    recorder = env.cli("record", name, "-o", f"srt://127.0.0.1:{srt_port}?mode=listener&passphrase=${{FB_SRT_PASSPHRASE}}", env=environment)
    wait_until(lambda: udp_port_bound(srt_port), 30, "the recorder's SRT listener")

    everyone = command_lines()
    leaks = {pid: line for pid, line in everyone.items() if any(secret in line for secret in secrets)}
    assert not leaks, f"credentials on command lines: {leaks}"
    # The scan saw the children that hold the credentials.
    assert any("_gst_launch.py" in line for line in everyone.values()), "the GStreamer child"
    assert any("ffmpeg" in line and "-fpre /dev/fd/" in line for line in everyone.values()), "the SRT child"

    # The passphrase reached ffmpeg: a receiver that knows it gets the stream (this receiver stands
    # for another machine; ffmpeg takes an input's passphrase only on its command line).
    received = tmp_path / "received.ts"
    receiver = env.spawn(
        ["ffmpeg", "-v", "error", "-y", "-i", f"srt://127.0.0.1:{srt_port}?passphrase={passphrase}", "-map", "0", "-c", "copy", "-f", "mpegts", str(received)],
        label="ffmpeg srt receiver",
    )
    wait_until(lambda: received.exists() and received.stat().st_size > 100_000, 30, "the receiver to get video")

    view, url = start_view(env, name)
    pages = "".join(get(url + path)[2] for path in ("", "status.json", "metrics"))
    shown = [
        repr(parse_source(source.replace("${FB_CAM_USER}", user).replace("${FB_CAM_PASSWORD}", urllib.parse.quote(password, safe="")))),
        env.run_cli("status", "--json", name, env=environment).stdout,
        env.run_cli("status", name, env=environment).stdout,
        pages,
    ]
    assert f"127.0.0.1:{rtsp_port}" in shown[1] and f"127.0.0.1:{srt_port}" in shown[1], "status names the source and output"
    recorder.signal(signal.SIGTERM)
    assert recorder.wait(timeout=30) == 0, recorder.output()
    receiver.wait(timeout=30)
    assert len(decode(received)) >= 10
    for proc in (daemon, recorder, view):
        shown.append("\n".join(proc.stdout + proc.stderr))
    for text in shown:
        for secret in secrets:
            assert secret not in text, f"{secret!r} shown in:\n{text}"
