"""Defects a second look at the core found, each pinned by a test that failed before its fix.

Missed wake-up after attaching, a non-transactional geometry change, trigger queues shared by
pid, a race that removed a new daemon's semaphores, a daemon killed by an unexpected exception
from its source, phantom readers in status, and an attach that waited for a frozen attacher.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import posix_ipc
import pytest

import framebroker as fb
from conftest import shm_objects, wait_until
from framebroker._layout import LOCK_OWNER, OBJECT_SEPARATOR, SEGMENT_PREFIX, semaphore_name
from framebroker._locks import ByteLocks
from framebroker._segment import remove_stale
from test_ring_invariants import _can_unshare


def _readers(name: str) -> list:
    return fb.status(name)["streams"][0]["readers"]


# --- a new reader is woken by the very next frame ------------------------------------------------


def test_a_new_readers_first_wait_ends_with_the_next_frame(env):
    # 5 fps: a frame period (200 ms) well inside the idle reader's liveness step (500 ms). A
    # reader the producer did not know about would sleep through frame N+1 until the liveness
    # step and then take N+2; a reader it wakes takes N+1.
    daemon, name = env.serve("test://", None, "--fps", "5", "--width", "64", "--height", "48")
    got = []
    for _ in range(5):
        with fb.Reader(name, name="newcomer") as cam:
            first = cam.latest(timeout=5.0).seq
            second = cam.next(timeout=5.0)
            got.append((first, second.seq))
    assert all(after == before + 1 for before, after in got), f"a new reader skipped the next frame: {got}"


# --- set_geometry is all or nothing; gray frames as (h, w, 1) ---------------------------------------


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m to mount a small /dev/shm privately")
def test_a_failed_resize_changes_nothing_and_can_be_retried(env):
    name = env.name()
    code = f"""
import numpy as np, framebroker as fb
with fb.Publisher({name!r}, shape=(48, 64, 3), slots=4) as pub, fb.Reader({name!r}) as cam:
    for attempt in range(2):
        try:
            pub.set_geometry((1080, 1920, 3))
        except fb.ShmSpaceError as exc:
            assert pub.shape == (48, 64, 3), pub.shape
        else:
            raise SystemExit("the resize should not fit in 16 MiB")
    pub.publish(np.full((48, 64, 3), 7, np.uint8))
    frame = cam.latest(timeout=2)
    assert frame.shape == (48, 64, 3) and int(frame.array[0, 0, 0]) == 7
    print("unchanged after two failed resizes")
