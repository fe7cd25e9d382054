"""A plain reader: prints what arrives (rate, frame age, frames it skipped), optionally checking
``test://`` frames byte for byte. Useful to see a stream from a shell and as a test consumer.

"Skipped" counts the frames between the first and the last one it got that it never saw:
``latest`` and ``next`` skip frames by design when the reader is slower than the camera, and
``ordered`` when frames were overwritten before it got to them (``frame.dropped``).
"""

from __future__ import annotations

import argparse
import time

import framebroker as fb
from framebroker import testpattern

from ._common import Every, add_wait_option, age_ms, exit_on_sigterm, open_reader, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="stream to read")
    parser.add_argument("--mode", choices=["latest", "next", "ordered"], default="next", help="how to ask for frames (default next)")
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames")
    parser.add_argument("--verify", action="store_true", help="check every frame against the test:// pattern; exit 1 on a bad one")
    parser.add_argument("--every", action="store_true", help="print a line per frame instead of once a second")
    parser.add_argument("--reader-name", default="reader", help="name shown by framebroker status")
    add_wait_option(parser, 10.0)
    parser.add_argument("--timeout", type=float, default=0.0, help="exit 1 if no frame arrives for this many seconds (default: wait)")
    parser.add_argument(
        "--work-ms",
        type=float,
        default=0.0,
        help="pretend each frame takes this long to process, holding it meanwhile (a slow consumer; "
        "in latest mode the default is 100 ms, the sampling interval)",
    )


def _skipped(count: int) -> str:
    return "none skipped" if count == 0 else f"{count} skipped"


def main(args: argparse.Namespace) -> int:
    exit_on_sigterm()
    summary = Every(1.0)
    count = 0
    bad = 0
    skipped = 0
    last_seq = 0
    window_start, window_count = time.monotonic(), 0
    with open_reader(args.name, args.reader_name, args.wait, "read") as cam:
        frames = cam.ordered(timeout=args.timeout or None) if args.mode == "ordered" else None
        while True:
            try:
                if frames is not None:
                    frame = next(frames)
                elif args.mode == "latest":
                    frame = cam.latest(timeout=args.timeout or None)
                else:
                    frame = cam.next(timeout=args.timeout or None)
            except StopIteration:
                say("read: stream ended")
                return 1 if bad else 0
            except fb.SourceEnded as exc:
                say(f"read: {exc}")
                return 1 if bad else 0
            except fb.FrameTimeout as exc:
                say(f"read: {exc}")
                return 1
            age = age_ms(frame.timestamp_ns)
            if args.mode != "latest" or frame.seq != last_seq:
                count += 1
                window_count += 1
                if last_seq and frame.seq > last_seq + 1:
                    skipped += frame.seq - last_seq - 1
                if args.verify and testpattern.verify(frame.array, frame.format) is None:
                    bad += 1
                    say(f"read: frame {frame.seq} FAILED the test-pattern check")
                if args.every:
                    say(f"read: frame {frame.seq}: {frame.width}x{frame.height} {frame.format}, {age:.1f} ms old")
            last_seq = frame.seq
            work = args.work_ms or (100.0 if args.mode == "latest" else 0.0)
            if work:
                time.sleep(work / 1000.0)  # simulated processing, with the frame held
            if summary():
                now = time.monotonic()
                rate = window_count / (now - window_start)
                window_start, window_count = now, 0
                lag = cam.newest_seq - frame.seq
                extra = f", {bad} bad" if args.verify else ""
                say(f"read: {rate:.1f} frames/s, frame age {age:.0f} ms, lag {lag}, {_skipped(skipped)}{extra}")
            if args.frames and count >= args.frames:
                say(f"read: done after {count} frames, {_skipped(skipped)}, {bad} bad")
                return 1 if bad else 0
