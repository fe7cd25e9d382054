"""Derived streams against models that convert for themselves: CPU of everything, main-stream latency.

    python bench/derive_cost.py [--seconds 20] [--readers 4] [--json bench/results/derive_cost.json]

Four "models" each need 640x360 RGB from a 1920x1080 BGR camera at 30 fps (``test://``). Every
scenario runs a daemon, its readers and a latency probe as separate processes, then measures for
``--seconds`` after a warm-up:

* ``main only``: the daemon, no model: the daemon's own cost and the main stream's latency.
* ``each converts``: no deriving; each model reads ``cam`` and runs ``cv2.resize`` (bilinear, the
  default) and ``cv2.cvtColor`` itself.
* ``derived``: ``serve --derive lores=640x360:rgb``; each model reads ``cam.lores``, already
  640x360 RGB (a zero-copy view).
* ``derived, OpenCV pool``: the same with the daemon's OpenCV thread pool at its default size
  (``OPENCV_FOR_THREADS_NUM`` = the number of cores; a deriving daemon uses one thread unless
  told otherwise), to choose how the deriving thread should run.

CPU is utime + stime of every process of the scenario (all threads), daemon included, per
second of wall time, from /proc at both ends of the window; the probe is left out (it runs in
every scenario alike). Latency is the probe's: capture time (``frame.timestamp_ns``) to holding
the main stream's frame in another process, p50 and p99. Also measured, in this process: what a
deriver would pay to copy a 1080p frame out of the ring instead of leasing it, against the
conversion itself. Medians and ratios are from one run; the machine is shared, so compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import framebroker as fb  # noqa: E402
from framebroker._process import framebroker_command  # noqa: E402

WIDTH, HEIGHT, FPS = 1920, 1080, 30
MODEL_SIZE = (640, 360)
WARMUP = 4.0  # seconds every process runs before the window opens (--warmup)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the child roles ---------------------------------------------------------------------------


def model(stream: str, convert: bool) -> int:
    """A model's input stage: a 640x360 RGB array per frame, made here or read ready-made."""
    import cv2

    frames = 0
    with fb.Reader(stream, name="model", wait=20) as reader:
        print("ready", flush=True)
        try:
            for frame in reader:
                with frame:
                    if convert:
                        small = cv2.resize(frame.array, MODEL_SIZE)
                        picture = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
                    else:
                        picture = frame.array
                    assert picture.shape == (MODEL_SIZE[1], MODEL_SIZE[0], 3)
                frames += 1
        except KeyboardInterrupt:
            pass
    print(json.dumps({"frames": frames}), flush=True)
    return 0


def probe(stream: str) -> int:
    """Capture to a usable main frame in another process, per frame, until SIGTERM."""
    latencies: List[int] = []
    with fb.Reader(stream, name="probe", wait=20) as reader:
        print("ready", flush=True)
        try:
            for frame in reader:
                latencies.append(time.monotonic_ns() - frame.timestamp_ns)
                frame.release()
        except KeyboardInterrupt:
            pass
    print(json.dumps({"latency_ns": latencies}), flush=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# --- the orchestrator --------------------------------------------------------------------------


class Scenario:
    def __init__(self, label: str, derive: bool, convert: bool, readers: int, opencv_pool: bool = False) -> None:
        self.label, self.derive, self.convert, self.readers, self.opencv_pool = label, derive, convert, readers, opencv_pool


def _spawn(argv: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, start_new_session=True)


def _wait_ready(process: subprocess.Popen) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"a child did not start: {line!r} {process.stderr.read() if process.stderr else ''}")


