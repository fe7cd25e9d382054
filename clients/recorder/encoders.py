"""Encoders: turn frames into H.264 ``EncodedPacket``s, through FFmpeg (PyAV) or GStreamer.

Two kinds, one interface (``Encoder``):

* ``PyAVEncoder`` runs an FFmpeg codec in this process: ``libx264`` (software), ``h264_nvenc``
  (NVIDIA NVENC) and ``h264_v4l2m2m`` (V4L2 memory-to-memory, e.g. Raspberry Pi). Frames carry
  their PTS into the codec and packets come back with it, so each packet is matched to its frame
  by PTS.
* ``GStreamerEncoder`` runs ``gst-launch-1.0`` in a child and feeds it raw frames on a pipe:
  ``fdsrc ! rawvideoparse ! <conversion> ! <encoder> ! h264parse ! byte-stream/au ! fdsink``.
  This is the only way to Jetson's encoders (``nvv4l2h264enc``, older ``omxh264enc``, both fed
  NV12/I420 in NVMM memory by ``nvvidconv``) and it reaches VAAPI (``vah264enc``,
  ``vaapih264enc``) and V4L2 (``v4l2h264enc``) too. A pipe carries no timestamps: the encoder
  keeps a FIFO of the frames it wrote and gives them, in order, to the access units coming back,
  which FFmpeg's H.264 parser splits out of the byte stream. That needs one access unit per frame
  in input order, so every pipeline here disables B-frames. ``x264enc`` (software) runs the same
  plumbing where no hardware exists, which is how the tests prove it.

The PyAV wheel's FFmpeg has no ``h264_vaapi`` (and feeding it needs VAAPI surfaces, which PyAV's
encoding API does not offer), so VAAPI goes through GStreamer.

``ENCODERS`` names every encoder ``--encoder`` accepts; ``AUTO_ORDER`` is the order ``auto`` tries
them in (design.md section 6). Which one works is decided by a test encode (``selection.py``).
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional

import numpy as np

import framebroker as fb

from .packets import TIME_BASE, EncodedPacket, FrameStamp, keep_tail

log = logging.getLogger("framebroker.recorder")

GST_LAUNCH = "gst-launch-1.0"
# How long stop() waits for a GStreamer child to drain and exit before killing it (seconds).
GST_STOP_TIMEOUT = 10.0
# Software x264 settings, chosen with bench/recorder_realtime.py: "superfast" keeps 1280x720 at
# 30 fps well inside real time on 2 shared cores, with headroom for noisy camera pictures that the
# test pattern does not have; "zerolatency" removes B-frames, lookahead and frame threading, so a
# packet leaves the encoder with its frame (kill -9 loses at most what sits in the queue).
X264_PRESET = "superfast"
X264_TUNE = "zerolatency"

Deliver = Callable[[EncodedPacket], None]

_RAW_FORMATS = {"bgr": ("bgr24", "bgr", 3), "rgb": ("rgb24", "rgb", 3), "gray": ("gray", "gray8", 1)}


@dataclass(frozen=True)
class EncoderSettings:
    """What an encoder is asked to do. Width and height must be even (4:2:0 chroma)."""

    width: int
    height: int
    pixel_format: str = "bgr"  # of the frames handed to encode(): bgr, rgb or gray
    fps: float = 30.0  # nominal; real timing comes from each frame's PTS
    bitrate_kbps: int = 2000
    keyframe_interval: Fraction = Fraction(1)  # seconds between keyframes

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(f"H.264 needs an even, positive frame size, got {self.width}x{self.height}")
        if self.pixel_format not in _RAW_FORMATS:
            raise ValueError(f"unknown pixel format {self.pixel_format!r}: use bgr, rgb or gray")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.bitrate_kbps <= 0:
            raise ValueError(f"bitrate must be > 0 kbit/s, got {self.bitrate_kbps}")

    @property
    def keyframe_frames(self) -> int:
        """The keyframe interval in frames at the nominal rate (for encoders counting frames)."""
        return max(1, round(float(self.keyframe_interval) * self.fps))

    @property
    def frame_rate(self) -> Fraction:
        return Fraction(self.fps).limit_denominator(1001)

    @property
    def bitrate_bps(self) -> int:
        return self.bitrate_kbps * 1000


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Encoder:
    """Turns frames into ``EncodedPacket``s handed to ``deliver``.

    ``start()`` opens the codec or pipeline (``fb.EncoderError`` if it cannot), ``encode()`` takes
    one frame, ``stop()`` flushes what the encoder still holds and closes it; ``abort()`` closes
    without flushing. ``encode()`` must be called from one thread; ``deliver`` may be called from
    another (see the subclasses), never for two packets at once. An error raised by ``deliver``
    ends encoding: it is raised again by the next ``encode()`` or by ``stop()``.
    """

    name = "?"
    hardware = False
    forces_keyframes = False  # whether encode(keyframe=True) is honoured (else: every keyframe_frames)

    def __init__(self, settings: EncoderSettings, deliver: Deliver) -> None:
        self.settings = settings
        self._deliver = deliver
        self._state = State.NEW
        self._lock = threading.Lock()
        self.frames_in = 0
        self.packets_out = 0

    @property
    def state(self) -> State:
        return self._state

    def start(self) -> None:
        with self._lock:
            if self._state is not State.NEW:
                raise ValueError(f"encoder {self.name} was already started")
            self._start()
            self._state = State.RUNNING

    def encode(self, image: np.ndarray, stamp: FrameStamp, keyframe: bool = False) -> None:
        if self._state is not State.RUNNING:
            raise fb.EncoderError(f"encoder {self.name} is not running ({self._state.value})")
        self._encode(image, stamp, keyframe)
        self.frames_in += 1

    def stop(self) -> None:
        with self._lock:
            if self._state is not State.RUNNING:
                self._state = State.STOPPED
                return
            self._state = State.STOPPED
            self._stop(flush=True)

    def abort(self) -> None:
        with self._lock:
            if self._state is State.RUNNING:
                self._state = State.STOPPED
                try:
                    self._stop(flush=False)
                except Exception as exc:  # aborting: nothing useful to do with it
                    log.debug("aborting encoder %s: %s", self.name, exc)
            self._state = State.STOPPED

    def _emit(self, packet: EncodedPacket) -> None:
        self.packets_out += 1
        self._deliver(packet)

    def _start(self) -> None:
        raise NotImplementedError

    def _encode(self, image: np.ndarray, stamp: FrameStamp, keyframe: bool) -> None:
        raise NotImplementedError

    def _stop(self, flush: bool) -> None:
        raise NotImplementedError


# --- FFmpeg codecs through PyAV ------------------------------------------------------------------


def _x264_options(settings: EncoderSettings) -> dict[str, str]:
    return {
        "preset": X264_PRESET,
        "tune": X264_TUNE,
        "forced-idr": "1",  # keyframes we force are IDR frames: a file or clip can start there
        # A one-second VBV buffer keeps the rate near --bitrate for streaming receivers.
        "maxrate": str(settings.bitrate_bps),
        "bufsize": str(settings.bitrate_bps),
    }


def _nvenc_options(settings: EncoderSettings) -> dict[str, str]:
    return {
        "preset": "p4",
        "tune": "ll",  # low latency: no lookahead
        "zerolatency": "1",  # no reordering delay
        "forced-idr": "1",
        "rc": "cbr",
        "bf": "0",
    }


def _v4l2m2m_options(settings: EncoderSettings) -> dict[str, str]:
    return {"bf": "0"}


class PyAVEncoder(Encoder):
    """An FFmpeg H.264 encoder run in-process by PyAV.

    Threads: ``encode()`` and ``stop()`` run the codec and call ``deliver`` on the caller's thread.
    """

    def __init__(
        self,
        settings: EncoderSettings,
        deliver: Deliver,
        *,
        codec: str,
        hardware: bool,
        options: Callable[[EncoderSettings], dict[str, str]],
        forces_keyframes: bool,
    ) -> None:
        super().__init__(settings, deliver)
        self.name = codec
        self.hardware = hardware
        self.forces_keyframes = forces_keyframes
        self._options = options
        self._context: Any = None
        self._pending: dict[int, FrameStamp] = {}

    def _start(self) -> None:
        import av
        import av.logging

        settings = self.settings
        try:
            context = av.CodecContext.create(self.name, "w")
        except Exception as exc:  # av.codec.codec.UnknownCodecError, ValueError, ...
            raise fb.EncoderError(f"{self.name} is not in this FFmpeg build (PyAV): {exc}") from None
        context.width = settings.width
        context.height = settings.height
        context.pix_fmt = "yuv420p"
        context.time_base = TIME_BASE
        context.framerate = settings.frame_rate
        context.bit_rate = settings.bitrate_bps
        context.max_b_frames = 0  # output order == input order; a segment can start at any keyframe
        # Encoders that honour forced keyframes get them on time from the recorder; the GOP is
        # only a backstop there. The others count frames.
        frames = settings.keyframe_frames
        context.gop_size = 2 * frames if self.forces_keyframes else frames
        context.options = self._options(settings)
        # FFmpeg says why an encoder cannot open (no GPU, no device) only in its log.
        previous = av.logging.get_level()
        av.logging.set_level(av.logging.ERROR)
        try:
            with av.logging.Capture() as messages:
                try:
                    context.open()
                except Exception as exc:
                    reasons = "; ".join(dict.fromkeys(text.strip() for _level, _name, text in messages if text.strip()))
                    raise fb.EncoderError(f"{self.name} could not be opened: {reasons or exc}") from None
        finally:
            av.logging.set_level(previous)
        self._context = context
        self._av = av
        self._raw_format = _RAW_FORMATS[settings.pixel_format][0]

    def _encode(self, image: np.ndarray, stamp: FrameStamp, keyframe: bool) -> None:
        av = self._av
        frame = av.VideoFrame.from_ndarray(image, format=self._raw_format).reformat(format="yuv420p")
        frame.pts = stamp.pts
        frame.time_base = TIME_BASE
        if keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        self._pending[stamp.pts] = stamp
        try:
            packets = self._context.encode(frame)
        except Exception as exc:
            raise fb.EncoderError(f"{self.name} failed to encode frame {stamp.seq}: {exc}") from None
        for packet in packets:
            self._hand_on(packet)

    def _hand_on(self, packet: Any) -> None:
        pts = packet.pts
        stamp = self._pending.pop(pts, None)
        # Nothing reorders here, so a frame older than this packet will never come back (an
        # encoder may drop frames): forget it.
        for stale in [key for key in self._pending if key < pts]:
            del self._pending[stale]
        frames = (stamp,) if stamp is not None else ()
        dts = packet.dts if packet.dts is not None else pts
        self._emit(EncodedPacket(bytes(packet), pts, dts, bool(packet.is_keyframe), frames))

    def _stop(self, flush: bool) -> None:
        context, self._context = self._context, None
        if context is None:
            return
        if flush:
            try:
                packets = context.encode(None)
            except Exception as exc:
                raise fb.EncoderError(f"{self.name} failed while flushing: {exc}") from None
            for packet in packets:
                self._hand_on(packet)
        try:
            context.close()
        except Exception:
            pass


# --- GStreamer pipelines through gst-launch-1.0 ------------------------------------------------------


def _gst_x264enc(s: EncoderSettings) -> list[str]:
    return [
        "videoconvert", "!", "video/x-raw,format=I420", "!",
        "x264enc", f"speed-preset={X264_PRESET}", f"tune={X264_TUNE}", "bframes=0",
        f"key-int-max={s.keyframe_frames}", f"bitrate={s.bitrate_kbps}", "byte-stream=true",
    ]  # fmt: skip


def _gst_nvv4l2h264enc(s: EncoderSettings) -> list[str]:
    # Jetson (JetPack 4.x+): nvvidconv copies the frame into NVMM (hardware) memory as NV12, the
    # only input the V4L2 encoder takes. nvvidconv does not accept 3-byte BGR, hence BGRx first.
    return [
        "videoconvert", "!", "video/x-raw,format=BGRx", "!",
        "nvvidconv", "!", "video/x-raw(memory:NVMM),format=NV12", "!",
        "nvv4l2h264enc", f"bitrate={s.bitrate_bps}", "control-rate=1",
        f"iframeinterval={s.keyframe_frames}", f"idrinterval={s.keyframe_frames}",
        "insert-sps-pps=true", "insert-vui=true", "preset-level=1",
    ]  # fmt: skip


def _gst_omxh264enc(s: EncoderSettings) -> list[str]:
    # Older Jetson releases (L4T 32 and before): the OpenMAX encoder, fed I420 in NVMM memory.
    return [
        "videoconvert", "!", "video/x-raw,format=I420", "!",
        "nvvidconv", "!", "video/x-raw(memory:NVMM),format=I420", "!",
        "omxh264enc", f"bitrate={s.bitrate_bps}", "control-rate=2",
        f"iframeinterval={s.keyframe_frames}", "insert-sps-pps=true",
    ]  # fmt: skip


def _gst_vah264enc(s: EncoderSettings) -> list[str]:
    # GStreamer's "va" plugin (1.22+), the successor of gstreamer-vaapi.
    return [
        "videoconvert", "!", "video/x-raw,format=NV12", "!",
        "vah264enc", f"bitrate={s.bitrate_kbps}", "rate-control=cbr",
        f"key-int-max={s.keyframe_frames}", "b-frames=0",
    ]  # fmt: skip


def _gst_vaapih264enc(s: EncoderSettings) -> list[str]:
    return [
        "videoconvert", "!", "video/x-raw,format=NV12", "!",
        "vaapih264enc", f"bitrate={s.bitrate_kbps}", "rate-control=cbr",
        f"keyframe-period={s.keyframe_frames}", "max-bframes=0",
    ]  # fmt: skip


def _gst_v4l2h264enc(s: EncoderSettings) -> list[str]:
    # V4L2 memory-to-memory encoder (Raspberry Pi's bcm2835-codec and others). The level caps make
    # the Pi's encoder negotiate; repeat_sequence_header puts SPS/PPS before every keyframe.
    controls = f"controls,video_bitrate={s.bitrate_bps},h264_i_frame_period={s.keyframe_frames},repeat_sequence_header=1"
    return [
        "videoconvert", "!", "video/x-raw,format=I420", "!",
        "v4l2h264enc", f"extra-controls={controls}", "!", "video/x-h264,level=(string)4",
    ]  # fmt: skip


def holds_idr_slice(access_unit: bytes) -> bool:
    """Whether an H.264 access unit in Annex B form holds an IDR slice (NAL unit type 5).

    PyAV's parser flags keyframes only from PyAV 18 on; earlier releases (12, the last for
    Python 3.8 on JetPack 5, and 13 to 17) leave every parsed unit unflagged. A start code cannot
    occur inside a NAL unit (emulation prevention), so every match below starts a NAL unit.
    """
    start = access_unit.find(b"\x00\x00\x01")
    while 0 <= start < len(access_unit) - 3:
        if access_unit[start + 3] & 0x1F == 5:
            return True
        start = access_unit.find(b"\x00\x00\x01", start + 3)
    return False


def gst_pipeline(encoder_elements: list[str], settings: EncoderSettings, out_fd: int) -> list[str]:
    """The gst-launch-1.0 arguments: raw frames on stdin, H.264 access units on ``out_fd``."""
    _, gst_format, channels = _RAW_FORMATS[settings.pixel_format]
    rate = settings.frame_rate
    row = settings.width * channels
    return [
        "fdsrc", "fd=0", f"blocksize={row * settings.height}", "!",
        # Our rows are packed; GStreamer would otherwise assume rows padded to 4 bytes.
        "rawvideoparse", f"format={gst_format}", f"width={settings.width}", f"height={settings.height}",
        f"framerate={rate.numerator}/{rate.denominator}", f"plane-strides=<{row}>", "!",
        *encoder_elements, "!",
        # config-interval=-1: SPS/PPS in front of every IDR frame, so any keyframe can start a
        # file and a receiver can join a stream there.
        "h264parse", "config-interval=-1", "!",
        "video/x-h264,stream-format=byte-stream,alignment=au", "!",
        "fdsink", f"fd={out_fd}", "sync=false",
    ]  # fmt: skip


class GStreamerEncoder(Encoder):
    """An encoder element run by ``gst-launch-1.0`` in a child process, fed over a pipe.

    Threads: ``encode()`` writes frames to the child's stdin on the caller's thread (it blocks if
    the encoder is slower than the frames come; the recorder's queue absorbs that). A reader thread
    splits the child's output into access units and calls ``deliver`` for each; a second thread
    keeps the last lines the child printed on stderr, for error messages.

    Keyframes come every ``keyframe_frames`` frames: GStreamer offers no way to force one through
    a pipe, so ``encode(keyframe=True)`` is not honoured (``forces_keyframes`` is False).
    """

    _process: Optional[subprocess.Popen] = None

    def __init__(
        self,
        settings: EncoderSettings,
        deliver: Deliver,
        *,
        element: str,
        hardware: bool,
        elements: Callable[[EncoderSettings], list[str]],
    ) -> None:
        super().__init__(settings, deliver)
        self.name = element
        self.hardware = hardware
        self._elements = elements
        self._fifo: deque[FrameStamp] = deque()
        self._fifo_lock = threading.Lock()
        self._stderr: deque[str] = deque(maxlen=30)
        self._error: Optional[BaseException] = None
        self._reader: Optional[threading.Thread] = None
        self._aborting = False
        self.unmatched = 0  # access units that came back with no frame waiting for them

    def argv(self, out_fd: int = 3) -> list[str]:
        return [GST_LAUNCH, "-q", *gst_pipeline(self._elements(self.settings), self.settings, out_fd)]

    def _start(self) -> None:
        import av

        if shutil.which(GST_LAUNCH) is None:
            raise fb.EncoderError(f"{self.name} needs GStreamer's {GST_LAUNCH}: apt-get install gstreamer1.0-tools")
        # The parser splits the byte stream into access units (and flags keyframes); it only
        # parses, it decodes nothing.
        self._parser = av.CodecContext.create("h264", "r")
        read_end, write_end = os.pipe()
        try:
            self._process = subprocess.Popen(
                self.argv(write_end),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(write_end,),
                # A Ctrl-C in the terminal is ours to handle: we end the child with EOS, in order.
                start_new_session=True,
            )
        except OSError as exc:
            os.close(read_end)
            raise fb.EncoderError(f"cannot start {GST_LAUNCH}: {exc}") from None
        finally:
            os.close(write_end)
        self._out = read_end
        self._reader = threading.Thread(target=self._read_output, name=f"{self.name}-out", daemon=True)
        self._reader.start()
        keep_tail(self._process.stderr, self._stderr, f"{self.name}-err")  # type: ignore[union-attr,arg-type]

    def _encode(self, image: np.ndarray, stamp: FrameStamp, keyframe: bool) -> None:
        if self._error is not None:
            raise self._error
        process = self._process
        assert process is not None and process.stdin is not None
        with self._fifo_lock:
            self._fifo.append(stamp)
        try:
            process.stdin.write(np.ascontiguousarray(image).data)
            process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._wait_for_exit(2.0)
            raise self._error or fb.EncoderError(self._failure("stopped taking frames")) from None

    def _read_output(self) -> None:
        try:
            while True:
                data = os.read(self._out, 1 << 16)
                for unit in self._parser.parse(data or None):
                    self._hand_on(unit)
                if not data:
                    break
        except BaseException as exc:  # an output failed (or the parser did): stop the pipeline
            self._error = exc
            process = self._process
            if process is not None and process.poll() is None:
                process.kill()
        finally:
            os.close(self._out)

    def _hand_on(self, unit: Any) -> None:
        with self._fifo_lock:
            stamp = self._fifo.popleft() if self._fifo else None
        if stamp is None:
            # One access unit per frame is the contract of these pipelines (no B-frames, no
            # frame skipping); say so loudly if an element breaks it instead of mislabelling.
            self.unmatched += 1
            log.error("%s returned an access unit with no frame waiting for it; dropped it", self.name)
            return
        data = bytes(unit)
        self._emit(EncodedPacket(data, stamp.pts, stamp.pts, bool(unit.is_keyframe) or holds_idr_slice(data), (stamp,)))

    def _wait_for_exit(self, timeout: float) -> Optional[int]:
        process = self._process
        if process is None:
            return None
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _failure(self, what: str) -> str:
        lines = list(self._stderr)
        detail = next((line for line in lines if line.startswith(("ERROR", "WARNING: erroneous"))), lines[-1] if lines else "")
        for index, line in enumerate(lines):
            if line.startswith("ERROR: from element") and index + 1 < len(lines):
                detail = f"{line.rsplit(': ', 1)[-1]} ({lines[index + 1]})"
                break
        code = self._process.returncode if self._process is not None else None
        return f"GStreamer encoder {self.name} {what} (gst-launch-1.0 exit {code})" + (f": {detail}" if detail else "")

    def _stop(self, flush: bool) -> None:
        process = self._process
        if process is None:
            return
        if not flush:
            self._aborting = True
            if process.poll() is None:
                process.kill()
        try:
            assert process.stdin is not None
            process.stdin.close()  # end of stream: the pipeline drains and exits
        except (BrokenPipeError, OSError):
            pass
        code = self._wait_for_exit(GST_STOP_TIMEOUT if flush else 2.0)
        if code is None:
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(timeout=GST_STOP_TIMEOUT)
        if not flush:
            return
        if self._error is not None:
            raise self._error
        if code is None:
            raise fb.EncoderError(self._failure(f"did not finish within {GST_STOP_TIMEOUT:g} s"))
        if code != 0:
            raise fb.EncoderError(self._failure("failed"))
        if self._fifo:
            log.warning("%s: %d frame(s) went in but never came out encoded", self.name, len(self._fifo))


# --- the registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder ``--encoder`` can name."""

    name: str
    family: str  # jetson, nvenc, vaapi, v4l2m2m, software
    backend: str  # pyav or gstreamer
    hardware: bool
    description: str
    factory: Callable[[EncoderSettings, Deliver], Encoder] = field(repr=False, compare=False)

    def create(self, settings: EncoderSettings, deliver: Deliver) -> Encoder:
        return self.factory(settings, deliver)


def _pyav(codec: str, family: str, hardware: bool, description: str, options: Callable[[EncoderSettings], dict[str, str]], forces: bool) -> EncoderSpec:
    def factory(settings: EncoderSettings, deliver: Deliver) -> Encoder:
        return PyAVEncoder(settings, deliver, codec=codec, hardware=hardware, options=options, forces_keyframes=forces)

    return EncoderSpec(codec, family, "pyav", hardware, description, factory)


def _gst(element: str, family: str, hardware: bool, description: str, elements: Callable[[EncoderSettings], list[str]]) -> EncoderSpec:
    def factory(settings: EncoderSettings, deliver: Deliver) -> Encoder:
        return GStreamerEncoder(settings, deliver, element=element, hardware=hardware, elements=elements)

    return EncoderSpec(element, family, "gstreamer", hardware, description, factory)


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        _gst("nvv4l2h264enc", "jetson", True, "Jetson hardware encoder (GStreamer, NVMM NV12)", _gst_nvv4l2h264enc),
        _gst("omxh264enc", "jetson", True, "older Jetson hardware encoder (GStreamer OpenMAX)", _gst_omxh264enc),
        _pyav("h264_nvenc", "nvenc", True, "NVIDIA NVENC (FFmpeg)", _nvenc_options, True),
        _gst("vah264enc", "vaapi", True, "VAAPI (GStreamer va)", _gst_vah264enc),
        _gst("vaapih264enc", "vaapi", True, "VAAPI (gstreamer-vaapi)", _gst_vaapih264enc),
        _pyav("h264_v4l2m2m", "v4l2m2m", True, "V4L2 memory-to-memory, e.g. Raspberry Pi (FFmpeg)", _v4l2m2m_options, False),
        _gst("v4l2h264enc", "v4l2m2m", True, "V4L2 memory-to-memory, e.g. Raspberry Pi (GStreamer)", _gst_v4l2h264enc),
        _pyav("libx264", "software", False, "software x264 (FFmpeg)", _x264_options, True),
        _gst("x264enc", "software", False, "software x264 (GStreamer)", _gst_x264enc),
    )
}

# design.md section 6: Jetson (then the older OpenMAX one), NVENC, VAAPI, V4L2 M2M, software x264.
AUTO_ORDER = (
    "nvv4l2h264enc",
    "omxh264enc",
    "h264_nvenc",
    "vah264enc",
    "vaapih264enc",
    "h264_v4l2m2m",
    "v4l2h264enc",
    "libx264",
)
SOFTWARE_FALLBACK = "libx264"
