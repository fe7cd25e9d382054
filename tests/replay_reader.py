"""An ordered reader for the replay tests: what it got, frame by frame, as one JSON line.

Run as ``python tests/replay_reader.py STREAM --name NAME [--work-ms MS] [--expect-results FILE]``.
It prints ``{"event": "ready"}`` once attached, ``{"event": "progress", "frames": N}`` every ten
frames, and at the end of the stream ``{"event": "done", "frames": [...]}`` with, per frame,
its seq, wall_time, timestamp_ns, dropped, a CRC of its bytes and the test-pattern number its
picture shows. With ``--expect-results`` (a results sidecar) it also reads back, with
``ResultReader.get(seq)``, each result the file holds for the frames it gets.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib

import framebroker as fb
from framebroker import testpattern


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def expected_results(path: str) -> dict:
    expected: dict = {}
    with open(path) as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                expected.setdefault(record["seq"], {})[record["model"]] = record["data"]
    return expected


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stream")
    parser.add_argument("--name", default="replay-reader")
    parser.add_argument("--work-ms", type=float, default=0.0)
    parser.add_argument("--expect-results", default="")
    args = parser.parse_args()
    expected = expected_results(args.expect_results) if args.expect_results else {}
    models = sorted({model for entries in expected.values() for model in entries})
    frames = []
    results = {"checked": 0, "bad": []}
    with fb.Reader(args.stream, name=args.name, wait=20.0) as cam:
        readers = {model: fb.ResultReader(args.stream, model, wait=20.0) for model in models}
        emit(event="ready", pid=os.getpid())
        for frame in cam.ordered(timeout=20.0):
            with frame:
                frames.append(
                    {
                        "seq": frame.seq,
                        "wall_time": frame.wall_time,
                        "timestamp_ns": frame.timestamp_ns,
                        "dropped": frame.dropped,
                        "crc": zlib.crc32(frame.array.tobytes()),
                        "shows": testpattern.identify(frame.array),
                    }
                )
                for model, data in expected.get(frame.seq, {}).items():
                    result = readers[model].get(frame.seq, timeout=5.0)
                    results["checked"] += 1
                    if result is None or result.data != data or result.wall_time != frame.wall_time:
                        results["bad"].append([frame.seq, model, None if result is None else result.data])
                if args.work_ms:
                    time.sleep(args.work_ms / 1000.0)  # a slow model, holding the frame meanwhile
            if len(frames) % 10 == 0:
                emit(event="progress", frames=len(frames))
        for reader in readers.values():
            reader.close()
    emit(event="done", frames=frames, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
