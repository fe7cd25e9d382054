"""Results (fb.ResultWriter / fb.ResultReader): joined to frames by seq, with the ring's guarantees."""

from __future__ import annotations

import os
import random
import signal
import stat
import time

import numpy as np
import pytest

import framebroker as fb
from conftest import shm_objects, wait_until
from test_ring_invariants import _rate


def _frames(pub: fb.Publisher, cam: fb.Reader, count: int) -> list:
    frames = []
    for _ in range(count):
        pub.publish(np.zeros((48, 64, 3), np.uint8))
        frames.append(cam.next(timeout=2.0))
        frames[-1].release()
    return frames


def test_exact_joins_by_seq_across_processes(env):
    daemon, name = env.serve("test://", None, "--fps", "60", "--width", "64", "--height", "48")
    writer = env.worker("write-results", name, "--model", "m", "--seconds", "60", "--fps", "100")
    writer.wait_event("ready")
    checkers = [env.worker("check-results", name, "--model", "m", "--seconds", "20", "--frames", "300", "--mode", mode, "--name", mode) for mode in ("ordered", "latest")]
    results = [c.wait_event("done", timeout=60) for c in checkers]
    assert all(r["checked"] >= 300 and r["bad"] == 0 for r in results), results
    # And in this process: get() of a seq answers for exactly that frame.
    with fb.ResultReader(name, "m") as res:
        newest = res.latest(timeout=5.0)
        for seq in range(newest.seq - 5, newest.seq + 1):
            found = res.get(seq, timeout=5.0)
            assert found is not None and found.seq == seq and found.data["seq"] == seq


def test_get_answers_the_frame_none_when_skipped_and_waits_for_later_ones(env):
    name = env.name()
    with fb.Publisher(name, shape=(48, 64, 3)) as pub, fb.Reader(name) as cam:
        with fb.ResultWriter(name, "every-other", keep=4) as out, fb.ResultReader(name, "every-other") as res:
            frames = _frames(pub, cam, 3)
            out.publish(frames[0], {"objects": [{"box": np.array([1, 2, 3, 4]), "label": "face", "score": np.float32(0.5)}]})
            out.publish(frames[2], {"n": 3})
            first = res.get(frames[0], timeout=1.0)
            assert first.seq == 1 and first.objects == [{"box": [1, 2, 3, 4], "label": "face", "score": 0.5}]
            assert first.timestamp_ns == frames[0].timestamp_ns and first.wall_time == frames[0].wall_time
            assert first.latency_ns > 0 and first.number == 1
            assert res.get(2, timeout=1.0) is None, "frame 2 was skipped by the model"
            with pytest.raises(fb.FrameTimeout, match="no result yet for frame 4"):
                res.get(4, timeout=0.1)
            later = _frames(pub, cam, 6)
            for frame in later:
                out.publish(frame, {"n": frame.seq})
            with pytest.raises(fb.ResultExpired, match="no longer kept"):
                res.get(1, timeout=1.0)
            assert res.get(9, timeout=0).data == {"n": 9}
            assert res.latest(timeout=0).seq == 9
            with pytest.raises(ValueError, match="frame order"):
                out.publish(5, {"late": True}, timestamp_ns=time.monotonic_ns())
            assert fb.models(name) == ["every-other"]
    assert shm_objects(name) == []


def test_bad_results_and_names_get_clear_errors(env):
    name = env.name()
    with fb.Publisher(name, shape=(48, 64, 3)) as pub, fb.Reader(name) as cam, fb.ResultWriter(name, "m") as out:
        frame = _frames(pub, cam, 1)[0]
        with pytest.raises(ValueError, match=r"result too large: \d+ bytes encoded, at most 65536"):
            out.publish(frame, {"mask": "x" * 70000})
        with pytest.raises(TypeError, match="JSON-serialisable"):
            out.publish(frame, {"what": object()})
        with pytest.raises(ValueError, match="JSON-serialisable"):
            out.publish(frame, {"score": float("nan")})
        with pytest.raises(TypeError, match="a result is a dict"):
            out.publish(frame, ["not", "a", "dict"])
        with pytest.raises(ValueError, match="no longer in its ring"):
            out.publish(10_000, {})
        out.publish(frame, {"ok": True})  # nothing above took effect
    for bad in ("", "a@b", "x" * 65, "..", "cam 0"):
        with pytest.raises(ValueError, match="invalid model name"):
            fb.ResultWriter(name, bad)
        with pytest.raises(ValueError, match="invalid model name"):
            fb.ResultReader(name, bad)
    with pytest.raises(fb.StreamNotFound):
        fb.ResultWriter(env.name("absent"), "m")


def test_one_writer_per_model_a_second_is_refused_a_dead_one_taken_over(env):
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "64", "--height", "48")
    first = env.worker("write-results", name, "--model", "m", "--seconds", "60", "--fps", "50")
    pid = first.wait_event("ready")["pid"]
    with pytest.raises(fb.StreamBusy, match=f"model 'm' on stream '{name}' already has a writer \\(pid {pid}\\)") as refused:
        fb.ResultWriter(name, "m")
    assert refused.value.pid == pid
    with fb.ResultReader(name, "m", name="follower") as res:
        res.latest(timeout=5.0)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        second = env.worker("write-results", name, "--model", "m", "--seconds", "60", "--fps", "50")
        new_pid = second.wait_event("ready")["pid"]
        wait_until(lambda: fb.status(name)["streams"][0]["models"][0]["pid"] == new_pid, 10, "the new writer in status")
        # The reader follows the new writer by itself (its seqs start again).
        seen = [r.seq for r in [next(iter(res)) for _ in range(3)]]
        assert seen == sorted(seen)
        model = fb.status(name)["streams"][0]["models"][0]
        assert model["alive"] and [r["name"] for r in model["readers"]] == ["follower"]


