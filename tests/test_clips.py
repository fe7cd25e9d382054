"""Event clips: a trigger from any process makes the recorder write the seconds around it."""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import pytest

import framebroker as fb
from framebroker import testpattern

from conftest import ffmpeg_decode, wait_until
from test_recorder import SHAPE, decode, recorder_entry, wait_recorder_ordered

FPS = 30
PERIOD_NS = 1_000_000_000 // FPS


def clip_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json"))


def capture_times(ts_path: Path) -> dict[int, int]:
    """seq -> capture timestamp_ns, from the clip's sidecar index."""
    with open(ts_path.with_suffix(".csv"), newline="") as handle:
        return {int(row["seq"]): int(row["timestamp_ns"]) for row in csv.DictReader(handle)}


def decodes_cleanly(path: Path) -> None:
    result = ffmpeg_decode(path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_trigger_from_another_process_writes_the_seconds_before_and_after(env, tmp_path):
    daemon, name = env.serve("test://", None, "--fps", str(FPS), "--width", "320", "--height", "240")
    recorder = env.cli("record", name, "--clips", str(tmp_path), "--pre-roll", "3", "--post-roll", "2")
    wait_recorder_ordered(name, recorder)
    wait_until(lambda: (recorder_entry(name) or {}).get("info", {}).get("preroll_s", 0) >= 3, 30, "three seconds of pre-roll")

    seq = fb.status(name)["streams"][0]["seq"]
    sent = env.run_cli("trigger", name, "--label", "person", "--seq", str(seq))
    assert sent.returncode == 0 and "sent to 1 recorder(s)" in sent.stdout, sent.stdout + sent.stderr

    (summary_path,) = wait_until(lambda: clip_files(tmp_path) or None, 20, "the clip's .json")
    summary = json.loads(summary_path.read_text())
    clip = tmp_path / summary["file"]
    assert "person" in clip.name and summary["triggers"][0]["seq"] == seq and summary["triggers"][0]["label"] == "person"
    assert summary["encoder"] and summary["stream"] == name

    frames = decode(clip)
    assert frames[0].keyframe, "a clip starts on a keyframe"
    assert all(f.seq is not None for f in frames), "every frame carries its number"
    times = capture_times(clip)
    assert [f.seq for f in frames] == sorted(times), "the sidecar index lists exactly the decoded frames"
    trigger_ns = times[seq]
    assert times[frames[0].seq] <= trigger_ns - 3_000_000_000, "starts at least the pre-roll before the trigger's frame"
    # The last frame at or before the end: about a period before it, more when capture times
    # jitter (seen here: 3.5 us short of one period), so half a period of slack.
    assert times[frames[-1].seq] >= trigger_ns + 2_000_000_000 - 1.5 * PERIOD_NS, "ends the post-roll after it"
    decodes_cleanly(clip)

    info = recorder_entry(name)["info"]
    assert info["clips"] == 1 and info["preroll_kb"] > 0 and info["preroll_s"] >= 3


def test_close_triggers_make_one_clip_far_ones_two(env, tmp_path):
    """Stream time runs four times faster than the clock here: frames carry timestamps 1/30 s
    apart but are published every 1/120 s, and triggers name their frames by seq."""
    name = env.name()
    with fb.Publisher(name, shape=SHAPE, fps=FPS) as pub:
        recorder = env.cli("record", name, "--clips", str(tmp_path), "--pre-roll", "3", "--post-roll", "5")
        t0 = time.monotonic_ns()
        stamps: dict[int, int] = {}

        def publish_until(last: int) -> None:
            while pub.seq < last:
                seq = pub.seq + 1
                stamps[seq] = t0 + seq * PERIOD_NS
                pub.publish(testpattern.render(seq, SHAPE), timestamp_ns=stamps[seq])
                time.sleep(1 / (4 * FPS))
                if seq == 1:
                    wait_recorder_ordered(name, recorder)

        publish_until(300)  # 10 s of stream time
        assert fb.trigger(name, "first", seq=300, timestamp_ns=stamps[300]) == 1
        publish_until(360)  # 2 s later
        assert fb.trigger(name, "second", seq=360, timestamp_ns=stamps[360]) == 1
        publish_until(720)  # 12 s after that: more than a post-roll and a pre-roll apart
        assert fb.trigger(name, "third", seq=720, timestamp_ns=stamps[720]) == 1
        publish_until(960)  # past the last post-roll
        wait_until(lambda: len(clip_files(tmp_path)) == 2, 30, "two clips")
        # Stopped (SIGTERM finishes cleanly), the recorder has written every clip it ever will.
        recorder.signal(signal.SIGTERM)
        assert recorder.wait(timeout=30) == 0, recorder.output()
        assert len(clip_files(tmp_path)) == 2

    first, second = (json.loads(p.read_text()) for p in clip_files(tmp_path))
    assert [t["label"] for t in first["triggers"]] == ["first", "second"], "overlapping triggers extend one clip"
    assert [t["label"] for t in second["triggers"]] == ["third"]
    one = capture_times(tmp_path / first["file"])
    assert min(one) <= 300 - 3 * FPS and max(one) >= 360 + 5 * FPS - 1
    two = capture_times(tmp_path / second["file"])
    assert min(two) <= 720 - 3 * FPS and max(two) >= 720 + 5 * FPS - 1
    assert max(one) < min(two)
    for summary in (first, second):
        frames = decode(tmp_path / summary["file"])
        assert frames[0].keyframe and [f.seq for f in frames] == sorted(capture_times(tmp_path / summary["file"]))


def test_a_result_matching_a_rule_opens_a_clip_whose_pre_roll_counts_from_the_frame_it_was_seen_on(env, tmp_path):
    """Stream time runs four times faster than the clock; the model publishes each result 15
    frames (0.5 s of stream time) after its frame, and finds something three times: a cat (label
    filtered out), a faint square (score filtered out), a clear square at frame 300 (the match)."""
    name = env.name()
    latency = 15
    findings = {
        150: {"box": [10, 40, 30, 30], "label": "cat", "score": 0.99},
        200: {"box": [10, 40, 30, 30], "label": "square", "score": 0.5},
        300: {"box": [20, 50, 30, 30], "label": "square", "score": 0.9},
    }
    rules = ["--trigger-on", "det:square>=0.8", "--trigger-on", "det:cat>=1"]
    with fb.Publisher(name, shape=SHAPE, fps=FPS) as pub, fb.ResultWriter(name, "det") as out:
        recorder = env.cli("record", name, "--clips", str(tmp_path), "--pre-roll", "3", "--post-roll", "2", "--results", *rules)
        t0 = time.monotonic_ns()
        stamps: dict[int, int] = {}
        while pub.seq < 600:
            seq = pub.seq + 1
            stamps[seq] = t0 + seq * PERIOD_NS
            pub.publish(testpattern.render(seq, SHAPE), timestamp_ns=stamps[seq])
            if seq == 1:
                wait_recorder_ordered(name, recorder)
                wait_until(lambda: any(r["name"] == "recorder" for r in fb.status(name)["streams"][0]["models"][0]["readers"]), 20, "the recorder to read the results")
            seen = seq - latency
            if seen >= 1:
                found = [findings[seen]] if seen in findings else []
                out.publish(seen, {"objects": found}, timestamp_ns=stamps[seen])
            time.sleep(1 / (4 * FPS))
        (summary_path,) = wait_until(lambda: clip_files(tmp_path) or None, 30, "the clip's .json")

    summary = json.loads(summary_path.read_text())
    assert [(t["rule"], t["seq"], t["model"]) for t in summary["triggers"]] == [("det:square>=0.8", 300, "det")], summary["triggers"]
    assert summary["triggers"][0]["objects"] == [findings[300]] and summary["triggers"][0]["timestamp_ns"] == stamps[300]
    assert summary["triggers_total"] == 1 and "square" in summary["file"]
    clip = tmp_path / summary["file"]
    times = capture_times(clip)
    # Three seconds before the frame the square was seen on (300), not before the moment the
    # result came (315): the clip starts at frame 210 at the latest.
    assert min(times) <= 300 - 3 * FPS, min(times)
    assert max(times) >= 300 + 2 * FPS - 1
    frames = decode(clip)
    assert frames[0].keyframe and [f.seq for f in frames] == sorted(times)
    decodes_cleanly(clip)
    # The clip's results sidecar holds the results of its frames, the match included, each at
    # its frame's PTS (the clip's .csv index says which).
    with open(clip.with_suffix(".csv"), newline="") as handle:
        pts_of = {int(row["seq"]): int(row["pts"]) for row in csv.DictReader(handle)}
    lines = [json.loads(line) for line in clip.with_suffix(".results.jsonl").read_text().splitlines()[1:]]
    assert summary["results"] == clip.with_suffix(".results.jsonl").name
    assert sorted(line["seq"] for line in lines) == sorted(pts_of)
    assert all(line["pts"] == pts_of[line["seq"]] for line in lines)
    assert summary["triggers"][0]["pts"] == pts_of[300], "the event is placed at the frame it is about"
    assert [line["data"]["objects"] for line in lines if line["seq"] == 300] == [[findings[300]]]


def test_trigger_without_a_recorder_is_an_error(env, tmp_path):
    daemon, name = env.serve()
    result = env.run_cli("trigger", name, "--label", "x")
    assert result.returncode == 1
    assert f"nothing on stream {name!r} listens for triggers" in result.stderr and "--clips" in result.stderr
    with pytest.raises(fb.TriggerError):
        fb.trigger(name, "x")
    # A recorder without --clips does not listen either ...
    plain = env.cli("record", name, "-o", str(tmp_path / "plain.ts"))
    wait_recorder_ordered(name, plain)
    with pytest.raises(fb.TriggerError):
        fb.trigger(name, "x")
    # ... one with clips does, until it stops.
    clips = env.cli("record", name, "--clips", str(tmp_path), "--reader-name", "clipper")
    wait_until(lambda: _listens(name), 30, "the clip recorder to listen")
    assert fb.trigger(name, "x") == 1
    clips.stop()
    with pytest.raises(fb.TriggerError):
        fb.trigger(name, "x")
    missing = env.run_cli("trigger", env.name("none"))
    assert missing.returncode == 1 and "nothing serves it" in missing.stderr


def _listens(name: str) -> bool:
    try:
        fb.trigger(name, "probe", post_roll=0)
    except fb.TriggerError:
        return False
    return True
