"""Rings that grow (serve --slots auto): any number of readers, within --max-shm, and back."""

from __future__ import annotations

import os
import signal
import time

import pytest

import framebroker as fb
from conftest import shm_objects, wait_until
from framebroker._layout import RingLayout


def _stream(name: str) -> dict:
    return fb.status(name)["streams"][0]


def test_24_readers_each_holding_a_frame_grow_the_ring_and_nothing_breaks(env):
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "320", "--height", "240", "--shrink-after", "3")
    assert _stream(name)["slots"] == 12 and _stream(name)["max_shm_bytes"] > 0
    ordered = env.worker("verify", name, "--mode", "ordered", "--seconds", "60", "--frames", "450", "--name", "ordered", "--recheck")
    ordered.wait_event("ready")
    start_seq, start = _stream(name)["seq"], time.monotonic()
    holders = []
    for i in range(24):
        holder = env.worker("hold", name, "--seconds", "-1", "--name", f"holder{i}")
        holder.wait_event("holding", timeout=30)
        holders.append(holder)
    produced = (_stream(name)["seq"] - start_seq) / (time.monotonic() - start)
    # Twelve slots hold ten frames at most: the ring grew (readers that hold frames of a segment
    # the producer left keep them, and need room in the new one only when they ask again).
    history = _stream(name)["ring_history"]
    assert history and history[0]["from"] == 12 and history[0]["to"] > 12, history
    # The source's rate held while the ring moved under the readers (a generous bound for a
    # busy 2-core machine starting 25 Python processes meanwhile).
    assert produced >= 0.8 * 30, produced
    for holder in holders:
        holder.signal(signal.SIGTERM)
    for holder in holders:
        done = holder.wait_event("done", timeout=30)
        assert done["intact"] and done["pattern_ok"], done
    result = ordered.wait_event("done", timeout=60)
    # 15 s of frames, across the moves, each checked byte for byte twice (torn, then changed).
    # (A reader starved of CPU while 25 processes start may fall a ring behind: those frames are
    # counted in "dropped", never handed out wrong.)
    assert result["checked"] == 450 and result["bad"] == 0, result
    # Readers gone: back to the starting size after --shrink-after.
    wait_until(lambda: _stream(name)["slots"] == 12, 20, "the ring to shrink back")
    assert _stream(name)["ring_history"][-1]["to"] == 12


def test_the_cap_is_a_clear_error_naming_the_figure_and_the_flag(env):
    capacity = 320 * 240 * 3
    cap = RingLayout.compute(13, capacity).total_size  # room for 12 slots, not for 18 (nor 13)
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "320", "--height", "240", "--max-shm", str(cap - 1))
    readers = [fb.Reader(name, name=f"r{i}") for i in range(10)]
    try:
        with pytest.raises(fb.CapacityError, match=r"past its limit of [\d.]+ MiB\. Restart the daemon with a larger --max-shm"):
            fb.Reader(name, name="one too many")
        assert _stream(name)["slots"] == 12
    finally:
        for reader in readers:
            reader.close()
    with pytest.raises(ValueError):
        fb.Publisher(env.name(), shape=(4, 4, 3), slots="auto", max_shm=0)


def test_a_fixed_ring_still_refuses_with_the_slots_it_needs(env):
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "64", "--height", "48", "--slots", "4")
    with fb.Reader(name, hold=2):
        with pytest.raises(fb.CapacityError, match="--slots 5"):
            fb.Reader(name)


def test_daemon_killed_while_growing_leaves_nothing_and_readers_reattach(env):
    # 4K frames: reserving 18 slots of them takes long enough to kill the daemon in the middle.
    daemon, name = env.serve("test://", None, "--fps", "10", "--width", "3840", "--height", "2160")
    follower = env.worker("follow", name, "--seconds", "120", "--name", "follower")
    follower.wait_event("ready")
    holders = [fb.Reader(name, name=f"h{i}") for i in range(9)]  # follower + 9: the budget of 10
    # A reader that wants ten frames more: the ring must grow to 22 slots, 550 MB to reserve.
    asker = env.spawn([*env.worker_argv("hold", name), "--seconds", "-1", "--hold", "10", "--name", "asker"], label="asker")
    draft = f"framebroker.{name}@new."
    deadline = time.monotonic() + 30
    while not any(entry.startswith(draft) for entry in os.listdir("/dev/shm")):
        # A tight look: the segment is being reserved for a tenth of a second or so.
        assert time.monotonic() < deadline, "the daemon never started to make a larger segment"
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    for reader in holders:
        reader.close()
    asker.stop()
    daemon, _ = env.serve("test://", name, "--fps", "10", "--width", "320", "--height", "240")
    assert not any(entry.startswith(draft) for entry in os.listdir("/dev/shm")), "the dead daemon's half-made segment is gone"
    wait_until(lambda: any(e.get("event") == "frame" and e["shape"] == [240, 320, 3] for e in follower.events), 20, "the follower on the new daemon")
    daemon.stop()
    follower.stop()
    assert shm_objects(name) == []
