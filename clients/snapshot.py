"""``framebroker snapshot NAME -o FILE.jpg``: save the stream's current picture as JPEG or PNG.

"Current" means fresh: a frame older than ``--max-age`` (the stream is reconnecting, its
camera stalled) is not saved; the snapshot waits for a new one and fails after ``--timeout``
with the daemon's reason.
"""

from __future__ import annotations

import argparse
import os
import time

import framebroker as fb
from framebroker.arguments import float_in, int_in

from ._common import add_wait_option, exit_on_sigterm, note, open_reader, say

EXTENSIONS = (".jpg", ".jpeg", ".png")


def image_file(text: str) -> str:
    if os.path.splitext(text)[1].lower() not in EXTENSIONS:
        raise argparse.ArgumentTypeError(f"{text!r}: the file name must end in .jpg, .jpeg or .png (it chooses the format)")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="stream to take the picture from")
    parser.add_argument("-o", "--output", required=True, type=image_file, metavar="FILE", help="where to save it: FILE.jpg or FILE.png")
    parser.add_argument("--timeout", type=float_in(0, 1e6, "--timeout"), default=5.0, help="exit 1 if no fresh frame arrives within this many seconds (default 5)")
    parser.add_argument("--max-age", type=float_in(0, 1e6, "--max-age"), default=1.0, help="a frame older than this many seconds waits for a newer one (default 1)")
    parser.add_argument("--quality", type=int_in(1, 100, "--quality"), default=90, help="JPEG quality 1-100 (default 90)")
    add_wait_option(parser, 0.0)


def main(args: argparse.Namespace) -> int:
    exit_on_sigterm()
    with open_reader(args.name, "snapshot", args.wait, "snapshot") as cam:
        deadline = time.monotonic() + args.timeout
        try:
            frame = cam.latest(timeout=args.timeout)
            # wall_time is when the daemon published it: comparable across processes.
            while time.time() - frame.wall_time > args.max_age:
                frame = cam.next(timeout=max(0.001, deadline - time.monotonic()))
        except fb.FrameTimeout as exc:
            note(f"snapshot: no fresh frame within {args.timeout:g} s ({exc}); nothing saved. See framebroker status {args.name}")
            return 1
        except fb.SourceEnded as exc:
            note(f"snapshot: {exc}; nothing saved")
            return 1
        with frame:
            try:
                frame.save(args.output, quality=args.quality)
            except OSError as exc:
                note(f"snapshot: cannot write {args.output}: {exc.strerror or exc}; choose a writable place with -o")
                return 1
            seq, width, height, pixel_format, age = frame.seq, frame.width, frame.height, frame.format, time.time() - frame.wall_time
    say(f"snapshot: saved {args.output} ({width}x{height} {pixel_format}, seq {seq}, {age * 1000:.0f} ms old)")
    return 0
