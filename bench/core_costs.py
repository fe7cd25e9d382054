"""Per-frame cost of the two calls on the frame path: ``Publisher.publish()`` and ``Reader.latest()``.

    python bench/core_costs.py [--width 1920 --height 1080] [--reps 5] [--frames 300]

Everything runs in one process so the clock is the same for both sides; each figure is the
median over ``--reps`` repetitions of the median over ``--frames`` calls (this machine is shared
and noisy: compare ratios measured in the same run, not absolute times across runs). Writes
``bench/results/core_costs-WxH.json``. The comparison with other transports is ``bench/compare.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid
from pathlib import Path

import numpy as np

import framebroker as fb
from framebroker import testpattern

RESULTS = Path(__file__).resolve().parent / "results"


def _median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000.0


def measure(width: int, height: int, frames: int, idle_s: float) -> dict[str, float]:
    shape = (height, width, 3)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    clock = time.perf_counter_ns
    sources = [testpattern.render(n, shape) for n in range(1, 5)]
    results: dict[str, list[int]] = {k: [] for k in ("copy_cold", "copy_warm", "publish", "publish_1_reader", "slot_write", "latest_new", "latest_same", "latest_after_idle")}
    with fb.Publisher(name, shape=shape, slots=8) as pub:
        # A bare numpy copy into shared memory, into a slot last written 6 frames ago (cold)
        # and into the same slot again (warm): the yardsticks for publish().
        views = pub._views  # noqa: SLF001 - the raw slots, for the yardstick only
        for i in range(frames):
            src = sources[i % 4]
            start = clock()
            np.copyto(views[i % 6], src)
            results["copy_cold"].append(clock() - start)
            start = clock()
            np.copyto(views[7], src)
            results["copy_warm"].append(clock() - start)
        for i in range(frames):
            src = sources[i % 4]
            start = clock()
            pub.publish(src)
            results["publish"].append(clock() - start)
        with fb.Reader(name, name="bench") as cam:
            for i in range(frames):
                src = sources[i % 4]
                start = clock()
                pub.publish(src)
                results["publish_1_reader"].append(clock() - start)
                start = clock()
                frame = cam.latest()
                results["latest_new"].append(clock() - start)
                start = clock()
                cam.latest()
                results["latest_same"].append(clock() - start)
                assert frame.array.shape == shape
            for i in range(frames):
                start = clock()
                writer = pub.slot()
                with writer:
                    pass  # a source that decodes into the slot would write here
                results["slot_write"].append(clock() - start)
            for i in range(min(frames, 60)):
                pub.publish(sources[i % 4])
                time.sleep(idle_s)  # a frame period of idling: caches and branch predictors go cold
                start = clock()
                cam.latest()
                results["latest_after_idle"].append(clock() - start)
    return {key: _median_us(values) for key, values in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--idle", type=float, default=1 / 30, help="idle time before the 'after idle' latest() calls")
    args = parser.parse_args()
    runs = [measure(args.width, args.height, args.frames, args.idle) for _ in range(args.reps)]
    summary = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    rows = [
        ("numpy copy into a cold slot", "copy_cold"),
        ("numpy copy into a warm slot", "copy_warm"),
        ("publish(), no reader", "publish"),
        ("publish(), 1 reader attached", "publish_1_reader"),
        ("pub.slot() in place (no copy)", "slot_write"),
        ("latest(), a new frame each call", "latest_new"),
        ("latest(), same frame again", "latest_same"),
        ("latest(), after a frame period idle", "latest_after_idle"),
    ]
    print(f"framebroker core costs, {args.width}x{args.height} BGR, median of {args.reps} x {args.frames} calls")
    print(f"{'call':<38} {'us':>9}")
    for label, key in rows:
        print(f"{label:<38} {summary[key]:>9.1f}")
    ratio_cold = summary["publish"] / summary["copy_cold"]
    ratio_warm = summary["publish"] / summary["copy_warm"]
    print(f"publish() / cold copy: {ratio_cold:.2f}   publish() / warm copy: {ratio_warm:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"core_costs-{args.width}x{args.height}.json"
    out.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
                "width": args.width,
                "height": args.height,
                "reps": args.reps,
                "frames": args.frames,
                "median_us": summary,
                "runs_us": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
