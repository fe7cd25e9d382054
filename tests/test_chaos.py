"""Chaos: readers killed at random moments, frozen at random instants, the daemon killed and
restarted; afterwards everything still works and nothing is leaked."""

from __future__ import annotations

import random
import signal
import time

import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker._status import describe_stream

from conftest import ffmpeg_decode, wait_until

pytestmark = pytest.mark.chaos

FPS = 30
SLOTS = 12
KILLS = 100
FREEZES = 20
RESTARTS = 3


def _seq_rate(name: str, seconds: float) -> float:
    """Frames the daemon published per second over ``seconds``, from its own counter."""
    start = describe_stream(name)
    time.sleep(seconds)
    end = describe_stream(name)
    return (end["seq"] - start["seq"]) / seconds


def test_chaos(env, tmp_path):
    rng = random.Random(20261121)
    daemon, name = env.serve("test://", None, "--fps", str(FPS), "--slots", str(SLOTS), "--width", "320", "--height", "240")
    recording = tmp_path / "chaos.ts"
    recorder = env.cli("record", name, "-o", str(recording), "--reader-name", "recorder")
    survivors = [
        env.spawn(
            [*env.worker_argv("survive", name), "--mode", mode, "--name", f"survivor-{mode}"],
            label=f"survivor-{mode}",
        )
        for mode in ("latest", "next", "ordered")
    ]
    for survivor in survivors:
        survivor.wait_event("progress")
    wait_until(lambda: recording.exists() and recording.stat().st_size > 0, 20, "the recorder to write")

    # 1. A hundred readers killed with SIGKILL at random moments: while attaching, while holding
    #    frames (hold=2, a lease on two slots), in the middle of taking or releasing one.
    killed = 0
    while killed < KILLS:
        batch = []
        for _ in range(3):
            role = rng.choice(["churn", "churn", "hold"])
            batch.append(env.worker(role, name, "--hold", "2", "--name", f"victim{killed + len(batch)}"))
        for victim in batch:
            if rng.random() < 0.8:  # most after they got going, some while still starting up
                wait_until(lambda: victim.events or victim.popen.poll() is not None, 20, "the victim to start")
            time.sleep(rng.uniform(0.0, 0.15))
            victim.signal(signal.SIGKILL)
            victim.wait()
            killed += 1
    assert daemon.popen.poll() is None, daemon.output()

    # 2. Readers frozen (SIGSTOP) at random instants for random lengths: the daemon's rate holds.
    frozen_pool = [env.worker("churn", name, "--hold", "2", "--name", f"freeze{i}") for i in range(2)]
    for reader in frozen_pool:
        reader.wait_event("ready")
    rates = []
    for _ in range(FREEZES):
        victim = rng.choice(frozen_pool)
        time.sleep(rng.uniform(0.0, 0.1))
        victim.signal(signal.SIGSTOP)
        rates.append(_seq_rate(name, rng.uniform(0.3, 0.8)))
        victim.signal(signal.SIGCONT)
    assert min(rates) >= 0.75 * FPS, f"the daemon slowed while readers were frozen: {rates}"
    for reader in frozen_pool:
        assert reader.popen.poll() is None, reader.output()
        reader.stop()

    # 3. The daemon killed with SIGKILL and restarted, several times; survivors go on by themselves.
    for _ in range(RESTARTS):
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        time.sleep(rng.uniform(0.1, 1.0))
        daemon, _ = env.serve("test://", name, "--fps", str(FPS), "--slots", str(SLOTS), "--width", "320", "--height", "240")

    # Afterwards: every survivor still gets fresh, intact frames from the latest daemon ...
    marks = {id(s): len(s.events) for s in survivors}
    for survivor in survivors:
        wait_until(
            lambda: sum(e.get("event") == "progress" for e in survivor.events[marks[id(survivor)]:]) >= 3
            and survivor.events[-1]["frames"] > survivor.events[marks[id(survivor)]]["frames"],
            20,
            f"{survivor.label} to keep reading",
        )
        last = survivor.events[-1]
        assert last["bad"] == 0, last
        assert last["restarts_seen"] >= 1, last
        assert survivor.popen.poll() is None, survivor.output()

    # ... the recorder too ...
    size = recording.stat().st_size
    wait_until(lambda: recording.stat().st_size > size, 10, "the recorder to go on writing")
    assert recorder.popen.poll() is None, recorder.output()

    # ... the table holds exactly the live readers ...
    expected = sorted([f"survivor-{m}" for m in ("latest", "next", "ordered")] + ["recorder"])
    info = wait_until(lambda: (lambda i: i if len(i["readers"]) == len(expected) else None)(describe_stream(name)), 5, "only survivors in the table")
    assert sorted(r["name"] for r in info["readers"]) == expected

    # ... and no slot leaked: the rest of the hold budget is available and holds intact frames.
    room = SLOTS - 2 - len(expected)
    with fb.Reader(name, name="capacity-check", hold=room) as cam:
        held = [cam.next(timeout=5) for _ in range(room)]
        assert len({f.seq for f in held}) == room
        assert all(testpattern.verify(f.array) == f.seq for f in held)

    for survivor in survivors:
        survivor.stop()
    # The recording went through three daemon restarts and still decodes without an error.
    recorder.signal(signal.SIGINT)
    assert recorder.wait(timeout=30) == 0, recorder.output()
    decoded = ffmpeg_decode(recording)
    assert decoded.returncode == 0 and not decoded.stderr.strip(), decoded.stderr
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    # env's teardown asserts nothing of this stream is left in /dev/shm.
