"""How much memory the recorder's pre-roll buffer takes, at 720p and 1080p.

    python bench/preroll_memory.py [--pre-roll 5] [--seconds 15] [--sizes 1280x720 1920x1080]

For each size it runs ``framebroker serve test://`` at 30 fps and ``framebroker record --clips``
with the default bitrate (about 0.1 bit per pixel) and reports, once the buffer is full, what the
recorder says it holds (seconds, KiB: the encoded keyframe groups) and the recorder process's
private memory with and without clips (the difference is the buffer plus its bookkeeping). The
test pattern compresses differently from a camera picture; the bitrate bounds it either way:
about (pre-roll + 2 s margin) x bitrate, the "expected" column. Writes
bench/results/preroll_memory.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import framebroker as fb  # noqa: E402
from framebroker._process import framebroker_command  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def private_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(width: int, height: int, pre_roll: float, seconds: float, clips: bool) -> dict:
    name = f"preroll-{uuid.uuid4().hex[:6]}"
    directory = tempfile.mkdtemp(prefix="framebroker-preroll-")
    daemon = subprocess.Popen(
        framebroker_command("serve", "test://", "--name", name, "--width", str(width), "--height", str(height), "--fps", "30"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    recorder = None
    try:
        fb.Reader(name, name="probe", wait=15).close()
        args = ["--clips", directory, "--pre-roll", str(pre_roll)] if clips else ["-o", f"{directory}/plain.ts"]
        recorder = subprocess.Popen(
            framebroker_command("record", name, *args),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        time.sleep(seconds)
        info = next(r["info"] for r in fb.status(name)["streams"][0]["readers"] if r["name"] == "recorder")
        return {
            "width": width,
            "height": height,
            "clips": clips,
            "preroll_s": info.get("preroll_s"),
            "preroll_kib": info.get("preroll_kb"),
            "recorder_private_mb": round(private_mb(recorder.pid), 1),
        }
    finally:
        if recorder is not None:
            stop(recorder)
        stop(daemon)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pre-roll", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=15.0, help="run time per measurement (longer than pre-roll + 2 s)")
    parser.add_argument("--sizes", nargs="+", default=["1280x720", "1920x1080"])
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        with_clips = measure(width, height, args.pre_roll, args.seconds, clips=True)
        without = measure(width, height, args.pre_roll, args.seconds, clips=False)
        with_clips["recorder_private_mb_without_clips"] = without["recorder_private_mb"]
        bitrate = max(200, int(width * height * 30 * 0.1 / 1000))
        with_clips["expected_kib_at_default_bitrate"] = round((args.pre_roll + 2) * bitrate * 1000 / 8 / 1024)
        rows.append(with_clips)
    print(f"pre-roll {args.pre_roll:g} s (+2 s margin), test:// at 30 fps, default bitrate")
    print(f"{'size':<10} {'held s':>7} {'held KiB':>9} {'expected KiB':>13} {'recorder MB':>12} {'without clips':>14}")
    for row in rows:
        print(
            f"{row['width']}x{row['height']:<5} {row['preroll_s']:>7} {row['preroll_kib']:>9} {row['expected_kib_at_default_bitrate']:>13} "
            f"{row['recorder_private_mb']:>12} {row['recorder_private_mb_without_clips']:>14}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "preroll_memory.json"
    out.write_text(json.dumps({"pre_roll_s": args.pre_roll, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
