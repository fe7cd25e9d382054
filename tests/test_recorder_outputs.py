"""One encode, many live outputs: ``record NAME -o FILE -o rtsp://... -o srt://... -o udp://...``.

Real servers on this machine only: ffmpeg in RTSP listen mode as the server a recorder publishes to
(a receiver that writes what it gets to a file), GStreamer's RTSP server in record mode where a
user and password must be checked, a TCP server that accepts and never answers. Each received
stream is checked by decoding it and reading the test pattern's frame number off every picture.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.parse
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Optional

import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker_clients.recorder import live, recorder
from framebroker_clients.recorder.encoders import ENCODERS
from framebroker_clients.recorder.outputs import OutputStatus, make_output
from framebroker_clients.recorder.packets import EncodedPacket, FrameStamp, StreamInfo

from conftest import ffmpeg_decode, wait_until
from test_recorder import free_udp_port, recorder_entry, udp_port_bound
from test_security import command_lines
from test_sources import free_port, require_gstreamer, start_rtsp_server

av = pytest.importorskip("av")

INFO = StreamInfo("cam", 320, 240, "test")


def tcp_listening(port: int) -> bool:
    hex_port = f":{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(fields[1].endswith(hex_port) and fields[3] == "0A" for fields in (line.split() for line in table.readlines()[1:]))


def rtsp_receiver(env, port: int, path: Path):
    """An RTSP server that takes one publisher (ffmpeg -rtsp_flags listen) and writes its stream to
    ``path``, all of it (-copyinkf: also what comes before the first keyframe, which ffmpeg would drop)."""
    proc = env.spawn(
        ["ffmpeg", "-v", "error", "-y", "-rtsp_flags", "listen", "-i", f"rtsp://127.0.0.1:{port}/live",
         "-c", "copy", "-copyinkf", "-f", "mpegts", str(path)],  # fmt: skip
        label=f"rtsp receiver {path.name}",
    )
    wait_until(lambda: tcp_listening(port), 10, "the RTSP receiver to listen")
    return proc


def udp_receiver(env, port: int, path: Path):
    proc = env.spawn(
        ["ffmpeg", "-v", "error", "-y", "-i", f"udp://127.0.0.1:{port}?timeout=1000000", "-c", "copy", "-f", "mpegts", str(path)],
        label="udp receiver",
    )
    wait_until(lambda: udp_port_bound(port), 10, "the UDP receiver to listen")
    return proc


def output_entry(name: str, label: str) -> Optional[list[str]]:
    """The recorder's status entry for the output ``label``, split in words ([label, state, ...])."""
    entry = recorder_entry(name)
    outs = entry["info"].get("out", []) if entry else []
    found = [text.split() for text in outs if text.split()[0] == label]
    return found[0] if found else None


def wait_output(name: str, label: str, proc, predicate, what: str) -> list[str]:
    def check() -> Optional[list[str]]:
        assert proc.popen.poll() is None, proc.output()
        words = output_entry(name, label)
        return words if words and predicate(words) else None

    return wait_until(check, 30, f"{label}: {what}")


def written(name: str) -> int:
    entry = recorder_entry(name)
    return entry["info"].get("written", 0) if entry else 0


def seqs_of(path: Path) -> list[int]:
    """The frame numbers of every picture in a received or recorded file; it must start on a
    keyframe and every picture must carry its number (a broken picture would not)."""
    seqs = []
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.video[0]):
            if not seqs and packet.size:
                assert packet.is_keyframe, f"{path.name} does not start on a keyframe"
            for frame in packet.decode():
                seqs.append(testpattern.identify(frame.to_ndarray(format="bgr24")))
    assert seqs and None not in seqs, f"{path.name}: a picture without a readable frame number: {seqs}"
    return seqs  # type: ignore[return-value]


