"""Example ML consumer: reports moving regions by differencing consecutive frames.

Keeps a small grey copy of the previous frame (the only copy it makes). Publishes the moving
regions of every frame it compared through ``fb.ResultWriter`` (model ``motion``, ``--model``
to change): ``{"objects": [{"box": [x, y, w, h], "label": "motion", "score": s}]}`` in the
frame's pixels, where ``score`` is the share of the box's pixels that changed (0-1), and an
empty list for a still frame. Prints what changed (how many regions, the largest one's box)
with the frame's number and how old the frame is when the result is ready, whenever motion
starts, stops, or once a second while it goes on.
"""

from __future__ import annotations

import argparse
from typing import Optional

import numpy as np

import framebroker as fb

from ._common import Every, add_model_option, add_wait_option, age_ms, exit_on_sigterm, fresh_frames, open_reader, say

WORK_WIDTH = 320  # analyse at this width: motion needs no more, and it keeps the CPU cost small
OPENING = np.ones((3, 3), np.uint8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="stream to read")
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames (default: run until the stream ends)")
    parser.add_argument("--threshold", type=int, default=25, help="grey-level change that counts as motion (default 25)")
    parser.add_argument("--min-area", type=int, default=40, help="smallest region reported, in pixels at 320 px width")
    parser.add_argument("--reader-name", default="motion", help="name shown by framebroker status")
    add_model_option(parser, "motion")
    add_wait_option(parser, 10.0)


def _region(box: tuple[int, int, int, int], changed: np.ndarray, scale: float) -> dict:
    """A moving region as published: its box in the frame's pixels, and the share of it that changed."""
    x, y, w, h = box
    share = float(np.count_nonzero(changed[y : y + h, x : x + w])) / max(1, w * h)
    return {"box": [round(x / scale), round(y / scale), round(w / scale), round(h / scale)], "label": "motion", "score": round(share, 3)}


def main(args: argparse.Namespace) -> int:
    import cv2

    exit_on_sigterm()
    previous: Optional[np.ndarray] = None
    moving = False
    processed = 0
    summary = Every(1.0)
    with open_reader(args.name, args.reader_name, args.wait, "motion") as cam, fb.ResultWriter(args.name, args.model) as out:
        say(f"motion: reading stream {args.name!r}, publishing as model {args.model!r}")
        for frame in fresh_frames(cam, "motion"):
            with frame:
                image = frame.array
                scale = WORK_WIDTH / image.shape[1]
                size = (WORK_WIDTH, max(1, round(image.shape[0] * scale)))
                small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                captured_ns = frame.timestamp_ns
            gray = small if small.ndim == 2 else cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
            processed += 1
            if previous is None or previous.shape != gray.shape:
                previous = gray
                continue  # nothing to compare with: no result for this frame
            diff = cv2.absdiff(gray, previous)
            previous = gray
            _, changed = cv2.threshold(diff, args.threshold, 255, cv2.THRESH_BINARY)
            # Opening drops changes a pixel or two wide (noise, flicker along edges) before the
            # dilation joins what is left into regions.
            changed = cv2.morphologyEx(changed, cv2.MORPH_OPEN, OPENING)
            mask = cv2.dilate(changed, None, iterations=2)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            boxes = [cv2.boundingRect(c) for c in contours if cv2.contourArea(c) >= args.min_area]
            out.publish(frame, {"objects": [_region(box, changed, scale) for box in boxes]})
            seq = frame.seq
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