def _stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def run_scenario(scenario: Scenario, seconds: float, warmup: float) -> Dict[str, Any]:
    name = f"fbbench-derive-{uuid.uuid4().hex[:6]}"
    serve = ["serve", "test://", "--name", name, "--width", str(WIDTH), "--height", str(HEIGHT), "--fps", str(FPS)]
    if scenario.derive:
        serve += ["--derive", f"lores={MODEL_SIZE[0]}x{MODEL_SIZE[1]}:rgb"]
    env = dict(os.environ, OPENCV_FOR_THREADS_NUM=str(os.cpu_count())) if scenario.opencv_pool else None
    daemon = _spawn(framebroker_command(*serve), env)
    me = [sys.executable, str(Path(__file__).resolve())]
    children: List[subprocess.Popen] = []
    try:
        fb.Reader(name, name="bench-wait", wait=20).close()
        source = f"{name}.lores" if scenario.derive else name
        models = [_spawn([*me, "--role", "model", source] + (["--convert"] if scenario.convert else [])) for _ in range(scenario.readers)]
        children += models
        latency_probe = _spawn([*me, "--role", "probe", name])
        children.append(latency_probe)
        for child in children:
            _wait_ready(child)
        time.sleep(warmup)
        measured = [daemon] + models
        start_cpu = {p.pid: cpu_seconds(p.pid) for p in measured}
        start_probe = cpu_seconds(latency_probe.pid)
        start = time.monotonic()
        seq_start = fb.status(name)["streams"][0]["seq"]
        time.sleep(seconds)
        wall = time.monotonic() - start
        cpu = {p.pid: (cpu_seconds(p.pid) - start_cpu[p.pid]) / wall for p in measured}
        probe_cpu = (cpu_seconds(latency_probe.pid) - start_probe) / wall
        document = fb.status(name)["streams"][0]
        published = (document["seq"] - seq_start) / wall
        derived = document["derived"][0] if document["derived"] else None
    finally:
        outputs = [_stop(child) for child in children]
        _stop(daemon)
    latencies = json.loads(outputs[-1].strip().splitlines()[-1])["latency_ns"]
    latencies = latencies[int(len(latencies) * warmup / (warmup + seconds)) :]
    frames = [json.loads(out.strip().splitlines()[-1])["frames"] for out in outputs[:-1]]
    return {
        "label": scenario.label,
        "derive": scenario.derive,
        "readers_convert": scenario.convert,
        "readers": scenario.readers,
        "daemon_opencv_threads": (os.cpu_count() if scenario.opencv_pool else 1) if scenario.derive else None,
        "cpu_total_cores": round(sum(cpu.values()), 4),
        "cpu_daemon_cores": round(cpu[daemon.pid], 4),
        "cpu_readers_cores": round(sum(cpu.values()) - cpu[daemon.pid], 4),
        "cpu_probe_cores": round(probe_cpu, 4),
        "main_fps": round(published, 2),
        "derived_skipped": derived["skipped"] if derived else None,
        "reader_frames": frames,
        "latency_p50_ms": round(float(np.percentile(latencies, 50)) / 1e6, 3),
        "latency_p99_ms": round(float(np.percentile(latencies, 99)) / 1e6, 3),
        "latency_samples": len(latencies),
    }


def copy_or_lease(repeats: int = 200) -> Dict[str, float]:
    """What a deriver would pay per frame to copy the main frame out, against a lease of it and
    the conversion itself (medians, microseconds, this process)."""
    import cv2

    from framebroker import testpattern

    stream = f"fbbench-lease-{uuid.uuid4().hex[:6]}"
    image = testpattern.render(1, (HEIGHT, WIDTH, 3))
    private = np.empty_like(image)
    copy_ns, lease_ns, convert_ns = [], [], []
    clock = time.perf_counter_ns
    with fb.Publisher(stream, (HEIGHT, WIDTH, 3), fps=FPS) as publisher, fb.Reader(stream, name="lease") as reader:
        for _ in range(repeats):
            publisher.publish(image)
            start = clock()
            frame = reader.next(timeout=1)
            view = frame.array
            leased = clock()
            np.copyto(private, view)
            copied = clock()
            cv2.cvtColor(cv2.resize(view, MODEL_SIZE), cv2.COLOR_BGR2RGB)
            converted = clock()
            frame.release()
            lease_ns.append(leased - start)
            copy_ns.append(copied - leased)
            convert_ns.append(converted - copied)
    return {
        "lease_us": round(statistics.median(lease_ns) / 1e3, 1),
        "copy_us": round(statistics.median(copy_ns) / 1e3, 1),
        "convert_us": round(statistics.median(convert_ns) / 1e3, 1),
    }


