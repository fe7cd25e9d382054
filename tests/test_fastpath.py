"""The two frame paths: the compiled one (framebroker/_fastpath.c) and the pure-Python one.

The ring's invariant tests run on both (``.ci/run`` runs them again with FRAMEBROKER_PURE=1);
this file checks what is particular to having two: choosing, warning, building without a
compiler, the same figures written either way, and a producer on one path serving readers on
the other, frames intact and woken at once.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

import framebroker as fb
from framebroker import _fast, _ring, testpattern
from framebroker._layout import FLAG_FUTEX
from framebroker._segment import open_segment
from framebroker._table import live_entries, read_entry

from conftest import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("compiled", "pure")


def _require_compiled() -> None:
    if _fast._compiled is None:
        pytest.skip(f"the compiled frame path is not built here: {_fast.why_pure}")


def _path_env(path: str) -> dict:
    environment = dict(os.environ)
    environment.pop(_fast.PURE_VARIABLE, None)
    if path == "pure":
        environment[_fast.PURE_VARIABLE] = "1"
    return environment


def _use_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    if path == "pure":
        monkeypatch.setenv(_fast.PURE_VARIABLE, "1")
    else:
        monkeypatch.delenv(_fast.PURE_VARIABLE, raising=False)


@pytest.fixture(params=PATHS)
def frame_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test's Publishers and Readers on each frame path in turn."""
    if request.param == "compiled":
        _require_compiled()
    _use_path(monkeypatch, request.param)
    return request.param


def _worker(env, path: str, role: str, stream: str, *args: str):
    return env.spawn([*env.worker_argv(role, stream), *args], label=f"{path} worker {role}", env=_path_env(path))


def _entries(stream: str) -> list:
    segment = open_segment(stream, for_status=True)
    try:
        segment.map(control_writable=False, data_access=None)
        return [read_entry(segment.control, offset) for _, offset in live_entries(segment.locks, segment.layout, segment.control)]
    finally:
        segment.close()


# --- choosing the path ------------------------------------------------------------------------------


def test_the_extension_is_built_for_this_ring_layout():
    _require_compiled()
    assert _fast._layout_mismatches(_fast._compiled) == []
    stale = types.ModuleType("framebroker._fastpath")
    stale.LAYOUT = dict(_fast._compiled.LAYOUT, WAKE_OFFSET=0)  # type: ignore[attr-defined]
    assert _fast._layout_mismatches(stale) == ["WAKE_OFFSET"]


def test_each_attachment_runs_the_path_chosen_when_it_attaches(env, frame_path):
    name = env.name()
    with fb.Publisher(name, shape=(48, 64, 3), slots=4) as pub, fb.Reader(name, name="chosen") as cam:
        compiled = frame_path == "compiled"
        assert (pub._fast is not None) is compiled
        assert (cam._attachment.fast is not None) is compiled
        assert bool(cam._attachment.wake_flags & FLAG_FUTEX) is (compiled and _fast.readers_use_futex())
        pub.publish(testpattern.render(1, (48, 64, 3)))
        assert testpattern.verify(cam.latest(timeout=1.0).array) == 1


def test_a_missing_extension_is_one_warning_that_says_what_to_install():
    # The import system refuses a module whose sys.modules entry is None: as if it were not built.
    code = "import sys; sys.modules['framebroker._fastpath'] = None; import framebroker, framebroker._fast as f; print(f.compiled())"
    environment = _path_env("compiled")
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=environment, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, result.stderr
    assert "pure-Python frame path" in warnings[0] and "python3-dev" in warnings[0] and "FRAMEBROKER_PURE=1" in warnings[0]
    chosen = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=_path_env("pure"), timeout=60)
    assert chosen.returncode == 0 and "RuntimeWarning" not in chosen.stderr, chosen.stderr


