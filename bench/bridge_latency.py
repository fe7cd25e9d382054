"""Capture to a reader on the "remote" side: framebroker bridge over Zenoh, against an RTSP restream.

    python bench/bridge_latency.py [--seconds 20] [--width 1280 --height 720 --fps 30] [--paths zenoh,rtsp]

Both paths start from the same origin (``framebroker serve test://``) and end in a reader of a
second daemon's ring on this machine (loopback: what a second machine adds is the network):

* **zenoh**: ``framebroker bridge NAME --listen tcp/127.0.0.1:P`` (encode with the recorder's
  encoder, libx264 here) -> ``framebroker serve zenoh://NAME?connect=...`` (PyAV decode).
* **rtsp**: ``framebroker record NAME -o udp://127.0.0.1:U`` (the same encoder and settings) ->
  an RTSP server restreaming it without re-encoding (``bench/rtsp_relay.py``: GStreamer's
  rtsp-server, ``tsdemux ! h264parse ! rtph264pay``, as a media server would) ->
  ``framebroker serve rtsp://127.0.0.1:R/NAME?latency=0`` (rtspsrc, no jitter-buffer delay,
  GStreamer decode in a child).

Latency is the same measurement on both: a reader of the origin's ring records each frame's
capture wall time by seq; the reader of the remote ring takes every frame in order, notes the
time it has it and reads the frame number from the picture (``testpattern.identify``), which
names the origin frame. Out of order counts frames whose number is not above the previous one.
CPU is the share of one core over the measuring window of each process on the path (with its
children: the GStreamer child of an rtsp:// source). Writes ``bench/results/bridge_latency-WxH.json``.
This machine is shared: run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import framebroker as fb
from framebroker import testpattern
from framebroker._process import framebroker_command
from framebroker._status import describe_stream
from recorder_realtime import wait_streaming  # bench/ is this script's folder

RESULTS = Path(__file__).resolve().parent / "results"
RELAY = Path(__file__).resolve().parent / "rtsp_relay.py"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: Dict[int, int] = {}
    times: Dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


class OriginClock:
    """Capture wall time of every origin frame, by seq (a reader of the origin's ring)."""

    def __init__(self, stream: str) -> None:
        self.walls: Dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: str) -> None:
        with fb.Reader(stream, name="bench-origin") as cam:
            while not self._stop.is_set():
                try:
                    frame = cam.next(timeout=0.5)
                except fb.FrameTimeout:
                    continue
                self.walls[frame.seq] = frame.wall_time
                frame.release()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def measure_remote(stream: str, seconds: float, clock: OriginClock) -> dict:
    """Every frame of the remote ring for ``seconds``: latency from origin capture, order."""
    arrivals = []
    dropped = 0
    with fb.Reader(stream, name="bench-remote") as cam:
        deadline = time.monotonic() + seconds
        for frame in cam.ordered(timeout=5.0):
            with frame:
                now = time.time()
                dropped += frame.dropped
                number = testpattern.identify(frame.array[:, :, 1])  # one channel: the band is grey levels
                arrivals.append((now, number, frame.seq, frame.wall_time))
            if time.monotonic() > deadline:
                break
    time.sleep(0.2)  # the origin reader's last frames
    latencies, unknown, out_of_order, previous = [], 0, 0, 0
    for now, number, _seq, _wall in arrivals:
        if number is None or number not in clock.walls:
            unknown += 1
            continue
        if number <= previous:
            out_of_order += 1
        previous = number
        latencies.append((now - clock.walls[number]) * 1000)
    latencies.sort()
    return {
        "frames": len(arrivals),
        "measured": len(latencies),
        "unidentified": unknown,
        "out_of_order": out_of_order,
        "dropped_by_reader": dropped,
        "seq_is_origin_seq": all(seq == number for _now, number, seq, _wall in arrivals if number is not None),
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2) if latencies else None,
        "max_ms": round(latencies[-1], 2) if latencies else None,
    }


