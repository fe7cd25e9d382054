"""What feeding a GStreamer encoder costs per frame: BGR converted by videoconvert in the child
(as the recorder did) against I420 converted by OpenCV in the recorder (as it does now).

    python bench/gst_feed.py [--sizes 720p,1080p] [--frames 120] [--reps 3] [--quick]

Each way runs for real: frames written on a pipe to a ``framebroker.gstreamer.GstProcess``
child (``fdsrc ! rawvideoparse ! ...``), as ``GStreamerEncoder`` does. Ways:

* ``bgr>bgrx``: BGR on the pipe, ``videoconvert`` to BGRx, the Jetson pipeline's CPU part
  before nvvidconv (which takes no 3-byte BGR); ``fakesink`` where nvvidconv would be.
* ``bgr>i420``: BGR on the pipe, ``videoconvert`` to I420, as the x264enc pipeline did.
* ``i420``: I420 from OpenCV's ``cvtColor`` in this process, I420 on the pipe, no conversion
  in the child (every GStreamer encoder now).
* ``bgr>i420>x264enc`` and ``i420>x264enc``: the same two ways with the software stand-in
  encoder behind them (x264enc superfast/zerolatency, as the recorder runs it).

Per frame: the parent's CPU time converting (``cvtColor``) and writing, the child's CPU time
(``getrusage`` of the reaped child: a run of ``--frames`` more frames minus a run of 30, so
start-up and the first frame cancel out), and the bytes on the pipe. Medians over ``--reps``.
The daemon's side of the Jetson change is measured too: dropping the 4th byte of a BGRx frame
(what nvvidconv delivers) with numpy's strided copy, with OpenCV, and with videoconvert in a
child. This machine is shared and noisy: compare ratios from one run, not absolute times
across runs. Writes ``bench/results/gst_feed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from framebroker import testpattern
from framebroker.gstreamer import GstProcess
from framebroker_clients.recorder.encoders import X264_PRESET, X264_TUNE, EncoderSettings, RawFeed

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080), "240p": (320, 240)}
WARM_FRAMES = 30  # the shorter run, subtracted: start-up, caps, the first frame's allocations
X264 = ["x264enc", f"speed-preset={X264_PRESET}", f"tune={X264_TUNE}", "bframes=0", "key-int-max=30", "bitrate=4000"]


def bgr_parse(width: int, height: int) -> list[str]:
    row = width * 3
    return [
        "fdsrc", "fd=0", f"blocksize={row * height}", "!",
        "rawvideoparse", "format=bgr", f"width={width}", f"height={height}", "framerate=30/1", f"plane-strides=<{row}>",
    ]  # fmt: skip


def i420_parse(feed: RawFeed, width: int, height: int) -> list[str]:
    return [
        "fdsrc", "fd=0", f"blocksize={feed.frame_bytes}", "!",
        "rawvideoparse", "format=i420", f"width={width}", f"height={height}", "framerate=30/1",
        f"plane-strides=<{','.join(map(str, feed.strides))}>", f"plane-offsets=<{','.join(map(str, feed.offsets))}>",
        "!", *feed.caps(),
    ]  # fmt: skip


class Way:
    """One way of feeding: the pipeline, the frames, and what this process does to a frame
    before writing it."""

    def __init__(
        self, name: str, pipeline: list[str], frames: list[np.ndarray], convert: Optional[Callable[[np.ndarray], np.ndarray]] = None
    ) -> None:
        self.name = name
        self.pipeline = pipeline
        self.frames = frames
        self.convert = convert


def ways(width: int, height: int) -> list[Way]:
    import cv2

    feed = RawFeed(EncoderSettings(width=width, height=height))
    bgr = bgr_parse(width, height)
    i420 = i420_parse(feed, width, height)
    frames = [testpattern.render(n, (height, width, 3)) for n in range(1, 5)]
    bgrx = [cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA) for frame in frames]
    bgrx_parse = [
        "fdsrc", "fd=0", f"blocksize={width * 4 * height}", "!",
        "rawvideoparse", "format=bgrx", f"width={width}", f"height={height}", "framerate=30/1",
    ]  # fmt: skip
    return [
        Way("bgr>bgrx", [*bgr, "!", "videoconvert", "!", "video/x-raw,format=BGRx", "!", "fakesink"], frames),
        Way("bgr>i420", [*bgr, "!", "videoconvert", "!", "video/x-raw,format=I420", "!", "fakesink"], frames),
        Way("i420", [*i420, "!", "fakesink"], frames, feed.convert),
        Way("bgr>i420>x264enc", [*bgr, "!", "videoconvert", "!", "video/x-raw,format=I420", "!", *X264, "!", "fakesink"], frames),
        Way("i420>x264enc", [*i420, "!", *X264, "!", "fakesink"], frames, feed.convert),
        # The daemon's side: BGRx as nvvidconv delivers it, passed on, or made BGR by videoconvert.
        Way("bgrx", [*bgrx_parse, "!", "fakesink"], bgrx),
        Way("bgrx>bgr", [*bgrx_parse, "!", "videoconvert", "!", "video/x-raw,format=BGR", "!", "fakesink"], bgrx),
    ]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(way: Way, count: int) -> dict:
    """Feed ``count`` frames; our CPU per frame (convert, write) and the child's CPU in total."""
    before = children_cpu()
    convert_s: list[float] = []
    write_s: list[float] = []
    sent = 0
    with GstProcess(way.pipeline, name=f"bench {way.name}", stdin=subprocess.PIPE) as child:
        assert child.stdin is not None
        for n in range(count):
            image = way.frames[n % len(way.frames)]
            start = time.thread_time()
            data = way.convert(image) if way.convert is not None else image
            middle = time.thread_time()
            child.stdin.write(data.data)
            child.stdin.flush()
            end = time.thread_time()
            convert_s.append(middle - start)
            write_s.append(end - middle)
            sent = data.nbytes
        child.stdin.close()
        code = child.wait(300)
        if code != 0:
            raise SystemExit(f"{way.name}: the pipeline failed (exit {code}): {child.error()}")
    return {"child_s": children_cpu() - before, "convert_s": convert_s, "write_s": write_s, "bytes": sent}