def contiguous(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def summary_of(proc, label: str) -> str:
    """What the summary line says about one output: the text in [...] after its label."""
    line = next(line for line in proc.stdout if line.startswith("record: "))
    return line.split(label + " [", 1)[1].split("]", 1)[0]


# --- a server restart in the middle ----------------------------------------------------------------


def test_rtsp_server_restarts_mid_recording_while_the_file_and_udp_go_on_without_a_gap(env, tmp_path):
    """One encode to a file, an RTSP server and UDP. The RTSP server goes away and a new one comes
    up on the same port: the output says why it is reconnecting, reconnects by itself, and the new
    server's stream decodes from its first picture. The file and the UDP stream lose nothing."""
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    rtsp_port, udp_port = free_port(), free_udp_port()
    first, second = tmp_path / "first.ts", tmp_path / "second.ts"
    udp_file, video = tmp_path / "udp.ts", tmp_path / "video.ts"
    server = rtsp_receiver(env, rtsp_port, first)
    udp = udp_receiver(env, udp_port, udp_file)
    rtsp = f"rtsp://127.0.0.1:{rtsp_port}/live"
    proc = env.cli("record", name, "--encoder", "libx264", "-o", str(video), "-o", rtsp, "-o", f"udp://127.0.0.1:{udp_port}")

    wait_output(name, rtsp, proc, lambda words: words[1] == "connected", "connected")
    mark = written(name)
    wait_until(lambda: written(name) >= mark + 30, 20, "a second of video to the first server")
    server.signal(signal.SIGTERM)
    server.wait(timeout=20)
    down = wait_output(name, rtsp, proc, lambda words: words[1] == "reconnecting", "reconnecting")
    assert down[2].startswith("#") and "(" in " ".join(down), down  # the attempt and why it failed

    server = rtsp_receiver(env, rtsp_port, second)
    up = wait_output(name, rtsp, proc, lambda words: words[1] == "connected" and "re=1" in words, "connected again")
    assert up[2].endswith("kb/s") and int(up[2][: -len("kb/s")]) > 0, up  # its bit rate
    mark = written(name)
    wait_until(lambda: written(name) >= mark + 30, 20, "a second of video to the second server")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.output()
    assert server.wait(timeout=20) == 0, server.output()  # the publisher said TEARDOWN: it ends
    udp.wait(timeout=20)  # a second after the last datagram
    assert "reconnects=1" in summary_of(proc, rtsp), proc.stdout

    recorded = seqs_of(video)
    assert contiguous(recorded), "the file lost frames while the RTSP server restarted"
    sent_by_udp = seqs_of(udp_file)
    assert contiguous(sent_by_udp) and set(sent_by_udp) <= set(recorded), "the UDP stream lost frames"
    assert len(sent_by_udp) >= len(recorded) - 35  # its receiver started first: all but the wait for a keyframe
    before, after = seqs_of(first), seqs_of(second)
    for received in (first, second):
        result = ffmpeg_decode(received)
        assert result.returncode == 0, f"{received.name}: {result.stderr}"
    assert contiguous(before) and contiguous(after) and before[-1] < after[0]
    assert set(before) | set(after) <= set(recorded) and len(before) >= 30 and len(after) >= 30


# --- servers that refuse or hang, and nobody at all ------------------------------------------------------


class SilentServer:
    """Accepts TCP connections and never says a word (a hung server, or a port that is not RTSP)."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def test_a_hung_server_and_a_refusing_one_never_hold_up_the_file(env, tmp_path, silent_server):
    """FFmpeg's RTSP muxer waits for the server's answers holding Python's GIL: in the recorder's
    own process a server that never answers would freeze it. It runs in a child, so the file
    records every frame meanwhile, and a server that refuses the password shows why."""
    require_gstreamer()
    tag = uuid.uuid4().hex[:8]
    environment = {**os.environ, "FB_OUT_USER": f"u-{tag}", "FB_OUT_PASSWORD": f"right-{tag}", "FB_WRONG": f"wrong-{tag}"}
    refusing, refusing_port = start_rtsp_server(
        env, "--record", str(tmp_path / "never.ts"), "--user-env", "FB_OUT_USER", "--password-env", "FB_OUT_PASSWORD", environ=environment
    )
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    hung = f"rtsp://127.0.0.1:{silent_server.port}/cam"
    wrong = f"rtsp://${{FB_OUT_USER}}:${{FB_WRONG}}@127.0.0.1:{refusing_port}/test"
    shown_wrong = f"rtsp://***@127.0.0.1:{refusing_port}/test"
    video = tmp_path / "video.ts"
    proc = env.cli("record", name, "--encoder", "libx264", "-o", str(video), "-o", hung, "-o", wrong, env=environment)

    refused = wait_output(name, shown_wrong, proc, lambda words: words[1] == "reconnecting", "refused")
    assert "401 Unauthorized" in " ".join(refused), refused
    wait_until(lambda: silent_server.connections, 20, "the hung server to be called")
    mark = written(name)
    wait_until(lambda: written(name) >= mark + 45, 20, "the file to go on")
    waiting = output_entry(name, hung)  # for the answer that never comes
    assert waiting[1] == "connecting" or waiting[-1] == "(not connected after 10 s)", waiting
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.output()  # the file was written: the recording did its job
    assert contiguous(seqs_of(video))
    assert summary_of(proc, hung).startswith("never connected")
    assert "401 Unauthorized" in summary_of(proc, shown_wrong)
    assert not (tmp_path / "never.ts").exists() or (tmp_path / "never.ts").stat().st_size == 0


def test_only_streams_and_none_connects_fails_with_the_reason(env):
    """A receiver that is absent is waited for (an SRT caller tries again and again); if the
    recording ends without any output ever connected, nothing was delivered: exit 1, and why."""
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    target = f"srt://127.0.0.1:{free_udp_port()}?connect_timeout=500"
    proc = env.cli("record", name, "--encoder", "libx264", "-o", target, "--duration", "3")
    assert proc.wait(timeout=60) == 1, proc.output()
    message = next(line for line in proc.stderr if "nothing was sent" in line)
    assert f"no output ever connected ({target}: " in message, message
    assert any("trying again in 0.5 s" in line for line in proc.stderr), proc.output()


def test_connect_timeout_kills_the_child_and_tries_again(silent_server):
    """In one process: an RTSP output whose server never answers gives up after its connect
    timeout (CONNECT_SECONDS, 1.5 s here), kills its child, says so, and tries again after its backoff."""
    output = live.RtspOutput(f"rtsp://127.0.0.1:{silent_server.port}/cam")
    output.connect_timeout = 1.5
    output.start(INFO)
    try:
        stop = threading.Event()
        feeder = threading.Thread(target=feed_h264, args=(output, stop), daemon=True)
        feeder.start()
        wait_until(lambda: output.attempts >= 2, 15, "two attempts that timed out")
        assert output.status().state == "reconnecting" and output.reason == "not connected after 1.5 s"
        assert silent_server.connections, "the child called the server"
        stop.set()
        feeder.join(5)
    finally:
        output.stop()
    assert output.status().state == "stopped" and not output.ever_connected


def feed_h264(output: live.LiveOutput, stop: threading.Event, fps: int = 30) -> None:
    """Real H.264 (libx264, a keyframe a second) of the test pattern into ``output``, in real time."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = INFO.width, INFO.height, "yuv420p"
    encoder.time_base = Fraction(1, 90000)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "x264-params": "repeat-headers=1"}
    n = 0
    start = time.monotonic()
    while not stop.is_set():
        n += 1
        frame = av.VideoFrame.from_ndarray(testpattern.render(n, (INFO.height, INFO.width, 3)), format="bgr24").reformat(format="yuv420p")
        frame.pts = (n - 1) * 3000
        if n % fps == 1:
            frame.pict_type = av.video.frame.PictureType.I
        for packet in encoder.encode(frame):
            stamp = FrameStamp(n, n, float(n), packet.pts)
            output.write(EncodedPacket(bytes(packet), packet.pts, packet.dts, packet.is_keyframe, (stamp,)))
        time.sleep(max(0.0, start + n / fps - time.monotonic()))


