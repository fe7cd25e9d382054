"""framebroker bridge and zenoh:// sources: frames and results between machines over real Zenoh sessions.

Every session here uses explicit 127.0.0.1 endpoints on a port picked free for the test (never
multicast scouting, never an address outside this machine). The origin is a real daemon on the
test pattern, whose frame number survives H.264 (``testpattern.identify``), so a remote frame is
matched to the origin's frame of the same seq by its picture.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

import framebroker as fb
from framebroker import testpattern
from conftest import wait_until

needs_zenoh = pytest.mark.skipif(
    importlib.util.find_spec("zenoh") is None,
    reason="eclipse-zenoh is not installed (pip install 'framebroker[zenoh]'; .ci/run installs it)",
)

SIZE = ("--width", "320", "--height", "240")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def zenoh_files() -> list:
    """Zenoh's shared-memory pool files: the bridge and the source turn that transport off."""
    return sorted(entry for entry in os.listdir("/dev/shm") if entry.endswith(".zenoh"))


class Link:
    """An origin daemon, its bridge listening on 127.0.0.1:PORT, and a remote daemon serving it."""

    def __init__(self, env, *bridge_args: str) -> None:
        self.env = env
        self.port = free_port()
        self.endpoint = f"tcp/127.0.0.1:{self.port}"
        self.origin_proc, self.origin = env.serve("test://", None, *SIZE)
        self.bridge_args = bridge_args
        self.bridge = self.start_bridge()
        self.remote = env.name("remote")
        self.remote_proc = env.cli("serve", f"zenoh://{self.origin}?connect={self.endpoint}", "--name", self.remote)
        env.wait_streaming(self.remote, self.remote_proc, timeout=60)

    def start_bridge(self):
        return self.env.cli("bridge", self.origin, "--listen", self.endpoint, "--keyframe-interval", "0.5", *self.bridge_args)

    def remote_info(self) -> dict:
        return fb.status(self.remote)["streams"][0]


def collect(stream: str, seconds: float, into: dict, name: str = "check") -> None:
    """Every frame of ``stream`` for ``seconds``, in order: seq -> (wall_time, number in the picture)."""
    with fb.Reader(stream, name=name) as cam:
        deadline = time.monotonic() + seconds
        for frame in cam.ordered(timeout=5.0):
            with frame:
                into[frame.seq] = (frame.wall_time, testpattern.identify(frame.array))
            if time.monotonic() > deadline:
                return


