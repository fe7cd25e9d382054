"""What writing into more distinct buffers costs: the copy of a frame into 1, 2, 3, 4, 6 rotating
destinations (the naive baseline rewrites one buffer; a ring that never tears needs at least two).

    python bench/slot_rotation.py [--width 1920 --height 1080] [--frames 600]

Prints the median copy time per rotation width, all measured in one run (compare ratios only).
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--frames", type=int, default=600)
    args = parser.parse_args()
    size = args.width * args.height * 3
    # Shared mappings, like the ring's slots; three sources, like a camera's changing frames.
    buffers = [np.frombuffer(mmap.mmap(-1, size), np.uint8) for _ in range(6)]
    for buffer in buffers:
        buffer[:] = 1
    sources = [np.full(size, value, np.uint8) for value in range(3)]
    print(f"copy of a {args.width}x{args.height} BGR frame, median of {args.frames}")
    for width in (1, 2, 3, 4, 6):
        samples = []
        for index in range(args.frames):
            started = time.perf_counter_ns()
            np.copyto(buffers[index % width], sources[index % 3])
            samples.append(time.perf_counter_ns() - started)
        print(f"rotating over {width} destination(s): {statistics.median(samples) / 1000:7.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
