"""The recorder's parts on their own: encoder selection (with simulated and real probes), the
encoders' pipelines, the packet router and outputs' lifecycle, and the bounded queue in front of
a deliberately slow encoder."""

from __future__ import annotations

import logging
import time
from fractions import Fraction

import pytest

import framebroker as fb
from framebroker import testpattern
from framebroker._status import describe_stream

from conftest import MISSING_JETSON, MISSING_NVENC, wait_until, works_or_says_why

av = pytest.importorskip("av")

from framebroker_clients.recorder import encoders, outputs, packets, recorder, selection  # noqa: E402
from framebroker_clients.recorder.encoders import AUTO_ORDER, ENCODERS, Encoder, EncoderSettings, EncoderSpec  # noqa: E402
from framebroker_clients.recorder.packets import EncodedPacket, FrameStamp, PacketRouter, StreamInfo  # noqa: E402

SHAPE = (240, 320, 3)
INFO = StreamInfo("cam", 320, 240, "fake")


# --- selection ----------------------------------------------------------------------------------------


def simulated(working: set[str]):
    calls: list[str] = []

    def probe(spec: EncoderSpec):
        calls.append(spec.name)
        return None if spec.name in working else "simulated: not on this machine"

    return probe, calls


@pytest.mark.parametrize("chosen", AUTO_ORDER[:-1])
def test_auto_takes_the_first_working_encoder_in_the_documented_order(chosen):
    index = AUTO_ORDER.index(chosen)
    # Everything from the chosen one on works; everything before it fails.
    probe, calls = simulated(set(AUTO_ORDER[index:]))
    result = selection.select_encoder("auto", probe=probe)
    assert result.spec.name == chosen and result.spec.hardware and not result.fallback
    assert calls == list(AUTO_ORDER[: index + 1])
    assert [name for name, _ in result.tried] == list(AUTO_ORDER[:index])


def test_the_documented_order():
    families = [ENCODERS[name].family for name in AUTO_ORDER]
    assert AUTO_ORDER[:2] == ("nvv4l2h264enc", "omxh264enc")
    assert families == ["jetson", "jetson", "nvenc", "vaapi", "vaapi", "vaapi", "v4l2m2m", "v4l2m2m", "software"]


def test_auto_falls_back_to_x264_with_one_short_loud_line(caplog):
    probe, calls = simulated({"libx264", "x264enc"})
    with caplog.at_level(logging.DEBUG, logger="framebroker.recorder"):
        result = selection.select_encoder("auto", probe=probe)
    assert result.spec.name == "libx264" and result.fallback
    assert calls == list(AUTO_ORDER)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    # As the CLI prints it (its log format), the line stays short: what, why, where the details are.
    line = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s").format(record)
    assert len(line) < 200, line
    assert "SOFTWARE H.264 (libx264)" in line and "no hardware encoder works (8 tried)" in line and "--log-level debug" in line
    assert "simulated" not in line, "the reasons are at debug level"
    reasons = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "encoder h264_nvenc does not work here: simulated: not on this machine" in reasons
    assert len([r for r in reasons if "does not work here" in r]) == 8
    assert result.fallback_reason == "no hardware encoder works (8 tried)"


def test_nothing_works_is_an_encoder_error():
    probe, _ = simulated(set())
    with pytest.raises(fb.EncoderError, match="not even software x264"):
        selection.select_encoder("auto", probe=probe)


def test_a_named_encoder_is_probed_and_a_failing_one_is_an_error():
    probe, calls = simulated({"h264_nvenc"})
    assert selection.select_encoder("h264_nvenc", probe=probe).spec.name == "h264_nvenc"
    assert calls == ["h264_nvenc"]
    with pytest.raises(fb.EncoderError, match=r"encoder vah264enc \(VAAPI \(GStreamer va\)\) does not work on this machine: simulated"):
        selection.select_encoder("vah264enc", probe=probe)
    with pytest.raises(ValueError, match="unknown encoder 'h265'"):
        selection.select_encoder("h265", probe=probe)


def test_real_probes_on_this_machine():
    assert selection.probe_encoder(ENCODERS["libx264"]) is None
    assert selection.probe_encoder(ENCODERS["x264enc"]) is None
    works_or_says_why(selection.probe_encoder(ENCODERS["h264_nvenc"]), MISSING_NVENC)
    works_or_says_why(selection.probe_encoder(ENCODERS["nvv4l2h264enc"]), MISSING_JETSON)


class HangingEncoder(Encoder):
    name = "hangs"

    def _start(self) -> None:
        pass

    def _encode(self, image, stamp, keyframe) -> None:
        time.sleep(3)

    def _stop(self, flush: bool) -> None:
        pass


