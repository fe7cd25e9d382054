"""The code that runs in the benchmark's child processes: one producer and N readers per run.

It is the same for every transport; a transport only supplies ``publish`` and ``wait_next``
(``transports/__init__.py``). ``compare.py`` starts these functions with multiprocessing's
``spawn`` method, so every process starts fresh and nothing is inherited by a fork.

The producer's timeline (readers classify frames by the phase stamped into them,
``frame_identity.py``):

1. **warm-up**: a frame every ``WARMUP_PERIOD`` until every reader has received one (so late
   joiners such as zmq subscribers are connected before anything is measured), then
   ``WARMUP_BURST_S`` flat out so every buffer the transport uses in steady state is mapped;
2. **idle**: ``idle_s`` without frames. The orchestrator reads every reader's CPU time at
   both ends of this window. The producer meanwhile times bare numpy copies of a frame
   (``_bare_copies``), at the run's frame rate and back to back: the yardsticks for its
   publish cost at 30 fps and flat out;
3. per repetition: **latency**, ``latency_frames`` frames paced at ``fps`` (readers record
   usable-time minus the pre-write timestamp); then **throughput**, publishing back to back
   for ``throughput_s``;
4. **integrity**, back to back for ``integrity_s`` while readers hold each frame for
   ``hold_s``: the case where a frame can change under a reader that holds it;
5. **end** frames until the orchestrator has every reader's report.

Readers hold each latency and integrity frame for ``hold_s`` (simulated work) before checking
it again; throughput frames are checked twice at once, so holding does not cap the rate.
Garbage collection is off while measuring: it would pause transports at random.
"""

from __future__ import annotations

import gc
import itertools
import mmap
import os
import resource
import time
import traceback
from typing import Any, Iterator, Optional

import numpy as np

import transports
from frame_identity import (
    FILLS,
    KIND_END,
    KIND_INTEGRITY,
    KIND_LATENCY,
    KIND_NAMES,
    KIND_THROUGHPUT,
    KIND_WARMUP,
    REP_SHIFT,
    FrameCheck,
    SourceFrames,
    frame_number,
)
from transports import RunSpec

WARMUP_PERIOD = 0.02
WARMUP_BURST_S = 0.2
END_PERIOD = 0.02
# How long the producer waits for every reader to receive a warm-up frame, and for every
# report once the end frames go out (seconds).
READY_TIMEOUT = 60.0
END_TIMEOUT = 30.0
# How often a waiting reader looks at the stop flag (seconds): longer than the idle window, so
# the idle CPU measured is the transport's own, not this loop's.
WAIT_STEP = 2.0
# Quiet time after the warm-up burst before the idle window opens (readers drain backlogs).
IDLE_SETTLE_S = 0.1
COLD_DESTINATIONS = 8
MIN_PACED_COPIES = 6
FLAT_WARMUP = 10
FLAT_COPIES = 40


