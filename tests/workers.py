"""Processes that tests start: producers and readers with a job each.

Run as ``python tests/workers.py ROLE STREAM [options]``. Every worker prints one JSON object per
line on stdout (``{"event": ...}``), flushing each, so a test can follow it and assert on facts
rather than on timing.

``--seconds S`` bounds a worker's run; 0 (the default) runs it until the test stops it with
SIGTERM. Tests end workers when they have seen what they waited for, never by a lifetime fixed in
advance; ``produce``, ``verify``, ``hold`` and ``idle`` still report ``done`` when stopped
(``Proc.finish`` in conftest.py stops one and returns that report).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import zlib

import numpy as np

import framebroker as fb
from framebroker import testpattern


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def deadline_of(seconds: float) -> float:
    """When a run of ``seconds`` ends (monotonic clock); never, for 0: until SIGTERM."""
    return time.monotonic() + seconds if seconds > 0 else float("inf")


def produce(args: argparse.Namespace) -> int:
    """Publish test-pattern frames, paced at --fps (0: as fast as possible), for --seconds.

    With --unsafe, after publishing each frame it also scribbles the next frame into the slot of
    the one it just published, without any lock: a deliberately broken ring that the integrity
    tests must catch (their negative control).
    """
    shape = (args.height, args.width, 3)
    period = 1.0 / args.fps if args.fps else 0.0
    with fb.Publisher(args.stream, shape=shape, fps=args.fps, slots=args.slots) as pub:
        emit(event="ready", pid=os.getpid())
        deadline = deadline_of(args.seconds)
        next_time = time.monotonic()
        next_report = next_time
        n = 0
        try:
            while time.monotonic() < deadline:
                n += 1
                writer = pub.slot()
                with writer as buf:
                    testpattern.render_into(buf, n & 0xFFFFFFFF)
                if args.unsafe and pub.seq:
                    # Reach past the locks on purpose (see the docstring).
                    victim = pub._views[pub._newest_slot]  # noqa: SLF001
                    testpattern.render_into(victim, (n + 1) & 0xFFFFFFFF)
                if period:
                    next_time += period
                    delay = next_time - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + 0.05
                    emit(event="progress", published=pub.seq, t=now)
        except KeyboardInterrupt:  # SIGTERM: the test has seen what it waited for
            pass
        emit(event="done", published=pub.seq)
    return 0


def verify_loop(args: argparse.Namespace) -> int:
    """Read frames (next or ordered) and check every byte of each against the pattern."""
    checked = bad = 0
    first_bad = None
    deadline = deadline_of(args.seconds)
    with fb.Reader(args.stream, name=args.name, wait=10.0) as cam:
        emit(event="ready", pid=os.getpid())
        frames = cam.ordered(timeout=5.0) if args.mode == "ordered" else None
        try:
            while time.monotonic() < deadline and (not args.frames or checked < args.frames):
                try:
                    frame = next(frames) if frames is not None else cam.next(timeout=5.0)
                except (fb.FrameTimeout, StopIteration):
                    break
                with frame:
                    # The producers number frames like the ring does (n == seq), so a frame must
                    # be a perfect test picture *and* the picture of its own seq.
                    ok = testpattern.verify(frame.array) == frame.seq
                    # Check again: the frame must not change while held.
                    if ok and args.recheck:
                        ok = testpattern.verify(frame.array) == frame.seq
                    if args.work_ms:
                        time.sleep(args.work_ms / 1000.0)  # a slow consumer, holding the frame
                checked += 1
                if not ok:
                    bad += 1
                    first_bad = first_bad or frame.seq
                if checked % 20 == 0:
                    emit(event="progress", checked=checked, bad=bad)
        except KeyboardInterrupt:
            pass
        emit(event="done", checked=checked, bad=bad, first_bad=first_bad, dropped=cam.dropped)
    return 0


def hold(args: argparse.Namespace) -> int:
    """Take frames, hold them for --seconds (or until SIGTERM), then report whether they stayed
    intact. Killed with SIGKILL instead, it is a reader that died holding leases."""
    with fb.Reader(args.stream, name=args.name, hold=args.hold, wait=10.0) as cam:
        frames = []
        for _ in range(args.hold):
            frames.append(cam.next(timeout=10.0))
        copies = [f.array.copy() for f in frames]
        emit(event="holding", pid=os.getpid(), seqs=[f.seq for f in frames], newest=cam.newest_seq)
        try:
            if args.seconds > 0:
                time.sleep(args.seconds)
            else:
                signal.pause()
        except KeyboardInterrupt:
            pass
        intact = all(np.array_equal(f.array, c) for f, c in zip(frames, copies))
        pattern_ok = all(testpattern.verify(f.array) == f.seq for f in frames)
        writable = any(f.array.flags.writeable for f in frames)
        try:
            frames[0].array[0, 0, 0] = 1
            write_refused = False
        except ValueError:
            write_refused = True
        emit(
            event="done",
            intact=intact,
            pattern_ok=pattern_ok,
            writable=writable,
            write_refused=write_refused,
            newest=cam.newest_seq,
            seqs=[f.seq for f in frames],
        )
    return 0


def churn(args: argparse.Namespace) -> int:
    """Take and release frames in a tight loop (latest / next / explicit release), for --seconds
    or until stopped; tests freeze or kill it at random instants."""
    deadline = deadline_of(args.seconds)
    count = 0
    with fb.Reader(args.stream, name=args.name, hold=args.hold, wait=10.0) as cam:
        emit(event="ready", pid=os.getpid())
        while time.monotonic() < deadline:
            frame = cam.latest(timeout=5.0) if count % 3 == 0 else cam.next(timeout=5.0)
            if count % 2:
                frame.release()
            count += 1
            if count % 1000 == 0:
                emit(event="progress", count=count)
        emit(event="done", count=count)
    return 0


def follow(args: argparse.Namespace) -> int:
    """Read with next() and report every frame's seq, shape and daemon pid-independent facts;
    used to watch re-attachment after a daemon restart and geometry changes."""
    deadline = deadline_of(args.seconds)
    with fb.Reader(args.stream, name=args.name, wait=10.0) as cam:
        emit(event="ready", pid=os.getpid())
        while time.monotonic() < deadline:
            try:
                frame = cam.next(timeout=1.0)
            except fb.FrameTimeout:
                emit(event="timeout")
                continue
            except fb.SourceEnded as exc:
                emit(event="ended", message=str(exc))
                return 0
            with frame:
                n = testpattern.verify(frame.array, frame.format)
                emit(
                    event="frame",
                    seq=frame.seq,
                    shape=list(frame.shape),
                    valid=n is not None,
                    ts=frame.timestamp_ns,
                    wall=frame.wall_time,
                    now=time.monotonic_ns(),
                )
    return 0


def idle(args: argparse.Namespace) -> int:
    """Wait for frames that do not come (or come rarely), to measure what waiting costs."""
    with fb.Reader(args.stream, name=args.name, wait=10.0) as cam:
        emit(event="ready", pid=os.getpid())
        deadline = deadline_of(args.seconds)
        try:
            while time.monotonic() < deadline:
                remaining = deadline - time.monotonic()
                try:
                    frame = cam.next(timeout=None if remaining == float("inf") else max(0.01, remaining))
                except fb.FrameTimeout:
                    continue
                emit(event="frame", seq=frame.seq, ts=frame.timestamp_ns, now=time.monotonic_ns())
                frame.release()
        except KeyboardInterrupt:
            pass
        emit(event="done")
    return 0


def survive(args: argparse.Namespace) -> int:
    """Read in one mode (latest / next / ordered) through anything (daemon restarts included),
    checking every frame, and report progress every 0.2 s until --seconds are up."""
    counts = {"frames": 0, "bad": 0, "timeouts": 0, "last_seq": 0, "restarts_seen": 0}
    deadline = deadline_of(args.seconds)
    next_report = 0.0
    with fb.Reader(args.stream, name=args.name, hold=args.hold, wait=10.0) as cam:
        emit(event="ready", pid=os.getpid())
        frames = cam.ordered(timeout=1.0) if args.mode == "ordered" else None
        while time.monotonic() < deadline:
            try:
                if frames is not None:
                    frame = next(frames)
                elif args.mode == "latest":
                    frame = cam.latest(timeout=1.0)
                else:
                    frame = cam.next(timeout=1.0)
            except fb.FrameTimeout:
                counts["timeouts"] += 1
                frames = cam.ordered(timeout=1.0) if args.mode == "ordered" else None
                continue
            if frame.seq < counts["last_seq"]:
                counts["restarts_seen"] += 1  # a new daemon numbers from 1 again
            if frame.seq != counts["last_seq"]:
                counts["frames"] += 1
                if testpattern.verify(frame.array) != frame.seq:
                    counts["bad"] += 1
            counts["last_seq"] = frame.seq
            if args.mode == "latest":
                time.sleep(0.005)  # a consumer that samples the newest frame now and then
            now = time.monotonic()
            if now >= next_report:
                next_report = now + 0.2
                emit(event="progress", t=now, **counts)
        emit(event="done", **counts)
    return 0


def produce_lockstep(args: argparse.Namespace) -> int:
    """Publish --frames test-pattern frames in lockstep: each only once every ordered reader has
    moved past the one before (after waiting for --hold readers to attach)."""
    shape = (args.height, args.width, 3)
    with fb.Publisher(args.stream, shape=shape, slots=args.slots) as pub:
        emit(event="ready", pid=os.getpid())
        if not pub.wait_for_readers(args.hold, timeout=30.0):
            emit(event="no-readers")
            return 1
        started = time.monotonic()
        for n in range(1, args.frames + 1):
            while not pub.wait_until_consumed(timeout=1.0):
                emit(event="waiting", seq=pub.seq, lagging=pub.lagging_readers())
            with pub.slot() as buf:
                testpattern.render_into(buf, n)
            if n % 20 == 0:
                emit(event="progress", published=n, t=time.monotonic())
        pub.wait_until_consumed(timeout=10.0)
        emit(event="done", published=pub.seq, seconds=time.monotonic() - started)
    return 0


def listen(args: argparse.Namespace) -> int:
    """Listen for triggers until killed (tests kill it to leave its queue behind)."""
    with fb.Reader(args.stream, name=args.name, wait=10.0) as cam, cam.triggers() as inbox:
        emit(event="listening", pid=os.getpid(), queue=inbox.name)
        while True:
            trigger = inbox.receive(timeout=1.0)
            if trigger is not None:
                emit(event="trigger", label=trigger.label)


def freeze_attaching(args: argparse.Namespace) -> int:
    """Attach, but stop this very process (SIGSTOP) right after the first exclusive lock that
    attaching takes beyond the segment's own: a reader frozen in the middle of attaching."""
    from framebroker import _locks

    original = _locks.ByteLocks.try_exclusive

    def try_exclusive(self: _locks.ByteLocks, offset: int) -> bool:
        taken = original(self, offset)
        if taken and offset > 0:
            _locks.ByteLocks.try_exclusive = original  # type: ignore[method-assign]
            os.kill(os.getpid(), signal.SIGSTOP)
        return taken

    _locks.ByteLocks.try_exclusive = try_exclusive  # type: ignore[method-assign]
    with fb.Reader(args.stream, name=args.name, wait=10.0) as cam:
        emit(event="attached", seq=cam.latest(timeout=5.0).seq)
    return 0