def test_a_probe_that_hangs_fails_after_its_time_limit():
    spec = EncoderSpec("hangs", "test", True, "hangs", lambda s, d: HangingEncoder(s, d))
    started = time.monotonic()
    reason = selection.probe_encoder(spec, timeout=0.3)
    assert "did not finish within 0.3 s" in reason
    assert time.monotonic() - started < 2.5


# --- encoders ------------------------------------------------------------------------------------------


def settings(**overrides) -> EncoderSettings:
    values = dict(width=1280, height=720, fps=30.0, bitrate_kbps=2000, keyframe_interval=Fraction(1))
    values.update(overrides)
    return EncoderSettings(**values)


def argv_of(name: str, **overrides) -> str:
    encoder = ENCODERS[name].create(settings(**overrides), lambda packet: None)
    return " ".join(encoder.pipeline(7))


FEED_720P = (
    "fdsrc fd=0 blocksize=1382400 ! rawvideoparse format=i420 width=1280 height=720 framerate=30/1 "
    "plane-strides=<1280,640,640> plane-offsets=<0,921600,1152000> ! capssetter caps=video/x-raw,colorimetry=bt601 ! "
)
TAIL = " ! h264parse config-interval=-1 ! video/x-h264,stream-format=byte-stream,alignment=au ! fdsink fd=7 sync=false"


@pytest.mark.parametrize(
    "name, elements",
    [
        ("nvv4l2h264enc", "nvvidconv ! video/x-raw(memory:NVMM),format=NV12 ! nvv4l2h264enc bitrate=2000000 control-rate=1 "
         "iframeinterval=30 idrinterval=30 insert-sps-pps=true insert-vui=true preset-level=1 maxperf-enable=true"),
        ("omxh264enc", "nvvidconv ! video/x-raw(memory:NVMM),format=I420 ! omxh264enc bitrate=2000000 control-rate=2 "
         "iframeinterval=30 insert-sps-pps=true"),
        ("vah264enc", "vapostproc ! video/x-raw(memory:VAMemory),format=NV12 ! vah264enc bitrate=2000 rate-control=cbr key-int-max=30 b-frames=0"),
        ("vah264lpenc", "vapostproc ! video/x-raw(memory:VAMemory),format=NV12 ! vah264lpenc bitrate=2000 rate-control=cbr key-int-max=30 b-frames=0"),
        ("vaapih264enc", "vaapih264enc bitrate=2000 rate-control=cbr keyframe-period=30 max-bframes=0"),
        ("v4l2h264enc", "v4l2h264enc extra-controls=controls,video_bitrate=2000000,h264_i_frame_period=30,repeat_sequence_header=1 "
         "! video/x-h264,level=(string)3.1"),
        ("x264enc", "x264enc speed-preset=superfast tune=zerolatency bframes=0 key-int-max=30 bitrate=2000 byte-stream=true"),
    ],
)  # fmt: skip
def test_every_gstreamer_encoder_is_fed_i420_with_no_videoconvert(name, elements):
    """I420 converted by the recorder: half the bytes of BGR on the pipe, and no CPU conversion
    in the child (on a Jetson nvvidconv copies it into NVMM memory, on VAAPI vapostproc)."""
    assert argv_of(name) == FEED_720P + elements + TAIL


def test_pipelines_follow_the_settings():
    assert "framerate=25/2" in argv_of("x264enc", fps=12.5)
    assert "key-int-max=15" in argv_of("x264enc", keyframe_interval=Fraction(1, 2))
    # Gray frames go to nvvidconv as GRAY8; elsewhere they become I420 (luma under grey chroma).
    assert argv_of("nvv4l2h264enc", pixel_format="gray").startswith(
        "fdsrc fd=0 blocksize=921600 ! rawvideoparse format=gray8 width=1280 height=720 framerate=30/1 "
        "plane-strides=<1280> plane-offsets=<0> ! nvvidconv ! "
    )
    assert "blocksize=1382400 ! rawvideoparse format=i420" in argv_of("x264enc", pixel_format="gray")
    # Chroma rows of an odd half-width are packed too.
    assert "blocksize=116886 ! rawvideoparse format=i420 width=322 height=242 framerate=30/1 plane-strides=<322,161,161> plane-offsets=<0,77924,97405>" in argv_of(
        "x264enc", width=322, height=242
    )
    assert "level=(string)4.2" in argv_of("v4l2h264enc", width=1920, height=1080, fps=60)


