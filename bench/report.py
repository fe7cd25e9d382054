"""From raw child reports to figures: per-run summaries, ratios to the baseline, tables, targets.

How a figure is formed (this machine is noisy, so every figure is a median of medians):

* latency: per reader and repetition, p50/p99/max of (usable time - pre-write timestamp) over the
  latency phase; then the median across readers; then the median across repetitions.
  ``worst_ms`` is the plain maximum over everything.
* throughput: per reader and repetition, throughput frames received / the producer's phase
  duration; median across readers (``fps_min`` is the slowest reader), then across repetitions.
  ``seen`` is received / published.
* CPU per 1000 frames: a phase's CPU time (every thread of the process) / its frames x 1000, in
  ms; for readers the median across readers. ``30fps`` is the latency phase, ``max`` the
  throughput phase.
* producer cost: median ``publish`` time at 30 fps and flat out, each with its ratio to a bare
  ``np.copyto`` of the same frame into one shared-memory buffer, timed by the same process in
  the same run at 30 fps and back to back respectively (``driver._bare_copies``; a copy into
  private memory is recorded too).
* idle reader: CPU / wall time while waiting with no frames, in % of one core, read from
  ``/proc/PID/task/*/schedstat`` by the orchestrator at both ends of the idle window.
* torn / changed: totals over every phase, repetition and reader.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

import numpy as np

from transports import BASELINE

LATENCY_KIND = "latency"
THROUGHPUT_KIND = "throughput"


def _median(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def _group(reader: dict[str, Any], kind: str, rep: int) -> Optional[dict[str, Any]]:
    for group in reader["groups"]:
        if group["kind"] == kind and group["rep"] == rep:
            return group
    return None


def _per_1000_ms(cpu_s: Optional[float], frames: Optional[int]) -> Optional[float]:
    if cpu_s is None or not frames:
        return None
    return cpu_s / frames * 1e6


def summarize_run(producer: dict[str, Any], readers: list[dict[str, Any]], zero_copy: list[dict[str, Any]], idle: dict[str, Any], reps: int) -> dict[str, Any]:
    rep_rows = []
    worst = 0.0
    for rep in range(reps):
        prod = producer["reps"][rep]
        latency_phase, throughput_phase = prod["latency"], prod["throughput"]
        p50s, p99s, maxes, fps, seen, cpu_30, cpu_max = [], [], [], [], [], [], []
        for reader in readers:
            lat = _group(reader, LATENCY_KIND, rep)
            if lat and lat.get("latency_us"):
                samples = np.asarray(lat["latency_us"], dtype=np.float64) / 1000.0
                p50s.append(float(np.percentile(samples, 50)))
                p99s.append(float(np.percentile(samples, 99)))
                maxes.append(float(samples.max()))
                worst = max(worst, float(samples.max()))
                cpu_30.append(_per_1000_ms(lat["cpu_s"], lat["frames"]))
            thr = _group(reader, THROUGHPUT_KIND, rep)
            received = thr["frames"] if thr else 0
            fps.append(received / throughput_phase["duration_s"])
            seen.append(received / throughput_phase["frames"] if throughput_phase["frames"] else None)
            if thr:
                cpu_max.append(_per_1000_ms(thr["cpu_s"], thr["frames"]))
        rep_rows.append(
            {
                "latency_p50_ms": _median(p50s),
                "latency_p99_ms": _median(p99s),
                "latency_max_ms": _median(maxes),
                "latency_frames_per_reader": _median([len(_group(r, LATENCY_KIND, rep)["latency_us"]) if _group(r, LATENCY_KIND, rep) else 0 for r in readers]),
                "fps_per_reader": _median(fps),
                "fps_min_reader": min(fps) if fps else None,
                "producer_fps": throughput_phase["fps"],
                "seen": _median(seen),
                "publish_us_30fps": latency_phase["publish"]["p50_us"],
                "publish_us_max_speed": throughput_phase["publish"]["p50_us"],
                "producer_cpu_ms_per_1000_30fps": _per_1000_ms(latency_phase["cpu_s"], latency_phase["frames"]),
                "producer_cpu_ms_per_1000_max": _per_1000_ms(throughput_phase["cpu_s"], throughput_phase["frames"]),
                "reader_cpu_ms_per_1000_30fps": _median(cpu_30),
                "reader_cpu_ms_per_1000_max": _median(cpu_max),
            }
        )
    summary: dict[str, Any] = {key: _median([row[key] for row in rep_rows]) for key in rep_rows[0]} if rep_rows else {}
    summary["latency_worst_ms"] = worst
    pooled = [v for r in readers for g in r["groups"] if g["kind"] == LATENCY_KIND for v in g.get("latency_us", [])]
    if pooled:
        values = np.asarray(pooled, dtype=np.float64) / 1000.0
        summary["latency_pooled"] = {"n": len(pooled), "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}
    bare = producer["bare_copy"]
    for kind in ("warm", "cold", "private", "flat", "flat_private"):
        summary[f"copy_{kind}_us"] = bare[kind]["p50_us"]
    summary["publish_vs_copy"] = _ratio(summary.get("publish_us_30fps"), bare["warm"]["p50_us"])
    summary["publish_vs_copy_max_speed"] = _ratio(summary.get("publish_us_max_speed"), bare["flat"]["p50_us"])
    idle_pct = [cpu / idle["wall_s"] * 100.0 for cpu in idle["reader_cpu_s"] if cpu is not None and idle["wall_s"] > 0]
    summary["idle_reader_pct_core"] = _median(idle_pct)
    summary["idle_reader_pct_core_max"] = max(idle_pct) if idle_pct else None
    summary["idle_window_s"] = idle["wall_s"]
    torn: dict[str, int] = {}
    changed: dict[str, int] = {}
    for reader in readers:
        for group in reader["groups"]:
            torn[group["kind"]] = torn.get(group["kind"], 0) + group["torn"]
            changed[group["kind"]] = changed.get(group["kind"], 0) + group["changed"]
    summary["torn"] = sum(torn.values())
    summary["changed"] = sum(changed.values())
    summary["torn_by_phase"] = torn
    summary["changed_by_phase"] = changed
    summary["integrity_frames"] = sum(g["frames"] for r in readers for g in r["groups"] if g["kind"] == "integrity")
    summary["zero_copy"] = bool(zero_copy) and all(z.get("zero_copy") for z in zero_copy)
    summary["reader_array_mapping"] = zero_copy[0].get("path") if zero_copy else None
    summary["reps"] = rep_rows
    return summary


def merge(documents: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Several runs of compare.py as one: per transport, size and reader count, the median of
    each figure over the runs (torn and changed frames: the sum; zero-copy: all runs), and the
    same for latest(); ratios are then taken between these medians."""

    def median_of(values: list[Any]) -> Any:
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return _median(numbers) if numbers else None

    merged: dict[tuple, dict[str, Any]] = {}
    for document in documents:
        for run in document["runs"]:
            key = (run["size"], run["readers"], run["transport"])
            entry = merged.setdefault(key, {**{k: run[k] for k in ("transport", "size", "width", "height", "readers")}, "summaries": [], "statuses": []})
            entry["statuses"].append(run["status"])
            if run["status"] == "ok":
                entry["summaries"].append(run["summary"])
    runs = []
    for entry in merged.values():
        summaries = entry.pop("summaries")
        statuses = entry.pop("statuses")
        if not summaries:
            runs.append({**entry, "status": statuses[0], "reason": "in every run"})
            continue
        summary = {key: median_of([s.get(key) for s in summaries]) for key in summaries[0] if not isinstance(summaries[0][key], (dict, list))}
        summary["torn"] = sum(s["torn"] for s in summaries)
        summary["changed"] = sum(s["changed"] for s in summaries)
        summary["zero_copy"] = all(s["zero_copy"] for s in summaries)
        summary["runs_ok"] = f"{len(summaries)}/{len(statuses)}"
        runs.append({**entry, "status": "ok", "summary": summary})
    latest: dict[str, Any] = {}
    for document in documents:
        for path, rows in document.get("latest", {}).items():
            for size, row in rows.items():
                latest.setdefault(path, {}).setdefault(size, []).append(row)
    latest = {path: {size: {key: median_of([r[key] for r in rows]) for key in rows[0] if key != "runs"} for size, rows in sizes.items()} for path, sizes in latest.items()}
    add_ratios(runs)
    return runs, latest


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Ratios of each run's latency and throughput to the baseline's, same size and readers."""
    baseline = {(r["size"], r["readers"]): r["summary"] for r in runs if r["transport"] == BASELINE and r["status"] == "ok"}
    for run in runs:
        if run["status"] != "ok":
            continue
        base = baseline.get((run["size"], run["readers"]))
        summary = run["summary"]
        summary["latency_p50_vs_baseline"] = _ratio(summary.get("latency_p50_ms"), base and base.get("latency_p50_ms"))
        summary["fps_vs_baseline"] = _ratio(summary.get("fps_per_reader"), base and base.get("fps_per_reader"))


def _ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or not reference:
        return None
    return value / reference


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}{suffix}"
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def tables(runs: list[dict[str, Any]], latest: dict[str, Any]) -> str:
    lines = [
        f"Latency (30 fps) and throughput (producer flat out); ratios to `{BASELINE}`, same frame size and readers",
        "",
        "| frame | readers | transport | p50 ms | p99 ms | max ms | p50 / naive | fps per reader | fps / naive | frames seen | torn | changed |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        s = run.get("summary") or {}
        head = f"| {run['size']} | {run['readers']} | {run['transport']} |"
        if run["status"] != "ok":
            lines.append(f"{head} {run['status']}: {run.get('reason', '')} |" + " |" * 8)
            continue
        seen = s.get("seen")
        lines.append(
            f"{head} {_fmt(s['latency_p50_ms'])} | {_fmt(s['latency_p99_ms'])} | {_fmt(s['latency_max_ms'])} | "
            f"{_fmt(s.get('latency_p50_vs_baseline'))} | {_fmt(s['fps_per_reader'], 0)} | {_fmt(s.get('fps_vs_baseline'))} | "
            f"{_fmt(seen * 100 if seen is not None else None, 0, '%')} | {s['torn']} | {s['changed']} |"
        )
    lines += [
        "",
        "Costs, each as 30 fps / flat out: producer `publish` (median µs) and its ratio to a bare numpy copy of the frame into shared memory, timed by the same process; "
        "CPU in ms per 1000 frames",
        "",
        "| frame | readers | transport | publish µs | / numpy copy | producer CPU | reader CPU | idle reader % core | zero-copy view |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        if run["status"] != "ok":
            continue
        s = run["summary"]
        lines.append(
            f"| {run['size']} | {run['readers']} | {run['transport']} | {_fmt(s['publish_us_30fps'], 0)} / {_fmt(s['publish_us_max_speed'], 0)} | "
            f"{_fmt(s['publish_vs_copy'])} / {_fmt(s['publish_vs_copy_max_speed'])} | "
            f"{_fmt(s['producer_cpu_ms_per_1000_30fps'], 0)} / {_fmt(s['producer_cpu_ms_per_1000_max'], 0)} | "
            f"{_fmt(s['reader_cpu_ms_per_1000_30fps'], 0)} / {_fmt(s['reader_cpu_ms_per_1000_max'], 0)} | "
            f"{_fmt(s['idle_reader_pct_core'], 3)} | {_fmt(s['zero_copy'])} |"
        )
    if latest:
        lines += [
            "",
            "framebroker `latest()` alone, µs (median), on each frame path: back to back on a new frame (written in place), its first `.array`, the same frame again; "
            "right after a full `publish()` (caches flushed by the copy); after one frame period idle (median and p99)",
            "",
            "| frame path | frame | new frame | + `.array` | same frame | after a publish | after idle | after idle p99 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for path, rows in latest.items():
            for size, row in rows.items():
                lines.append(
                    f"| {path} | {size} | {_fmt(row['new_frame_us'], 1)} | {_fmt(row['array_view_us'], 1)} | {_fmt(row['same_frame_us'], 1)} | "
                    f"{_fmt(row['after_publish_us'], 1)} | {_fmt(row['after_idle_us'], 1)} | {_fmt(row['after_idle_p99_us'], 1)} |"
                )
    return "\n".join(lines)


# What each frame path must reach (the project's performance targets; the compiled path's are
# stricter): latency p50 at 1080p with 4 readers at most `latency` x naive and at most
# `latency_iox` x iceoryx2 (None: below it); throughput flat out at 1080p with 1 and 4 readers at
# least `fps` x naive and `fps_iox` x iceoryx2 (None: above it); the producer's cost growing by at
# most `growth_us` per reader from 1 to 16; `latest()` under 20 us back to back, and for the
# compiled path also after a frame period of idle.
PATH_TARGETS = {
    "framebroker": {"latency": 1.0, "latency_iox": 0.85, "fps": 0.95, "fps_iox": 1.1, "growth_us": 3.0, "latest_after_idle": True},
    "framebroker-pure": {"latency": 1.1, "latency_iox": None, "fps": 0.9, "fps_iox": None, "growth_us": 10.0, "latest_after_idle": False},
}
LATEST_LIMIT_US = 20.0


def targets(runs: list[dict[str, Any]], latest: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets, checked against this run's figures for each frame path (n/a
    when not measured)."""

    def summary(transport: str, size: str, readers: int) -> Optional[dict[str, Any]]:
        for run in runs:
            if run["transport"] == transport and run["size"] == size and run["readers"] == readers and run["status"] == "ok":
                return run["summary"]
        return None

    checks: list[dict[str, Any]] = []

    def add(name: str, met: Optional[bool], detail: str) -> None:
        checks.append({"target": name, "met": met, "detail": detail})

    def compare(name: str, value: Optional[float], base: Optional[float], iox: Optional[float], ratio: float, ratio_iox: Optional[float], lower: bool, unit: str) -> None:
        if value is None or not base:
            add(name, None, "not measured")
            return
        met = value / base <= ratio if lower else value / base >= ratio
        if ratio_iox is None:
            met = met and iox is not None and (value < iox if lower else value > iox)
        else:
            met = met and iox is not None and (value / iox <= ratio_iox if lower else value / iox >= ratio_iox)
        digits = 3 if unit == "ms" else 0
        versus = f"{value / iox:.2f}x iceoryx2 ({iox:.{digits}f} {unit})" if iox else "iceoryx2 not measured"
        add(name, met, f"{value:.{digits}f} {unit} = {value / base:.2f}x naive, {versus}")

    hd = "1920x1080"
    for path, goal in PATH_TARGETS.items():
        if not any(run["transport"] == path for run in runs) and path not in latest:
            continue
        iox_latency = "below iceoryx2" if goal["latency_iox"] is None else f"<= {goal['latency_iox']}x iceoryx2"
        fb4, base4, iox4 = summary(path, hd, 4), summary(BASELINE, hd, 4), summary("iceoryx2", hd, 4)
        compare(
            f"{path}: 1080p, 4 readers: p50 latency <= {goal['latency']}x naive and {iox_latency}",
            fb4 and fb4["latency_p50_ms"], base4 and base4["latency_p50_ms"], iox4 and iox4["latency_p50_ms"],
            goal["latency"], goal["latency_iox"], True, "ms",
        )
        iox_fps = "above iceoryx2" if goal["fps_iox"] is None else f">= {goal['fps_iox']}x iceoryx2"
        for readers in (1, 4):
            fb_run, base, iox = summary(path, hd, readers), summary(BASELINE, hd, readers), summary("iceoryx2", hd, readers)
            compare(
                f"{path}: 1080p, {readers} reader(s): throughput >= {goal['fps']}x naive and {iox_fps}",
                fb_run and fb_run["fps_per_reader"], base and base["fps_per_reader"], iox and iox["fps_per_reader"],
                goal["fps"], goal["fps_iox"], False, "fps",
            )
        rows = latest.get(path)
        name = f"{path}: latest() < {LATEST_LIMIT_US:g} us back to back" + (" and after a frame period idle" if goal["latest_after_idle"] else "") + ", every size"
        if rows:
            worst = max(max(row["new_frame_us"], row["after_idle_us"] if goal["latest_after_idle"] else 0.0) for row in rows.values())
            add(name, worst < LATEST_LIMIT_US, ", ".join(f"{size} {row['new_frame_us']:.1f} us (after idle {row['after_idle_us']:.1f})" for size, row in rows.items()))
        else:
            add(name, None, "not measured")
        fb_hd = [run for run in runs if run["transport"] == path and run["size"] == hd and run["status"] == "ok"]
        if fb_hd:
            worst_ratio = max(run["summary"]["publish_vs_copy"] for run in fb_hd)
            add(f"{path}: 1080p: producer cost <= 1.2x one numpy copy", worst_ratio <= 1.2, "worst over reader counts: " + ", ".join(f"{run['readers']} readers {run['summary']['publish_vs_copy']:.2f}x" for run in fb_hd))
        else:
            add(f"{path}: 1080p: producer cost <= 1.2x one numpy copy", None, "not measured")
        fb1, fb16 = summary(path, hd, 1), summary(path, hd, 16)
        name = f"{path}: 1080p, 16 readers: producer cost grows <= {goal['growth_us']:g} us per reader"
        if fb1 and fb16:
            growth = (fb16["publish_us_30fps"] - fb1["publish_us_30fps"]) / 15
            add(name, growth <= goal["growth_us"], f"{fb1['publish_us_30fps']:.0f} us -> {fb16['publish_us_30fps']:.0f} us: {growth:+.1f} us per reader")
        else:
            add(name, None, "needs 1 and 16 readers at 1080p")
        fb_runs = [run for run in runs if run["transport"] == path and run["status"] == "ok"]
        idle = [run["summary"]["idle_reader_pct_core_max"] for run in fb_runs if run["summary"]["idle_reader_pct_core_max"] is not None]
        add(f"{path}: idle reader < 0.5% of a core", (max(idle) < 0.5) if idle else None, f"worst {max(idle):.3f}%" if idle else "not measured")
        if fb_runs:
            torn = sum(run["summary"]["torn"] + run["summary"]["changed"] for run in fb_runs)
            add(f"{path}: zero torn or changed frames in every run", torn == 0, f"{torn} torn or changed over {len(fb_runs)} runs")
    return checks


def targets_text(checks: list[dict[str, Any]]) -> str:
    marks = {True: "met", False: "NOT MET", None: "n/a"}
    return "\n".join(f"- [{marks[c['met']]}] {c['target']}: {c['detail']}" for c in checks)
