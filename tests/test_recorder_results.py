"""The models' results in recordings (record --results, --burn-in), checked with ffprobe and ffmpeg.

A test model (``box_model.py``) publishes, for frames of ``test://``, the box of the pattern's
white square, with a latency: its results reach the recorder well after their frames. Decoded
frames are identified by the frame number the test pattern carries in its pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framebroker_clients._models import model_colour

from box_model import square
from conftest import wait_until
from test_recorder import decode, summary

BOX_MODEL = str(Path(__file__).resolve().parent / "box_model.py")


def start_box_model(env, name: str, *args: str):
    model = env.spawn([sys.executable, BOX_MODEL, name, "--quiet", *args], label="box model")
    model.wait_event("ready")
    wait_until(lambda: any(m["name"] == "square" and m["results"] for m in _models(name)), 20, "the model to publish")
    return model


def _models(name: str) -> list:
    from framebroker._status import describe_stream

    return describe_stream(name)["models"]


def ffprobe_pts(path: Path) -> list[int]:
    """Each video frame's PTS, in decoding order, as ffprobe prints them."""
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [frame["pts"] for frame in json.loads(result.stdout)["frames"]]


def ffmpeg_frames(path: Path, shape: tuple[int, int]) -> list[np.ndarray]:
    """Every frame decoded by ffmpeg, as BGR arrays, in the same order."""
    result = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "bgr24", "-"],
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    size = shape[0] * shape[1] * 3
    assert len(result.stdout) % size == 0
    return [np.frombuffer(result.stdout[i : i + size], np.uint8).reshape(*shape, 3) for i in range(0, len(result.stdout), size)]


def read_sidecar(video: Path) -> tuple[dict, list[dict]]:
    lines = video.with_suffix(".results.jsonl").read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


@pytest.mark.parametrize("suffix, time_base", [(".ts", "1/90000"), (".mp4", "1/90000"), (".mkv", "1/1000")])
def test_sidecar_joins_every_result_to_its_frame_by_ffprobes_pts(env, tmp_path, suffix, time_base):
    from framebroker import testpattern

    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    # A slow model that analyses every other frame: its results come 0.3 s after their frames.
    start_box_model(env, name, "--latency", "0.3", "--every", "2")
    video = tmp_path / f"out{suffix}"
    recorder = env.cli("record", name, "-o", str(video), "--results", "--duration", "4")
    assert recorder.wait(timeout=60) == 0, recorder.output()

    header, lines = read_sidecar(video)
    assert header["video"] == video.name and header["time_base"] == time_base and header["models"] == "all"
    pts = ffprobe_pts(video)
    numbers = [testpattern.identify(image) for image in ffmpeg_frames(video, (240, 320))]
    assert len(pts) == len(numbers) > 100 and None not in numbers
    frame_at = dict(zip(pts, numbers))
    assert len(frame_at) == len(pts), "PTS are unique"
    for line in lines:
        assert line["model"] == "square" and line["seq"] == line["data"]["n"]
        assert frame_at.get(line["pts"]) == line["seq"], f"result of frame {line['seq']} joined to frame {frame_at.get(line['pts'])}"
        assert abs(line["pts_time"] - line["pts"] * eval(time_base)) < 1e-6  # noqa: S307 - a fraction we wrote
        assert line["latency_ms"] >= 290 and line["data"]["objects"][0]["box"] == square(line["seq"], 240, 320)
    # Every frame the model analysed that is in the file has its result, the last ones too
    # (they came 0.3 s after the recording's last frame).
    assert sorted(line["seq"] for line in lines) == sorted(n for n in numbers if n % 2 == 0)
    assert int(summary(recorder)["results"]) == len(lines)


def test_each_segment_and_its_sidecar_hold_the_same_frames(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    start_box_model(env, name, "--latency", "0.25")
    recorder = env.cli("record", name, "--segment", "1", "--dir", str(tmp_path), "--results=square", "--duration", "3.5")
    assert recorder.wait(timeout=60) == 0, recorder.output()
    segments = sorted(tmp_path.glob(f"{name}-*.ts"))
    assert len(segments) >= 3
    total = 0
    for segment in segments:
        header, lines = read_sidecar(segment)
        assert header["models"] == ["square"]
        seqs = [frame.seq for frame in decode(segment)]
        # Results of a segment's last frames arrive after the next segment began: still its own.
        assert sorted(line["seq"] for line in lines) == seqs, segment.name
        total += len(lines)
    assert int(summary(recorder)["results"]) == total


def test_burn_in_draws_each_frames_own_boxes_into_the_video(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "640", "--height", "480", "--fps", "30")
    start_box_model(env, name, "--latency", "0.2")
    video = tmp_path / "burnt.ts"
    recorder = env.cli("record", name, "-o", str(video), "--burn-in", "square", "--duration", "3")
    assert recorder.wait(timeout=60) == 0, recorder.output()
    facts = summary(recorder)
    assert int(facts["burn_in_late"]) <= 3, facts  # the first frames, before the reader attached
    colour = np.array(model_colour("square")[::-1], np.float64)  # BGR

    def coloured(pixels: np.ndarray) -> float:
        """The share of ``pixels`` in the model's colour (give or take what H.264 changes)."""
        return float((np.linalg.norm(pixels.reshape(-1, 3).astype(np.float64) - colour, axis=1) < 80).mean())

    # The outline is 4 px wide at 640 px, just outside the box; its middle 2 px are checked.
    def left_edge(image: np.ndarray, box: list[int]) -> np.ndarray:
        x, y, w, h = box
        return image[y + 4 : y + h - 4, x - 3 : x - 1]

    def bottom_edge(image: np.ndarray, box: list[int]) -> np.ndarray:
        x, y, w, h = box
        return image[y + h + 1 : y + h + 3, x + 4 : x + w - 4]

    from framebroker import testpattern

    frames = [(testpattern.identify(image), image) for image in ffmpeg_frames(video, (480, 640))]
    checked = on_box = 0
    for number, image in frames:
        assert number is not None, "the box and its label leave the frame number readable"
        box = square(number, 480, 640)
        if box[0] < 4 or box[0] + box[2] + 4 > 640:
            continue  # at the picture's edge: part of the outline is cut off
        checked += 1
        if coloured(left_edge(image, box)) > 0.8 and coloured(bottom_edge(image, box)) > 0.8:
            on_box += 1
            # Not the box of a neighbouring frame: where its square was (8 px to the left), no outline.
            shifted = [box[0] - 8, *box[1:]]
            assert coloured(left_edge(image, shifted)) < 0.1, f"frame {number}: an outline where the previous frame's square was"
    assert checked > 60 and on_box >= checked - 3, f"{on_box} of {checked} frames have their box drawn around the square"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trigger-on", "faces"], "--trigger-on opens clips: give --clips DIR too"),
        (["--clips", ".", "--trigger-on", "faces:face>=high"], "the score after >= must be a number, got 'high'"),
        (["--clips", ".", "--trigger-on", "a@b"], "give MODEL[:LABEL][>=SCORE]"),
        (["--burn-in-wait", "1"], "--burn-in-wait goes with --burn-in"),
        (["--burn-in", "faces,no@pe"], "invalid model name 'no@pe'"),
        (["--burn-in", "faces", "--burn-in-wait", "11"], "--burn-in-wait must be >= 0 and <= 10"),
        (["-o", "udp://127.0.0.1:5000", "--results"], "--results writes a file beside each video file"),
    ],
)
def test_result_options_usage_errors_exit_2(env, args, message):
    result = env.run_cli("record", env.name(), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