@pytest.mark.timeout(240)
def test_installing_without_a_c_compiler_still_works(tmp_path):
    """``pip wheel .`` with a compiler that always fails: the build says so and goes on."""
    environment = dict(os.environ, CC="false", PIP_NO_INPUT="1")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-v", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=220,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"building extension .framebroker\._fastpath. failed", result.stdout + result.stderr)
    wheels = list(tmp_path.glob("framebroker-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "framebroker/_fast.py" in names and not [n for n in names if "_fastpath" in n and n.endswith(".so")]


# --- the same protocol, written down for both ------------------------------------------------------


def test_the_compiled_path_keeps_the_protocols_order_and_names_its_barriers():
    source = (ROOT / "framebroker" / "_fastpath.c").read_text()
    commit = source[source.index("static PyObject *ProducerPath_commit") :]
    order = [
        "memcpy(base + self->meta_offset",  # the record
        "__atomic_thread_fence(__ATOMIC_RELEASE)",
        "byte_lock(self->fd, F_UNLCK",  # the publishing barrier
        "__atomic_store_n(&head->newest_seq, meta.seq, __ATOMIC_RELEASE)",
        "__atomic_thread_fence(__ATOMIC_SEQ_CST)",
        "memcmp(base + self->changes_offset",  # the change bytes, after HEAD
        "producer_wake(self)",
    ]
    positions = [commit.index(step) for step in order]
    assert positions == sorted(positions), "record, fence, unlock, HEAD, full fence, change bytes, wake-ups"
    lease = source[source.index("static PyObject *reader_lease") :]
    positions = [lease.index(step) for step in ("byte_lock(self->fd, F_RDLCK", "__atomic_thread_fence(__ATOMIC_ACQUIRE)", "memcpy(&meta")]
    assert positions == sorted(positions), "the lease, then the record"
    assert "FUTEX_PRIVATE_FLAG" not in source.replace("(no FUTEX_PRIVATE_FLAG)", "")
    for words in ("_fastpath.c", "FUTEX_WAKE", "__ATOMIC_SEQ_CST", "__ATOMIC_RELEASE", "aarch64", "x86"):
        assert words in (_ring.__doc__ or ""), words


def test_a_live_reader_writes_the_same_figures_for_status_on_either_path(env, frame_path):
    name = env.name()
    with fb.Publisher(name, shape=(48, 64, 3), slots=5) as pub, fb.Reader(name, name="figures", hold=2) as cam:
        cam.triggers()  # sets FLAG_TRIGGERS: the figures must leave the entry's flags alone
        for n in range(1, 6):
            pub.publish(testpattern.render(n, (48, 64, 3)))
            cam.latest(timeout=1.0)
        time.sleep(0.6)  # one rate window
        pub.publish(testpattern.render(6, (48, 64, 3)))
        cam.latest(timeout=1.0)
        cam.latest(timeout=1.0)  # the same frame: the pure-Python path writes the figures now
        (entry,) = _entries(name)
        assert (entry["last_seq"], entry["frames"], entry["held"], entry["cursor"], entry["dropped"]) == (6, 6, 2, 0, 0), entry
        assert entry["flags"] & ~FLAG_FUTEX == 1, entry  # FLAG_TRIGGERS, and nothing else beside the wake flag
        assert entry["fps"] > 0 and abs(entry["last_frame_wall"] - time.time()) < 5, entry


# --- a producer on one path, readers on the other --------------------------------------------------


@pytest.mark.parametrize("producer, readers", [("compiled", "pure"), ("pure", "compiled")])
def test_a_producer_on_one_path_serves_readers_on_the_other_frames_intact(env, producer, readers):
    _require_compiled()
    name = env.name()
    source = _worker(env, producer, "produce", name, "--seconds", "60", "--width", "320", "--height", "240", "--fps", "300")
    source.wait_event("ready")
    checkers = [
        _worker(env, readers, "verify", name, "--seconds", "30", "--frames", "400", "--recheck", "--name", "next"),
        _worker(env, readers, "verify", name, "--seconds", "30", "--frames", "400", "--mode", "ordered", "--recheck", "--name", "ordered"),
    ]
    for checker in checkers:
        checker.wait_event("ready")
    flags = {entry["name"]: entry["flags"] & FLAG_FUTEX for entry in _entries(name)}
    assert flags == {"next": FLAG_FUTEX if readers == "compiled" else 0, "ordered": FLAG_FUTEX if readers == "compiled" else 0}
    results = [checker.wait_event("done", timeout=60) for checker in checkers]
    assert all(result["checked"] == 400 and result["bad"] == 0 for result in results), results


@pytest.mark.parametrize("producer", PATHS)
def test_idle_readers_on_both_paths_sleep_and_wake_at_each_frame(env, monkeypatch, producer):
    _require_compiled()
    _use_path(monkeypatch, producer)
    name = env.name()
    with fb.Publisher(name, shape=(48, 64, 3), fps=2) as pub:
        sleepers = {path: _worker(env, path, "idle", name, "--seconds", "8", "--name", path) for path in PATHS}
        for sleeper in sleepers.values():
            sleeper.wait_event("ready")
        time.sleep(0.3)
        before = {path: cpu_seconds(sleeper.pid) for path, sleeper in sleepers.items()}
        time.sleep(1.5)
        for path, sleeper in sleepers.items():
            assert cpu_seconds(sleeper.pid) - before[path] < 0.02, f"an idle {path} reader is not sleeping"
        latencies: dict = {path: [] for path in PATHS}
        for n in range(1, 8):
            seen = {path: len(sleeper.events) for path, sleeper in sleepers.items()}
            pub.publish(testpattern.render(n, (48, 64, 3)))
            for path, sleeper in sleepers.items():
                event = sleeper.wait_event("frame", after=seen[path])
                assert event["seq"] == n
                latencies[path].append((event["now"] - event["ts"]) / 1e6)
            time.sleep(0.2)
    # Woken by the producer, not by their liveness timer (0.5 s): within milliseconds.
    for path, values in latencies.items():
        assert statistics.median(values) < 50, (path, values)


@pytest.mark.parametrize("producer", PATHS)
def test_a_reader_on_the_other_path_is_woken_when_the_stream_ends(env, monkeypatch, producer):
    _require_compiled()
    other = "pure" if producer == "compiled" else "compiled"
    delays = []
    for _ in range(7):
        name = env.name()
        _use_path(monkeypatch, producer)
        with fb.Publisher(name, shape=(48, 64, 3)) as pub:
            _use_path(monkeypatch, other)
            with fb.Reader(name, name="waiting") as cam:
                pub.publish(np.zeros((48, 64, 3), np.uint8))
                cam.next(timeout=5.0)
                ended: list = []

                def wait_for_the_end() -> None:
                    try:
                        cam.next(timeout=5.0)
                    except fb.SourceEnded:
                        ended.append(time.monotonic())

                waiter = threading.Thread(target=wait_for_the_end)
                waiter.start()
                time.sleep(0.05)  # not synchronisation: a waiter not asleep yet only sees the end sooner
                start = time.monotonic()
                pub.set_state("ended", "the test is over")
                waiter.join(10)
                assert ended, "the reader did not see the stream end"
                delays.append(ended[0] - start)
    # Unwoken, a waiting reader notices at its liveness step (every 0.5 s): half a step late on
    # average. Woken, within milliseconds.
    assert statistics.median(delays) < 0.1, delays


# --- large frames: the compiled copy around the caches ----------------------------------------------


def test_frames_larger_than_the_cache_arrive_intact_across_processes(env):
    """1080p frames (larger than any core's L2) go through copy_frame's non-temporal stores; every
    byte of each must be the frame's own when a reader in another process leases it."""
    _require_compiled()
    name = env.name()
    source = _worker(env, "compiled", "produce", name, "--seconds", "60", "--width", "1920", "--height", "1080")
    source.wait_event("ready")
    checker = _worker(env, "pure", "verify", name, "--seconds", "40", "--frames", "60", "--recheck", "--name", "large")
    result = checker.wait_event("done", timeout=60)
    assert result["checked"] == 60 and result["bad"] == 0, result


def test_publish_copies_contiguous_and_strided_frames_alike(env, monkeypatch):
    _require_compiled()
    _use_path(monkeypatch, "compiled")
    name = env.name()
    shape = (2160, 3840, 3)  # 25 MB: above the streaming threshold everywhere
    with fb.Publisher(name, shape=shape, slots=4) as pub, fb.Reader(name, name="large") as cam:
        for n, frame in enumerate((testpattern.render(1, shape), np.ascontiguousarray(testpattern.render(2, shape)[:, ::-1])[:, ::-1]), 1):
            assert pub.publish(frame) == n
            held = cam.latest(timeout=5.0)
            assert np.array_equal(held.array, frame) and testpattern.verify(held.array) == n
            held.release()
        assert _fast._compiled.copy_frame(pub._views[0], testpattern.render(3, shape)) is True