def run_path(path: str, origin: str, args: argparse.Namespace, clock: OriginClock) -> dict:
    procs: List[subprocess.Popen] = []
    roles: Dict[str, subprocess.Popen] = {}

    def start(role: str, argv: List[str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(proc)
        roles[role] = proc
        return proc

    remote = f"{origin}-{path}"
    try:
        if path == "zenoh":
            endpoint = f"tcp/127.0.0.1:{free_port()}"
            start("bridge", framebroker_command("bridge", origin, "--listen", endpoint, "--encoder", args.encoder))
            start("remote serve", framebroker_command("serve", f"zenoh://{origin}?connect={endpoint}", "--name", remote))
        else:
            udp, rtsp = free_port(socket.SOCK_DGRAM), free_port()
            relay = start("rtsp server", ["/usr/bin/python3", str(RELAY), str(udp), str(rtsp), origin])
            assert relay.stdout is not None
            line = relay.stdout.readline()
            if not line.startswith("ready"):
                raise SystemExit(f"the RTSP relay did not start: {line}")
            start("recorder", framebroker_command("record", origin, "-o", f"udp://127.0.0.1:{udp}", "--encoder", args.encoder))
            start("remote serve", framebroker_command("serve", f"rtsp://127.0.0.1:{rtsp}/{origin}?latency=0", "--name", remote))
        wait_streaming(remote, timeout=60.0)
        time.sleep(args.warmup)
        before = {role: process_tree_cpu(proc.pid) for role, proc in roles.items()}
        started = time.monotonic()
        result = measure_remote(remote, args.seconds, clock)
        elapsed = time.monotonic() - started
        result["cpu_percent_of_a_core"] = {
            role: round(100 * (process_tree_cpu(proc.pid) - before[role]) / elapsed, 1) for role, proc in roles.items()
        }
        result["cpu_percent_total"] = round(sum(result["cpu_percent_of_a_core"].values()), 1)
        result["remote_status"] = describe_stream(remote).get("info", {}).get("remote")
        return result
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--encoder", default="libx264")
    parser.add_argument("--paths", default="zenoh,rtsp")
    args = parser.parse_args()
    origin = f"bench-{uuid.uuid4().hex[:6]}"
    size = ("--width", str(args.width), "--height", str(args.height), "--fps", f"{args.fps:g}")
    daemon = subprocess.Popen(framebroker_command("serve", "test://", "--name", origin, *size), stderr=subprocess.DEVNULL, start_new_session=True)
    results: Dict[str, dict] = {}
    try:
        wait_streaming(origin)
        clock = OriginClock(origin)
        for path in args.paths.split(","):
            print(f"measuring {path} ...", flush=True)
            results[path] = run_path(path, origin, args, clock)
        clock.stop()
    finally:
        daemon.terminate()
        daemon.wait(15)
    period_ms = 1000.0 / args.fps
    zenoh = results.get("zenoh", {})
    summary = {
        "bench": "bridge_latency",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(), "load": os.getloadavg()},
        "settings": {"width": args.width, "height": args.height, "fps": args.fps, "seconds": args.seconds, "encoder": args.encoder},
        "frame_period_ms": round(period_ms, 2),
        "paths": results,
        "target": "zenoh p50 within 2 frame periods, zero frames out of order",
        "target_met": bool(zenoh.get("p50_ms") is not None and zenoh["p50_ms"] <= 2 * period_ms and zenoh.get("out_of_order") == 0),
    }
    print(f"{'path':<6} {'frames':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'order':>5}  CPU % of a core")
    for path, r in results.items():
        cpu = ", ".join(f"{role} {value:g}" for role, value in r["cpu_percent_of_a_core"].items())
        print(f"{path:<6} {r['frames']:>6} {r['p50_ms']!s:>7} {r['p99_ms']!s:>7} {r['max_ms']!s:>7} {r['out_of_order']:>5}  {cpu} (total {r['cpu_percent_total']:g})")
    print(f"target (p50 <= {2 * period_ms:.1f} ms, zero out of order): {'met' if summary['target_met'] else 'NOT met'}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bridge_latency-{args.width}x{args.height}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
