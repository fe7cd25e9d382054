"""Soak: a daemon at 30 fps, four readers and a recorder for a long time; does anything grow?

    python bench/soak.py [--seconds 600] [--json out.json] [--no-recorder]

Starts ``framebroker serve test://`` (640x480, 30 fps), four ``framebroker read`` consumers in
different modes (latest, next, ordered, and a slow one holding each frame 80 ms) and
``framebroker record`` writing a .ts file, all as separate processes. After a warm-up it samples
every process's RSS, open file descriptors and the stream's /dev/shm use, and again at the end,
then stops everything by pid and prints a table (and JSON with --json). The recorder's dropped
frames come from ``framebroker status``. Exit code 0 unless a process died on the way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import framebroker as fb  # noqa: E402
from framebroker._process import framebroker_command  # noqa: E402

WARMUP = 5.0


def sample(pid: int) -> dict:
    """RSS split into private (heap: where a leak shows) and shared (ring pages a process touched)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {
        "rss_mb": round(fields["VmRSS"], 2),
        "private_mb": round(fields["RssAnon"], 2),
        "shared_mb": round(fields["RssShmem"], 2),
        "fds": fds,
    }


def shm_bytes(name: str) -> int:
    total = 0
    for entry in os.listdir("/dev/shm"):
        if entry == f"framebroker.{name}" or entry.startswith((f"framebroker.{name}@", f"sem.framebroker.{name}@")):
            try:
                total += os.stat(f"/dev/shm/{entry}").st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def stop(process: subprocess.Popen, timeout: float = 10.0) -> Optional[int]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def run(seconds: float, recorder: bool, fps: float = 30.0) -> dict:
    name = f"soak-{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="framebroker-soak-"))
    processes: dict[str, subprocess.Popen] = {}
    logs = {}

    def start(label: str, *args: str) -> None:
        log = open(workdir / f"{label}.log", "wb")
        logs[label] = log
        processes[label] = subprocess.Popen(
            framebroker_command(*args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    report: dict = {"seconds": seconds, "fps": fps, "stream": name, "processes": {}}
    try:
        start("daemon", "serve", "test://", "--name", name, "--fps", str(fps), "--width", "640", "--height", "480")
        fb.Reader(name, name="soak-probe", wait=15.0).close()
        start("read-latest", "read", name, "--mode", "latest", "--reader-name", "latest")
        start("read-next", "read", name, "--mode", "next", "--reader-name", "next")
        start("read-ordered", "read", name, "--mode", "ordered", "--reader-name", "ordered")
        start("read-slow", "read", name, "--mode", "next", "--work-ms", "80", "--reader-name", "slow")
        if recorder:
            start("recorder", "record", name, "-o", str(workdir / "soak.ts"))
        time.sleep(WARMUP)
        first = {label: sample(p.pid) for label, p in processes.items()}
        shm_first = shm_bytes(name)
        deadline = time.monotonic() + max(0.0, seconds - WARMUP)
        while time.monotonic() < deadline:
            dead = [label for label, p in processes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during the soak; see {workdir}")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        last = {label: sample(p.pid) for label, p in processes.items()}
        shm_last = shm_bytes(name)
        stream = fb.status(name)["streams"][0]
        for label in processes:
            report["processes"][label] = {
                "pid": processes[label].pid,
                "start": first[label],
                "end": last[label],
                "rss_growth_mb": round(last[label]["rss_mb"] - first[label]["rss_mb"], 2),
                "private_growth_mb": round(last[label]["private_mb"] - first[label]["private_mb"], 2),
                "fd_growth": last[label]["fds"] - first[label]["fds"],
            }
        report["shm_bytes"] = {"start": shm_first, "end": shm_last}
        report["frames_published"] = stream.get("seq")
        report["source_drops"] = stream.get("source_drops")
        recorder_entry = next((r for r in stream.get("readers", []) if r["info"].get("encoder")), None)
        report["recorder"] = recorder_entry["info"] if recorder_entry else None
        report["readers"] = {r["name"]: {"dropped": r["dropped"], "lag": r["lag"], "fps": r["fps"]} for r in stream.get("readers", [])}
    finally:
        for label in [l for l in processes if l != "daemon"] + (["daemon"] if "daemon" in processes else []):
            stop(processes[label])
        for log in logs.values():
            log.close()
        leftovers = [e for e in os.listdir("/dev/shm") if e.startswith((f"framebroker.{name}", f"sem.framebroker.{name}@"))]
        report["shm_left_after_stop"] = leftovers
        report["workdir"] = str(workdir)
    return report


def print_table(report: dict) -> None:
    print(f"soak of stream {report['stream']}: {report['seconds']:.0f} s at {report['fps']:g} fps, "
          f"{report.get('frames_published')} frames published, {report.get('source_drops')} dropped at the source")
    print(
        f"{'process':<14} {'pid':>7} {'RSS start':>10} {'RSS end':>9} {'private start':>14} {'private end':>12} "
        f"{'growth':>8} {'fds start':>10} {'fds end':>8}"
    )
    for label, entry in report["processes"].items():
        start, end = entry["start"], entry["end"]
        print(
            f"{label:<14} {entry['pid']:>7} {start['rss_mb']:>9.1f}M {end['rss_mb']:>8.1f}M {start['private_mb']:>13.1f}M "
            f"{end['private_mb']:>11.1f}M {entry['private_growth_mb']:>+7.2f}M {start['fds']:>10} {end['fds']:>8}"
        )
    shm = report["shm_bytes"]
    print(f"/dev/shm used by the stream: {shm['start'] / 2**20:.1f} MiB at start, {shm['end'] / 2**20:.1f} MiB at the end; "
          f"left after stop: {report['shm_left_after_stop'] or 'nothing'}")
    if report.get("recorder") is not None:
        print(f"recorder: {report['recorder']}")
    for name, reader in report.get("readers", {}).items():
        print(f"reader {name}: dropped {reader['dropped']}, lag {reader['lag']}, {reader['fps']} fps")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--no-recorder", action="store_true", help="leave the recorder out")
    args = parser.parse_args()
    report = run(args.seconds, recorder=not args.no_recorder)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    shutil.rmtree(report["workdir"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