def result_payload(seq: int) -> dict:
    """What the result writers publish for frame ``seq``: checkable from seq alone, and of a
    length that varies a lot (a torn record then shows as a bad checksum or a wrong seq)."""
    pad = (f"{seq:x}." * 4000)[: (seq * 7919) % 16000]
    return {"seq": seq, "pad": pad, "crc": zlib.crc32(pad.encode())}


def result_ok(result: "fb.Result") -> bool:
    data = result.data
    return data.get("seq") == result.seq and data.get("crc") == zlib.crc32(str(data.get("pad", "")).encode())


def write_results(args: argparse.Namespace) -> int:
    """Publish results on the stream by seq, paced at --fps (0: flat out), for --seconds.

    With --respawn N, a parent forks N writers in turn and kills each with SIGKILL at a random
    moment of its publishing (a writer killed at any instruction), then leaves the last one to
    run. With --unsafe, after each result it also scribbles into the record it just published,
    without a lock: the negative control of the integrity checks.
    """
    if args.respawn:
        rng = random.Random(args.respawn)
        for round_ in range(args.respawn):
            child = os.fork()
            if child == 0:
                os._exit(_write_results_loop(args, quiet=True))
            time.sleep(rng.uniform(0.005, 0.06))
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            emit(event="killed", round=round_ + 1)
    return _write_results_loop(args, quiet=False)