def table(results: List[Dict[str, Any]], costs: Dict[str, float]) -> str:
    each = next(r for r in results if r["label"] == "each converts")
    lines = [
        "| scenario | CPU, cores: all | daemon | models | / each converts | main fps | skipped | latency p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ratio = r["cpu_total_cores"] / each["cpu_total_cores"] if each["cpu_total_cores"] else float("nan")
        skipped = "-" if r["derived_skipped"] is None else str(r["derived_skipped"])
        lines.append(
            f"| {r['label']} | {r['cpu_total_cores']:.3f} | {r['cpu_daemon_cores']:.3f} | {r['cpu_readers_cores']:.3f} | "
            f"{ratio:.2f} | {r['main_fps']:.1f} | {skipped} | {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"per 1080p frame, one process: lease {costs['lease_us']} us, copy out {costs['copy_us']} us, "
        f"resize + cvtColor to 640x360 RGB {costs['convert_us']} us"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window per scenario (default 20)")
    parser.add_argument("--readers", type=int, default=4, help="models (default 4)")
    parser.add_argument("--warmup", type=float, default=WARMUP, help=f"seconds before each window (default {WARMUP:g})")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "derive_cost.json"), help="where the summary goes")
    parser.add_argument("--role", choices=["model", "probe"], help=argparse.SUPPRESS)
    parser.add_argument("--convert", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("stream", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        signal.signal(signal.SIGTERM, _interrupt)
        return model(args.stream, args.convert) if args.role == "model" else probe(args.stream)
    scenarios = [
        Scenario("main only", derive=False, convert=False, readers=0),
        Scenario("each converts", derive=False, convert=True, readers=args.readers),
        Scenario("derived", derive=True, convert=False, readers=args.readers),
        Scenario("derived, OpenCV pool", derive=True, convert=False, readers=args.readers, opencv_pool=True),
    ]
    started = time.time()
    load = os.getloadavg()[0]
    results = []
    for scenario in scenarios:
        print(f"{scenario.label} ...", file=sys.stderr, flush=True)
        results.append(run_scenario(scenario, args.seconds, args.warmup))
    costs = copy_or_lease()
    each = next(r for r in results if r["label"] == "each converts")
    main_only = next(r for r in results if r["label"] == "main only")
    summary = {
        "bench": "derive_cost",
        "started": started,
        "seconds": args.seconds,
        "frame": f"{WIDTH}x{HEIGHT} bgr at {FPS} fps",
        "models": f"{args.readers} x {MODEL_SIZE[0]}x{MODEL_SIZE[1]} rgb",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "opencv": __import__("cv2").__version__,
            "load_average_at_start": round(load, 2),
        },
        "scenarios": results,
        "ratios": {
            r["label"]: {
                "cpu_vs_each_converts": round(r["cpu_total_cores"] / each["cpu_total_cores"], 3),
                # Without the capture itself (the daemon of "main only"), which both ways pay alike.
                "cpu_beyond_capture_vs_each_converts": round(
                    (r["cpu_total_cores"] - main_only["cpu_daemon_cores"]) / (each["cpu_total_cores"] - main_only["cpu_daemon_cores"]), 3
                ),
                "latency_p50_vs_main_only": round(r["latency_p50_ms"] / main_only["latency_p50_ms"], 3),
                "latency_p99_vs_main_only": round(r["latency_p99_ms"] / main_only["latency_p99_ms"], 3),
            }
            for r in results
        },
        "per_frame_us": costs,
        "target": "derived streams: total CPU at most 1/3 of each model converting for itself",
    }
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(table(results, costs))
    derived = next(r for r in results if r["label"] == "derived")
    ratio = derived["cpu_total_cores"] / each["cpu_total_cores"]
    beyond = summary["ratios"]["derived"]["cpu_beyond_capture_vs_each_converts"]
    print(f"\ntarget: total CPU at most 1/3 of each converting: {ratio:.2f} ({'met' if ratio <= 1 / 3 else 'NOT met'}); "
          f"beyond the capture both pay: {beyond:.2f}")
    print(f"summary in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
