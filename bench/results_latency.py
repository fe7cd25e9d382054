"""Results channel: publish -> get() latency across processes, and the writer's cost per result.

A producer process publishes small frames at --fps; a writer process publishes one result per
frame (a typical detector's: a few boxes, ~300 bytes of JSON) with ``ResultWriter.publish(frame,
...)``, timing each call; 1, then 4, reader processes each ask ``get(seq)`` for the next frame's
result and sleep in the kernel until it is there. A reader's latency is the time from the
result's ``published_ns`` (taken inside ``publish``, just before the record is written) to the
moment ``get`` returns it, both on CLOCK_MONOTONIC of this one machine. Medians and p99 over all
readers, per reader count, in one run; JSON in bench/results/results_latency.json.

    python bench/results_latency.py [--fps 30] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

import framebroker as fb

HERE = Path(__file__).resolve().parent
OBJECTS = [{"box": [120 + i, 80, 64, 64], "label": "face", "score": 0.91, "id": i} for i in range(4)]


def _producer(stream: str, fps: float, seconds: float, ready: Any) -> None:
    with fb.Publisher(stream, shape=(120, 160, 3), fps=fps) as pub:
        ready.set()
        frame = np.zeros((120, 160, 3), np.uint8)
        period = 1.0 / fps
        next_time = time.monotonic()
        deadline = next_time + seconds + 3.0
        while time.monotonic() < deadline:
            pub.publish(frame)
            next_time += period
            time.sleep(max(0.0, next_time - time.monotonic()))


def _writer(stream: str, seconds: float, ready: Any, out: Any) -> None:
    costs: List[int] = []
    with fb.Reader(stream, name="bench-model", wait=10.0) as cam, fb.ResultWriter(stream, "bench") as writer:
        ready.set()
        deadline = time.monotonic() + seconds + 1.0
        for frame in cam:
            start = time.perf_counter_ns()
            writer.publish(frame, {"objects": OBJECTS})
            costs.append(time.perf_counter_ns() - start)
            if time.monotonic() > deadline:
                break
    out.put(costs)


def _reader(stream: str, seconds: float, ready: Any, out: Any) -> None:
    latencies: List[int] = []
    with fb.ResultReader(stream, "bench", name="bench-join", wait=10.0) as results:
        seq = results.latest(timeout=10.0).seq + 1
        ready.set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            result = results.get(seq, timeout=2.0)
            now = time.monotonic_ns()
            if result is not None:
                latencies.append(now - result.published_ns)
            seq += 1
    out.put(latencies)


def _percentile(values: List[int], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] / 1000.0


def run(readers: int, fps: float, seconds: float) -> Dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    stream = f"fbbench-results-{uuid.uuid4().hex[:8]}"
    events = [context.Event() for _ in range(readers + 2)]
    queue = context.Queue()
    writer_queue = context.Queue()
    producer = context.Process(target=_producer, args=(stream, fps, seconds + readers, events[0]))
    producer.start()
    events[0].wait(20)
    writer = context.Process(target=_writer, args=(stream, seconds + readers, events[1], writer_queue))
    writer.start()
    events[1].wait(20)
    procs = [context.Process(target=_reader, args=(stream, seconds, events[2 + i], queue)) for i in range(readers)]
    for proc in procs:
        proc.start()
    latencies: List[int] = []
    for _ in procs:
        latencies.extend(queue.get(timeout=seconds + 60))
    costs = writer_queue.get(timeout=seconds + 60)
    for proc in [*procs, writer, producer]:
        proc.join(timeout=30)
    return {
        "readers": readers,
        "results_joined": len(latencies),
        "latency_p50_us": round(_percentile(latencies, 0.5), 1),
        "latency_p99_us": round(_percentile(latencies, 0.99), 1),
        "publish_cost_median_us": round(statistics.median(costs) / 1000.0, 1),
        "publish_cost_p99_us": round(_percentile(costs, 0.99), 1),
        "payload_bytes": len(json.dumps({"objects": OBJECTS}, separators=(",", ":"))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--output", default=str(HERE / "results" / "results_latency.json"))
    args = parser.parse_args()
    rows = [run(n, args.fps, args.seconds) for n in (1, 4)]
    print(f"{'readers':>7} {'joined':>7} {'p50 us':>8} {'p99 us':>8} {'publish us (median / p99)':>28}")
    for row in rows:
        print(
            f"{row['readers']:>7} {row['results_joined']:>7} {row['latency_p50_us']:>8} {row['latency_p99_us']:>8} "
            f"{row['publish_cost_median_us']:>14} / {row['publish_cost_p99_us']}"
        )
    target = all(r["latency_p50_us"] < 200 and r["latency_p99_us"] < 1000 for r in rows)
    print(f"target (p50 under 200 us, p99 under 1 ms): {'met' if target else 'NOT met'}")
    document = {
        "settings": vars(args),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
        "target_met": target,
    }
    Path(args.output).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
