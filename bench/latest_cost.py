"""What ``Reader.latest()`` costs by itself, at several frame sizes (framebroker only, on either
frame path).

One process holds a Publisher and a Reader of the same stream, so the call is all that is
measured. For each size:

* ``calls`` times back to back: a new frame is published by writing one byte in place
  (``pub.slot()``, so no 6-25 MB copy flushes the caches between calls), then ``latest()`` is
  timed on the new frame, then its first ``.array`` (the view is built lazily), then
  ``latest()`` again on the same frame;
* ``calls`` times after a full ``publish()`` of the frame: the same call when the copy has just
  evicted most of the cache (what a reader on a busy 2-core machine meets);
* ``idle_calls`` times after publishing and sleeping one frame period: caches and branch
  predictors cold, the same code several times slower; what a 30 fps reader meets every frame.
"""

from __future__ import annotations

import time
import traceback
import uuid
from typing import Any

import numpy as np

import framebroker as fb
from driver import summarize_ns
from frame_identity import SourceFrames
from transports.framebroker_ring import choose_path


def measure(shape: tuple[int, int, int], calls: int, idle_calls: int, period: float) -> dict[str, Any]:
    stream = f"fbbench-latest-{uuid.uuid4().hex[:10]}"
    sources = SourceFrames(shape).frames
    clock = time.perf_counter_ns
    new_ns, array_ns, same_ns, copied_ns, idle_ns = [], [], [], [], []
    with fb.Publisher(stream, shape=shape, fps=1.0 / period) as publisher, fb.Reader(stream, name="latest-cost") as reader:
        for i in range(calls):
            with publisher.slot() as buffer:
                buffer[0, 0, 0] = i & 0xFF
            start = clock()
            frame = reader.latest()
            middle = clock()
            _view = frame.array  # built lazily: its first access is part of a usable frame
            end = clock()
            reader.latest()
            again = clock()
            new_ns.append(middle - start)
            array_ns.append(end - middle)
            same_ns.append(again - end)
        for i in range(calls):
            publisher.publish(sources[i % len(sources)])
            start = clock()
            reader.latest()
            copied_ns.append(clock() - start)
        for i in range(idle_calls):
            publisher.publish(sources[i % len(sources)])
            time.sleep(period)
            start = clock()
            reader.latest()
            idle_ns.append(clock() - start)
    return {
        "new_frame": summarize_ns(new_ns),
        "array_view": summarize_ns(array_ns),
        "same_frame": summarize_ns(same_ns),
        "after_publish": summarize_ns(copied_ns),
        "after_idle": summarize_ns(idle_ns),
    }


def child_main(transport: str, shapes: list[tuple[int, int, int]], reps: int, calls: int, idle_calls: int, period: float, results: Any) -> None:
    """Entry point of the spawned process: every size, ``reps`` times, sizes interleaved, on the
    frame path of ``transport`` (``framebroker`` or ``framebroker-pure``)."""
    try:
        choose_path(transport)
        runs: dict[str, list[dict[str, Any]]] = {f"{s[1]}x{s[0]}": [] for s in shapes}
        for _ in range(reps):
            for shape in shapes:
                runs[f"{shape[1]}x{shape[0]}"].append(measure(shape, calls, idle_calls, period))
        results.put(("latest", 0, runs))
    except BaseException:
        results.put(("error", "latest", -1, traceback.format_exc()))


def median_of(runs: list[dict[str, Any]], key: str, stat: str = "p50_us") -> float:
    return float(np.median([run[key][stat] for run in runs]))
