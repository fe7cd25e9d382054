"""One test (or more) per invariant of the ring (the protocol in framebroker/_ring.py), each able to fail.

Where an invariant is about integrity, a negative control runs the same checker against a
deliberately broken producer and asserts that it *does* report damage, so a green result means
the ring kept the frames intact, not that the checker was blind.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker._layout import LAYOUT_VERSION, LOCK_SLOT_BASE, MAGIC
from framebroker._status import describe_stream

from conftest import cpu_seconds, shm_objects, wait_until


# --- 2.1 no torn frame -------------------------------------------------------------------------


def test_no_torn_frame_at_full_producer_speed(env):
    """Three reader processes check every byte of thousands of frames while the producer runs flat out."""
    name = env.name()
    # The producer runs until the test ends it; each reader stops after its share of frames.
    producer = env.worker("produce", name, "--width", "320", "--height", "240")
    producer.wait_event("ready")
    readers = [env.worker("verify", name, "--frames", "1200", "--name", f"v{i}") for i in range(2)]
    readers.append(env.worker("verify", name, "--frames", "1200", "--mode", "ordered", "--name", "ordered"))
    results = [r.wait_event("done", timeout=120) for r in readers]
    assert sum(r["checked"] for r in results) >= 3000, results
    assert all(r["bad"] == 0 for r in results), results


def test_torn_frame_checker_catches_an_unsafe_ring(env):
    """Negative control: a producer that writes into a slot readers hold is caught."""
    name = env.name()
    producer = env.worker("produce", name, "--unsafe", "--fps", "200")
    producer.wait_event("ready")
    reader = env.worker("verify", name, "--frames", "400", "--recheck")
    result = reader.wait_event("done", timeout=30)
    assert result["checked"] > 50
    assert result["bad"] > 0, "the integrity check did not notice frames changing under the reader"


# --- 2.2 a held frame is stable ----------------------------------------------------------------


def test_held_frame_is_stable_and_read_only_across_processes(env):
    name = env.name()
    producer = env.worker("produce", name, "--fps", "300", "--slots", "6")
    producer.wait_event("ready")
    holder = env.worker("hold", name, "--hold", "2")
    holding = holder.wait_event("holding")
    wait_until(lambda: producer.events[-1].get("published", 0) >= max(holding["seqs"]) + 300, 30, "300 frames published over the held ones")
    done = holder.finish()
    assert done["newest"] - max(holding["seqs"]) >= 300, "the producer should have published hundreds of frames meanwhile"
    assert done["intact"] and done["pattern_ok"], done
    assert not done["writable"] and done["write_refused"], done


def test_held_frame_is_stable_in_one_process(env):
    name = env.name()
    with fb.Publisher(name, shape=(120, 160, 3), fps=0, slots=4) as pub, fb.Reader(name, name="holder") as cam:
        pub.publish(testpattern.render(1, (120, 160, 3)))
        frame = cam.latest(timeout=1)
        view = frame.array
        before = view.copy()
        for n in range(2, 500):
            pub.publish(testpattern.render(n, (120, 160, 3)))
        assert np.array_equal(view, before)
        assert testpattern.verify(view) == 1
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0, 0, 0] = 0
        with pytest.raises(ValueError):
            view.setflags(write=True)
        frame.release()
        with pytest.raises(fb.FrameReleased):
            frame.array
        pub.publish(testpattern.render(500, (120, 160, 3)))


def test_held_frame_checker_catches_an_unsafe_ring(env):
    """Negative control for the hold test: without leases a held frame changes."""
    name = env.name()
    producer = env.worker("produce", name, "--fps", "200", "--unsafe")
    producer.wait_event("ready")
    holder = env.worker("hold", name, "--seconds", "1")
    done = holder.wait_event("done", timeout=30)
    assert not done["intact"] or not done["pattern_ok"]


# --- 2.3 the producer never waits on readers ---------------------------------------------------


def _rate(producer, seconds: float) -> float:
    start = len(producer.events)
    time.sleep(seconds)
    progress = [e for e in producer.events[start:] if e.get("event") == "progress"]
    assert len(progress) >= 2, producer.output()
    return (progress[-1]["published"] - progress[0]["published"]) / (progress[-1]["t"] - progress[0]["t"])


def _checked(verifier) -> int:
    """How many frames a verify worker has checked, from its latest progress report."""
    progress = [e for e in verifier.events if e.get("event") == "progress"]
    return progress[-1]["checked"] if progress else 0


def test_reader_frozen_while_holding_does_not_slow_the_producer(env):
    name = env.name()
    producer = env.worker("produce", name, "--fps", "200", "--slots", "5")
    producer.wait_event("ready")
    holder = env.worker("hold", name, "--hold", "2")
    holder.wait_event("holding")
    other = env.worker("verify", name, "--name", "other")
    other.wait_event("ready")
    before = _rate(producer, 1.5)
    holder.signal(signal.SIGSTOP)
    checked_at_freeze = _checked(other)
    during = _rate(producer, 2.5)
    checked_while_frozen = _checked(other) - checked_at_freeze
    holder.signal(signal.SIGCONT)
    assert during >= 0.85 * before, (before, during)
    result = other.finish()
    # The other reader went on reading meanwhile (20 fps at the least, on a busy machine).
    assert checked_while_frozen >= 50 and result["bad"] == 0, (checked_while_frozen, result)



def test_reader_frozen_at_random_instants_never_blocks_the_producer(env):
    """Freeze readers churning through take/release at random instants; the producer keeps its rate."""
    name = env.name()
    producer = env.worker("produce", name, "--fps", "200", "--slots", "6")
    producer.wait_event("ready")
    churners = [env.worker("churn", name, "--hold", "2", "--name", f"churn{i}") for i in range(2)]
    for churner in churners:
        churner.wait_event("ready")
    baseline = _rate(producer, 1.0)
    rng = random.Random(2)
    slowest = float("inf")
    for _ in range(12):
        time.sleep(rng.uniform(0.0, 0.05))
        victim = rng.choice(churners)
        victim.signal(signal.SIGSTOP)
        slowest = min(slowest, _rate(producer, 0.6))
        victim.signal(signal.SIGCONT)
    assert slowest >= 0.8 * baseline, (baseline, slowest)
    for churner in churners:
        assert churner.popen.poll() is None, churner.output()


# --- 2.4 no busy polling -----------------------------------------------------------------------


def test_idle_reader_sleeps_and_wakes_on_publish(env):
    name = env.name()
    with fb.Publisher(name, shape=(48, 64, 3), fps=2) as pub:
        idle = env.worker("idle", name)
        idle.wait_event("ready")
        time.sleep(0.5)
        cpu_before = cpu_seconds(idle.pid)
        time.sleep(3.0)
        cpu_used = cpu_seconds(idle.pid) - cpu_before
        assert cpu_used < 0.03, f"an idle reader used {cpu_used:.3f} s of CPU in 3 s"
        latencies = []
        for n in range(1, 8):
            pub.publish(testpattern.render(n, (48, 64, 3)))
            event = idle.wait_event("frame", after=len(idle.events))
            latencies.append((event["now"] - event["ts"]) / 1e6)
            time.sleep(0.2)
    # Woken by the post, not by its liveness timer (0.5 s): within a few ms even on a busy machine.
    assert sorted(latencies)[len(latencies) // 2] < 50, latencies


# --- 2.5 crash safety ----------------------------------------------------------------------------


def _slots_used(pub, numbers) -> set:
    used = set()
    for n in numbers:
        pub.publish(testpattern.render(n, (48, 64, 3)))
        used.add(pub._newest_slot)  # noqa: SLF001 - which slot the producer wrote
    return used


def test_killed_reader_holding_frames_is_reclaimed(env):
    name = env.name()
    slots = 6
    with fb.Publisher(name, shape=(48, 64, 3), slots=slots) as pub:
        holder = env.worker("hold", name, "--hold", str(slots - 2))
        n = 0
        while not any(e.get("event") == "holding" for e in holder.events):
            n += 1
            pub.publish(testpattern.render(n, (48, 64, 3)))
            time.sleep(0.02)
            assert n < 1000, holder.output()
        holding = holder.wait_event("holding")
        assert len(holding["seqs"]) == slots - 2
        # With every slot a reader may hold leased, the producer cycles through the other two.
        assert len(_slots_used(pub, range(n + 1, n + 30))) == 2
        holder.signal(signal.SIGKILL)
        holder.wait()
        wait_until(lambda: not describe_stream(name)["readers"], 2.0, "the dead reader to leave the table")
        locks = pub._segment.locks  # noqa: SLF001
        assert not any(locks.held_by_other(LOCK_SLOT_BASE + k) for k in range(slots)), "a dead reader's lease survived"
        # Its budget is free again: a new reader holds as many frames as the ring allows, which
        # forces the producer through every slot, including the four the dead reader had.
        with fb.Reader(name, name="after", hold=slots - 2) as cam:
            held = []
            for m in range(n + 30, n + 30 + slots - 2):
                assert pub.publish(testpattern.render(m, (48, 64, 3))) is not None
                held.append(cam.next(timeout=2))
            assert len(_slots_used(pub, range(n + 40, n + 50))) == 2
            assert len({f._slot for f in held}) == slots - 2  # noqa: SLF001
            assert all(testpattern.verify(f.array) is not None for f in held)
        assert pub.dropped == 0


def test_reader_killed_at_random_instants_leaks_nothing(env):
    name = env.name()
    slots = 5
    producer = env.worker("produce", name, "--fps", "300", "--slots", str(slots))
    producer.wait_event("ready")
    rng = random.Random(5)
    for i in range(10):
        churner = env.worker("churn", name, "--hold", "2", "--name", f"k{i}")
        churner.wait_event("ready")
        time.sleep(rng.uniform(0.0, 0.3))
        churner.signal(signal.SIGKILL)
        churner.wait()
    wait_until(lambda: not describe_stream(name)["readers"], 3.0, "killed readers to leave the table")
    # Every slot a reader may lease is available again.
    with fb.Reader(name, name="survivor", hold=slots - 2) as cam:
        frames = [cam.next(timeout=5) for _ in range(slots - 2)]
        assert all(testpattern.verify(f.array) is not None for f in frames)


@pytest.mark.parametrize("mode", ["latest", "next", "ordered"])
def test_daemon_killed_and_restarted_reader_goes_on_by_itself(env, mode):
    daemon, name = env.serve("test://", None, "--fps", "60")
    reader = env.worker("survive", name, "--mode", mode)
    wait_until(lambda: any(e.get("frames", 0) > 20 for e in reader.events), 10, "frames before the kill")
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    assert describe_stream(name)["state"] == "dead"
    time.sleep(1.0)
    restarted, _ = env.serve("test://", name, "--fps", "60")
    wait_until(
        lambda: any(e.get("restarts_seen", 0) >= 1 and e.get("last_seq", 0) > 30 for e in reader.events),
        15,
        "frames from the restarted daemon",
    )
    last = reader.events[-1]
    assert last["bad"] == 0, last
    assert reader.popen.poll() is None, "the reader had to be restarted"


def test_latest_does_not_hand_out_a_dead_daemons_frame_forever(env):
    daemon, name = env.serve("test://", None, "--fps", "60")
    with fb.Reader(name, name="live") as cam:
        cam.latest(timeout=5)
        daemon.signal(signal.SIGKILL)
        daemon.wait()

        def refused() -> bool:
            try:
                cam.latest(timeout=0.05)
            except fb.FrameTimeout as exc:
                return "daemon stopped" in str(exc)
            return False

        wait_until(refused, 3, "latest() to stop returning the last frame of a dead daemon")
    env.require_clean = False  # the killed daemon's segment stays until a daemon takes it over


# --- 2.6 weak memory models ------------------------------------------------------------------


def test_protocol_documents_the_publishing_barrier():
    """The ordering argument must stay written down next to the code that relies on it."""
    import framebroker._publisher as publisher
    import framebroker._ring as ring

    doc = ring.__doc__ or ""
    assert "What orders the frame bytes before the sequence number" in doc
    assert "aarch64" in doc and "x86" in doc
    source = Path(publisher.__file__).read_text()
    commit = source[source.index("def _commit") :]
    meta_at = commit.index("_pack_meta(")
    unlock_at = commit.index("unlock(LOCK_SLOT_BASE")
    newest_at = commit.index("_pack_frame_counters(")
    assert meta_at < unlock_at < newest_at, "record, then the unlock barrier, then newest_seq"
    assert "publishing barrier" in commit[:unlock_at]


# --- 2.7 every frame carries seq, timestamps, geometry and format ----------------------------------


def test_frame_metadata(env):
    name = env.name()
    with fb.Publisher(name, shape=(60, 80), fps=25, slots=8) as pub, fb.Reader(name, name="meta", hold=1) as cam:
        stamps = []
        got = []
        frames = cam.ordered(timeout=2)
        for n in range(1, 6):
            stamp = time.monotonic_ns()
            stamps.append(stamp)
            pub.publish(testpattern.render(n, (60, 80)), timestamp_ns=stamp)
            frame = next(frames)
            got.append((frame.seq, frame.timestamp_ns, frame.wall_time, frame.shape, frame.format, frame.dropped))
        assert [g[0] for g in got] == [1, 2, 3, 4, 5]
        assert [g[1] for g in got] == stamps
        assert all(abs(g[2] - time.time()) < 5 for g in got)
        assert all(g[3] == (60, 80) and g[4] == "gray" and g[5] == 0 for g in got)
        before = time.monotonic_ns()
        pub.publish(testpattern.render(6, (60, 80)))
        frame = next(frames)
        assert before <= frame.timestamp_ns <= time.monotonic_ns(), "capture time defaults to now, CLOCK_MONOTONIC"


def test_ordered_counts_frames_it_missed(env):
    name = env.name()
    with fb.Publisher(name, shape=(32, 48, 3), slots=4) as pub, fb.Reader(name, name="slow") as cam:
        pub.publish(testpattern.render(1, (32, 48, 3)))
        frames = cam.ordered(timeout=1)
        assert next(frames).seq == 1
        for n in range(2, 30):  # far more than the ring holds
            pub.publish(testpattern.render(n, (32, 48, 3)))
        frame = next(frames)
        assert frame.seq > 2 and frame.dropped == frame.seq - 2
        assert cam.dropped == frame.dropped


# --- 2.8 geometry changes -------------------------------------------------------------------------


def test_geometry_change_is_seen_by_readers(env):
    name = env.name()
    shapes = [(240, 320, 3), (480, 640, 3), (120, 160, 3), (720, 1280, 3)]
    with fb.Publisher(name, shape=shapes[0], fps=100) as pub:
        follower = env.worker("follow", name)
        follower.wait_event("ready")
        n = 0
        for shape in shapes:
            for _ in range(30):
                n += 1
                pub.publish(testpattern.render(n, shape))
                time.sleep(0.01)
            wait_until(lambda: any(e.get("shape") == list(shape) for e in follower.events), 10, f"a {shape} frame")
        frames = [e for e in follower.events if e.get("event") == "frame"]
        assert all(e["valid"] for e in frames), "a frame of one size was shown with another"
        assert {tuple(e["shape"]) for e in frames} == set(shapes)


# --- 2.9 no SIGBUS: memory is reserved at start ---------------------------------------------------


def _can_unshare() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m to mount a small /dev/shm privately")
def test_too_small_dev_shm_is_a_clear_error_at_start(env):
    import shlex

    from framebroker._layout import RingLayout
    from framebroker._process import framebroker_command

    name = env.name()
    command = shlex.join(framebroker_command("serve", "test://", "--name", name, "--width", "1920", "--height", "1080"))
    script = f"mount -t tmpfs -o size=16m tmpfs /dev/shm && {command}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    needed = RingLayout.compute(12, 1920 * 1080 * 3).total_size / (1 << 20)
    assert result.returncode == 1, result.stderr
    assert f"cannot reserve {needed:.1f} MiB in /dev/shm" in result.stderr, result.stderr
    assert "only 16.0 MiB is free" in result.stderr
    assert "Bus error" not in result.stderr


def test_segment_memory_is_reserved_not_sparse(env):
    name = env.name()
    with fb.Publisher(name, shape=(480, 640, 3), slots=4):
        st = os.stat(f"/dev/shm/framebroker.{name}")
        assert st.st_blocks * 512 >= st.st_size, "the segment must be fully allocated up front"


# --- 2.10 private by default ---------------------------------------------------------------------


def test_segments_and_semaphores_are_private_by_default(env):
    daemon, name = env.serve()
    objects = shm_objects(name)
    assert f"framebroker.{name}" in objects and any(o.startswith("sem.") for o in objects)
    for obj in objects:
        assert stat.S_IMODE(os.stat(f"/dev/shm/{obj}").st_mode) == 0o600, obj


def test_group_option_opens_to_the_group(env):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name if os.geteuid() != 0 else "video"
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        pytest.skip(f"group {group} does not exist here")
    daemon, name = env.serve("test://", None, "--group", group)
    for obj in shm_objects(name):
        st = os.stat(f"/dev/shm/{obj}")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid, obj


def _write_segment(name: str, content: bytes) -> str:
    path = f"/dev/shm/framebroker.{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    return path


def test_foreign_magic_is_refused(env):
    name = env.name()
    path = _write_segment(name, b"this is not a ring" + bytes(8192))
    try:
        with pytest.raises(fb.IncompatibleSegment, match="not a framebroker ring"):
            fb.Reader(name)
        result = env.run_cli("serve", "test://", "--name", name)
        assert result.returncode == 1
        assert "not a framebroker ring" in result.stderr and f"rm {path}" in result.stderr
        assert os.path.exists(path), "an untrusted object must never be removed by us"
    finally:
        os.unlink(path)


def test_other_layout_version_is_refused(env):
    name = env.name()
    header = bytearray(MAGIC + struct.pack("<I", LAYOUT_VERSION + 1)) + bytes(8192)
    path = _write_segment(name, bytes(header))
    try:
        with pytest.raises(fb.IncompatibleSegment, match=f"layout version {LAYOUT_VERSION + 1}"):
            fb.Reader(name)
    finally:
        os.unlink(path)


def test_segment_claiming_another_owner_is_refused(env):
    name = env.name()
    with fb.Publisher(name, shape=(32, 32, 3)):
        raw = Path(f"/dev/shm/framebroker.{name}").read_bytes()
    forged = bytearray(raw)
    struct.pack_into("<I", forged, 28, os.geteuid() + 1)  # owner_uid in the static header
    path = _write_segment(name, bytes(forged))
    try:
        with pytest.raises(fb.IncompatibleSegment, match="claims to belong to uid"):
            fb.Reader(name)
    finally:
        os.unlink(path)


# --- 2.11 one owner per stream ---------------------------------------------------------------------


def test_second_daemon_is_refused_naming_the_pid(env):
    daemon, name = env.serve()
    result = env.run_cli("serve", "test://", "--name", name)
    assert result.returncode == 1
    assert f"already served by a live daemon (pid {daemon.pid})" in result.stderr
    assert describe_stream(name)["alive"], "the first daemon must be unharmed"


def test_stale_segment_of_a_dead_daemon_is_taken_over(env):
    daemon, name = env.serve()
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    assert describe_stream(name)["state"] == "dead"
    second, _ = env.serve("test://", name)
    info = describe_stream(name)
    assert info["alive"] and info["pid"] == second.pid


# --- clean stop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_clean_stop_leaves_nothing_in_dev_shm(env, signum):
    daemon, name = env.serve()
    with fb.Reader(name, name="attached") as cam:
        cam.next(timeout=5)
        daemon.signal(signum)
        assert daemon.wait(timeout=15) == 0, daemon.output()
    assert shm_objects(name) == []
    assert "removed /dev/shm/framebroker." in "\n".join(daemon.stderr)
