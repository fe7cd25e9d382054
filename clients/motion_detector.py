"""Example ML consumer: reports moving regions by differencing consecutive frames.

Keeps a small grey copy of the previous frame (the only copy it makes) and prints what changed
(how many regions, the largest one's box) with the frame's number and how old the frame is when
the result is ready, whenever motion starts, stops, or once a second while it goes on.
"""

from __future__ import annotations

import argparse
from typing import Optional

import numpy as np

from ._common import Every, add_wait_option, age_ms, exit_on_sigterm, fresh_frames, open_reader, say

WORK_WIDTH = 320  # analyse at this width: motion needs no more, and it keeps the CPU cost small


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="stream to read")
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames (default: run until the stream ends)")
    parser.add_argument("--threshold", type=int, default=25, help="grey-level change that counts as motion (default 25)")
    parser.add_argument("--min-area", type=int, default=40, help="smallest region reported, in pixels at 320 px width")
    parser.add_argument("--reader-name", default="motion", help="name shown by framebroker status")
    add_wait_option(parser, 10.0)


def main(args: argparse.Namespace) -> int:
    import cv2

    exit_on_sigterm()
    previous: Optional[np.ndarray] = None
    moving = False
    processed = 0
    summary = Every(1.0)
    with open_reader(args.name, args.reader_name, args.wait, "motion") as cam:
        say(f"motion: reading stream {args.name!r}")
        for frame in fresh_frames(cam, "motion"):
            with frame:
                image = frame.array
                scale = WORK_WIDTH / image.shape[1]
                size = (WORK_WIDTH, max(1, round(image.shape[0] * scale)))
                small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                seq, captured_ns = frame.seq, frame.timestamp_ns
            gray = small if small.ndim == 2 else cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
            processed += 1
            if previous is None or previous.shape != gray.shape:
                previous = gray
                continue
            diff = cv2.absdiff(gray, previous)
            previous = gray
            _, mask = cv2.threshold(diff, args.threshold, 255, cv2.THRESH_BINARY)
            mask = cv2.dilate(mask, None, iterations=2)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            boxes = [cv2.boundingRect(c) for c in contours if cv2.contourArea(c) >= args.min_area]
            now_moving = bool(boxes)
            if now_moving != moving or (now_moving and summary()):
                latency = f"result {age_ms(captured_ns):.0f} ms after capture"
                if now_moving:
                    x, y, w, h = (round(value / scale) for value in max(boxes, key=lambda box: box[2] * box[3]))
                    regions = f"{len(boxes)} moving region{'s' if len(boxes) > 1 else ''}"
                    say(f"motion: frame {seq}: {regions}, largest {w}x{h} at ({x}, {y}); {latency}")
                else:
                    say(f"motion: frame {seq}: still; {latency}")
            moving = now_moving
            if args.frames and processed >= args.frames:
                say(f"motion: done after {processed} frames")
                return 0
    return 0