def _write_results_loop(args: argparse.Namespace, quiet: bool) -> int:
    period = 1.0 / args.fps if args.fps else 0.0
    with fb.ResultWriter(args.stream, args.model, wait=10.0) as out:
        if not quiet:
            emit(event="ready", pid=os.getpid())
        deadline = deadline_of(args.seconds)
        next_time = next_report = time.monotonic()
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            out.publish(seq, result_payload(seq), timestamp_ns=time.monotonic_ns())
            if args.unsafe:
                ring = out._ring  # noqa: SLF001 - reach past the locks on purpose (see the docstring)
                victim = ring._flat[ring._newest_slot]  # noqa: SLF001
                victim[40:48] = np.frombuffer(b"XXXXXXXX", np.uint8)
            if period:
                next_time += period
                delay = next_time - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            now = time.monotonic()
            if not quiet and now >= next_report:
                next_report = now + 0.05
                emit(event="progress", published=seq, t=now)
        if not quiet:
            emit(event="done", published=seq)
    return 0


def check_results(args: argparse.Namespace) -> int:
    """Read results (--mode ordered: every one; latest: the newest, again and again, with get()
    of it) and check each; report counts. Follows writers that die and are replaced."""
    checked = bad = restarts = 0
    first_bad = None
    last_seq = 0
    deadline = deadline_of(args.seconds)
    with fb.ResultReader(args.stream, args.model, name=args.name, wait=10.0) as results:
        emit(event="ready", pid=os.getpid())
        iterator = results.ordered(timeout=1.0)
        try:  # SIGTERM (KeyboardInterrupt here) ends the checking, not the report
            while time.monotonic() < deadline and (not args.frames or checked < args.frames):
                try:
                    if args.mode == "ordered":
                        result = next(iterator)
                    else:
                        result = results.latest(timeout=1.0)
                        again = results.get(result.seq, timeout=1.0)
                        if again is None or again.seq != result.seq or not result_ok(again):
                            bad += 1
                except (fb.FrameTimeout, fb.ResultExpired):
                    continue
                except ValueError:  # a record that is not even JSON: only an unsafe writer makes one
                    bad += 1
                    checked += 1
                    continue
                if result.seq < last_seq:
                    restarts += 1
                elif args.mode == "ordered" and result.seq == last_seq:
                    bad += 1  # the same result twice in order
                last_seq = result.seq
                checked += 1
                if not result_ok(result):
                    bad += 1
                    first_bad = first_bad or result.seq
        except KeyboardInterrupt:
            pass
        emit(event="done", checked=checked, bad=bad, first_bad=first_bad, restarts=restarts, dropped=results.dropped)
    return 0


ROLES = {
    "produce-lockstep": produce_lockstep,
    "write-results": write_results,
    "check-results": check_results,
    "listen": listen,
    "freeze-attaching": freeze_attaching,
    "produce": produce,
    "verify": verify_loop,
    "hold": hold,
    "churn": churn,
    "follow": follow,
    "idle": idle,
    "survive": survive,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("stream")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--frames", type=int, default=0)
    parser.add_argument("--fps", type=float, default=0.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--slots", type=int, default=12)
    parser.add_argument("--hold", type=int, default=1)
    parser.add_argument("--mode", default="next")
    parser.add_argument("--unsafe", action="store_true")
    parser.add_argument("--recheck", action="store_true")
    parser.add_argument("--model", default="model")
    parser.add_argument("--respawn", type=int, default=0)
    parser.add_argument("--work-ms", type=float, default=0.0)
    args = parser.parse_args()

    def on_sigterm(*_: object) -> None:
        # KeyboardInterrupt, not SystemExit: posix_ipc swallows any other exception a handler
        # raises during a semaphore wait (see fb.Reader).
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return ROLES[args.role](args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