# --- credentials --------------------------------------------------------------------------------------------


def test_rtsp_credentials_are_on_no_command_line_and_in_nothing_shown(env, tmp_path):
    """The recorder publishes to a server that checks a user and password, given as ${NAME} from
    the environment. While it runs, no process's command line holds them (the recorder's, its
    RTSP child's); nor do status (JSON and table), the preview's pages and metrics, and the
    recorder's log at debug level. The server receiving the stream proves they reached it."""
    from test_preview import get, start_view

    require_gstreamer()
    tag = uuid.uuid4().hex[:8]
    user, password = f"pub-{tag}", f"p@ss:{tag}/w#rd"
    secrets = (user, password, urllib.parse.quote(password, safe=""))
    environment = {**os.environ, "FB_PUB_USER": user, "FB_PUB_PASSWORD": password}
    received = tmp_path / "received.ts"
    server, port = start_rtsp_server(env, "--record", str(received), "--user-env", "FB_PUB_USER", "--password-env", "FB_PUB_PASSWORD", environ=environment)
    daemon, name = env.serve("test://", None, "--width", "320", "--height", "240", "--fps", "30")
    shown = f"rtsp://***@127.0.0.1:{port}/test"
    proc = env.cli(
        "--log-level", "debug", "record", name, "--encoder", "libx264", "-o", str(tmp_path / "video.ts"),
        "-o", f"rtsp://${{FB_PUB_USER}}:${{FB_PUB_PASSWORD}}@127.0.0.1:{port}/test", env=environment,
    )  # fmt: skip
    wait_output(name, shown, proc, lambda words: words[1] == "connected", "connected")
    server.wait_line(lambda line: line == "recording")

    everyone = command_lines()
    leaks = {pid: line for pid, line in everyone.items() if any(secret in line for secret in secrets)}
    assert not leaks, f"credentials on command lines: {leaks}"
    assert any("rtsp_publish.py --config-fd" in line for line in everyone.values()), "the scan saw the RTSP child"
    view, url = start_view(env, name)
    pages = "".join(get(url + path)[2] for path in ("", "status.json", "metrics"))
    shown_texts = [env.run_cli("status", "--json", name).stdout, env.run_cli("status", name).stdout, pages]
    assert shown in shown_texts[0] and shown in shown_texts[1] and shown in pages
    mark = written(name)
    wait_until(lambda: written(name) >= mark + 20, 20, "more video")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.output()
    server.wait_line(lambda line: line == "publisher gone")
    shown_texts.append("\n".join(proc.stdout + proc.stderr + view.stdout + view.stderr + server.stdout + server.stderr))
    for text in shown_texts:
        for secret in secrets:
            assert secret not in text, f"{secret!r} shown in:\n{text}"
    seqs = seqs_of(received)
    assert len(seqs) >= 20 and contiguous(seqs)


