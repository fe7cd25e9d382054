"""Derived streams (``serve --derive``): made once in the daemon from the same capture, mapped back
to the main frame exactly, never slowing the main stream, gone from /dev/shm with the daemon."""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker._derive import Derivations, DeriveSpec
from framebroker._status import describe_stream

from conftest import wait_until
from test_sources import require_gstreamer, start_rtsp_server

REPOSITORY = Path(__file__).resolve().parent.parent
MAIN = (640, 480)  # the main stream's width and height in these tests
Rect = Tuple[int, int, int, int]

# Each derived stream with where the 640x480 main picture must land, worked out by hand: the
# main rectangle drawn (x, y, w, h) and the derived rectangle it fills.
#   letterbox 300x300: scale min(300/640, 300/480) = 0.46875 -> 300x225, (300 - 225) // 2 = 37 down
#   letterbox 200x400: scale 0.3125 -> 200x150, (400 - 150) // 2 = 125 down
#   crop 200x300: scale max(200/640, 300/480) = 0.625 -> the main's 320x480 centre, from x = 160
#   crop 800x300 (larger than the main: upscaled): scale 1.25 -> the main's 640x240 centre, from y = 120
EVERY_MODE_AND_FORMAT = {
    "sbgr": ("320x200:bgr", (0, 0, 640, 480), (0, 0, 320, 200)),
    "srgb": ("320x200:rgb:stretch", (0, 0, 640, 480), (0, 0, 320, 200)),
    "sgray": ("320x200:gray", (0, 0, 640, 480), (0, 0, 320, 200)),
    "lbgr": ("300x300:letterbox", (0, 0, 640, 480), (0, 37, 300, 225)),
    "lrgb": ("200x400:rgb:letterbox", (0, 0, 640, 480), (0, 125, 200, 150)),
    "lgray": ("300x300:gray:letterbox", (0, 0, 640, 480), (0, 37, 300, 225)),
    "cbgr": ("200x300:bgr:crop", (160, 0, 320, 480), (0, 0, 200, 300)),
    "crgb": ("800x300:crop:rgb", (0, 120, 640, 240), (0, 0, 800, 300)),
    "cgray": ("200x300:gray:crop", (160, 0, 320, 480), (0, 0, 200, 300)),
}

def reference(main: np.ndarray, main_format: str, size: Tuple[int, int], fmt: str, source: Rect, target: Rect) -> np.ndarray:
    """The derived frame as cv2 makes it the other way round (colours first, then the size), on
    a black canvas: the daemon's result must equal it within rounding."""
    picture = main if main_format == fmt else cv2.cvtColor(main, getattr(cv2, f"COLOR_{main_format.upper()}2{fmt.upper()}"))
    sx, sy, sw, sh = source
    tx, ty, tw, th = target
    canvas = np.zeros((size[1], size[0]) + picture.shape[2:], np.uint8)
    canvas[ty : ty + th, tx : tx + tw] = cv2.resize(picture[sy : sy + sh, sx : sx + sw], (tw, th), interpolation=cv2.INTER_LINEAR)
    return canvas


def pattern(seq: int, main_format: str) -> np.ndarray:
    shape = (MAIN[1], MAIN[0]) if main_format == "gray" else (MAIN[1], MAIN[0], 3)
    return testpattern.render(seq, shape, main_format)


