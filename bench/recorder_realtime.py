"""Can the recorder keep up in software? 1280x720 at 30 fps through a real daemon and the real recorder.

    python bench/recorder_realtime.py [--seconds 20] [--width 1280 --height 720 --fps 30] [--encoder libx264]

Starts ``framebroker serve test://`` and ``framebroker record NAME --duration S`` as the user would,
then reports what the recorder wrote (frames, achieved fps, dropped in the ring and at the encoder
queue, median encode time per frame from its summary line), the CPU time of the recorder and of
the daemon, and checks the file: every frame decoded, identified and in sequence. Writes
``bench/results/recorder_realtime-WxH.json``. This machine is shared: run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from framebroker import testpattern
from framebroker._process import framebroker_command
from framebroker._status import describe_stream

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_streaming(name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = describe_stream(name)
        if info["state"] == "streaming" and info.get("seq", 0) > 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"the daemon did not start streaming {name} within {timeout} s")


def check_file(path: Path) -> dict:
    import av

    seqs = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            seqs.append(testpattern.identify(frame.to_ndarray(format="gray")))
    gaps = sum(1 for a, b in zip(seqs, seqs[1:]) if a is not None and b is not None and b != a + 1)
    return {"decoded": len(seqs), "unidentified": seqs.count(None), "gaps": gaps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--encoder", default="libx264")
    args = parser.parse_args()

    name = f"bench-rec-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="recbench-"))
    out = workdir / "bench.ts"
    daemon = subprocess.Popen(
        framebroker_command("serve", "test://", "--name", name, "--width", str(args.width), "--height", str(args.height), "--fps", str(args.fps)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_streaming(name)
        daemon_cpu0 = cpu_seconds(daemon.pid)
        started = time.monotonic()
        with open(workdir / "stdout", "w+") as stdout, open(workdir / "stderr", "w+") as stderr:
            recorder = subprocess.Popen(
                framebroker_command("record", name, "-o", str(out), "--duration", str(args.seconds), "--encoder", args.encoder),
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            # wait4: the CPU time of the recorder process alone (threads included).
            _, status, usage = os.wait4(recorder.pid, 0)
            # As Popen reports it (os.waitstatus_to_exitcode is Python 3.9+).
            recorder.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            wall = time.monotonic() - started
            daemon_cpu = cpu_seconds(daemon.pid) - daemon_cpu0
            stdout.seek(0)
            stderr.seek(0)
            recorder_stdout, recorder_stderr = stdout.read(), stderr.read()
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
    if recorder.returncode != 0:
        print(recorder_stdout, recorder_stderr, file=sys.stderr)
        return 1
    line = next(line for line in recorder_stdout.splitlines() if line.startswith("record: "))
    facts = dict(re.findall(r"(\w+)=(\S+)", line))
    frames = int(facts["frames"])
    recorded = float(facts["seconds"])
    recorder_cpu = usage.ru_utime + usage.ru_stime
    result = {
        "size": f"{args.width}x{args.height}",
        "fps_target": args.fps,
        "encoder": facts["encoder"],
        "frames": frames,
        "recorded_s": recorded,
        "achieved_fps": round((frames - 1) / recorded, 2) if recorded else 0.0,
        "encode_ms_median": float(facts["encode_ms"]) if facts["encode_ms"] != "None" else None,
        "dropped_ring": int(facts["dropped_ring"]),
        "dropped_queue": int(facts["dropped_queue"]),
        "recorder_cpu_percent_of_one_core": round(100 * recorder_cpu / wall, 1),
        "daemon_cpu_percent_of_one_core": round(100 * daemon_cpu / wall, 1),
        "file_mbit_s": round(out.stat().st_size * 8 / 1e6 / recorded, 2) if recorded else None,
        **check_file(out),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
    }
    shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"recorder_realtime-{args.width}x{args.height}.json").write_text(json.dumps(result, indent=2) + "\n")
    realtime = result["dropped_ring"] == 0 and result["dropped_queue"] == 0 and result["gaps"] == 0 and result["decoded"] == frames
    print("real time, no frame lost" if realtime else "NOT real time: frames were lost")
    return 0 if realtime else 1


if __name__ == "__main__":
    sys.exit(main())