@pytest.mark.parametrize(
    "size, fps, kbps, level",
    [
        ((320, 240), 30, 500, "1.3"),
        ((1280, 720), 30, 2000, "3.1"),
        ((1280, 720), 60, 2000, "3.2"),
        ((1920, 1080), 30, 2000, "4"),
        ((1920, 1080), 30, 25000, "4.1"),  # Main profile allows 20 Mbit/s at level 4
        ((1920, 1080), 60, 8000, "4.2"),
        ((3840, 2160), 30, 20000, "5.1"),
        ((16, 4096), 1, 64, "4"),  # a tiny frame, but a side of 256 macroblocks needs MaxFS >= 256^2 / 8
    ],
)
def test_h264_level_from_size_rate_and_bitrate(size, fps, kbps, level):
    assert encoders.h264_level(*size, fps, kbps) == level


def test_a_size_beyond_h264_is_an_encoder_error():
    with pytest.raises(ValueError, match="beyond every H.264 level"):
        encoders.h264_level(16384, 16384, 30, 2000)
    encoder = ENCODERS["v4l2h264enc"].create(settings(width=16384, height=16384), lambda packet: None)
    with pytest.raises(fb.EncoderError, match="v4l2h264enc: 16384x16384 at 30 fps and 2000 kbit/s is beyond every H.264 level"):
        encoder.start()


def test_settings_refuse_what_h264_cannot_take():
    with pytest.raises(ValueError, match="even"):
        settings(width=321)
    with pytest.raises(ValueError, match="pixel format"):
        settings(pixel_format="yuv")


@pytest.mark.parametrize("name", ["libx264", "x264enc"])
@pytest.mark.parametrize("shape, pixel_format", [((240, 322, 3), "bgr"), ((242, 318), "gray")])
def test_encoders_return_one_packet_per_frame_with_its_stamp(name, shape, pixel_format):
    """Rows of 966 or 318 bytes are not multiples of 4: GStreamer must be told our rows are packed."""
    got: list[EncodedPacket] = []
    encoder = ENCODERS[name].create(
        EncoderSettings(width=shape[1], height=shape[0], pixel_format=pixel_format, bitrate_kbps=800), got.append
    )
    encoder.start()
    with pytest.raises(ValueError, match="already started"):
        encoder.start()
    for n in range(1, 9):
        stamp = FrameStamp(n, n * 1000, 1.0 * n, (n - 1) * 3000 + (90_000 if n > 4 else 0))
        encoder.encode(testpattern.render(n, shape), stamp, keyframe=n == 1)
    encoder.stop()
    encoder.stop()  # twice is fine
    assert [p.frames[0].seq for p in got] == list(range(1, 9))
    assert [p.pts for p in got] == [p.frames[0].pts for p in got]
    assert got[0].keyframe
    decoder = av.CodecContext.create("h264", "r")
    numbers = []
    for packet in got:
        for frame in decoder.decode(av.Packet(packet.data)):
            numbers.append(testpattern.identify(frame.to_ndarray(format="gray")))
    for frame in decoder.decode(None):
        numbers.append(testpattern.identify(frame.to_ndarray(format="gray")))
    assert numbers == list(range(1, 9))


def test_libx264_makes_a_keyframe_when_asked():
    got: list[EncodedPacket] = []
    encoder = ENCODERS["libx264"].create(settings(width=320, height=240), got.append)
    encoder.start()
    for n in range(1, 13):
        encoder.encode(testpattern.render(n, SHAPE), FrameStamp(n, 0, 0.0, n * 3000), keyframe=n in (1, 7))
    encoder.stop()
    assert [p.frames[0].seq for p in got if p.keyframe] == [1, 7]


def test_keyframe_clock_and_pts_conversion_are_exact():
    clock = recorder.KeyframeClock(Fraction(2, 3))
    due = [pts for pts in range(0, 200_000, 3000) if clock.due(pts)]
    assert due == [0, 60000, 120000, 180000]
    assert packets.pts_from_ns(1_000_000_000) == 90_000
    assert packets.pts_from_ns(5_555) == 0 and packets.pts_from_ns(5_556) == 1  # nearest tick
    big = 10**15 + 123_456_789  # 11.6 days of nanoseconds: no float rounding creeps in
    assert packets.pts_from_ns(big) == (big * 9 + 50_000) // 100_000


# --- router and outputs ----------------------------------------------------------------------------------


class Collect(outputs.Output):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.packets: list[EncodedPacket] = []
        self.info = None
        self.fail = fail

    def describe(self) -> str:
        return "collect"

    def _start(self, info: StreamInfo) -> None:
        self.info = info

    def _write(self, packet: EncodedPacket) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.packets.append(packet)

    def _stop(self) -> None:
        pass


def packet(n: int, keyframe: bool = False) -> EncodedPacket:
    return EncodedPacket(b"\x00", n * 3000, n * 3000, keyframe, (FrameStamp(n, n, float(n), n * 3000),))