def measure_way(way: Way, count: int) -> dict:
    short = run(way, WARM_FRAMES)
    long = run(way, WARM_FRAMES + count)
    return {
        "convert_ms": 1000 * statistics.median(long["convert_s"]),
        "write_ms": 1000 * statistics.median(long["write_s"]),
        "child_ms": 1000 * max(0.0, long["child_s"] - short["child_s"]) / count,
        "pipe_bytes": long["bytes"],
    }


def drop_fourth_byte(width: int, height: int, reps: int) -> dict:
    """ms per frame to turn a BGRx frame into BGR in this process (numpy, OpenCV)."""
    import cv2

    source = np.random.default_rng(1).integers(0, 256, (height, width, 4), np.uint8)
    out = np.empty((height, width, 3), np.uint8)
    timings: dict[str, list[float]] = {"numpy_strided_copy": [], "opencv_cvtcolor": []}
    for _ in range(reps * 20):
        start = time.perf_counter()
        np.copyto(out, source[:, :, :3])
        middle = time.perf_counter()
        cv2.cvtColor(source, cv2.COLOR_BGRA2BGR, dst=out)
        timings["numpy_strided_copy"].append(middle - start)
        timings["opencv_cvtcolor"].append(time.perf_counter() - middle)
    return {key: 1000 * statistics.median(values) for key, values in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="720p,1080p", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a few frames at 240p: checks that it runs, measures nothing")
    parser.add_argument("--output", type=Path, help="where to write the JSON summary (default bench/results/gst_feed.json; none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.frames, args.reps = "240p", 5, 1
    elif args.output is None:
        args.output = RESULTS / "gst_feed.json"
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "frames": args.frames,
        "reps": args.reps,
        "sizes": {},
    }
    for size in args.sizes.split(","):
        width, height = SIZES[size]
        runs: dict[str, list[dict]] = {}
        all_ways = ways(width, height)
        for _ in range(args.reps):
            for way in all_ways:
                runs.setdefault(way.name, []).append(measure_way(way, args.frames))
        medians = {name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in runs.items()}
        for figures in medians.values():
            figures["total_ms"] = figures["convert_ms"] + figures["write_ms"] + figures["child_ms"]

        drop = drop_fourth_byte(width, height, args.reps)

        def ratio(before: str, after: str) -> float:
            return round(medians[before]["total_ms"] / medians[after]["total_ms"], 2)

        report["sizes"][size] = {
            "width": width,
            "height": height,
            "ms_per_frame": {name: {key: round(value, 3) for key, value in figures.items()} for name, figures in medians.items()},
            "ratios": {
                "jetson_feed bgr>bgrx / i420": ratio("bgr>bgrx", "i420"),
                "feed bgr>i420 / i420": ratio("bgr>i420", "i420"),
                "x264enc bgr>i420>x264enc / i420>x264enc": ratio("bgr>i420>x264enc", "i420>x264enc"),
                # What videoconvert adds in the child, against OpenCV dropping the byte in the daemon.
                "drop 4th byte: videoconvert / opencv": round((medians["bgrx>bgr"]["child_ms"] - medians["bgrx"]["child_ms"]) / drop["opencv_cvtcolor"], 1),
            },
            "drop_fourth_byte_ms": {key: round(value, 3) for key, value in drop.items()},
        }
        print(f"{size} ({width}x{height}), ms per frame, median of {args.reps} runs of {args.frames} frames:")
        print(f"  {'way':<18} {'convert':>8} {'write':>8} {'child':>8} {'total':>8} {'pipe KiB':>9}")
        for name, figures in medians.items():
            print(
                f"  {name:<18} {figures['convert_ms']:>8.2f} {figures['write_ms']:>8.2f} {figures['child_ms']:>8.2f}"
                f" {figures['total_ms']:>8.2f} {figures['pipe_bytes'] / 1024:>9.0f}"
            )
        for label, value in report["sizes"][size]["ratios"].items():
            print(f"  {label}: {value}")
        print(f"  drop the 4th byte in the daemon: {report['sizes'][size]['drop_fourth_byte_ms']}")
    if args.output is not None:
        args.output.parent.mkdir(exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