def cpu_seconds() -> float:
    """CPU time of this process, every thread included (zmq I/O threads, Queue feeder threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize_ns(samples: list[int]) -> dict[str, Optional[float]]:
    """p50/p99/max/mean in microseconds."""
    if not samples:
        return {"n": 0, "p50_us": None, "p99_us": None, "max_us": None, "mean_us": None}
    values = np.asarray(samples, dtype=np.float64) / 1000.0
    return {
        "n": len(samples),
        "p50_us": float(np.percentile(values, 50)),
        "p99_us": float(np.percentile(values, 99)),
        "max_us": float(values.max()),
        "mean_us": float(values.mean()),
    }


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# --- producer -----------------------------------------------------------------------------------


def producer_main(spec: RunSpec, resources: Any, control: dict[str, Any], results: Any) -> None:
    """``control``: events the orchestrator sets: ``go`` (every reader has a frame),
    ``idle_start``/``idle_end`` (it has sampled the readers' CPU), ``done`` (it has every report)."""
    try:
        _run_producer(spec, resources, control, results)
    except BaseException:
        results.put(("error", "producer", -1, traceback.format_exc()))


def _run_producer(spec: RunSpec, resources: Any, control: dict[str, Any], results: Any) -> None:
    go, done = control["go"], control["done"]
    module = transports.load(spec.transport)
    sources = SourceFrames(spec.shape)
    producer = module.Producer(spec, resources)
    try:
        results.put(("producer_ready", os.getpid()))
        counter = itertools.count(1)
        warmup = 0
        deadline = time.monotonic() + READY_TIMEOUT
        while not go.wait(WARMUP_PERIOD):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every reader received a frame within {READY_TIMEOUT} s")
            _publish(producer, sources, frame_number(KIND_WARMUP, 0, next(counter)))
            warmup += 1
        # Flat out for a moment: the transport touches the slots, chunks and buffers it uses in
        # steady state (first touches page-fault), so no measured phase pays for them.
        burst = _full_speed_phase(producer, sources, counter, KIND_WARMUP, 0, WARMUP_BURST_S)
        gc.collect()
        gc.disable()
        report: dict[str, Any] = {"pid": os.getpid(), "warmup_frames": warmup + burst["frames"]}
        # The idle window: the orchestrator samples every reader's CPU at both ends, while the
        # readers wait for a frame and nothing else (their own timeouts are longer than this).
        time.sleep(IDLE_SETTLE_S)
        _handshake(results, control["idle_start"], "idle_start")
        report["bare_copy"] = _bare_copies(sources, spec)
        _handshake(results, control["idle_end"], "idle_end")
        reps = []
        for rep in range(spec.reps):
            latency = _paced_phase(producer, sources, counter, rep, spec)
            time.sleep(spec.settle_s)
            throughput = _full_speed_phase(producer, sources, counter, KIND_THROUGHPUT, rep, spec.throughput_s)
            time.sleep(spec.settle_s)
            reps.append({"latency": latency, "throughput": throughput})
        report["reps"] = reps
        report["integrity"] = _full_speed_phase(producer, sources, counter, KIND_INTEGRITY, 0, spec.integrity_s)
        time.sleep(spec.settle_s)
        deadline = time.monotonic() + END_TIMEOUT
        while not done.wait(END_PERIOD) and time.monotonic() < deadline:
            _publish(producer, sources, frame_number(KIND_END, 0, next(counter)))
        report["transport_drops"] = getattr(producer, "dropped", None)
        gc.enable()
        results.put(("producer", report))
    finally:
        producer.close()


def _handshake(results: Any, event: Any, name: str) -> None:
    results.put((name, 0, time.monotonic_ns()))
    if not event.wait(READY_TIMEOUT):
        raise TimeoutError(f"the orchestrator did not answer {name!r} within {READY_TIMEOUT} s")


def _publish(producer: transports.ProducerEnd, sources: SourceFrames, n: int) -> int:
    """Publish frame ``n``; return the nanoseconds it took, stamping included."""
    clock = time.monotonic_ns
    timestamp = clock()  # before anything is written: the copy counts as latency
    producer.publish(sources.stamped(n, timestamp), timestamp)
    return clock() - timestamp


def _bare_copies(sources: SourceFrames, spec: RunSpec) -> dict[str, Any]:
    """Time ``np.copyto`` of a frame, the yardstick for ``publish``.

    At the run's frame rate, in turn: into one shared-memory buffer (``warm``: the same one each
    time, as the naive baseline writes), into eight in turn (``cold``), and into private memory
    (``private``: numpy may back it with huge pages, which shared memory does not get, so it is
    faster than any copy a shared-memory transport can make). Then back to back into the warm
    shared buffer (``flat``) and private memory (``flat_private``), for publishing flat out.
    Shared buffers are anonymous ``MAP_SHARED`` mappings: the same shmem pages as ``/dev/shm``.
    """

    def shared() -> np.ndarray:
        mapping = mmap.mmap(-1, spec.nbytes)
        array = np.ndarray(spec.shape, np.uint8, buffer=mapping)
        array.fill(1)  # map every page now: first-touch page faults are not copying
        return array

    destinations = {"warm": [shared()], "cold": [shared() for _ in range(COLD_DESTINATIONS)], "private": [np.full(spec.shape, 1, np.uint8)]}
    samples: dict[str, list[int]] = {kind: [] for kind in destinations}
    kinds = list(destinations)
    period = 1.0 / spec.fps
    ticks = max(3 * MIN_PACED_COPIES, int(spec.idle_s * spec.fps))
    clock = time.perf_counter_ns
    next_tick = time.monotonic()
    for tick in range(ticks):
        _sleep_until(next_tick)
        next_tick += period
        kind = kinds[tick % len(kinds)]
        targets = destinations[kind]
        destination = targets[(tick // len(kinds)) % len(targets)]
        source = sources.frames[tick % len(FILLS)]
        start = clock()
        np.copyto(destination, source)
        samples[kind].append(clock() - start)
    for kind, destination in (("flat", destinations["warm"][0]), ("flat_private", destinations["private"][0])):
        samples[kind] = []
        for tick in range(FLAT_WARMUP + FLAT_COPIES):
            start = clock()
            np.copyto(destination, sources.frames[tick % len(FILLS)])
            if tick >= FLAT_WARMUP:  # the first copies after idling run slow, as any code does
                samples[kind].append(clock() - start)
    return {kind: summarize_ns(values) for kind, values in samples.items()}


def _paced_phase(producer: transports.ProducerEnd, sources: SourceFrames, counter: Iterator[int], rep: int, spec: RunSpec) -> dict[str, Any]:
    period = 1.0 / spec.fps
    durations = []
    cpu_start = cpu_seconds()
    start = time.monotonic_ns()
    next_tick = time.monotonic()
    for _ in range(spec.latency_frames):
        _sleep_until(next_tick)
        durations.append(_publish(producer, sources, frame_number(KIND_LATENCY, rep, next(counter))))
        next_tick += period
        now = time.monotonic()
        if now > next_tick + period:
            next_tick = now  # fell behind (a slow transport): no bursts to catch up
    end = time.monotonic_ns()
    return {
        "frames": len(durations),
        "duration_s": (end - start) / 1e9,
        "publish": summarize_ns(durations),
        "cpu_s": cpu_seconds() - cpu_start,
        "start_ns": start,
        "end_ns": end,
    }


def _full_speed_phase(producer: transports.ProducerEnd, sources: SourceFrames, counter: Iterator[int], kind: int, rep: int, seconds: float) -> dict[str, Any]:
    durations = []
    cpu_start = cpu_seconds()
    start = time.monotonic_ns()
    stop_at = start + int(seconds * 1e9)
    while time.monotonic_ns() < stop_at:
        durations.append(_publish(producer, sources, frame_number(kind, rep, next(counter))))
    end = time.monotonic_ns()
    duration = (end - start) / 1e9
    return {
        "frames": len(durations),
        "duration_s": duration,
        "fps": len(durations) / duration if duration > 0 else None,
        "publish": summarize_ns(durations),
        "cpu_s": cpu_seconds() - cpu_start,
        "start_ns": start,
        "end_ns": end,
    }


# --- reader ---------------------------------------------------------------------------------------


class _Group:
    """What one reader saw of one phase of one repetition."""

    __slots__ = ("key", "cpu_start", "first_ns", "last_ns", "frames", "torn", "changed", "latency_ns")

    def __init__(self, key: int, cpu_start: float, now: int) -> None:
        self.key = key
        self.cpu_start = cpu_start
        self.first_ns = now
        self.last_ns = now
        self.frames = 0
        self.torn = 0
        self.changed = 0
        self.latency_ns: list[int] = []


def reader_main(spec: RunSpec, resources: Any, index: int, stop: Any, results: Any) -> None:
    try:
        _run_reader(spec, resources, index, stop, results)
    except BaseException:
        results.put(("error", "reader", index, traceback.format_exc()))


def _run_reader(spec: RunSpec, resources: Any, index: int, stop: Any, results: Any) -> None:
    module = transports.load(spec.transport)
    check = FrameCheck(spec.shape)
    port = module.Reader(spec, resources, index)
    gc.collect()
    gc.disable()
    try:
        groups: dict[int, _Group] = {}
        repeats = 0
        last_n = -1
        hold_s = spec.hold_s
        clock = time.monotonic_ns
        ended = False
        while True:
            array = port.wait_next(WAIT_STEP)
            now = clock()
            if array is None:
                if stop.is_set():
                    break
                continue
            head, tail, spots = check.read(array)
            n = head[0]
            if n == last_n:
                repeats += 1  # woken for a frame already seen (naive: a post that raced a read)
                continue
            last_n = n
            key = n >> REP_SHIFT
            kind = key >> 8
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(key, cpu_seconds(), now)
                if len(groups) == 1:
                    results.put(("reader_ready", index, mapping_of(array)))
            group.frames += 1
            group.last_ns = now
            if kind == KIND_LATENCY:
                group.latency_ns.append(now - head[1])
            if check.torn(head, tail, spots):
                group.torn += 1
            if hold_s > 0 and (kind == KIND_LATENCY or kind == KIND_INTEGRITY):
                time.sleep(hold_s)
            if check.read(array) != (head, tail, spots):
                group.changed += 1
            if kind == KIND_END:
                ended = True
                break
        end_cpu = cpu_seconds()
        gc.enable()
        ordered = list(groups.values())
        report_groups = []
        for position, group in enumerate(ordered):
            following = ordered[position + 1].cpu_start if position + 1 < len(ordered) else end_cpu
            kind = group.key >> 8
            entry = {
                "kind": KIND_NAMES.get(kind, str(kind)),
                "rep": group.key & 0xFF,
                "frames": group.frames,
                "torn": group.torn,
                "changed": group.changed,
                "first_ns": group.first_ns,
                "last_ns": group.last_ns,
                # from this phase's first frame to the next phase's first frame
                "cpu_s": following - group.cpu_start,
            }
            if kind == KIND_LATENCY:
                entry["latency_us"] = [round(value / 1000.0, 1) for value in group.latency_ns]
            report_groups.append(entry)
        results.put(("reader", index, {"pid": os.getpid(), "ended": ended, "repeats": repeats, "groups": report_groups}))
    finally:
        port.close()


def mapping_of(array: np.ndarray) -> dict[str, Any]:
    """Where the array's bytes live, from ``/proc/self/maps``: zero-copy means a shared, file-backed
    mapping (``/dev/shm/...``), not something assumed from the transport's documentation."""
    address = array.__array_interface__["data"][0]
    end_address = address + array.nbytes
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(value, 16) for value in fields[0].split("-"))
            if start <= address < end:
                perms = fields[1]
                path = fields[5].strip() if len(fields) > 5 else ""
                shared = perms[3] == "s"
                return {
                    "zero_copy": shared and path.startswith("/") and end_address <= end,
                    "path": path or "(anonymous)",
                    "perms": perms,
                    "shared": shared,
                    "array_writable": bool(array.flags.writeable),
                }
    return {"zero_copy": False, "path": None, "perms": None, "shared": False, "array_writable": bool(array.flags.writeable)}


def process_cpu_seconds(pid: int) -> Optional[float]:
    """CPU time of another process, every thread, in nanosecond resolution (``schedstat``);
    None if it has gone."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9