def test_writer_killed_at_random_instants_never_leaves_a_torn_record(env):
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "64", "--height", "48")
    checker = env.worker("check-results", name, "--model", "m", "--seconds", "120", "--mode", "ordered")
    writer = env.worker("write-results", name, "--model", "m", "--seconds", "60", "--respawn", "100")
    checker.wait_event("ready", timeout=30)
    writer.wait_event("ready", timeout=120)  # after 100 writers were killed at random moments
    assert len([e for e in writer.events if e.get("event") == "killed"]) == 100
    wait_until(lambda: len([e for e in writer.events if e.get("event") == "progress"]) > 5, 10, "the last writer to publish")
    checker.signal(signal.SIGTERM)
    done = checker.wait_event("done", timeout=30)
    assert done["bad"] == 0 and done["first_bad"] is None, done
    # Most writers die before the checker finds them (it looks for a new one every 0.1 s); it
    # must have followed several all the same.
    assert done["checked"] > 100 and done["restarts"] >= 3, done


def test_integrity_check_catches_an_unsafe_writer(env):
    """Negative control: a writer that scribbles into a record after publishing it is caught."""
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "64", "--height", "48")
    writer = env.worker("write-results", name, "--model", "m", "--seconds", "30", "--fps", "200", "--unsafe")
    writer.wait_event("ready")
    checker = env.worker("check-results", name, "--model", "m", "--seconds", "3", "--mode", "latest")
    done = checker.wait_event("done", timeout=30)
    assert done["checked"] > 20 and done["bad"] > 0, done


def test_readers_frozen_mid_read_never_slow_the_writer(env):
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "64", "--height", "48")
    writer = env.worker("write-results", name, "--model", "m", "--seconds", "60", "--fps", "200")
    writer.wait_event("ready")
    readers = [env.worker("check-results", name, "--model", "m", "--seconds", "60", "--mode", mode, "--name", mode) for mode in ("latest", "ordered")]
    for reader in readers:
        reader.wait_event("ready")
    baseline = _rate(writer, 1.0)
    rng = random.Random(3)
    slowest = float("inf")
    for _ in range(10):
        time.sleep(rng.uniform(0.0, 0.05))
        victim = rng.choice(readers)
        victim.signal(signal.SIGSTOP)
        slowest = min(slowest, _rate(writer, 0.5))
        victim.signal(signal.SIGCONT)
    assert slowest >= 0.8 * baseline, (baseline, slowest)
    for reader in readers:
        reader.signal(signal.SIGTERM)
        assert reader.wait_event("done", timeout=30)["bad"] == 0


def test_results_follow_a_daemon_restart_and_keep_the_streams_permissions(env):
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "64", "--height", "48", "--group", "root")
    with fb.Reader(name) as cam, fb.ResultWriter(name, "m") as out, fb.ResultReader(name, "m") as res:
        ring = f"/dev/shm/framebroker.{name}@res.m"
        assert stat.S_IMODE(os.stat(ring).st_mode) == 0o660 and os.stat(ring).st_gid == 0
        frame = cam.next(timeout=5.0)
        out.publish(frame, {"before": True})
        assert res.get(frame, timeout=1.0).data == {"before": True}
        daemon.stop()
        daemon, _ = env.serve("test://", name, "--fps", "30", "--width", "64", "--height", "48", "--group", "root")
        frame = wait_until(lambda: cam.next(timeout=5.0) if cam.newest_seq < 1000 else None, 10, "frames of the new daemon")
        out.publish(frame, {"after": True})
        # The same reader, not reopened: the result of the new daemon's frame, not the old one's.
        assert res.get(frame, timeout=2.0).data == {"after": True}
        assert fb.status(name)["streams"][0]["models"][0]["lag"] is not None
    assert [obj for obj in shm_objects(name) if "@res." in obj] == []


def test_iteration_from_the_oldest_kept_and_a_relays_own_wall_time(env):
    name = env.name()
    with fb.Publisher(name, shape=(48, 64, 3)) as pub, fb.Reader(name) as cam, fb.ResultWriter(name, "m") as out:
        for frame in _frames(pub, cam, 5):
            out.publish(frame, {"n": frame.seq})
        out.publish(7, {"relayed": True}, timestamp_ns=time.monotonic_ns(), wall_time=1234.5)
        with pytest.raises(TypeError, match="wall_time goes with a seq"):
            out.publish(8, {}, wall_time=1.0)
        with fb.ResultReader(name, "m") as res:
            iterator = res.ordered(timeout=0.2, oldest=True)
            got = [next(iterator) for _ in range(6)]
            assert [r.seq for r in got] == [1, 2, 3, 4, 5, 7] and all(r.dropped == 0 for r in got)
            assert got[-1].wall_time == 1234.5
