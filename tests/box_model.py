"""A model for the tests: it finds the test pattern's white square, by arithmetic, on every frame.

Run as ``python tests/box_model.py STREAM [--model NAME] [--latency S] [--every N]``. For each
frame of ``test://`` (frame number == seq) it publishes the square's box, ``{"objects": [{"box":
[x, y, side, side], "label": "square", "score": 0.9, "id": 1}], "n": seq}``, exactly where
``framebroker.testpattern`` draws it. ``--latency`` holds each result back that long after the
frame's capture (a slow model: results arrive well after their frames); ``--every N`` publishes
for every Nth frame only (a model that skips frames). ``--score``/``--label`` change what it
says, ``--from-seq`` publishes only from that frame on. Prints ``{"event": "ready"}`` once
publishing, then ``{"event": "published", "seq": N}`` for each result.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import framebroker as fb
from framebroker import testpattern


def square(seq: int, height: int, width: int) -> list[int]:
    """[x, y, w, h] of the white square in test frame ``seq`` of that size."""
    x, y, side = testpattern._box(height, width, seq)  # noqa: SLF001 - the pattern's own geometry
    return [x, y, side, side]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stream")
    parser.add_argument("--model", default="square")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--label", default="square")
    parser.add_argument("--score", type=float, default=0.9)
    parser.add_argument("--from-seq", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no event per result")
    args = parser.parse_args()

    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with fb.Reader(args.stream, name=f"model-{args.model}", wait=10.0) as cam, fb.ResultWriter(args.stream, args.model) as out:
            print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
            for frame in cam.ordered():
                with frame:
                    seq, stamp, (height, width) = frame.seq, frame.timestamp_ns, frame.shape[:2]
                if seq % args.every or seq < args.from_seq:
                    continue
                delay = (stamp + args.latency * 1e9 - time.monotonic_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                box = square(seq, height, width)
                out.publish(seq, {"objects": [{"box": box, "label": args.label, "score": args.score, "id": 1}], "n": seq}, timestamp_ns=stamp)
                if not args.quiet:
                    print(json.dumps({"event": "published", "seq": seq}), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
