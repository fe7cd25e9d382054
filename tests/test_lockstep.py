"""Lockstep: the producer waits for its ordered readers, and only for them, only when asked."""

from __future__ import annotations

import os
import signal

import numpy as np

import framebroker as fb


def test_every_ordered_reader_gets_every_frame_fast_and_slow(env):
    name = env.name()
    producer = env.worker("produce-lockstep", name, "--frames", "120", "--hold", "2", "--slots", "4", "--width", "160", "--height", "120")
    producer.wait_event("ready")
    fast = env.worker("verify", name, "--mode", "ordered", "--frames", "120", "--seconds", "60", "--name", "fast")
    slow = env.worker("verify", name, "--mode", "ordered", "--frames", "120", "--seconds", "60", "--name", "slow", "--work-ms", "15")
    results = [reader.wait_event("done", timeout=90) for reader in (fast, slow)]
    for result in results:
        # Four slots, a reader 15 ms a frame behind the other: without lockstep it would lose most.
        assert result["checked"] == 120 and result["dropped"] == 0 and result["bad"] == 0, results
    assert producer.wait_event("done", timeout=30)["published"] == 120


def test_a_killed_reader_stops_holding_the_stream_back_and_live_readers_never_do(env):
    name = env.name()
    producer = env.worker("produce-lockstep", name, "--frames", "200", "--hold", "2", "--slots", "5", "--width", "160", "--height", "120")
    producer.wait_event("ready")
    survivor = env.worker("verify", name, "--mode", "ordered", "--frames", "200", "--seconds", "60", "--name", "survivor")
    doomed = env.worker("verify", name, "--mode", "ordered", "--frames", "200", "--seconds", "60", "--name", "doomed", "--work-ms", "50")
    producer.wait_event("progress", timeout=30)
    # A reader in latest mode that freezes does not count: only ordered readers hold it back.
    watcher = env.worker("churn", name, "--seconds", "0", "--name", "watcher")
    watcher.wait_event("ready")
    watcher.signal(signal.SIGSTOP)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    result = survivor.wait_event("done", timeout=60)
    assert result["checked"] == 200 and result["dropped"] == 0 and result["bad"] == 0, result
    assert producer.wait_event("done", timeout=30)["published"] == 200
    watcher.signal(signal.SIGCONT)


def test_without_lockstep_the_producer_never_waits(env):
    name = env.name()
    with fb.Publisher(name, shape=(48, 64, 3), slots=4) as pub, fb.Reader(name, name="idle") as cam:
        iterator = cam.ordered(timeout=1.0)
        pub.publish(np.zeros((48, 64, 3), np.uint8))
        next(iterator)
        assert not pub.wait_until_consumed(timeout=0.05), "the reader has not asked for the next frame"
        assert [(r["name"], r["last_seq"]) for r in pub.lagging_readers()] == [("idle", 0)]
        for _ in range(50):  # publish() itself never waits, whatever the readers do
            pub.publish(np.zeros((48, 64, 3), np.uint8))
        assert pub.seq == 51
        # ... so this reader lost most of them: the ring kept the newest few.
        assert next(iterator).dropped >= 45