def check_against_reference(frame: fb.Frame, main: np.ndarray, main_format: str, source: Rect, target: Rect) -> None:
    expected = reference(main, main_format, (frame.width, frame.height), frame.format, source, target)
    difference = np.abs(frame.array.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 2, f"{frame!r}: {int((difference > 2).sum())} samples differ by more than rounding (max {difference.max()})"
    tx, ty, tw, th = target
    bars = np.ones(frame.shape[:2], bool)
    bars[ty : ty + th, tx : tx + tw] = False
    assert not frame.array[bars].any(), f"{frame!r}: the letterbox bars are not black"


def derive_args(specs: Dict[str, Tuple[str, Rect, Rect]]) -> List[str]:
    return [word for name, (spec, _, _) in specs.items() for word in ("--derive", f"{name}={spec}")]


def test_every_mode_and_format_equals_a_cv2_conversion_of_the_same_frame(env):
    daemon, name = env.serve("test://", None, "--fps", "15", *derive_args(EVERY_MODE_AND_FORMAT))
    for derived, (_spec, source, target) in EVERY_MODE_AND_FORMAT.items():
        with fb.Reader(f"{name}.{derived}", name="check") as reader:
            frame = reader.next(timeout=5)
            # test:// frame n is testpattern.render(n): the main frame of the same seq, exactly.
            check_against_reference(frame, pattern(frame.seq, "bgr"), "bgr", source, target)


@pytest.mark.parametrize(
    "main_format, specs",
    [
        ("rgb", {"s": ("200x100:gray", (0, 0, 640, 480), (0, 0, 200, 100)), "l": ("300x300:bgr:letterbox", (0, 0, 640, 480), (0, 37, 300, 225))}),
        ("gray", {"c": ("200x300:rgb:crop", (160, 0, 320, 480), (0, 0, 200, 300)), "s": ("320x240:bgr", (0, 0, 640, 480), (0, 0, 320, 240))}),
    ],
)
def test_from_an_rgb_or_gray_main_stream(env, main_format, specs):
    daemon, name = env.serve("test://", None, "--fps", "15", "--format", main_format, *derive_args(specs))
    for derived, (_spec, source, target) in specs.items():
        with fb.Reader(f"{name}.{derived}", name="check") as reader:
            frame = reader.next(timeout=5)
            check_against_reference(frame, pattern(frame.seq, main_format), main_format, source, target)


def test_a_derived_frame_carries_its_main_frames_seq_and_capture_times(env):
    daemon, name = env.serve("test://", None, "--fps", "15", "--derive", "small=160x120:rgb")
    with fb.Reader(name, name="main") as main_reader, fb.Reader(f"{name}.small", name="small", hold=5) as reader:
        mains = main_reader.ordered(timeout=5)
        captures = {}
        # An ordered reader: from its second call on, the ring keeps every main frame after its
        # first for it, while the derived frames come.
        for main in (next(mains), next(mains)):
            captures[main.seq] = (main.timestamp_ns, main.wall_time)
        derived = []
        while len(derived) < 5:
            frame = reader.next(timeout=5)
            if frame.seq > min(captures):
                derived.append(frame)
        for main in mains:
            captures[main.seq] = (main.timestamp_ns, main.wall_time)
            if main.seq >= derived[-1].seq:
                break
    assert main_reader.dropped == 0
    for frame in derived:
        assert (frame.timestamp_ns, frame.wall_time) == captures[frame.seq], frame


# --- the mapping back to the main frame ---------------------------------------------------------------


def white_square(frame: fb.Frame, below: float) -> Optional[List[int]]:
    """[x, y, w, h] in ``frame``'s pixels of the test pattern's white square: the pixels whose
    three channels are all above half (the gradient never has that) below the row ``below`` (the
    band's white cells are above it); half intensity is where a resized edge lies."""
    image = frame.array
    mask = (image > 127).all(axis=2)
    mask[: int(np.ceil(below))] = False
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@pytest.mark.parametrize("spec, inside", [("300x300:letterbox", (0, 640)), ("200x300:crop", (160, 480))])
def test_source_box_finds_a_known_object_in_the_main_frame(env, spec, inside):
    """The test pattern's white square, found in the derived picture, is where the pattern drew it
    in the main frame, once mapped back; and mapping there and back changes no box."""
    daemon, name = env.serve("test://", None, "--fps", "30", "--derive", f"d={spec}")
    band = testpattern._band_height(MAIN[1])
    checked = 0
    with fb.Reader(f"{name}.d", name="find") as reader:
        while checked < 3:
            frame = reader.next(timeout=5)
            x, y, side = testpattern._box(MAIN[1], MAIN[0], frame.seq)
            if not inside[0] <= x <= x + side <= inside[1]:
                continue  # crop: the square is outside the part of the main frame drawn
            found = white_square(frame, frame.derived_box([0, band + 2, 1, 1])[1])
            assert found is not None, frame
            mapped = frame.source_box(found)
            # An edge found to half a derived pixel is a main pixel or two out (scale 0.47 and 0.63).
            assert np.allclose(mapped, [x, y, side, side], atol=2.5), (frame, found, mapped, (x, y, side))
            checked += 1
        reader.close()  # the frame's ring is left: its mapping comes from the one serving the stream now
        assert frame.released and np.allclose(frame.source_box(found), mapped)
        rng = random.Random(frame.seq)
        for _ in range(20):
            box = [rng.uniform(-50, 700), rng.uniform(-50, 500), rng.uniform(0, 300), rng.uniform(0, 300)]
            assert np.allclose(frame.source_box(frame.derived_box(box)), box, atol=1e-9)
            assert np.allclose(frame.derived_box(frame.source_box(box)), box, atol=1e-9)
    with fb.Reader(name, name="main") as reader:
        frame = reader.next(timeout=5)
        assert frame.source_box([1, 2, 3, 4]) == frame.derived_box([1, 2, 3, 4]) == [1.0, 2.0, 3.0, 4.0]
        with pytest.raises(ValueError, match=r"\[x, y, w, h\]"):
            frame.source_box([1, 2, 3])
        with pytest.raises(TypeError, match=r"\[x, y, w, h\]"):
            frame.source_box("abcd")


def _publish_until_derived(pub: fb.Publisher, reader: fb.Reader, image: np.ndarray) -> fb.Frame:
    """Publish ``image`` and return the derived frame of that very seq."""
    seq = pub.publish(image)
    while True:
        frame = reader.next(timeout=5)
        if frame.seq == seq:
            return frame
        frame.release()


def test_a_main_stream_that_changes_size_keeps_each_frames_own_mapping(env):
    """A camera back at another resolution: frames drawn before keep the mapping they were drawn
    with, later ones get the new one. Driven by a Publisher, whose frames are known exactly."""
    name = env.name("geo")
    small, wide = (240, 320, 3), (360, 640, 3)
    with fb.Publisher(name, small, fps=30) as pub:
        derivations = Derivations(pub, [DeriveSpec.parse("d=160x160:rgb:letterbox")], slots="auto")
        try:
            with fb.Reader(f"{name}.d", name="geo", hold=2) as reader:
                before = _publish_until_derived(pub, reader, testpattern.render(1, small))
                after = _publish_until_derived(pub, reader, testpattern.render(2, wide))  # a larger ring: the deriver follows
                assert not before.released and before.seq == 1 and after.seq == 2
                # 320x240 into 160x160: 160x120, 20 rows down; 640x360: 160x90, 35 rows down.
                check_against_reference(before, testpattern.render(1, small), "bgr", (0, 0, 320, 240), (0, 20, 160, 120))
                check_against_reference(after, testpattern.render(2, wide), "bgr", (0, 0, 640, 360), (0, 35, 160, 90))
                assert before.source_box([0, 20, 160, 120]) == [0.0, 0.0, 320.0, 240.0]
                assert after.source_box([0, 35, 160, 90]) == [0.0, 0.0, 640.0, 360.0]
                assert after.derived_box([320, 180, 64, 36]) == [80.0, 80.0, 16.0, 9.0]
                derived = describe_stream(f"{name}.d")
                assert derived["derive"]["from_seq"] == 2 and derived["derive"]["target_box"] == [0, 35, 160, 90]
        finally:
            derivations.close()


def test_the_daemon_follows_a_camera_back_at_another_resolution(env):
    """The same through the daemon: an RTSP server restarted at another size. While it is away the
    derived stream says what the main one says; held frames keep their mapping."""
    require_gstreamer()
    server, port = start_rtsp_server(env, "--width", "320", "--height", "240")
    daemon, name = env.serve(f"rtsp://127.0.0.1:{port}/test?latency=0", None, "--derive", "d=160x160:letterbox")
    with fb.Reader(f"{name}.d", name="held") as holder, fb.Reader(f"{name}.d", name="geo") as reader:
        before = holder.next(timeout=15)
        assert before.source_box([0, 20, 160, 120]) == [0.0, 0.0, 320.0, 240.0]
        server.stop()
        wait_until(lambda: describe_stream(f"{name}.d")["state"] == "reconnecting", 30, "the derived stream to say reconnecting")
        assert f"127.0.0.1:{port}" in describe_stream(f"{name}.d")["reason"]
        restarted = env.spawn([*server.argv[:3], "--width", "640", "--height", "360"], label="rtsp server again")
        restarted.wait_line(lambda line: line.startswith("ready"), timeout=15)
        after = None
        while after is None or after.source_box([0, 35, 160, 90]) != [0.0, 0.0, 640.0, 360.0]:
            after = reader.next(timeout=40)
        assert describe_stream(f"{name}.d")["state"] == "streaming"
        assert not before.released and before.source_box([0, 20, 160, 120]) == [0.0, 0.0, 320.0, 240.0]


# --- never in the main stream's way -------------------------------------------------------------------


def test_a_slow_derivation_never_delays_the_main_stream(env):
    """A derived stream far too large to draw at the camera's rate (4K from VGA, each frame tens of
    milliseconds): it skips frames and counts them, while the main stream keeps its rate."""
    fps = 60
    daemon, name = env.serve("test://", None, "--fps", str(fps), "--derive", "huge=3840x2160:rgb")
    main_times: List[int] = []
    derived_seqs: List[int] = []
    with fb.Reader(name, name="main") as main_reader, fb.Reader(f"{name}.huge", name="huge") as derived_reader:
        frames = main_reader.ordered(timeout=5)
        for frame in frames:
            main_times.append(frame.timestamp_ns)
            if len(main_times) == 3 * fps:
                break
            # The derived stream's newest frame now and then, without holding up the main reader.
            if len(main_times) % 10 == 0:
                try:
                    derived_seqs.append(derived_reader.latest(timeout=0).seq)
                except fb.FrameTimeout:
                    pass
        assert main_reader.dropped == 0
    main = describe_stream(name)
    derived = main["derived"][0] if main.get("derived") else fb.status(name)["streams"][0]["derived"][0]
    assert derived["skipped"] > 0, derived  # the derivation is slow, for real
    assert main["publisher_drops"] == 0
    gaps = np.diff(main_times) / 1e9
    period = 1 / fps
    # Capture times keep the source's schedule: a derivation on the main stream's path would space
    # them by its own duration, which the derived stream's skips show is several periods.
    assert statistics.median(gaps) < 1.5 * period, statistics.median(gaps)
    derived_gap = (derived_seqs[-1] - derived_seqs[0]) / max(1, len(set(derived_seqs)) - 1)
    assert derived_gap >= 2, f"the derived stream took {derived_seqs}: not slower than the main one"
    assert statistics.median(gaps) < derived_gap * period / 2


# --- lifecycle, status, command line ------------------------------------------------------------------


def shm_of(name: str) -> List[str]:
    """Everything in /dev/shm of the stream and of its derived streams."""
    return sorted(entry for entry in os.listdir("/dev/shm") if entry.startswith((f"framebroker.{name}", f"sem.framebroker.{name}")))


def test_sigterm_leaves_nothing_of_the_main_or_derived_streams(env):
    daemon, name = env.serve("test://", None, "--derive", "a=320x240:rgb", "--derive", "b=100x100:gray:crop")
    with fb.Reader(f"{name}.a", name="holder") as reader:
        frame = reader.next(timeout=5)
        assert any(entry.startswith(f"framebroker.{name}.a") for entry in shm_of(name))
        held = frame.source_box([0, 0, 320, 240])
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, daemon.output()
        assert shm_of(name) == []
        assert frame.array.shape == (240, 320, 3)  # a frame held stays readable
        assert frame.source_box([0, 0, 320, 240]) == held == [0.0, 0.0, 640.0, 480.0]  # its reader still has the header
    with pytest.raises(fb.StreamNotFound, match="came from a daemon that is gone"):
        frame.source_box([0, 0, 320, 240])
    assert any(f"{name}.a: stopped, its ring removed" in line for line in daemon.stderr), daemon.output()


def test_status_shows_derived_streams_under_their_main_stream(env):
    daemon, name = env.serve("test://", None, "--fps", "20", "--derive", "lores=320x240:rgb", "--derive", "det=300x300:letterbox")
    reader = env.cli("read", f"{name}.det", "--reader-name", "detector")
    wait_until(lambda: describe_stream(f"{name}.det")["readers"], 10, "the reader of the derived stream")
    wait_until(lambda: describe_stream(f"{name}.det")["measured_fps"] > 0, 10, "the derived stream's rate")
    result = env.run_cli("status", "--json")
    document = json.loads(result.stdout)
    names = [stream["name"] for stream in document["streams"]]
    assert name in names and f"{name}.det" not in names and f"{name}.lores" not in names
    (main,) = [stream for stream in document["streams"] if stream["name"] == name]
    assert main["derived_from"] is None and main["derive"] is None
    assert [derived["name"] for derived in main["derived"]] == [f"{name}.det", f"{name}.lores"]
    det = main["derived"][0]
    assert det["derived_from"] == name and (det["width"], det["height"], det["format"]) == (300, 300, "bgr")
    assert det["derive"] == {"name": "det", "mode": "letterbox", "from_seq": 1, "source_box": [0, 0, 640, 480], "target_box": [0, 37, 300, 225]}
    assert det["skipped"] == 0 and det["measured_fps"] > 0
    assert [(r["name"], r["pid"]) for r in det["readers"]] == [("detector", reader.pid)]
    assert {r["name"] for r in main["readers"]} == {"derive lores", "derive det"}
    # One stream by name: the same grouping; a derived one alone says what it comes from.
    assert [d["name"] for d in fb.status(name)["streams"][0]["derived"]] == [f"{name}.det", f"{name}.lores"]
    assert fb.status(f"{name}.det")["streams"][0]["derived_from"] == name
    table = env.run_cli("status", name).stdout
    assert f"  derived {name}.det: 300x300 bgr letterbox, " in table and " 0 skipped" in table, table
    assert "    main frame 640x480+0+0 drawn at 300x225+0+37" in table, table
    assert f"  derived {name}.lores: 320x240 rgb stretch, " in table, table
    assert f"derived from stream {name}: 300x300 bgr letterbox" in env.run_cli("status", f"{name}.det").stdout


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lores", "write NAME=WxH[:bgr|rgb|gray][:stretch|letterbox|crop]"),
        ("lores=640", "'640' is not a size: write WxH"),
        ("lo.res=640x360", "must be 1-32 characters from A-Z a-z 0-9 _ -"),
        ("lores=640x360:rbg", "'rbg' is neither a format (bgr, rgb, gray) nor a mode (stretch, letterbox, crop)"),
        ("lores=640x360:rgb:gray", "two formats (rgb and gray)"),
        ("lores=0x360", "between 1 and 16384 pixels"),
    ],
)
def test_a_bad_derive_spec_is_a_usage_error_saying_what_to_write(env, spec, message):
    result = env.run_cli("serve", "test://", "--name", env.name(), "--derive", spec)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_derive_in_a_config_file(env, tmp_path):
    config = tmp_path / "cams.toml"
    config.write_text('[streams.cam]\nsource = "test://"\nderive = ["lores=640x360:rgb", "det=640x640:rgb:letterbox"]\n')
    result = env.run_cli("up", "--check", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--derive=lores=640x360:rgb --derive=det=640x640:rgb:letterbox" in result.stdout
    config.write_text('[streams.cam]\nsource = "test://"\nderive = ["lores=640x360:rgb", "lores=1x1"]\n')
    result = env.run_cli("up", "--check", str(config))
    assert result.returncode == 2 and "cams.toml:3: streams.cam.derive" in result.stderr and "two derived streams are called 'lores'" in result.stderr, result.stderr


def test_faces_reads_the_derived_gray_stream_or_converts_itself(env):
    daemon, name = env.serve("test://", None, "--derive", "faces=320x240:gray")
    faces = env.cli("faces", name, "--frames", "5")
    assert faces.wait(timeout=60) == 0, faces.output()
    assert faces.stdout[0] == f"faces: reading '{name}.faces' (derived by the daemon), publishing as model 'faces'", faces.output()
    wait_until(lambda: describe_stream(f"{name}.faces")["frames"] > 0, 5, "derived frames")
    plain, plain_name = env.serve("test://")
    faces = env.cli("faces", plain_name, "--frames", "5")
    assert faces.wait(timeout=60) == 0, faces.output()
    assert faces.stdout[0] == f"faces: reading '{plain_name}', converting each frame here: no derived stream '{plain_name}.faces'"
    help_text = " ".join(env.run_cli("faces", "--help").stdout.split())
    assert "read the derived stream NAME.D (default faces: a gray picture the daemon makes once" in help_text
    assert "--derive faces=640x360:gray" in help_text


def test_the_benchmark_runs_and_reports(env, tmp_path):
    """bench/derive_cost.py for a second per scenario: an instrument that works, no figure judged."""
    summary = tmp_path / "derive_cost.json"
    bench = env.spawn(
        [sys.executable, str(REPOSITORY / "bench" / "derive_cost.py"), "--seconds", "1", "--warmup", "0.5", "--readers", "1", "--json", str(summary)],
        label="derive_cost",
    )
    assert bench.wait(timeout=180) == 0, bench.output()
    document = json.loads(summary.read_text())
    labels = [scenario["label"] for scenario in document["scenarios"]]
    assert labels == ["main only", "each converts", "derived", "derived, OpenCV pool"]
    for scenario in document["scenarios"]:
        assert scenario["main_fps"] > 0 and scenario["latency_samples"] > 0, scenario
        assert all(frames > 0 for frames in scenario["reader_frames"]), scenario
    assert set(document["per_frame_us"]) == {"lease_us", "copy_us", "convert_us"}
    assert any(line.startswith("| derived | ") for line in bench.stdout), bench.output()
    ours = tuple(f"{kind}fbbench-{what}-" for kind in ("framebroker.", "sem.framebroker.") for what in ("derive", "lease"))
    assert not [entry for entry in os.listdir("/dev/shm") if entry.startswith(ours)]