"""
    script = f"mount -t tmpfs -o size=16m tmpfs /dev/shm && {shlex.join([sys.executable, '-c', code])}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unchanged after two failed resizes" in result.stdout


@pytest.mark.parametrize("declared", [(48, 64), (48, 64, 1)])
def test_gray_frames_given_as_h_w_1_are_published(env, declared):
    name = env.name()
    with fb.Publisher(name, shape=declared, format="gray") as pub, fb.Reader(name) as cam:
        image = np.arange(48 * 64, dtype=np.uint32).astype(np.uint8).reshape(48, 64, 1)
        pub.publish(image)
        frame = cam.latest(timeout=2.0)
        assert frame.shape == (48, 64) and frame.format == "gray"
        assert np.array_equal(frame.array, image[:, :, 0])
        assert pub.shape == (48, 64)


# --- trigger queues: one per listener, liveness from its entry --------------------------------------


def _queue_exists(name: str) -> bool:
    # By name, not by listing /dev/mqueue: it is not mounted everywhere (it is not here).
    try:
        posix_ipc.MessageQueue(name).close()
    except posix_ipc.ExistentialError:
        return False
    return True


def test_two_listeners_in_one_process_each_get_their_own_trigger(env):
    daemon, name = env.serve("test://", None, "--fps", "20", "--width", "64", "--height", "48")
    with fb.Reader(name, name="one") as first, fb.Reader(name, name="two") as second:
        inbox_one, inbox_two = first.triggers(), second.triggers()
        assert inbox_one.name != inbox_two.name
        assert fb.trigger(name, "both") == 2
        assert inbox_one.receive(timeout=2.0).label == "both"
        assert inbox_two.receive(timeout=2.0).label == "both"
        assert inbox_one.receive(timeout=0.1) is None and inbox_two.receive(timeout=0.1) is None
        names = inbox_one.name, inbox_two.name
        inbox_one.close()
        assert not _queue_exists(names[0]) and _queue_exists(names[1])
        assert fb.trigger(name, "second only") == 1
        assert inbox_two.receive(timeout=2.0).label == "second only"
        with pytest.raises(ValueError, match="already listens"):
            second.triggers()
    assert not _queue_exists(names[1])


def test_a_killed_listeners_queue_is_removed_by_the_reader_that_takes_its_entry(env):
    daemon, name = env.serve("test://", None, "--fps", "20", "--width", "64", "--height", "48")
    listener = env.worker("listen", name)
    left_behind = listener.wait_event("listening")["queue"]
    os.kill(listener.pid, signal.SIGKILL)
    listener.wait()
    assert _queue_exists(left_behind)
    with fb.Reader(name) as cam:
        cam.latest(timeout=5.0)
        assert not _queue_exists(left_behind)


def test_a_killed_listeners_queue_goes_with_its_daemon(env):
    daemon, name = env.serve("test://", None, "--fps", "20", "--width", "64", "--height", "48")
    listener = env.worker("listen", name)
    left_behind = listener.wait_event("listening")["queue"]
    os.kill(listener.pid, signal.SIGKILL)
    listener.wait()
    daemon.stop()
    assert not _queue_exists(left_behind)


def test_a_listener_follows_a_daemon_restart_to_a_new_queue(env):
    daemon, name = env.serve("test://", None, "--fps", "20", "--width", "64", "--height", "48")
    with fb.Reader(name) as cam, cam.triggers() as inbox:
        before = inbox.name
        daemon.stop()
        daemon, _ = env.serve("test://", name, "--fps", "20", "--width", "64", "--height", "48")
        wait_until(lambda: cam.latest(timeout=5.0).seq and inbox.name != before, 10, "the reader to move to the new daemon")
        assert fb.trigger(name, "after restart") == 1
        assert inbox.receive(timeout=2.0).label == "after restart"
        assert not _queue_exists(before) and _queue_exists(inbox.name)


def test_a_reader_whose_waits_are_shorter_than_the_liveness_step_follows_a_restart(env):
    """A reader that only waits a short while per call (next(timeout=0.2), as the preview's
    encoder thread does) must still notice that its daemon stopped and attach to the next one.
    The compiled wait once ended at the deadline without checking the daemon, so such a reader
    kept waiting on the dead daemon's segment for ever."""
    daemon, name = env.serve("test://", None, "--fps", "20", "--width", "64", "--height", "48")
    with fb.Reader(name) as cam:
        cam.next(timeout=5.0)
        daemon.stop()
        while True:  # until the stop shows: the last frames may still be there to take
            try:
                cam.next(timeout=0.2)
            except fb.FrameTimeout:
                break
        daemon, _ = env.serve("test://", name, "--fps", "20", "--width", "64", "--height", "48")
        seqs = []

        def taken() -> bool:
            try:
                seqs.append(cam.next(timeout=0.2).seq)
            except fb.FrameTimeout:
                pass
            return len(seqs) >= 3

        wait_until(taken, 10, "frames from the restarted daemon through short waits")
    daemon.stop()


# --- taking over a stale stream removes only the dead daemon's semaphores ---------------------------