# --- the queue of a live output, status, options --------------------------------------------------------


class Held(live.LiveOutput):
    """A live output whose link is up at once and sends only when the test lets it."""

    def __init__(self, label: str = "held://x") -> None:
        super().__init__(label)
        self.gate = threading.Event()
        self.sent: list[EncodedPacket] = []

    def _open(self, info: StreamInfo) -> None:
        pass

    def _send(self, packet: EncodedPacket) -> None:
        while not self.gate.wait(0.05):
            self._check()
        self.sent.append(packet)

    def _poll(self) -> bool:
        return True

    def _close(self, clean: bool) -> None:
        pass


def packet(n: int, keyframe: bool) -> EncodedPacket:
    return EncodedPacket(b"\x00" * 100, n * 3000, n * 3000, keyframe, (FrameStamp(n, n, float(n), n * 3000),))


def test_a_slow_link_starts_again_at_a_keyframe_instead_of_falling_behind():
    output = Held()
    output.start(INFO)
    wait_until(lambda: output._accepting, 5, "the link to open")
    output.write(packet(1, keyframe=True))
    wait_until(lambda: not output._queue and output.link_up, 5, "the first packet to be in flight")
    for n in range(2, 151):  # 5 s of video at 30 fps, a keyframe every second; the link sends nothing
        output.write(packet(n, keyframe=n % 30 == 1))
    # Queued beyond 2 s at a keyframe: dropped; the queue starts at that keyframe.
    assert output.dropped > 0 and output._queue[0].keyframe
    assert (output._queue[-1].pts - output._queue[0].pts) / 90000 <= live.BACKLOG_SECONDS + 1
    output.gate.set()
    output.stop()
    seqs = [p.frames[0].seq for p in output.sent]
    assert seqs[0] == 1 and output.dropped + len(seqs) == 150
    resumed = seqs[1:]  # after the packet that was in flight: from a keyframe, in order
    assert resumed[0] % 30 == 1 and contiguous(resumed)


