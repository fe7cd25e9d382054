"""The benchmark harness (``bench/compare.py``) runs, reports every transport and can see tears.

Not a benchmark: ``--quick`` runs for seconds and no figure is judged here, only that the
instrument works. Peers (pyzmq, iceoryx2) come from the ``bench`` extra; without them a
developer's run skips them, but on CI (``CI=true``, where ``.ci/run`` installs the extra) a
missing peer fails. framebroker runs on both frame paths; the compiled one is skipped where the
extension is not built (``.ci/run`` makes sure it is).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TRANSPORTS = ["framebroker", "framebroker-pure", "naive", "mp.Queue", "zmq", "iceoryx2"]
PEER_PACKAGES = {"zmq": "zmq", "iceoryx2": "iceoryx2"}
COMPILED = {"framebroker": "framebroker._fastpath"}
ZERO_COPY = {"framebroker": True, "framebroker-pure": True, "naive": True, "iceoryx2": True, "mp.Queue": False, "zmq": False}
SUMMARY_FIELDS = [
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "fps_per_reader",
    "seen",
    "publish_us_30fps",
    "copy_warm_us",
    "publish_vs_copy",
    "producer_cpu_ms_per_1000_30fps",
    "producer_cpu_ms_per_1000_max",
    "reader_cpu_ms_per_1000_30fps",
    "reader_cpu_ms_per_1000_max",
    "idle_reader_pct_core",
    "torn",
    "changed",
    "zero_copy",
    "latency_p50_vs_baseline",
    "fps_vs_baseline",
]


def _frame_identity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_frame_identity", BENCH / "frame_identity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_tear_check_sees_torn_and_changed_frames():
    ident = _frame_identity()
    shape = (48, 64, 3)
    sources = ident.SourceFrames(shape)
    check = ident.FrameCheck(shape)
    old = sources.stamped(ident.frame_number(ident.KIND_THROUGHPUT, 0, 7), 1000).copy()
    new = sources.stamped(ident.frame_number(ident.KIND_THROUGHPUT, 0, 8), 2000).copy()
    assert not check.torn(*check.read(old))
    assert not check.torn(*check.read(new))

    # A copy caught half way: the head is the new frame's, the tail the old one's.
    half = old.copy()
    half.reshape(-1)[: old.nbytes // 2] = new.reshape(-1)[: old.nbytes // 2]
    assert check.torn(*check.read(half))

    # Head and tail intact, a stretch in the middle from the other frame: the spots see it.
    middle = old.copy()
    start, stop = old.nbytes // 3, old.nbytes // 3 + old.nbytes // 10
    middle.reshape(-1)[start:stop] = new.reshape(-1)[start:stop]
    assert check.torn(*check.read(middle))

    # Changed while held: the second reading differs from the first.
    held = old.copy()
    first = check.read(held)
    held.reshape(-1)[held.nbytes // 2 :] = new.reshape(-1)[held.nbytes // 2 :]
    assert check.read(held) != first


@pytest.mark.bench
@pytest.mark.timeout(600)
def test_quick_compare_reports_every_transport(tmp_path):
    missing = [name for name, package in PEER_PACKAGES.items() if importlib.util.find_spec(package) is None]
    if missing and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must install the bench extra (pip install '.[bench]'); missing peers: {missing}")
    missing += [name for name, module in COMPILED.items() if importlib.util.find_spec(module) is None]
    out = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, f"compare.py --quick failed\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    document = json.loads(out.read_text())
    # The summary leaves the raw samples to the .raw.json beside it (git-ignored in bench/results).
    raw_path = tmp_path / "quick.raw.json"
    assert document["raw_samples"].startswith(raw_path.name)
    raw_runs = {run["transport"]: run for run in json.loads(raw_path.read_text())["runs"]}

    runs = {run["transport"]: run for run in document["runs"]}
    assert sorted(runs) == sorted(TRANSPORTS)
    for name, run in runs.items():
        if name in missing:
            assert run["status"] == "skipped"
            continue
        assert run["status"] == "ok", run.get("error")
        summary = run["summary"]
        for field in SUMMARY_FIELDS:
            assert summary.get(field) is not None, f"{name}: {field} missing"
        assert summary["zero_copy"] is ZERO_COPY[name], f"{name}: zero-copy check says {summary['zero_copy']}"
        assert "readers_raw" not in run and len(raw_runs[name]["readers_raw"]) == run["readers"]

    # The baseline tears and changes frames under a reader; if it did not, the check would be blind.
    naive = runs["naive"]["summary"]
    assert naive["torn"] + naive["changed"] > 0
    assert naive["changed_by_phase"]["integrity"] > 0
    for path in ("framebroker", "framebroker-pure"):
        if path in missing:
            continue
        framebroker = runs[path]["summary"]
        assert framebroker["torn"] == 0 and framebroker["changed"] == 0
        assert framebroker["integrity_frames"] > 0
        assert document["latest"][path]["640x480"]["new_frame_us"] > 0
    for key in ("cpu", "cores", "kernel", "python", "packages"):
        assert document["machine"][key]
    assert {check["target"] for check in document["targets"]}
    assert "| framebroker |" in document["table_markdown"] and "| framebroker-pure |" in document["table_markdown"]
    assert "| framebroker-pure |" in result.stdout

    leftovers = [entry for entry in os.listdir("/dev/shm") if document["run_id"] in entry]
    leftovers += [entry for entry in os.listdir("/tmp") if entry.startswith("fbbench-") and document["run_id"] in entry]
    assert not leftovers, f"compare.py left shared objects behind: {leftovers}"


def test_quick_gst_feed_measures_every_way(tmp_path):
    """bench/gst_feed.py runs each way of feeding a GStreamer encoder; I420 halves the pipe."""
    from test_sources import require_gstreamer

    require_gstreamer()
    out = tmp_path / "feed.json"
    result = subprocess.run([sys.executable, str(BENCH / "gst_feed.py"), "--quick", "--output", str(out)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    size = json.loads(out.read_text())["sizes"]["240p"]
    ways = size["ms_per_frame"]
    assert set(ways) == {"bgr>bgrx", "bgr>i420", "i420", "bgr>i420>x264enc", "i420>x264enc", "bgrx", "bgrx>bgr"}
    assert ways["i420"]["pipe_bytes"] * 2 == ways["bgr>i420"]["pipe_bytes"] == 320 * 240 * 3
    assert all(figures["total_ms"] > 0 for figures in ways.values()) and len(size["ratios"]) == 4
