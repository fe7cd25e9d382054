"""framebroker side by side with the transports people use today, measured in the same run.

    python bench/compare.py                 # the full table (about 5 minutes on 2 cores)
    python bench/compare.py --quick         # seconds: the smoke test's run
    python bench/compare.py --sizes 1080p --readers 4 --transports framebroker,framebroker-pure,naive,iceoryx2
    python bench/compare.py --merge bench/results/compare-A.json B.json C.json   # medians of runs

framebroker is measured on both of its frame paths: ``framebroker`` (compiled, ``_fastpath.c``)
and ``framebroker-pure`` (``FRAMEBROKER_PURE=1``). For every frame size x reader count x
transport, one producer process and one process per reader (multiprocessing ``spawn``: nothing
inherited from a fork) run the same driver (``driver.py``): latency at 30 fps, throughput flat
out, CPU per 1000 frames, idle-reader CPU, producer cost against a bare numpy copy, a
``/proc/self/maps`` check that the reader's array really is shared memory, and torn/changed
frames for every transport. Repetitions run inside the same processes; figures are medians
(``report.py``). Then ``latest()`` alone at VGA, 1080p and 4K on each path (``latest_cost.py``).

Writes ``bench/results/compare-<date>.json``, the summary that is committed (the machine and
its load average before and after, the settings, the commit, every run's figures, the tables and
the targets), and beside it ``compare-<date>.raw.json``, the same with every child's raw report
and sample, which git ignores (a full run's raw samples are about 1 MB). Prints the tables
(markdown, ready for README.md) and which of the performance targets the run meets.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np

import driver
import latest_cost
import report
import transports
from transports import TRANSPORTS, RunSpec

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SIZES = {"vga": (480, 640, 3), "720p": (720, 1280, 3), "1080p": (1080, 1920, 3), "4k": (2160, 3840, 3)}
ALIASES = {name.lower().replace(".", ""): name for name in TRANSPORTS}
FRAME_PATHS = ("framebroker", "framebroker-pure")  # framebroker's compiled and pure-Python paths

# Full run: 2 sizes x 3 reader counts x 6 transports = 36 runs of 5.5 s of phases each (0.2 s
# warm-up burst, 0.6 s idle, 3 x (30 frames at 30 fps + 0.4 s flat out + 2 x 0.05 s settling),
# 0.25 s integrity) plus starting the processes (0.5 s with one reader, 2-4 s with 16), then
# latest() at three sizes on both frame paths: about 5 minutes on 2 cores shared with other
# work, less when quiet.
FULL = {
    "sizes": "1080p,vga",
    "readers": "1,4,16",
    "reps": 3,
    "latency_frames": 30,
    "throughput_s": 0.4,
    "integrity_s": 0.25,
    "idle_s": 0.6,
    "latest_sizes": "vga,1080p,4k",
    "latest_calls": 100,
    "latest_idle_calls": 20,
}
QUICK = {
    "sizes": "vga",
    "readers": "2",
    "reps": 1,
    "latency_frames": 12,
    "throughput_s": 0.3,
    "integrity_s": 0.25,
    "idle_s": 0.3,
    "latest_sizes": "vga",
    "latest_calls": 30,
    "latest_idle_calls": 5,
}
# The parts of a run that are the children's raw reports (every sample): only in the .raw.json.
RAW_RUN_FIELDS = ("producer", "readers_raw")
# How long the orchestrator waits for a child's first message (process start, imports, attach).
START_TIMEOUT = 60.0
JOIN_TIMEOUT = 10.0


class RunFailed(Exception):
    pass


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds: VGA, 2 readers, 1 repetition, short phases")
    parser.add_argument("--sizes", help=f"frame sizes: {', '.join(SIZES)} or WxH (full: {FULL['sizes']})")
    parser.add_argument("--readers", help=f"reader counts (full: {FULL['readers']})")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma list (default: all)")
    parser.add_argument("--reps", type=int, help=f"repetitions per run (full: {FULL['reps']})")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate of the latency phase")
    parser.add_argument("--latency-frames", type=int, help=f"frames per latency phase (full: {FULL['latency_frames']})")
    parser.add_argument("--throughput-s", type=float, help=f"seconds per throughput phase (full: {FULL['throughput_s']})")
    parser.add_argument("--integrity-s", type=float, help=f"seconds of the integrity phase (full: {FULL['integrity_s']})")
    parser.add_argument("--idle-s", type=float, help=f"seconds readers wait with no frames (full: {FULL['idle_s']})")
    parser.add_argument("--hold-ms", type=float, default=2.0, help="simulated work while a reader holds a latency or integrity frame")
    parser.add_argument("--latest-sizes", help=f"sizes for the latest() cost, empty to skip (full: {FULL['latest_sizes']})")
    parser.add_argument("--latest-calls", type=int, help="back-to-back latest() calls per size and repetition")
    parser.add_argument("--latest-idle-calls", type=int, help="latest() calls after a frame period idle")
    parser.add_argument(
        "--out", type=Path, help="summary JSON (default bench/results/compare-<date>.json); the raw samples go beside it, in .raw.json"
    )
    parser.add_argument("--require-all", action="store_true", help="fail when a transport's packages are missing instead of skipping it")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="measure nothing: print the tables and targets of these runs' medians")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_size(text: str) -> tuple[int, int, int]:
    text = text.strip().lower()
    if text in SIZES:
        return SIZES[text]
    try:
        width, height = (int(part) for part in text.split("x"))
    except ValueError:
        raise SystemExit(f"compare.py: unknown size {text!r}: use {', '.join(SIZES)} or WIDTHxHEIGHT") from None
    return (height, width, 3)


def parse_transports(text: str) -> list[str]:
    names = []
    for item in text.split(","):
        key = item.strip().lower().replace(".", "")
        if key not in ALIASES:
            raise SystemExit(f"compare.py: unknown transport {item!r}: choose from {', '.join(TRANSPORTS)}")
        names.append(ALIASES[key])
    return names


def size_label(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


# --- the machine ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    def first(path: str, key: str) -> Optional[str]:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":" if ":" in line else "=", 1)[1].strip().strip('"')
        except OSError:
            pass
        return None

    def version(package: str) -> Optional[str]:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    packages = {name: version(name) for name in ("framebroker", "numpy", "posix_ipc", "pyzmq", "iceoryx2")}
    try:
        import zmq

        packages["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(BENCH), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    shm = os.statvfs("/dev/shm")
    return {
        "cpu": first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory": first("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "os": first("/etc/os-release", "PRETTY_NAME"),
        "python": platform.python_version(),
        "packages": packages,
        "framebroker_commit": commit or None,
        "dev_shm_bytes": shm.f_frsize * shm.f_blocks,
        "loadavg_start": os.getloadavg(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    load = machine.get("loadavg_start")
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory']}, Linux {machine['kernel']}, "
        f"Python {machine['python']}; {packages}; load average at start {load[0]:.2f}"
    )


# --- one run ---------------------------------------------------------------------------------------


class _Inbox:
    """Messages from the children of one run, with child liveness checked while waiting."""

    def __init__(self, results: Any, processes: list[Any]) -> None:
        self._results = results
        self._processes = processes
        self.messages: dict[str, dict[int, Any]] = {}

    def wait(self, kind: str, count: int, timeout: float) -> dict[int, Any]:
        deadline = time.monotonic() + timeout
        while len(self.messages.get(kind, {})) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunFailed(f"timed out after {timeout:.0f} s waiting for {count} {kind!r} message(s), got {len(self.messages.get(kind, {}))}")
            try:
                message = self._results.get(timeout=min(0.5, remaining))
            except queue.Empty:
                dead = [p for p in self._processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RunFailed(f"{dead[0].name} died with exit code {dead[0].exitcode}") from None
                continue
            self._store(message)
        return self.messages[kind]

    def _store(self, message: tuple) -> None:
        kind = message[0]
        if kind == "error":
            _kind, role, index, text = message
            raise RunFailed(f"{role} {index if index >= 0 else ''} failed:\n{text}".replace("  ", " "))
        if kind in ("producer_ready", "producer"):
            self.messages.setdefault(kind, {})[0] = message[1]
        else:
            self.messages.setdefault(kind, {})[message[1]] = message[2]


def run_one(ctx: Any, spec: RunSpec) -> dict[str, Any]:
    module = transports.load(spec.transport)
    resources = module.prepare(ctx, spec)
    results = ctx.Queue()
    control = {name: ctx.Event() for name in ("go", "idle_start", "idle_end", "done")}
    stop = ctx.Event()
    processes: list[Any] = []
    inbox = _Inbox(results, processes)
    expected = spec.idle_s + spec.reps * (spec.latency_frames / spec.fps + spec.throughput_s + 2 * spec.settle_s) + spec.integrity_s
    started = time.monotonic()
    timeline: dict[str, float] = {}
    record: dict[str, Any] = {}
    try:
        producer = ctx.Process(target=driver.producer_main, args=(spec, resources, control, results), name="producer", daemon=True)
        producer.start()
        processes.append(producer)
        inbox.wait("producer_ready", 1, START_TIMEOUT)
        timeline["producer_ready"] = time.monotonic() - started
        for index in range(spec.readers):
            reader = ctx.Process(target=driver.reader_main, args=(spec, resources, index, stop, results), name=f"reader {index}", daemon=True)
            reader.start()
            processes.append(reader)
        zero_copy = inbox.wait("reader_ready", spec.readers, START_TIMEOUT + 2 * spec.readers)
        control["go"].set()
        timeline["readers_ready"] = time.monotonic() - started
        reader_pids = [p.pid for p in processes[1:]]
        inbox.wait("idle_start", 1, START_TIMEOUT)
        idle_start = time.monotonic(), [driver.process_cpu_seconds(pid) for pid in reader_pids]
        control["idle_start"].set()
        inbox.wait("idle_end", 1, START_TIMEOUT + spec.idle_s)
        idle_end = time.monotonic(), [driver.process_cpu_seconds(pid) for pid in reader_pids]
        control["idle_end"].set()
        readers = inbox.wait("reader", spec.readers, 3 * expected + 60)
        timeline["reader_reports"] = time.monotonic() - started
        control["done"].set()
        producer_report = inbox.wait("producer", 1, driver.END_TIMEOUT + 30)[0]
        timeline["producer_report"] = time.monotonic() - started
        record = {
            "status": "ok",
            "producer": producer_report,
            "readers_raw": [readers[i] for i in range(spec.readers)],
            "zero_copy": [zero_copy[i] for i in range(spec.readers)],
            "idle": {
                "wall_s": idle_end[0] - idle_start[0],
                "reader_cpu_s": [None if a is None or b is None else b - a for a, b in zip(idle_start[1], idle_end[1])],
            },
        }
        if not all(r["ended"] for r in record["readers_raw"]):
            raise RunFailed("a reader stopped before it saw the end of the run")
        record["summary"] = report.summarize_run(producer_report, record["readers_raw"], record["zero_copy"], record["idle"], spec.reps)
    except RunFailed as exc:
        record = {"status": "error", "reason": str(exc).splitlines()[0], "error": str(exc)}
    finally:
        stop.set()
        for event in control.values():
            event.set()
        for process in processes:
            process.join(JOIN_TIMEOUT)
        for process in processes:
            if process.is_alive():
                process.terminate()  # by pid, only our own children
                process.join(JOIN_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
        module.cleanup(resources)
        results.close()
    record["wall_s"] = time.monotonic() - started
    record["timeline_s"] = timeline  # where the wall time of the run went
    return record


def run_latest(ctx: Any, transport: str, shapes: list[tuple[int, int, int]], reps: int, calls: int, idle_calls: int, fps: float) -> dict[str, Any]:
    results = ctx.Queue()
    process = ctx.Process(target=latest_cost.child_main, args=(transport, shapes, reps, calls, idle_calls, 1.0 / fps, results), name="latest", daemon=True)
    process.start()
    inbox = _Inbox(results, [process])
    try:
        runs = inbox.wait("latest", 1, 600)
    finally:
        process.join(JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join()
        results.close()
    raw = runs[0]
    table = {}
    for size, size_runs in raw.items():
        table[size] = {
            "new_frame_us": latest_cost.median_of(size_runs, "new_frame"),
            "array_view_us": latest_cost.median_of(size_runs, "array_view"),
            "same_frame_us": latest_cost.median_of(size_runs, "same_frame"),
            "after_publish_us": latest_cost.median_of(size_runs, "after_publish"),
            "after_idle_us": latest_cost.median_of(size_runs, "after_idle"),
            "after_idle_p99_us": latest_cost.median_of(size_runs, "after_idle", "p99_us"),
            "runs": size_runs,
        }
    return table


# --- main ------------------------------------------------------------------------------------------


def merge_main(paths: list[Path]) -> int:
    documents = [json.loads(path.read_text()) for path in paths]
    order = {name: index for index, name in enumerate(TRANSPORTS)}
    runs, latest = report.merge(documents)
    runs.sort(key=lambda run: (-run["height"], run["readers"], order.get(run["transport"], len(order))))
    for document in documents:
        machine = document["machine"]
        print(f"{document['date']}: {machine_line(machine)}; load average at end {machine['loadavg_end'][0]:.2f}; {document['duration_s']:.0f} s")
    print(f"\nMedians of {len(documents)} runs (ratios between the medians)\n")
    print(report.tables(runs, latest))
    print("\nPerformance targets, from these medians:")
    print(report.targets_text(report.targets(runs, latest)))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_main(args.merge)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    reader_counts = [int(r) for r in str(args.readers).split(",") if r.strip()]
    names = parse_transports(args.transports)
    latest_sizes = [parse_size(s) for s in args.latest_sizes.split(",") if s.strip()]
    ctx = multiprocessing.get_context("spawn")
    machine = machine_info()
    run_id = f"{os.getpid():x}{uuid.uuid4().hex[:4]}"
    started = time.monotonic()
    settings = {
        key: getattr(args, key)
        for key in ("quick", "sizes", "readers", "reps", "fps", "latency_frames", "throughput_s", "integrity_s", "idle_s", "hold_ms", "latest_sizes", "latest_calls", "latest_idle_calls")
    }
    print(f"framebroker compare, run {run_id}: {machine_line(machine)}", file=sys.stderr)
    missing = {name: transports.missing_packages(name) for name in names}
    runs: list[dict[str, Any]] = []
    # Within each size and reader count the transports take turns at going first, so none is
    # always the one that meets the machine just after process start-up or a heavy neighbour.
    plan = []
    for group, (shape, readers) in enumerate((shape, readers) for shape in sizes for readers in reader_counts):
        turn = group % len(names)
        plan += [(shape, readers, name) for name in names[turn:] + names[:turn]]
    for number, (shape, readers, name) in enumerate(plan, 1):
        spec = RunSpec(
            transport=name,
            tag=f"{run_id}-{number}",
            shape=shape,
            readers=readers,
            reps=args.reps,
            fps=args.fps,
            latency_frames=args.latency_frames,
            throughput_s=args.throughput_s,
            integrity_s=args.integrity_s,
            idle_s=args.idle_s,
            hold_s=args.hold_ms / 1000.0,
        )
        base = {"transport": name, "size": size_label(shape), "width": shape[1], "height": shape[0], "readers": readers, "tag": spec.tag, "order": number}
        if missing[name]:
            record = {"status": "skipped", "reason": "not installed: " + "; ".join(f"{m} ({transports.INSTALL[m]})" for m in missing[name])}
        else:
            record = run_one(ctx, spec)
        runs.append({**base, **record})
        status = record["status"] if record["status"] != "ok" else f"{record['wall_s']:.1f} s"
        print(f"[{number}/{len(plan)}] {size_label(shape)} {readers} reader(s) {name}: {status}", file=sys.stderr)
        if record["status"] == "error":
            print(record["error"], file=sys.stderr)
    latest: dict[str, Any] = {}
    for path in (name for name in names if name in FRAME_PATHS and not missing[name]):
        if latest_sizes:
            latest[path] = run_latest(ctx, path, latest_sizes, args.reps, args.latest_calls, args.latest_idle_calls, args.fps)
            print(f"latest() costs of {path} measured at {', '.join(latest[path])}", file=sys.stderr)
    runs.sort(key=lambda run: (sizes.index((run["height"], run["width"], 3)), reader_counts.index(run["readers"]), names.index(run["transport"])))
    report.add_ratios(runs)
    checks = report.targets(runs, latest)
    text = report.tables(runs, latest)
    machine["loadavg_end"] = os.getloadavg()
    duration = time.monotonic() - started
    document = {
        "schema": 2,
        "run_id": run_id,
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "duration_s": duration,
        "machine": machine,
        "settings": settings,
        "baseline": transports.BASELINE,
        "runs": runs,
        "latest": latest,
        "targets": checks,
        "table_markdown": text,
    }
    out = args.out or RESULTS / f"compare-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    raw = raw_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(raw, document)
    write_json(out, summary_of(document, raw.name))
    print(f"Machine: {machine_line(machine)}; load average at end {machine['loadavg_end'][0]:.2f}")
    print(f"Settings: {_settings_line(args)}; total {duration:.0f} s")
    print()
    print(text)
    print()
    print("Performance targets, from this run:")
    print(report.targets_text(checks))
    print(f"\nwrote {out} (raw samples: {raw})")
    failed = [r for r in runs if r["status"] == "error"]
    skipped = [r for r in runs if r["status"] == "skipped"]
    if failed or (args.require_all and skipped):
        return 1
    return 0


def raw_path(out: Path) -> Path:
    """Where the raw samples of the summary ``out`` go (``*.raw.json`` is git-ignored)."""
    return out.with_name(f"{out.stem}.raw.json")


def summary_of(document: dict[str, Any], raw_name: str) -> dict[str, Any]:
    """The document without the children's raw reports: what a result needs to be read, re-tabled
    (``report.tables`` works on it) and compared, at about a tenth of the size."""
    runs = [{key: value for key, value in run.items() if key not in RAW_RUN_FIELDS} for run in document["runs"]]
    return {**document, "runs": runs, "raw_samples": f"{raw_name} (not kept in git)"}


def write_json(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=_json_default))
    tmp.replace(path)


def _settings_line(args: argparse.Namespace) -> str:
    return (
        f"{args.reps} repetitions in the same processes; latency {args.latency_frames} frames at {args.fps:g} fps; "
        f"throughput {args.throughput_s:g} s flat out; integrity {args.integrity_s:g} s flat out with {args.hold_ms:g} ms holds; "
        f"idle {args.idle_s:g} s"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
