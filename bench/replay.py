"""Replay speed: frames per second of ``framebroker serve FILE`` at ``--pace max`` and ``lockstep``.

    python bench/replay.py [--frames 300] [--width 1280 --height 720] [--readers 1,4]

Makes an H.264 clip of the test pattern with PyAV, then, for each pace and reader count, starts
the real daemon (``--wait-readers N``, so every reader sees the first frame) and N reader
processes that take every frame in order (``ordered()``), read a byte of it and give it back.
From the publish times (``timestamp_ns``) the readers saw it reports the replay's rate (frames
over the time from the first to the last), the median rate (one over the median interval between
frames), and per reader the frames it got and dropped. For scale, the same decode and colour
conversion in one process with nothing else (PyAV alone) is measured first. Writes
``bench/results/replay-WxH.json``. One run per configuration; this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def make_clip(path: Path, frames: int, width: int, height: int) -> None:
    import av

    from framebroker import testpattern

    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "veryfast", "bf": "0", "g": "30"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 90_000)
        image = np.empty((height, width, 3), np.uint8)
        for n in range(frames):
            frame = av.VideoFrame.from_ndarray(testpattern.render_into(image, n + 1), format="bgr24")
            frame.pts, frame.time_base = n * 3000, Fraction(1, 90_000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def decode_only(path: Path) -> float:
    """Frames per second of PyAV decoding and converting the clip to BGR, copied once."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        out = None
        count = 0
        started = time.perf_counter()
        for frame in container.decode(stream):
            image = frame.to_ndarray(format="bgr24")
            if out is None:
                out = np.empty_like(image)
            np.copyto(out, image)
            count += 1
        return count / (time.perf_counter() - started)


def read(stream: str, index: int) -> int:
    """A reader process: every frame in order; prints what it saw as one JSON line."""
    import framebroker as fb

    stamps = []
    dropped = 0
    with fb.Reader(stream, name=f"bench-{index}", wait=30.0) as cam:
        print(json.dumps({"ready": True}), flush=True)
        for frame in cam.ordered(timeout=30.0):
            with frame:
                int(frame.array[0, 0, 0])
                stamps.append(frame.timestamp_ns)
                dropped += frame.dropped
    print(json.dumps({"frames": len(stamps), "dropped": dropped, "stamps": stamps}), flush=True)
    return 0


def run(clip: Path, pace: str, readers: int) -> dict:
    from framebroker._process import framebroker_command

    name = f"bench-replay-{uuid.uuid4().hex[:6]}"
    log = clip.with_name(f"{name}.log")
    with open(log, "w") as handle:
        daemon = subprocess.Popen(
            framebroker_command("serve", str(clip), "--name", name, "--pace", pace, "--wait-readers", str(readers)),
            stdout=subprocess.DEVNULL,
            stderr=handle,
            start_new_session=True,
        )
    procs = []
    try:
        for index in range(readers):
            procs.append(
                subprocess.Popen([sys.executable, __file__, "--read", name, str(index)], stdout=subprocess.PIPE, text=True, start_new_session=True)
            )
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        if daemon.wait(timeout=60) != 0:
            raise SystemExit(f"the daemon failed:\n{log.read_text()}")
    finally:
        for proc in [*procs, daemon]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Every reader sees the publish times; the first reader's are the stream's (all of them in
    # lockstep; in max it may have missed some, which the span still covers).
    stamps = reports[0]["stamps"]
    span_s = (stamps[-1] - stamps[0]) / 1e9
    intervals = np.diff(stamps)
    return {
        "pace": pace,
        "readers": readers,
        "fps": round((len(stamps) - 1) / span_s, 1) if span_s > 0 else None,
        "fps_median": round(1e9 / statistics.median(intervals.tolist()), 1) if len(intervals) else None,
        "frames_per_reader": [r["frames"] for r in reports],
        "dropped_per_reader": [r["dropped"] for r in reports],
    }


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--read":
        return read(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--readers", default="1,4", help="reader counts, comma-separated")
    args = parser.parse_args()
    counts = [int(n) for n in args.readers.split(",")]
    with tempfile.TemporaryDirectory(prefix="replaybench-") as workdir:
        clip = Path(workdir) / "clip.ts"
        make_clip(clip, args.frames, args.width, args.height)
        summary = {
            "size": f"{args.width}x{args.height}",
            "frames": args.frames,
            "file_fps": 30,
            "decode_only_fps": round(decode_only(clip), 1),
            "runs": [run(clip, pace, readers) for pace in ("max", "lockstep") for readers in counts],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
        }
    print(f"decode + convert alone (PyAV, one process): {summary['decode_only_fps']} fps")
    print(f"{'pace':<9} {'readers':>7} {'fps':>7} {'median':>7}  frames / dropped per reader")
    for row in summary["runs"]:
        print(
            f"{row['pace']:<9} {row['readers']:>7} {row['fps']:>7} {row['fps_median']:>7}  "
            f"{row['frames_per_reader']} / {row['dropped_per_reader']}"
        )
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"replay-{summary['size']}.json"
    target.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
