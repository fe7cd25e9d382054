"""The parts together: a model's results recorded beside the video, the recording replayed in
lockstep with its results, the same frames and results coming out as went in."""

from __future__ import annotations

import csv
import json

import pytest

import framebroker as fb
from conftest import ffmpeg_decode
from test_recorder_results import start_box_model


def test_a_recording_with_its_results_replays_with_the_same_seqs_wall_times_and_results(env, tmp_path):
    daemon, name = env.serve("test://", None, "--fps", "30", "--width", "320", "--height", "240")
    start_box_model(env, name)
    video = tmp_path / "rec.ts"
    recorder = env.cli("record", name, "-o", str(video), "--index", "--results", "square", "--duration", "3")
    assert recorder.wait(timeout=60) == 0, recorder.output()
    assert ffmpeg_decode(video).returncode == 0
    with open(tmp_path / "rec.csv") as index_file:
        index = {int(row["seq"]): float(row["wall_time"]) for row in csv.DictReader(index_file)}
    lines = (tmp_path / "rec.results.jsonl").read_text().splitlines()
    recorded = {line["seq"]: line["data"] for line in map(json.loads, lines[1:])}
    assert len(index) >= 60 and set(recorded) <= set(index) and len(recorded) >= 0.9 * len(index)

    replay = env.cli("serve", str(video), "--name", env.name("replay"), "--pace", "lockstep", "--wait-readers", "1", "--results")
    replayed = replay.argv[replay.argv.index("--name") + 1]
    frames, results = [], {}
    with fb.Reader(replayed, name="offline-run", wait=20.0) as cam, fb.ResultReader(replayed, "square", wait=20.0) as res:
        for frame in cam.ordered(timeout=10.0):
            frames.append((frame.seq, frame.wall_time, frame.dropped))
            result = res.get(frame, timeout=10.0)  # None at once for a frame the model skipped
            if result is not None:
                results[frame.seq] = result.data
    assert replay.wait(timeout=30) == 0, replay.output()
    # Every frame of the recording, in order, none dropped, under its recorded seq and wall time ...
    assert [seq for seq, _, _ in frames] == sorted(index)
    assert all(dropped == 0 for _, _, dropped in frames)
    assert all(abs(wall - index[seq]) < 1e-6 for seq, wall, _ in frames)
    # ... and every recorded result on its frame again.
    assert results == recorded


def test_skip_answers_get_at_once_and_a_replay_says_which_frames_a_model_skipped(env, tmp_path):
    name = env.name()
    with fb.Publisher(name, shape=(8, 8, 3)) as pub, fb.Reader(name) as cam:
        with fb.ResultWriter(name, "sometimes") as out, fb.ResultReader(name, "sometimes") as res:
            for _ in range(4):
                pub.publish(__import__("numpy").zeros((8, 8, 3), "uint8"))
            frame = cam.latest(timeout=1.0)
            out.publish(frame, {"n": frame.seq})
            with pytest.raises(fb.FrameTimeout):
                res.get(frame.seq + 1, timeout=0.05)  # the model has not said anything about it
            out.skip(frame.seq + 2)
            assert res.get(frame.seq + 1, timeout=0) is None and res.get(frame.seq + 2, timeout=0) is None
            with pytest.raises(ValueError, match="frame order"):
                out.publish(frame.seq + 1, {}, timestamp_ns=frame.timestamp_ns)