def test_status_of_many_long_outputs_fits_the_reader_table(env):
    """Four live outputs with long URLs, all failing for long reasons: every one still has its
    entry in status, cut short to fit the reader table."""
    name = env.name("fit")
    outputs = []
    for n in range(4):
        output = Held(f"rtsp://camera-{n}.a-rather-long-domain-name.example:8554/some/long/path/to/stream-{n}")
        output.link, output.attempts, output.reason = live.Link.RECONNECTING, 7, "a long reason " * 8
        outputs.append(output)
    with fb.Publisher(name, shape=(240, 320, 3), fps=30) as pub:
        pub.publish(testpattern.render(1, (240, 320, 3)))
        reader = fb.Reader(name, name="recorder")
        try:
            spec = ENCODERS["libx264"]
            rec = recorder.Recorder(reader, spec, outputs, recorder.RecorderOptions(), extra_info=lambda: {"fallback": "x" * 40})
            rec.publish_info(force=True)
            entry = wait_until(lambda: recorder_entry(name), 5, "the recorder's entry")
        finally:
            reader.close()
    outs = entry["info"]["out"]
    assert len(outs) == 4 and all(text.split()[1] == "reconnecting" and "#7" in text for text in outs), outs
    assert entry["info"]["fallback"] == "x" * 40


def test_output_status_text():
    status = OutputStatus("rtsp://***@cam:8554/front", "reconnecting", None, 3, "Connection refused", 1)
    assert status.text() == "rtsp://***@cam:8554/front reconnecting #3 re=1 (Connection refused)"
    assert status.text(12, 0) == "rtsp://**... reconnecting #3 re=1"
    assert OutputStatus("a.ts", "writing", 812).text() == "a.ts writing 812kb/s"


@pytest.mark.parametrize(
    "url, message",
    [
        ("rtsp://cam:8554", "names no path"),
        ("rtsp://:8554/x", "is not a rtsp://HOST[:PORT]/PATH address"),
        ("rtsp://${FB_SURELY_UNSET_VARIABLE}@cam/x", "environment variable FB_SURELY_UNSET_VARIABLE is not set"),
    ],
)
def test_bad_rtsp_urls_say_what_is_wrong(url, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_output(url)


def test_rtsp_url_is_shown_without_credentials():
    output = make_output("rtsp://admin:s3cret@cam.local/live/front")
    assert isinstance(output, live.RtspOutput) and output.describe() == "rtsp://***@cam.local/live/front"
    assert output.mask("Unauthorized for admin:s3cret") == "Unauthorized for ***:***"


@pytest.mark.parametrize(
    "args, message",
    [
        (["-o", "a.ts", "-o", "a.ts"], "-o a.ts is given twice"),
        (["-o", "a.ts", "--segment", "2"], "give either -o FILE or --segment"),
        (["-o", "rtsp://cam:8554"], "names no path"),
        (["-o", "rtmp://host/app"], "unknown scheme rtmp://; give a file (.ts, .mp4, .mkv), rtsp://HOST[:PORT]/PATH"),
        (["-o", "udp://127.0.0.1:5000", "--index"], "--index goes with -o FILE"),
        (["-o", "udp://127.0.0.1:5000", "--results"], "--results writes a file beside each video file"),
    ],
)
def test_usage_errors_exit_2(env, args, message):
    result = env.run_cli("record", env.name(), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr


def test_config_output_list_becomes_repeated_outputs(env, tmp_path):
    """``output`` in a config file takes one value or a list; each becomes an -o, and the check
    names a bad one by its key and line, credentials hidden."""
    config = tmp_path / "cams.toml"
    config.write_text(
        '[streams.cam]\nsource = "test://"\n\n[streams.cam.record]\nsegment = 60\n'
        'output = ["rtsp://${FB_CFG_USER}:${FB_CFG_PASS}@127.0.0.1:8554/cam", "udp://127.0.0.1:5000"]\n'
        '\n[streams.door]\nsource = "test://"\n\n[streams.door.record]\noutput = "door.ts"\n'
    )
    environment = {**os.environ, "FB_CFG_USER": "admin", "FB_CFG_PASS": "s3cret"}
    result = env.run_cli("up", "--check", str(config), env=environment)
    assert result.returncode == 0, result.stderr
    assert "'--output=rtsp://***@127.0.0.1:8554/cam' --output=udp://127.0.0.1:5000" in result.stdout, result.stdout
    assert "framebroker record door --output=door.ts" in result.stdout, result.stdout
    assert "s3cret" not in result.stdout + result.stderr
    missing = env.run_cli("up", "--check", str(config))
    assert missing.returncode == 2
    assert "cams.toml:6: streams.cam.record.output = " in missing.stderr and "FB_CFG_USER is not set" in missing.stderr, missing.stderr
