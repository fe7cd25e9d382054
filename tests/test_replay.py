"""Replay: ``framebroker serve FILE --pace realtime|max|lockstep``, with the recording's seqs,
wall times and results.

The clip is made here with PyAV, so its truth is known independently of the code under test:
120 frames of the test pattern at 30 fps with a one-second hole after the 60th (a camera that
stalled), numbered from seq 1001 in its index (``clip.csv``, the recorder's columns), each
frame's picture showing its own seq, and a results sidecar with two models. Readers are real
processes (``replay_reader.py``) that report every frame they got.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker._status import describe_stream, render_table

from conftest import TESTS, wait_until

av = pytest.importorskip("av")

READER = str(TESTS / "replay_reader.py")
SIZE = (240, 320)
FIRST_SEQ = 1001
FRAMES = 120
HOLE_AFTER = 60  # frames before the hole
TICKS = 3000  # one frame period at 30 fps, 90 kHz
HOLE_TICKS = 90_000  # the camera stalled for one second
WALL_START = 1_790_000_000.0


def clip_pts(k: int) -> int:
    """PTS (90 kHz) of the clip's k-th frame (from 0)."""
    return k * TICKS + (HOLE_TICKS if k >= HOLE_AFTER else 0)


def results_of(seq: int) -> dict:
    """What the recording says each model found on frame ``seq``."""
    found = {}
    if seq % 3 == 0:
        found["boxes"] = {"objects": [{"box": [seq % 50, 10, 20, 20], "label": "thing", "score": 0.5}]}
    if seq % 5 == 0:
        found["labels"] = {"seen": seq, "names": ["a", "b"]}
    return found


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clip.ts with its index clip.csv and its results sidecar clip.ts.results.jsonl."""
    folder = tmp_path_factory.mktemp("replay")
    path = folder / "clip.ts"
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "ultrafast", "crf": "18", "bf": "0", "g": "30"})
        stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 90_000)
        for k in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(testpattern.render(FIRST_SEQ + k, (*SIZE, 3)), format="bgr24")
            frame.pts, frame.time_base = clip_pts(k), Fraction(1, 90_000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with open(folder / "clip.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seq", "pts", "pts_time", "wall_time", "timestamp_ns"])
        for k in range(FRAMES):
            pts = clip_pts(k)
            writer.writerow([FIRST_SEQ + k, pts, f"{pts / 90_000:.6f}", f"{WALL_START + pts / 90_000:.6f}", 5_000_000_000 + pts * 100_000 // 9])
    with open(folder / "clip.ts.results.jsonl", "w") as handle:
        for k in range(FRAMES):
            seq, pts = FIRST_SEQ + k, clip_pts(k)
            for model, data in results_of(seq).items():
                record = {"seq": seq, "pts": pts, "pts_time": pts / 90_000, "wall_time": WALL_START + pts / 90_000, "model": model, "data": data}
                handle.write(json.dumps(record) + "\n")
    return path


def wall_of(seq: int) -> float:
    return round(WALL_START + clip_pts(seq - FIRST_SEQ) / 90_000, 6)


def replay(env, clip: "Path | str", *options: str):
    """Start ``framebroker serve clip --name ...`` (without waiting: it may hold its first frame)."""
    name = env.name("replay")
    return env.cli("serve", str(clip), "--name", name, *options), name


def start_reader(env, name: str, reader: str, *options: str):
    proc = env.spawn([sys.executable, READER, name, "--name", reader, *options], label=f"reader {reader}")
    proc.wait_event("ready")
    return proc


def frames_of(reader) -> list:
    return reader.wait_event("done", timeout=120)["frames"]


def check_every_frame(frames: list) -> None:
    """The reader got all 120 frames, none dropped, each with its recorded seq and wall time and
    the picture of that very frame."""
    assert [f["seq"] for f in frames] == list(range(FIRST_SEQ, FIRST_SEQ + FRAMES))
    assert all(f["dropped"] == 0 for f in frames)
    assert [f["shows"] for f in frames] == [f["seq"] for f in frames], "a frame published under another frame's seq"
    assert [round(f["wall_time"], 6) for f in frames] == [wall_of(f["seq"]) for f in frames]


def lockstep_run(env, clip: Path) -> tuple[list, list]:
    daemon, name = replay(env, clip, "--pace", "lockstep", "--wait-readers", "2", "--slots", "4")
    fast = start_reader(env, name, "fast")
    slow = start_reader(env, name, "slow", "--work-ms", "15")
    got = frames_of(fast), frames_of(slow)
    assert daemon.wait(timeout=30) == 0, daemon.output()
    return got


def test_lockstep_gives_every_ordered_reader_every_frame_with_its_recorded_seq_the_same_twice(env, clip):
    # Four slots, one reader 15 ms a frame slower than the other: at any free pace it would lose
    # most frames (see the last test). In lockstep neither loses one.
    fast, slow = lockstep_run(env, clip)
    check_every_frame(fast)
    check_every_frame(slow)
    assert [f["crc"] for f in fast] == [f["crc"] for f in slow]
    # timestamp_ns is this machine's clock at publish, not the recording's.
    assert all(abs(f["timestamp_ns"] - fast[0]["timestamp_ns"]) < 120e9 for f in fast)
    assert fast[0]["timestamp_ns"] != 5_000_000_000
    again, _ = lockstep_run(env, clip)
    assert [(f["seq"], f["crc"]) for f in again] == [(f["seq"], f["crc"]) for f in fast], "two runs delivered different frames"


def test_realtime_follows_the_files_pts_including_the_hole(env, clip):
    daemon, name = replay(env, clip, "--wait-readers", "1")
    frames = frames_of(start_reader(env, name, "timing"))
    check_every_frame(frames)
    assert daemon.wait(timeout=30) == 0
    errors_ms = []
    hole_error_ms = None
    for before, after in zip(frames, frames[1:]):
        published_ms = (after["timestamp_ns"] - before["timestamp_ns"]) / 1e6
        pts_ms = (clip_pts(after["seq"] - FIRST_SEQ) - clip_pts(before["seq"] - FIRST_SEQ)) / 90.0
        if pts_ms > 1000:
            hole_error_ms = published_ms - pts_ms
        else:
            errors_ms.append(abs(published_ms - pts_ms))
    assert statistics.median(errors_ms) < 3.0, sorted(errors_ms)[-10:]
    assert hole_error_ms is not None and abs(hole_error_ms) < 20.0, hole_error_ms


def test_max_replays_faster_than_real_time(env, clip):
    daemon, name = replay(env, clip, "--pace", "max", "--wait-readers", "1")
    frames = frames_of(start_reader(env, name, "flat-out"))
    assert daemon.wait(timeout=30) == 0
    first, last = frames[0], frames[-1]
    replayed_s = (last["timestamp_ns"] - first["timestamp_ns"]) / 1e9
    recorded_s = (clip_pts(last["seq"] - FIRST_SEQ) - clip_pts(first["seq"] - FIRST_SEQ)) / 90_000
    # The file spans 5 s (one of them the hole); decoding 120 small frames takes a fraction of that.
    assert recorded_s > 4.0 and replayed_s < recorded_s / 4, (replayed_s, recorded_s)


def test_a_reader_killed_mid_replay_does_not_stall_lockstep_and_status_shows_whom_it_waits_for(env, clip):
    daemon, name = replay(env, clip, "--pace", "lockstep", "--wait-readers", "2", "--slots", "4")
    survivor = start_reader(env, name, "survivor")
    doomed = start_reader(env, name, "doomed")
    doomed.wait_event("progress")
    doomed.signal(signal.SIGSTOP)

    def waiting_for_doomed():
        stream = describe_stream(name)
        replay_info = stream["info"].get("replay", {})
        return stream if [r["pid"] for r in replay_info.get("waiting_for", [])] == [doomed.pid] else None

    stream = wait_until(waiting_for_doomed, 10, "status to name the stopped reader")
    info = stream["info"]["replay"]
    assert info["pace"] == "lockstep" and info["frames"] == FRAMES and info["recorded"] is True
    assert 10 <= info["frame"] < FRAMES and 0 < info["time_s"] < info["duration_s"]
    assert abs(info["duration_s"] - (clip_pts(FRAMES - 1) + TICKS) / 90_000) < 0.01
    table = render_table({"streams": [stream]})
    assert f"pace lockstep   frame {info['frame']}/{FRAMES}" in table and "'doomed'" in table, table
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    check_every_frame(frames_of(survivor))
    assert daemon.wait(timeout=30) == 0, daemon.output()


def test_sigterm_stops_a_replay_at_once_while_it_waits_for_readers(env, clip):
    # Holding the first frame for a reader that never comes ...
    daemon, name = replay(env, clip, "--pace", "lockstep", "--wait-readers", "1")
    wait_until(lambda: "holding the first frame until 1 reader" in describe_stream(name).get("reason", ""), 10, "the hold")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=5) == 0, daemon.output()
    # ... and waiting in lockstep for a reader that stopped.
    daemon, name = replay(env, clip, "--pace", "lockstep", "--wait-readers", "1")
    reader = start_reader(env, name, "frozen")
    reader.wait_event("progress")
    reader.signal(signal.SIGSTOP)
    wait_until(lambda: describe_stream(name)["info"].get("replay", {}).get("waiting_for"), 10, "the lockstep wait")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=5) == 0, daemon.output()
    assert "stopped" in "\n".join(daemon.stderr)


def test_a_looping_file_numbers_its_next_pass_on(env, clip):
    daemon, name = replay(env, f"{clip}?loop=1", "--pace", "lockstep", "--wait-readers", "1")
    got = []
    with fb.Reader(name, name="loop", wait=10) as cam:
        for frame in cam.ordered(timeout=10):
            with frame:
                got.append((frame.seq, testpattern.identify(frame.array), frame.dropped))
            if len(got) == FRAMES + 10:
                break
        # The daemon now waits for this reader to ask for more, and shows where it is.
        info = wait_until(lambda: describe_stream(name)["info"]["replay"].get("waiting_for") and describe_stream(name)["info"]["replay"], 10, "the wait")
    # The first pass keeps the recording's seqs; the next one goes on from there (seqs only go
    # up), showing the file's first frames again.
    assert got[:FRAMES] == [(seq, seq, 0) for seq in range(FIRST_SEQ, FIRST_SEQ + FRAMES)]
    assert got[FRAMES:] == [(FIRST_SEQ + FRAMES + k, FIRST_SEQ + k, 0) for k in range(10)]
    assert info["pass"] == 2 and info["frame"] == 10 and info["waiting_for"][0]["name"] == "loop"


def test_recorded_results_are_republished_on_their_seqs(env, clip):
    daemon, name = replay(env, clip, "--pace", "lockstep", "--wait-readers", "1", "--results")
    sidecar = str(clip) + ".results.jsonl"
    reader = start_reader(env, name, "compare", "--expect-results", sidecar)
    done = reader.wait_event("done", timeout=120)
    check_every_frame(done["frames"])
    expected = sum(len(results_of(seq)) for seq in range(FIRST_SEQ, FIRST_SEQ + FRAMES))
    assert done["results"] == {"checked": expected, "bad": []}
    assert daemon.wait(timeout=30) == 0
    assert f"{expected} results republished" in "\n".join(daemon.stderr)


def test_the_recorder_records_a_lockstep_replay_frame_exact(env, clip, tmp_path):
    daemon, name = replay(env, clip, "--pace", "lockstep", "--wait-readers", "1")
    out = tmp_path / "again.ts"
    recorder = env.cli("record", name, "-o", str(out), "--index")
    assert recorder.wait(timeout=120) == 0, recorder.output()
    assert daemon.wait(timeout=30) == 0
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries", "stream=nb_read_frames", "-of", "json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(probe.stdout)["streams"][0]["nb_read_frames"] == str(FRAMES), probe
    with open(tmp_path / "again.csv") as handle:
        assert [int(row["seq"]) for row in csv.DictReader(handle)] == list(range(FIRST_SEQ, FIRST_SEQ + FRAMES))
    with av.open(str(out)) as container:
        shown = [testpattern.identify(frame.to_ndarray(format="bgr24")) for frame in container.decode(video=0)]
    assert shown == list(range(FIRST_SEQ, FIRST_SEQ + FRAMES))
    assert "dropped_ring=0 dropped_queue=0" in "\n".join(recorder.stdout + recorder.stderr)


def test_without_lockstep_a_slow_reader_loses_frames(env, clip):
    # The control for the lockstep tests: the same readers, at pace max, do lose frames.
    daemon, name = replay(env, clip, "--pace", "max", "--wait-readers", "1", "--slots", "4")
    frames = frames_of(start_reader(env, name, "slow", "--work-ms", "15"))
    assert daemon.wait(timeout=30) == 0
    assert sum(f["dropped"] for f in frames) > FRAMES // 2


@pytest.mark.parametrize(
    "options, message",
    [
        (["test://", "--pace", "max"], "--pace is for files"),
        (["test://", "--wait-readers", "1"], "are for files"),
        (["test://", "--results"], "are for files"),
        (["CLIP", "--slots", "12", "--wait-readers", "11"], "at most 10 readers"),
    ],
)
def test_replay_options_on_the_wrong_source_are_usage_errors(env, clip, options, message):
    options = [str(clip) if option == "CLIP" else option for option in options]
    done = env.run_cli("serve", *options, "--name", env.name())
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_results_without_a_sidecar_or_an_index_are_refused_at_start(env, clip, tmp_path):
    bare = tmp_path / "bare.ts"
    bare.write_bytes(clip.read_bytes())
    done = env.run_cli("serve", str(bare), "--name", env.name(), "--results")
    assert done.returncode == 1 and f"{bare}.results.jsonl" in done.stderr and f"{tmp_path / 'bare.results.jsonl'}" in done.stderr, done.stderr
    (tmp_path / "bare.results.jsonl").write_text('{"seq": 1, "model": "m", "data": {}}\n')
    done = env.run_cli("serve", str(bare), "--name", env.name(), "--results")
    assert done.returncode == 1 and "needs the recording's index" in done.stderr, done.stderr
    (tmp_path / "bare.csv").write_text("seq,pts,pts_time,wall_time,timestamp_ns\n1,0,0.0,oops,0\n")
    done = env.run_cli("serve", str(bare), "--name", env.name())
    assert done.returncode == 1 and "bare.csv, line 2" in done.stderr, done.stderr


def test_sidecars_cut_short_by_a_killed_recorder_are_read_up_to_the_cut(tmp_path):
    from framebroker._errors import SourceError
    from framebroker.sources._recording import RecordedResults, RecordingIndex

    video = tmp_path / "cam0.ts"
    index = tmp_path / "cam0.csv"
    # A number cut short still parses as a number: the unfinished last row is never trusted.
    index.write_text("seq,pts,pts_time,wall_time,timestamp_ns\r\n7,0,0.000000,100.5,1\r\n8,3003,0.033367,100.53")
    found = RecordingIndex.beside(str(video))
    assert found is not None and len(found) == 1 and found.find(40).seq == 7 and found.find(3003) is None
    index.write_text("frame,time\n1,2\n")  # somebody else's CSV: replayed without it
    assert RecordingIndex.beside(str(video)) is None
    results = tmp_path / "cam0.results.jsonl"
    results.write_text('{"seq": 7, "model": "faces", "data": {"objects": []}}\n{"seq": 8, "mod')
    assert RecordedResults.find(str(video), "").by_seq == {7: [("faces", {"objects": []})]}
    for bad, message in [
        ('{"seq": 7, "model": "faces", "data": {}}\n' * 2, "line 2: a second result of model 'faces' for frame 7"),
        ('{"seq": 7, "model": "faces", "data": {"mask": "' + "x" * 70_000 + '"}}\n', "line 1: \"data\": result too large"),
        ('{"seq": 7, "model": "faces"}\n{}\n', "line 1: \"data\""),
    ]:
        results.write_text(bad)
        with pytest.raises(SourceError, match=message):
            RecordedResults.find(str(video), "")
