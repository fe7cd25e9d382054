"""The recorder's H.264 streams checked with FFmpeg's own tools: the I420 feed of the GStreamer
encoders (every frame there, colours right, tagged as converted), and SPS/PPS put back in front
of the keyframes of an encoder that sends them once, so that every segment decodes on its own."""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from framebroker import testpattern

from conftest import ffmpeg_decode
from test_sources import require, require_gstreamer

av = pytest.importorskip("av")

from framebroker_clients.recorder import outputs, selection  # noqa: E402
from framebroker_clients.recorder.encoders import ENCODERS, EncoderSettings, EncoderSpec, PyAVEncoder, _x264_options  # noqa: E402
from framebroker_clients.recorder.h264 import PPS, SPS, ParameterSets, nal_type, nal_units  # noqa: E402
from framebroker_clients.recorder.packets import FrameStamp, PacketRouter, StreamInfo  # noqa: E402


def ffprobe_stream(path: Path) -> dict:
    result = subprocess.run(
        [require("ffprobe"), "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["streams"][0]


def record(path: Path, encoder_name: str, frames: list, settings: EncoderSettings, keyframes=(1,)) -> None:
    """Encode ``frames`` (30 fps) with the named encoder into ``path`` (MPEG-TS) or, for a
    directory, into 1 s segments there."""
    output = outputs.SegmentedOutput(path, "seg", Fraction(1)) if path.is_dir() else outputs.FileOutput(path)
    router = PacketRouter()
    router.attach(output)
    router.open(StreamInfo("cam", settings.width, settings.height, encoder_name))
    encoder = ENCODERS[encoder_name].create(settings, router.deliver)
    encoder.start()
    for n, image in enumerate(frames, 1):
        encoder.encode(image, FrameStamp(n, n, float(n), (n - 1) * 3000), keyframe=n in keyframes)
    encoder.stop()
    router.close()


# --- the I420 feed of the GStreamer encoders ---------------------------------------------------------


@pytest.mark.parametrize(
    "pixel_format, value, rgb",
    [("bgr", (40, 60, 220), (220, 60, 40)), ("rgb", (220, 60, 40), (220, 60, 40)), ("gray", 200, (200, 200, 200))],
)
def test_the_i420_feed_end_to_end_keeps_every_frame_and_its_colour(tmp_path, pixel_format, value, rgb):
    """x264enc stands in for the hardware encoders on the same feed: I420 converted by the
    recorder, at 1280x720. GStreamer takes HD I420 for BT.709 unless told otherwise, and the red
    then comes back 14 levels off; ours is BT.601, converted and tagged (smpte170m)."""
    require_gstreamer()
    width, height = 1280, 720
    shape = (height, width) if pixel_format == "gray" else (height, width, 3)
    path = tmp_path / "colour.ts"
    record(path, "x264enc", [np.full(shape, value, np.uint8)] * 10, EncoderSettings(width=width, height=height, pixel_format=pixel_format))
    stream = ffprobe_stream(path)
    assert int(stream["nb_read_frames"]) == 10
    assert (stream["pix_fmt"], stream["color_space"], stream["color_range"]) == ("yuv420p", "smpte170m", "tv")
    decoded = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    centre = np.frombuffer(decoded, np.uint8).reshape(height, width, 3)[height // 2, width // 2].astype(int)
    assert np.abs(centre - np.array(rgb)).max() <= 3, f"decoded {centre.tolist()}, sent {rgb}"


# --- SPS/PPS for every keyframe -------------------------------------------------------------------------


def as_packet(data: bytes, like) -> "av.Packet":
    packet = av.Packet(data)
    packet.pts, packet.dts, packet.is_keyframe = like.pts, like.dts, like.is_keyframe
    return packet


class SendsHeadersOnce:
    """A libx264 codec context made to emit what FFmpeg's h264_v4l2m2m does (RPi-Distro/ffmpeg#10):
    SPS and PPS once, in a packet of their own before the first frame, and keyframes without
    them after that. FFmpeg's filter_units bitstream filter takes them apart."""

    def __init__(self, context) -> None:
        from av.bitstream import BitStreamFilterContext

        self.context = context
        self.only_sets = BitStreamFilterContext("filter_units=pass_types=7|8", "h264")
        self.without_sets = BitStreamFilterContext("filter_units=remove_types=7|8", "h264")
        self.sent: list[bytes] = []  # what the repair got

    def encode(self, frame):
        out = []
        for packet in self.context.encode(frame):
            if not self.sent:
                out += self.only_sets.filter(as_packet(bytes(packet), packet))
            out += self.without_sets.filter(as_packet(bytes(packet), packet))
        self.sent += [bytes(packet) for packet in out]
        return out

    def close(self) -> None:
        self.context.close()


class HeadersOnceEncoder(PyAVEncoder):
    def __init__(self, settings: EncoderSettings, deliver) -> None:
        super().__init__(settings, deliver, codec="libx264", options=_x264_options, forces_keyframes=True)

    def _start(self) -> None:
        super()._start()
        self.wrapped = self._context = SendsHeadersOnce(self._context)


HEADERS_ONCE = EncoderSpec("headers-once", "test", True, "libx264 sending SPS/PPS once", HeadersOnceEncoder)


def test_segments_from_an_encoder_that_sends_sps_pps_once_each_decode_on_their_own(tmp_path, monkeypatch):
    encoders: list[HeadersOnceEncoder] = []

    def factory(settings: EncoderSettings, deliver) -> HeadersOnceEncoder:
        encoders.append(HeadersOnceEncoder(settings, deliver))
        return encoders[-1]

    monkeypatch.setitem(ENCODERS, HEADERS_ONCE.name, EncoderSpec(HEADERS_ONCE.name, "test", True, "", factory))
    shape = (240, 320, 3)
    frames = [testpattern.render(n, shape) for n in range(1, 106)]  # 3.5 s at 30 fps
    record(tmp_path, HEADERS_ONCE.name, frames, EncoderSettings(width=320, height=240), keyframes=(1, 31, 61, 91))
    # The condition was there: one packet of SPS/PPS alone, and keyframes without them after it.
    sent = [{nal_type(unit) for unit in nal_units(data)} for data in encoders[0].wrapped.sent]
    assert sent[0] == {SPS, PPS} and all(SPS not in types and PPS not in types for types in sent[1:])
    segments = sorted(tmp_path.glob("seg-*.ts"))
    assert len(segments) == 4
    counts = []
    for segment in segments:
        decoded = ffmpeg_decode(segment)
        assert decoded.returncode == 0 and not decoded.stderr, f"{segment.name}: {decoded.stderr}"
        counts.append(int(ffprobe_stream(segment)["nb_read_frames"]))
    assert counts == [30, 30, 30, 15]


def test_the_probe_accepts_an_encoder_that_sends_sps_pps_in_a_packet_of_their_own():
    """The header-only first packet goes in front of the first frame: the probe still sees one
    packet per frame, the first a keyframe."""
    assert selection.probe_encoder(HEADERS_ONCE) is None


def test_parameter_sets_held_merged_and_repeated():
    sets = b"\x00\x00\x00\x01\x67\x42\x00\x1e" + b"\x00\x00\x00\x01\x68\xce\x3c\x80"
    idr, p_frame = b"\x00\x00\x01\x65\x88\x84", b"\x00\x00\x01\x41\x9a\x02"
    repair = ParameterSets()
    assert repair.complete(sets, False) is None, "no picture: held for the next packet"
    assert repair.complete(idr, False) == (sets + idr, True), "an IDR slice is a keyframe"
    assert repair.complete(p_frame, False) == (p_frame, False)
    assert repair.complete(idr, True) == (sets + idr, True), "the sets put back in front"
    assert repair.complete(sets + idr, True) == (sets + idr, True), "nothing added where they are"
    assert nal_units(b"\x00\x00\x00\x01\x67\x42\x00\x00\x01\x68\xce\x00\x00\x00\x01\x65\x88") == [b"\x67\x42", b"\x68\xce", b"\x65\x88"]