def test_router_delivers_in_order_and_outputs_start_on_a_keyframe():
    router = PacketRouter()
    early = Collect()
    router.attach(early)
    router.open(INFO)
    assert early.info == INFO and early.state is outputs.State.RUNNING
    router.deliver(packet(1, keyframe=True))
    late = Collect()
    router.attach(late)  # a pre-roll buffer would attach like this, mid-stream
    router.deliver(packet(2))
    router.deliver(packet(3, keyframe=True))
    router.detach(early)
    router.deliver(packet(4))
    assert [p.pts for p in early.packets] == [3000, 6000, 9000]
    assert [p.pts for p in late.packets] == [9000, 12000] and late.skipped == 1
    router.close()
    assert late.state is outputs.State.STOPPED
    with pytest.raises(ValueError, match="closed"):
        router.attach(Collect())


def test_an_output_failure_reaches_the_encoder_as_an_output_error():
    router = PacketRouter()
    router.attach(Collect(fail=True))
    router.open(INFO)
    with pytest.raises(outputs.OutputError, match="No space left"):
        router.deliver(packet(1, keyframe=True))


def test_output_lifecycle_is_checked():
    output = Collect()
    with pytest.raises(ValueError, match="not running"):
        output.write(packet(1, keyframe=True))
    output.start(INFO)
    with pytest.raises(ValueError, match="already started"):
        output.start(INFO)
    output.stop()
    output.stop()
    with pytest.raises(ValueError, match="stopped, not running"):
        output.write(packet(2, keyframe=True))


def test_make_output_and_segment_names():
    assert isinstance(outputs.make_output("/tmp/x.ts"), outputs.FileOutput)
    assert outputs.make_output("udp://127.0.0.1:5000").url == "udp://127.0.0.1:5000?pkt_size=1316"
    assert outputs.make_output("udp://239.0.0.1:5000?ttl=2").url == "udp://239.0.0.1:5000?ttl=2&pkt_size=1316"
    assert outputs.make_output("srt://h:9000?passphrase=secretsecret").describe() == "srt://h:9000?passphrase=***"
    with pytest.raises(ValueError, match="unknown scheme"):
        outputs.make_output("http://x/y")
    assert outputs.segment_stamp(1_700_000_000.9996) == "20231114-221321.000Z"  # rounds into the next second
    assert outputs.segment_stamp(0.123) == "19700101-000000.123Z"


# --- the bounded queue --------------------------------------------------------------------------------------


class SlowEncoder(Encoder):
    """Takes 80 ms per frame: far slower than the 50 fps the test publishes."""

    name = "slow"

    def _start(self) -> None:
        pass

    def _encode(self, image, stamp, keyframe) -> None:
        time.sleep(0.08)
        self._emit(EncodedPacket(b"", stamp.pts, stamp.pts, keyframe, (stamp,)))

    def _stop(self, flush: bool) -> None:
        pass


def test_a_slow_encoder_drops_at_the_queue_and_never_stalls_the_reader(env):
    name = env.name("slow")
    spec = EncoderSpec("slow", "test", False, "deliberately slow", lambda s, d: SlowEncoder(s, d))
    collect = Collect()
    with fb.Publisher(name, shape=SHAPE, fps=50) as pub:
        reader = fb.Reader(name, name="recorder")
        rec = recorder.Recorder(reader, spec, [collect], recorder.RecorderOptions(queue_frames=4))
        assert rec.state is recorder.RecorderState.NEW
        rec.start()
        assert rec.state is recorder.RecorderState.RECORDING
        with pytest.raises(ValueError, match="already started"):
            rec.start()
        wait_until(lambda: any(r["mode"] == "ordered" for r in describe_stream(name)["readers"]), 10, "ordered reading")
        stamps = {}
        next_time = time.monotonic()
        for n in range(1, 101):
            next_time += 0.02
            time.sleep(max(0.0, next_time - time.monotonic()))
            stamps[n] = time.monotonic_ns()
            pub.publish(testpattern.render(n, SHAPE), timestamp_ns=stamps[n])
        wait_until(lambda: rec.stats.frames_read == 100, 10, "the reader to take all 100 frames")
        rec.request_stop()
        assert rec.wait(10)
        assert rec.state is recorder.RecorderState.STOPPED and rec.end_reason == "stopped"
    stats = rec.stats
    assert rec.error is None
    assert stats.ring_dropped == 0, "the reader fell behind the ring"
    assert stats.queue_dropped > 30
    assert stats.frames_encoded + stats.queue_dropped == 100
    seqs = [p.frames[0].seq for p in collect.packets]
    assert len(seqs) == stats.frames_encoded and seqs == sorted(seqs)
    assert all(p.pts == packets.pts_from_ns(stamps[p.frames[0].seq] - stamps[1]) for p in collect.packets)