@needs_zenoh
def test_remote_frames_are_the_origins_with_their_seq_and_wall_time(env):
    link = Link(env)
    origin, remote = {}, {}
    threads = [threading.Thread(target=collect, args=(name, 3.0, into)) for name, into in ((link.origin, origin), (link.remote, remote))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    seqs = list(remote)
    assert len(seqs) >= 30, remote
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "frames out of order on the remote"
    # Every remote frame shows the origin's frame of the same seq (its number survives H.264)...
    assert all(number == seq for seq, (_wall, number) in remote.items()), {s: n for s, (_w, n) in remote.items() if n != s}
    # ... and carries the origin's wall time, exactly, where both readers saw the frame.
    both = set(origin) & set(remote)
    assert len(both) >= 20, (sorted(origin)[:3], sorted(remote)[:3])
    assert all(remote[seq][0] == origin[seq][0] for seq in both)
    # Status on both sides: the remote's origin and link, the bridge's remotes.
    info = wait_until(lambda: (lambda r: r if r.get("latency_p50_ms") is not None else None)(link.remote_info()["info"].get("remote", {})), 10, "remote info")
    assert info["link"] == "up" and info["origin"].startswith(f"{link.origin}@") and info["origin_state"] == "streaming"
    assert info["lost"] == 0 and 0 < info["latency_p50_ms"] < 2000

    def bridge_entry():
        readers = fb.status(link.origin)["streams"][0]["readers"]
        bridges = [r for r in readers if r["name"] == "bridge" and r["info"].get("remotes") == 1]
        return bridges[0] if bridges else None

    entry = wait_until(bridge_entry, 10, "the bridge to see its remote")
    assert entry["info"]["link"] == "up" and entry["info"]["out"] == "zenoh"
    from framebroker_clients.preview import status_fragment

    page = status_fragment(link.remote_info(), {"message": "", "viewers": 0, "jpeg_encodes": 0, "frames_sent": 0, "quality": 80, "max_fps": 15})
    assert f"<th>origin</th><td>{link.origin}@" in page and "<th>link</th><td>up, 1 peers" in page, page
    table = env.run_cli("status").stdout
    assert f"remote: from {link.origin}@" in table and "link up" in table, table
    assert f"bridge pid {link.bridge.pid}: zenoh framebroker/{link.origin}/video   link up" in table, table
    assert not zenoh_files()


@needs_zenoh
def test_results_travel_both_ways_joined_to_the_same_seqs(env):
    link = Link(env)
    far, near = {}, {}
    # A model on the remote machine publishes on the remote stream; the origin reads it back.
    with fb.Reader(link.remote, name="far-model") as cam, fb.ResultWriter(link.remote, "far") as out:
        for _ in range(15):
            frame = cam.next(timeout=5.0)
            with frame:
                number = testpattern.identify(frame.array)
                out.publish(frame, {"objects": [{"box": [1, 2, 3, 4], "label": "pattern", "score": 1.0}], "number": number})
                far[frame.seq] = number
        with fb.ResultReader(link.origin, "far", wait=20) as back:
            for seq, number in far.items():
                result = back.get(seq, timeout=10)
                assert result is not None and result.seq == seq and result.data["number"] == number == seq
                assert result.objects[0]["label"] == "pattern"
    # A model at the origin; the remote reads its results, joined to the same seqs.
    with fb.Reader(link.origin, name="near-model") as cam, fb.ResultWriter(link.origin, "near") as out:
        for _ in range(15):
            frame = cam.next(timeout=5.0)
            with frame:
                out.publish(frame, {"number": testpattern.identify(frame.array)})
                near[frame.seq] = frame.wall_time
        with fb.ResultReader(link.remote, "near", wait=20) as there:
            for seq, wall in near.items():
                result = there.get(seq, timeout=10)
                # The frame's wall time (exact while the frame is in the remote ring, else within µs).
                assert result is not None and result.data["number"] == seq and abs(result.wall_time - wall) < 1e-3
        # Nothing was echoed back: each side's own model keeps its one writer, this process.
        for stream, model in ((link.origin, "near"), (link.remote, "far")):
            entries = [m for m in fb.status(stream)["streams"][0]["models"] if m["name"] == model]
            assert not entries or entries[0]["pid"] == os.getpid() or not entries[0]["alive"], entries
    assert "not written" not in "\n".join(link.bridge.stderr)
    assert not zenoh_files()


@needs_zenoh
def test_bridge_killed_and_restarted_mid_stream(env):
    link = Link(env)
    with fb.Reader(link.remote, name="survivor") as cam:
        before = cam.next(timeout=5.0)
        last_seq = before.seq
        before.release()
        link.bridge.signal(signal.SIGKILL)
        link.bridge.wait()

        def reconnecting():
            stream = link.remote_info()
            return stream if stream["state"] == "reconnecting" else None

        stream = wait_until(reconnecting, 30, "the remote stream to show reconnecting")
        assert stream["reason"], stream
        assert stream["info"]["remote"]["link"] in ("down", "idle"), stream["info"]
        # Readers time out cleanly meanwhile.
        with pytest.raises(fb.FrameTimeout):
            while True:
                cam.next(timeout=0.5).release()
        link.bridge = link.start_bridge()
        env.wait_streaming(link.remote, link.remote_proc, timeout=60)
        after = cam.next(timeout=10.0)
        with after:
            assert after.seq > last_seq and testpattern.identify(after.array) == after.seq
    assert link.remote_info()["reconnects"] >= 1
    assert not zenoh_files()


@needs_zenoh
def test_the_remote_follows_a_restart_of_the_origins_daemon(env):
    """The origin's daemon is killed and started again: its frames number from 1 again, and the
    remote makes a new ring, as a restarted daemon does; its readers follow by themselves."""
    link = Link(env)
    with fb.Reader(link.remote, name="follower") as cam:
        cam.next(timeout=5.0).release()
        first_ring = link.remote_info()["started"]
        link.origin_proc.signal(signal.SIGKILL)
        link.origin_proc.wait()
        link.origin_proc, _ = env.serve("test://", link.origin, *SIZE)
        wait_until(lambda: (lambda s: s["started"] != first_ring and s["state"] == "streaming")(link.remote_info()), 60, "a new remote ring")
        frame = cam.next(timeout=10.0)
        with frame:
            assert testpattern.identify(frame.array) == frame.seq
    assert "the origin's daemon restarted" in "\n".join(link.remote_proc.stderr)
    assert not zenoh_files()


@needs_zenoh
def test_a_late_joiner_starts_at_a_keyframe_with_parameter_sets(env):
    """Every keyframe on the wire is an IDR with SPS and PPS, and they come at the interval asked."""
    import zenoh

    from framebroker.zenoh_link import VideoUnit, session_config, video_key
    from framebroker_clients.recorder.h264 import IDR, PPS, SPS, nal_type, nal_units

    link = Link(env)
    units = []
    session = zenoh.open(session_config(connect=[link.endpoint]))
    try:
        subscriber = session.declare_subscriber(
            video_key(link.origin), lambda sample: units.append((VideoUnit.unpack(sample.attachment.to_bytes()), sample.payload.to_bytes()))
        )
        wait_until(lambda: sum(unit.keyframe for unit, _ in units) >= 4, 30, "four keyframes")
        subscriber.undeclare()
    finally:
        session.close()
    keyframes = [unit for unit, payload in units if unit.keyframe]
    for unit, payload in units:
        types = {nal_type(nal) for nal in nal_units(payload)}
        if unit.keyframe:
            assert {SPS, PPS, IDR} <= types, (unit, types)
        else:
            assert IDR not in types
    # --keyframe-interval 0.5 at 30 fps: a keyframe at least every 15 frames (forced by capture time).
    gaps = [b.seq - a.seq for a, b in zip(keyframes, keyframes[1:])]
    assert gaps and max(gaps) <= 16, gaps
    numbers = [unit.unit for unit, _ in units]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "units lost or reordered on loopback"
    assert not zenoh_files()


# --- input errors: no Zenoh needed to judge them ---------------------------------------------------------


def test_bridge_and_zenoh_sources_refuse_bad_input_with_exit_2(env):
    cases = [
        (("bridge", "cam0"), "say how remotes reach the bridge: --listen"),
        (("bridge", "cam0", "--connect", "127.0.0.1:7447"), "is not PROTOCOL/ADDRESS, e.g. tcp/"),
        (("bridge", "cam0", "--zenoh-config", "/nonexistent.json5"), "--zenoh-config /nonexistent.json5: no such file"),
        (("serve", "zenoh://cam0"), "says nowhere to find the bridge: add ?connect=tcp/HOST:7447"),
        (("serve", "zenoh://cam0?conect=tcp/127.0.0.1:7447"), "unknown option 'conect'"),
        (("serve", "zenho://cam0?connect=tcp/127.0.0.1:7447"), "did you mean zenoh://?"),
    ]
    for argv, message in cases:
        result = env.run_cli(*argv)
        assert result.returncode == 2 and message in result.stderr, (argv, result.returncode, result.stderr)


def test_up_check_runs_a_bridge_section(env, tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text('[streams.cam]\nsource = "test://"\n\n[streams.cam.bridge]\nlisten = ["tcp/127.0.0.1:7447"]\nkeyframe_interval = 2\n')
    result = env.run_cli("up", "--check", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "framebroker bridge cam --listen=tcp/127.0.0.1:7447 --keyframe-interval=2" in result.stdout, result.stdout
    config.write_text('[streams.cam]\nsource = "test://"\n\n[streams.cam.bridge]\nkeyframe_interval = 2\n')
    result = env.run_cli("up", "--check", str(config))
    assert result.returncode == 2 and "say how remotes reach the bridge" in result.stderr, result.stderr


def test_zenoh_missing_is_a_clear_error(env, tmp_path):
    """Without eclipse-zenoh, the bridge and a zenoh:// source say how to install it (a Python
    whose import of zenoh fails stands in for a machine without it)."""
    blocker = tmp_path / "zenoh.py"
    blocker.write_text("raise ImportError('No module named zenoh (blocked for this test)')\n")
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    _daemon, name = env.serve("test://", None, *SIZE)
    result = env.run_cli("bridge", name, "--listen", "tcp/127.0.0.1:1", env=environment)
    assert result.returncode == 1 and "pip install 'framebroker[zenoh]'" in result.stderr, result.stderr
    remote = env.name("remote")
    proc = env.cli("serve", f"zenoh://{name}?connect=tcp/127.0.0.1:1", "--name", remote, env=environment)
    stream = wait_until(lambda: (lambda s: s if s.get("reason") else None)(fb.status(remote)["streams"][0]), 20, "the reason")
    assert stream["state"] == "starting" and "pip install 'framebroker[zenoh]'" in stream["reason"], stream
    proc.stop()
