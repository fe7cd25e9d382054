"""The recorder, run as a user runs it, checked with real decoders (ffprobe, ffmpeg, PyAV).

Frames come from a real daemon (test://) or from a Publisher in the test with timestamps the test
chooses, so the truth (which seq was captured when) is known independently of the recorder. Each
decoded frame is mapped back to its seq by reading the test pattern's number off its pixels.
"""

from __future__ import annotations

import csv
import json
import os
import pty
import random
import re
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker._process import framebroker_command
from framebroker._status import describe_stream
from framebroker_clients.recorder.encoders import AUTO_ORDER

from conftest import MISSING_JETSON, MISSING_NVENC, wait_until, works_or_says_why

av = pytest.importorskip("av")

SHAPE = (240, 320, 3)
FRAME_TICKS = 3000  # one frame at 30 fps in 90 kHz ticks


@dataclass
class Decoded:
    seq: Optional[int]
    pts: int
    keyframe: bool


def decode(path: Path) -> list[Decoded]:
    """Every frame of a video file, with the seq its pixels carry, its PTS in 90 kHz ticks and
    its keyframe flag. The file's time base is 1/90000 (MPEG-TS, MP4) or 1/1000 (Matroska)."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ticks_per_unit = {Fraction(1, 90000): 1, Fraction(1, 1000): 90}[Fraction(stream.time_base)]
        for packet in container.demux(stream):
            for frame in packet.decode():
                seq = testpattern.identify(frame.to_ndarray(format="bgr24"))
                frames.append(Decoded(seq, frame.pts * ticks_per_unit, bool(packet.is_keyframe)))
    return frames


def ffprobe(path: Path) -> dict:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-show_programs", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ffmpeg_decode_errors(path: Path) -> subprocess.CompletedProcess:
    """Decode the whole file with ffmpeg (-xerror: stop with an error on the first broken frame)."""
    return subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"], capture_output=True, text=True, timeout=60)


def summary(proc) -> dict[str, str]:
    line = next((line for line in proc.stdout if line.startswith("record: ")), None)
    assert line is not None, proc.output()
    return dict(re.findall(r"(\w+)=(\S+)", line))


def recorder_entry(name: str) -> Optional[dict]:
    readers = [r for r in describe_stream(name)["readers"] if r["name"] == "recorder"]
    return readers[0] if readers else None


def wait_recorder_ordered(name: str, proc) -> None:
    def ready() -> bool:
        assert proc.popen.poll() is None, proc.output()
        entry = recorder_entry(name)
        return entry is not None and entry["mode"] == "ordered"

    wait_until(ready, 30, "the recorder to read in order")


def publish_schedule(pub: fb.Publisher, timestamps: list[int]) -> dict[int, int]:
    """Publish test frame n at timestamps[n-1] (sleeping until then); seq -> timestamp_ns."""
    published = {}
    for stamp in timestamps:
        delay = (stamp - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        seq = pub.seq + 1
        pub.publish(testpattern.render(seq, SHAPE), timestamp_ns=stamp)
        published[seq] = stamp
    return published


def stop_after_last(name: str, proc, last_seq: int) -> int:
    wait_until(lambda: (recorder_entry(name) or {}).get("last_seq") == last_seq, 20, f"the recorder to read seq {last_seq}")
    proc.signal(signal.SIGTERM)
    return proc.wait(timeout=30)


# --- a plain recording ------------------------------------------------------------------------------


def test_five_second_recording_is_h264_in_mpegts_of_the_right_length(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    out = tmp_path / "five.ts"
    recorder = env.cli("record", name, "-o", str(out), "--duration", "5")
    # While it records, status shows the encoder and what it has written.
    entry = wait_until(lambda: (e := recorder_entry(name)) and e["info"].get("written", 0) > 0 and e, 30, "the recorder's status")
    assert entry["info"]["encoder"] == "libx264" and entry["mode"] == "ordered"
    assert entry["info"]["fallback"] == "no hardware encoder works (8 tried)"
    table = env.run_cli("status", name).stdout
    assert "encoder=libx264" in table and "dropped_ring=" in table and "fallback=no hardware encoder works" in table
    assert recorder.wait(timeout=60) == 0, recorder.output()

    probe = ffprobe(out)
    assert probe["format"]["format_name"] == "mpegts"
    (stream,) = probe["streams"]
    assert stream["codec_name"] == "h264" and (stream["width"], stream["height"]) == (320, 240)
    assert abs(float(probe["format"]["duration"]) - 5.0) <= 0.02 * 5.0, probe["format"]
    # The encoder is in the file, in the log, and the fallback to software was loud.
    tags = probe["programs"][0]["tags"]
    assert tags["service_provider"] == "framebroker" and tags["service_name"] == f"{name} encoder=libx264"
    stderr = "\n".join(recorder.stderr)
    (warning,) = [line for line in recorder.stderr if "SOFTWARE H.264" in line]
    assert len(warning) < 200 and "--log-level debug" in warning, warning
    assert "h264_nvenc" not in stderr, "each encoder's reason only at debug level"
    assert "encoder libx264" in stderr
    facts = summary(recorder)
    assert facts["encoder"] == "libx264" and int(facts["frames"]) == len(decode(out))
    assert ffmpeg_decode_errors(out).returncode == 0
    # Not a terminal: no progress line, only the summary.
    assert [line for line in recorder.stdout if line.strip()] == [line for line in recorder.stdout if line.startswith("record: ")]
    assert not any("\r" in line for line in recorder.stdout)


# --- true timestamps ---------------------------------------------------------------------------------


def wandering_schedule(start_ns: int) -> list[int]:
    """60 frames: 30 at ~30 fps with jitter, a 1 s hole, 15 at 20 fps, 15 at 30 fps."""
    rng = random.Random(7)
    stamps, t = [], start_ns
    for index in range(60):
        if index == 30:
            t += 1_033_333_333  # a second's frames withheld
        elif index:
            t += 50_000_000 if 30 <= index < 45 else 33_333_333
        stamps.append(t + rng.randint(-4_000_000, 4_000_000))
    return stamps


def record_wandering_schedule(env, out: Path, *args: str) -> tuple[dict[int, int], list[Decoded], object]:
    """Record the wandering schedule into ``out``; the truth (seq -> capture time), the decoded
    frames, and the recorder."""
    name = env.name("pts")
    with fb.Publisher(name, shape=SHAPE, fps=30) as pub:
        recorder = env.cli("record", name, "-o", str(out), *args)
        wait_recorder_ordered(name, recorder)
        truth = publish_schedule(pub, wandering_schedule(time.monotonic_ns() + 200_000_000))
        assert stop_after_last(name, recorder, max(truth)) == 0, recorder.output()
    return truth, decode(out), recorder


def assert_true_timing(truth: dict[int, int], frames: list[Decoded]) -> None:
    """Every published frame is there, in order, at its capture time (within 1 ms), the hole too."""
    assert [f.seq for f in frames] == sorted(truth), "every published frame, in order, identified"
    first = frames[0]
    errors_ms = [abs((f.pts - first.pts) / 90_000 - (truth[f.seq] - truth[first.seq]) / 1e9) * 1000 for f in frames]
    assert max(errors_ms) <= 1.0, f"PTS error up to {max(errors_ms):.3f} ms"
    before, after = frames[29], frames[30]
    assert (before.seq, after.seq) == (30, 31)
    assert (after.pts - before.pts) / 90_000 >= 1.0, "the 1 s hole was closed up"


@pytest.mark.parametrize("encoder", ["libx264", "x264enc"])
def test_pts_are_capture_times_and_a_hole_stays_a_hole(env, tmp_path, encoder):
    """x264enc runs the GStreamer pipe path (raw frames in, access units split by FFmpeg's parser,
    PTS from the FIFO of written frames): the plumbing every hardware GStreamer encoder uses."""
    out = tmp_path / f"{encoder}.ts"
    truth, frames, recorder = record_wandering_schedule(env, out, "--encoder", encoder)
    assert_true_timing(truth, frames)
    assert f"encoder={encoder}" in ffprobe(out)["programs"][0]["tags"]["service_name"]
    assert summary(recorder)["dropped_ring"] == "0"


@pytest.mark.parametrize(
    "suffix, format_name", [(".ts", "mpegts"), (".mp4", "mov,mp4,m4a,3gp,3g2,mj2"), (".mkv", "matroska,webm")]
)
def test_the_file_extension_names_the_container(env, tmp_path, suffix, format_name):
    out = tmp_path / f"clip{suffix}"
    truth, frames, recorder = record_wandering_schedule(env, out)
    probe = ffprobe(out)
    assert probe["format"]["format_name"] == format_name
    (stream,) = probe["streams"]
    assert stream["codec_name"] == "h264" and (stream["width"], stream["height"]) == (320, 240)
    assert ffmpeg_decode_errors(out).returncode == 0, "decodes to the end"
    assert_true_timing(truth, frames)
    span = (truth[max(truth)] - truth[min(truth)]) / 1e9
    assert span <= float(probe["format"]["duration"]) <= span + 0.1, (probe["format"]["duration"], span)
    tags = probe["programs"][0]["tags"] if suffix == ".ts" else probe["format"]["tags"]
    assert "encoder=libx264" in tags["service_name" if suffix == ".ts" else "title"]


# --- crash safety -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, most_lost", [(".ts", 0.5), (".mp4", 1.0)])
def test_kill_9_leaves_a_decodable_file_ending_within_half_a_second(env, tmp_path, suffix, most_lost):
    """MPEG-TS is flushed packet by packet; MP4 fragment by fragment (at every keyframe and at
    least every half second), so the last fragment can be lost with the queue in front of it."""
    name = env.name("kill")
    out = tmp_path / f"killed{suffix}"
    truth: dict[int, int] = {}
    stop = threading.Event()
    ready = threading.Event()

    def produce() -> None:
        with fb.Publisher(name, shape=SHAPE, fps=30) as pub:
            ready.set()
            next_time = time.monotonic()
            while not stop.is_set():
                next_time += 1 / 30
                time.sleep(max(0.0, next_time - time.monotonic()))
                stamp = time.monotonic_ns()
                seq = pub.seq + 1
                pub.publish(testpattern.render(seq, SHAPE), timestamp_ns=stamp)
                truth[seq] = stamp

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        assert ready.wait(10)
        recorder = env.cli("record", name, "-o", str(out))
        wait_until(lambda: ((recorder_entry(name) or {}).get("info") or {}).get("written", 0) >= 45, 30, "1.5 s recorded")
        killed_ns = time.monotonic_ns()
        os.kill(recorder.pid, signal.SIGKILL)
        assert recorder.wait(timeout=10) == -signal.SIGKILL
    finally:
        stop.set()
        producer.join(timeout=10)

    assert ffmpeg_decode_errors(out).returncode == 0
    assert ffprobe(out)["format"]["format_name"] == {".ts": "mpegts", ".mp4": "mov,mp4,m4a,3gp,3g2,mj2"}[suffix]
    frames = decode(out)
    assert len(frames) >= 30 and all(f.seq is not None for f in frames)
    last = frames[-1].seq
    lost = (killed_ns - truth[last]) / 1e9
    assert lost <= most_lost, f"the file ends {lost:.3f} s before the kill"


# --- segments -------------------------------------------------------------------------------------------


def test_segments_cut_on_keyframes_add_up_keep_the_newest_and_index_every_frame(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    stale = tmp_path / f"{name}-20000101-000000.000Z.ts"  # an older run's segment: --keep counts it
    stale.write_bytes(b"")
    unrelated = tmp_path / "notes.ts"
    unrelated.write_bytes(b"x")
    recorder = env.cli("record", name, "--segment", "2", "--dir", str(tmp_path), "--keep", "3", "--duration", "7")
    assert recorder.wait(timeout=60) == 0, recorder.output()
    facts = summary(recorder)
    assert (facts["files"], facts["deleted"]) == ("4", "2")  # 7 s in 2 s files; the stale one went too
    assert not stale.exists() and unrelated.exists()
    kept = sorted(tmp_path.glob(f"{name}-*.ts"))
    assert len(kept) == 3
    assert all(p.with_suffix(".csv").exists() for p in kept)
    assert len(list(tmp_path.glob(f"{name}-*.csv"))) == 3

    per_file: list[list[Decoded]] = []
    durations = []
    for path in kept:
        frames = decode(path)
        assert frames[0].keyframe, f"{path.name} does not start on a keyframe"
        with open(path.with_suffix(".csv"), newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [(f.seq, f.pts) for f in frames] == [(int(r["seq"]), int(r["pts"])) for r in rows], path.name
        assert all(abs(float(r["pts_time"]) - int(r["pts"]) / 90_000) < 1e-5 for r in rows)
        # Named by the UTC capture time of the first frame.
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(float(rows[0]["wall_time"])))
        assert path.name.startswith(f"{name}-{stamp}")
        durations.append(float(ffprobe(path)["format"]["duration"]))
        per_file.append(frames)
    # Each file holds exactly the frames of its 2 s slot of recording time: it starts with the first
    # frame at or after the slot's start (a forced keyframe), the previous file ends before it.
    slot_ticks = 2 * 90_000
    slots = [frames[0].pts // slot_ticks for frames in per_file]
    assert slots == [slots[0], slots[0] + 1, slots[0] + 2]
    for frames, slot in zip(per_file, slots):
        assert all(f.pts // slot_ticks == slot for f in frames)
    # The files tile the timeline: no frame missing or repeated at a cut, and each file's duration
    # (ffprobe) reaches the next file's start, so the durations add up.
    all_frames = [f for frames in per_file for f in frames]
    dropped = int(facts["dropped_ring"]) + int(facts["dropped_queue"])
    seqs = [f.seq for f in all_frames]
    assert seqs == sorted(set(seqs)) and seqs[-1] - seqs[0] + 1 - len(seqs) <= dropped
    starts = [frames[0].pts for frames in per_file]
    for duration, start, next_start in zip(durations, starts, starts[1:]):
        assert abs(duration - (next_start - start) / 90_000) <= 0.1, (durations, starts)
    span = (all_frames[-1].pts - all_frames[0].pts + FRAME_TICKS) / 90_000
    assert abs(sum(durations) - span) <= 0.1 * len(durations), (durations, span)


# --- streaming --------------------------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def udp_port_bound(port: int) -> bool:
    hex_port = f":{port:04X}"
    with open("/proc/net/udp") as table:
        return any(line.split()[1].endswith(hex_port) for line in table.readlines()[1:])


def test_udp_stream_is_received_and_decoded_by_ffmpeg(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    port = free_udp_port()
    received = tmp_path / "udp.ts"
    receiver = env.spawn(
        ["ffmpeg", "-v", "error", "-y", "-i", f"udp://127.0.0.1:{port}?timeout=3000000", "-c", "copy", "-f", "mpegts", str(received)],
        label="ffmpeg udp receiver",
    )
    wait_until(lambda: udp_port_bound(port), 10, "the receiver to listen")
    recorder = env.cli("record", name, "-o", f"udp://127.0.0.1:{port}", "--duration", "3")
    assert recorder.wait(timeout=60) == 0, recorder.output()
    receiver.wait(timeout=30)  # it stops 3 s after the last datagram
    assert ffmpeg_decode_errors(received).returncode == 0
    frames = decode(received)
    seqs = [f.seq for f in frames]
    assert len(frames) >= 75 and None not in seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert ffprobe(received)["streams"][0]["codec_name"] == "h264"


def test_srt_stream_is_received_and_decoded_by_ffmpeg(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    port = free_udp_port()
    received = tmp_path / "srt.ts"
    receiver = env.spawn(
        ["ffmpeg", "-v", "error", "-y", "-i", f"srt://127.0.0.1:{port}?mode=listener", "-map", "0", "-c", "copy",
         # keep the sender's program metadata (the receiver muxes its own file)
         "-map_metadata:g", "0:p:0", "-f", "mpegts", str(received)],
        label="ffmpeg srt receiver",
    )
    wait_until(lambda: udp_port_bound(port), 10, "the SRT listener")
    recorder = env.cli("record", name, "-o", f"srt://127.0.0.1:{port}", "--duration", "3")
    assert recorder.wait(timeout=60) == 0, recorder.output()
    receiver.wait(timeout=30)  # it ends when the sender disconnects
    frames = decode(received)
    seqs = [f.seq for f in frames]
    assert len(frames) >= 75 and None not in seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert ffprobe(received)["programs"][0]["tags"]["service_name"] == f"{name} encoder=libx264"


# --- overlays, progress, options ------------------------------------------------------------------------


def test_text_and_clock_are_drawn_and_leave_the_frame_number_readable(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    plain, marked = tmp_path / "plain.ts", tmp_path / "marked.ts"
    for out, extra in ((plain, []), (marked, ["--text", "TX2 DEMO", "--clock"])):
        proc = env.cli("record", name, "-o", str(out), "--duration", "1", *extra)
        assert proc.wait(timeout=60) == 0, proc.output()

    def bottom(path: Path):
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            image = frame.to_ndarray(format="bgr24")
        assert testpattern.identify(image) is not None
        return image

    import numpy as np

    a, b = bottom(plain), bottom(marked)
    seq_a, seq_b = testpattern.identify(a), testpattern.identify(b)
    reference_a = testpattern.render(seq_a, SHAPE).astype(int)
    reference_b = testpattern.render(seq_b, SHAPE).astype(int)
    region = slice(200, 240)  # where the overlays go
    plain_diff = np.abs(a[region].astype(int) - reference_a[region]).mean()
    marked_diff = np.abs(b[region].astype(int) - reference_b[region]).mean()
    assert marked_diff > plain_diff + 10, (plain_diff, marked_diff)


def test_progress_line_only_on_a_terminal(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        framebroker_command("record", name, "-o", str(tmp_path / "tty.ts"), "--duration", "2"),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the terminal's other side closed
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = seen.decode()
    assert re.search(r"\rrecording \d\d:\d\d\.\d +\d+\.\d fps +\d+ frames +dropped 0 \(ring\) \+ 0 \(queue\)", text), text
    assert "record: done" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--encoder", "nosuch"], "unknown --encoder 'nosuch'"),
        (["--segment", "2", "-o", "x.ts"], "not both"),
        (["--keep", "3"], "--dir and --keep go with --segment"),
        (["--segment", "2", "--dir", "/nonexistent/dir"], "no such directory"),
        (["-o", "rtmp://host/app"], "unknown scheme rtmp://"),
        (["-o", "clip.avi"], "-o clip.avi: extension .avi; the file name must end in .ts (MPEG-TS), .mp4 (fragmented MP4) or .mkv (Matroska)"),
        (["-o", "clip"], "-o clip: no extension"),
        (["-o", "udp://nohostport"], "is not a udp://HOST:PORT address"),
        (["--duration", "-1"], "--duration must be > 0"),
        (["--bitrate", "fast"], "--bitrate must be a whole number"),
    ],
)
def test_usage_errors_exit_2(env, args, message):
    result = env.run_cli("record", env.name(), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("encoder, causes", [("h264_nvenc", MISSING_NVENC), ("nvv4l2h264enc", MISSING_JETSON)])
def test_a_named_hardware_encoder_records_or_says_why_it_cannot(env, tmp_path, encoder, causes):
    daemon, name = env.serve()
    out = tmp_path / "x.ts"
    result = env.run_cli("record", name, "-o", str(out), "--encoder", encoder, "--duration", "1")
    if result.returncode == 0:  # the hardware is there
        assert f"encoder={encoder}" in ffprobe(out)["programs"][0]["tags"]["service_name"]
        return
    assert result.returncode == 1, result.stderr
    verdict = f"encoder {encoder} ("
    because = "does not work on this machine: "
    assert verdict in result.stderr and because in result.stderr and "--encoder auto" in result.stderr, result.stderr
    works_or_says_why(result.stderr.split(because, 1)[1], causes)


def test_each_encoders_reason_at_debug_level(env, tmp_path):
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    result = env.run_cli("--log-level", "debug", "record", name, "-o", str(tmp_path / "x.ts"), "--duration", "0.5")
    assert result.returncode == 0, result.stderr
    reasons = dict(re.findall(r"DEBUG: encoder (\S+) does not work here: (.+)", result.stderr))
    chosen = re.search(r"encoder=(\S+)", result.stdout).group(1)
    # Every encoder tried before the chosen one, each with its reason (what is missing here).
    assert list(reasons) == list(AUTO_ORDER[: AUTO_ORDER.index(chosen)]), result.stderr
    assert all(len(reason) > 10 for reason in reasons.values()), reasons


def test_missing_stream_exits_1(env, tmp_path):
    name = env.name()
    result = env.run_cli("record", name, "-o", str(tmp_path / "x.ts"), "--encoder", "libx264", "--wait", "0.5", timeout=60)
    assert result.returncode == 1, result.stderr
    assert "framebroker record: error:" in result.stderr and name in result.stderr