def test_taking_over_a_stale_stream_leaves_a_new_daemons_semaphores_alone(env):
    name = env.name()
    dead = env.worker("produce", name, "--seconds", "60", "--fps", "10")
    dead.wait_event("ready")
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    # A second daemon half way through creating its segment: its draft is owner-locked and its
    # semaphores (of its own epoch) exist, but its segment is not linked under the name yet.
    epoch = 0x1234567890ABCDEF
    draft = f"/dev/shm/{SEGMENT_PREFIX}{name}{OBJECT_SEPARATOR}new.{os.getpid()}.{epoch:x}"
    fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    semaphores = [posix_ipc.Semaphore(semaphore_name(name, epoch, i), posix_ipc.O_CREX, 0o600, 0) for i in range(2)]
    try:
        assert ByteLocks(fd).try_exclusive(LOCK_OWNER)
        removed = remove_stale(name)  # what a third daemon starting now, or clean, does
        assert removed is not None
        for sem in semaphores:
            posix_ipc.Semaphore(sem.name)  # still there: raises ExistentialError if it was removed
        assert not any(obj == f"{SEGMENT_PREFIX}{name}" for obj in shm_objects(name))
    finally:
        os.close(fd)
        os.unlink(draft)
        for sem in semaphores:
            try:
                sem.unlink()
            except posix_ipc.ExistentialError:
                pass
            sem.close()


# --- the daemon outlives any exception from its source ------------------------------------------------


def test_daemon_survives_unexpected_source_exceptions_and_counts_them(env, caplog):
    import cv2

    from framebroker._daemon import Daemon

    name = env.name()
    daemon = Daemon("test://", name, width=64, height=48, fps=50)
    inner = daemon.source
    faults = {"read": 10, "open": 1}

    class Faulty:
        def __getattr__(self, attribute):
            return getattr(inner, attribute)

        def open(self):
            if faults["read"] < 0 and faults["open"] > 0:
                faults["open"] -= 1
                raise OSError(5, "Input/output error")
            inner.open()

        def read_into(self, out):
            faults["read"] -= 1
            if faults["read"] == 0:
                faults["read"] = -1
                raise cv2.error("simulated driver fault")
            return inner.read_into(out)

    daemon.source = Faulty()
    caplog.set_level(logging.DEBUG, logger="framebroker.serve")
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        with fb.Reader(name, wait=5.0) as cam:
            wait_until(lambda: cam.latest(timeout=5.0).seq > 20, 15, "frames after both faults")
            assert thread.is_alive()
            stream = fb.status(name)["streams"][0]
            assert stream["source_errors"] == 2 and stream["state"] == "streaming"
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert {r.exc_info[0].__name__ for r in tracebacks} == {"error", "OSError"}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.getMessage()]
        assert warnings, "the first failure in a row says that it retries"
    finally:
        daemon.request_stop()
        thread.join(10)
    assert not thread.is_alive() and shm_objects(name) == []


# --- status shows live readers only -------------------------------------------------------------------


def test_a_closed_reader_whose_frame_is_still_referenced_leaves_status(env):
    daemon, name = env.serve("test://", None, "--fps", "20", "--width", "64", "--height", "48")
    cam = fb.Reader(name, name="closer")
    frame = cam.latest(timeout=5.0)
    view = frame.array  # a view into shared memory that outlives the Reader
    assert [r["name"] for r in _readers(name)] == ["closer"]
    cam.close()
    assert _readers(name) == [], "a closed reader must leave status at once"
    assert view.shape == (48, 64, 3)
    with fb.Reader(name, name="after") as again:  # its entry and token are free for others
        again.latest(timeout=5.0)
        assert [(r["name"], r["pid"]) for r in _readers(name)] == [("after", os.getpid())]


# --- attaching never waits for a frozen attacher ---------------------------------------------------


def test_a_reader_frozen_while_attaching_blocks_nobody(env):
    daemon, name = env.serve("test://", None, "--fps", "20", "--width", "64", "--height", "48")
    frozen = env.worker("freeze-attaching", name)
    wait_until(lambda: _proc_state(frozen.pid) == "T", 10, "the attaching reader to stop itself")
    started = time.monotonic()
    with fb.Reader(name, name="unhindered") as cam:
        cam.latest(timeout=5.0)
    # Generous: the point is that nobody waits for the frozen process (which used to cost 2 s
    # and then fail), not a speed figure.
    assert time.monotonic() - started < 1.0
    frozen.stop()


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]
