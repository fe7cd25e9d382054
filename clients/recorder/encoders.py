"""Encoders: turn frames into H.264 ``EncodedPacket``s, through FFmpeg (PyAV) or GStreamer.

Two kinds, one interface (``Encoder``):

* ``PyAVEncoder`` runs an FFmpeg codec in this process: ``libx264`` (software), ``h264_nvenc``
  (NVIDIA NVENC) and ``h264_v4l2m2m`` (V4L2 memory-to-memory, e.g. Raspberry Pi). Frames carry
  their PTS into the codec and packets come back with it, so each packet is matched to its frame
  by PTS. SPS/PPS are put in front of every keyframe that lacks them (``h264.ParameterSets``:
  ``h264_v4l2m2m`` sends them once), so every segment and clip decodes on its own.
* ``GStreamerEncoder`` runs a pipeline in a child (``framebroker.gstreamer.GstProcess``) and
  feeds it I420 frames (converted here, ``RawFeed``) on a pipe:
  ``fdsrc ! rawvideoparse ! [hardware upload] ! <encoder> ! h264parse ! byte-stream/au ! fdsink``.
  This is the only way to Jetson's encoders (``nvv4l2h264enc``, older ``omxh264enc``, both fed
  NV12/I420 in NVMM memory by ``nvvidconv``) and it reaches VAAPI (``vah264enc``,
  ``vah264lpenc``, ``vaapih264enc``) and V4L2 (``v4l2h264enc``) too. A pipe carries no
  timestamps: the encoder keeps a FIFO of the frames it wrote and gives them, in order, to the
  access units coming back, which FFmpeg's H.264 parser splits out of the byte stream. That needs
  one access unit per frame in input order, so every pipeline here disables B-frames. ``x264enc`` (software) runs the same
  plumbing where no hardware exists, which is how the tests prove it.

The PyAV wheel's FFmpeg has no ``h264_vaapi`` (and feeding it needs VAAPI surfaces, which PyAV's
encoding API does not offer), so VAAPI goes through GStreamer.

``ENCODERS`` names every encoder ``--encoder`` accepts; ``AUTO_ORDER`` is the order ``auto`` tries
them in (README, Recording). Which one works is decided by a test encode (``selection.py``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional

import numpy as np

import framebroker as fb
from framebroker.gstreamer import GstProcess

from .h264 import ParameterSets, holds_idr_slice
from .lifecycle import Lifecycle, State
from .packets import TIME_BASE, EncodedPacket, FrameStamp

log = logging.getLogger("framebroker.recorder")

# How long stop() waits for a GStreamer child to drain and exit before killing it (seconds).
GST_STOP_TIMEOUT = 10.0
# Software x264 settings, chosen with bench/recorder_realtime.py: "superfast" keeps 1280x720 at
# 30 fps well inside real time on 2 shared cores, with headroom for noisy camera pictures that the
# test pattern does not have; "zerolatency" removes B-frames, lookahead and frame threading, so a
# packet leaves the encoder with its frame (kill -9 loses at most what sits in the queue).
X264_PRESET = "superfast"
X264_TUNE = "zerolatency"

Deliver = Callable[[EncodedPacket], None]

_PYAV_FORMATS = {"bgr": "bgr24", "rgb": "rgb24", "gray": "gray"}  # our pixel formats in FFmpeg's names


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
        if self.pixel_format not in _PYAV_FORMATS:
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


class Encoder(Lifecycle):
    """Turns frames into ``EncodedPacket``s handed to ``deliver``.

    ``start()`` opens the codec or pipeline (``fb.EncoderError`` if it cannot), ``encode()`` takes
    one frame, ``stop()`` flushes what the encoder still holds and closes it; ``abort()`` closes
    without flushing. ``encode()`` must be called from one thread; ``deliver`` may be called from
    another (see the subclasses), never for two packets at once. An error raised by ``deliver``
    ends encoding: it is raised again by the next ``encode()`` or by ``stop()``.
    """

    name = "?"
    forces_keyframes = False  # whether encode(keyframe=True) is honoured (else: every keyframe_frames)

    def __init__(self, settings: EncoderSettings, deliver: Deliver) -> None:
        super().__init__()
        self.settings = settings
        self._deliver = deliver

    def describe(self) -> str:
        return f"encoder {self.name}"

    def start(self) -> None:
        self._start_once(self._start)

    def encode(self, image: np.ndarray, stamp: FrameStamp, keyframe: bool = False) -> None:
        if self._state is not State.RUNNING:
            raise fb.EncoderError(f"{self.describe()} is not running ({self._state.value})")
        self._encode(image, stamp, keyframe)

    def stop(self) -> None:
        self._stop_once(lambda: self._stop(flush=True))

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
        options: Callable[[EncoderSettings], dict[str, str]],
        forces_keyframes: bool,
    ) -> None:
        super().__init__(settings, deliver)
        self.name = codec
        self.forces_keyframes = forces_keyframes
        self._options = options
        self._context: Any = None
        self._pending: dict[int, FrameStamp] = {}
        # h264_v4l2m2m sends SPS/PPS once; every encoder's stream goes through the same check,
        # which costs a scan for start codes per packet where nothing is missing.
        self._parameter_sets = ParameterSets()

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
        self._raw_format = _PYAV_FORMATS[settings.pixel_format]

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
        completed = self._parameter_sets.complete(bytes(packet), bool(packet.is_keyframe))
        if completed is None:
            return  # parameter sets alone: they go in front of the next packet, with its frame
        data, keyframe = completed
        pts = packet.pts
        stamp = self._pending.pop(pts, None)
        # Nothing reorders here, so a frame older than this packet will never come back (an
        # encoder may drop frames): forget it.
        for stale in [key for key in self._pending if key < pts]:
            del self._pending[stale]
        frames = (stamp,) if stamp is not None else ()
        dts = packet.dts if packet.dts is not None else pts
        self._emit(EncodedPacket(data, pts, dts, keyframe, frames))

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


# --- GStreamer pipelines in a child process -------------------------------------------------------------
#
# Every GStreamer encoder is fed I420 (planar 4:2:0), converted here by OpenCV's SIMD code: half
# the bytes of BGR on the pipe, and no videoconvert in the child, which on a Jetson cost a CPU
# core at 1080p before nvvidconv (which takes no 3-byte BGR) could copy the frame to the GPU.
# Each pipeline below takes I420 from rawvideoparse and moves it on with hardware where there is
# some (nvvidconv, vapostproc). Gray frames go to nvvidconv as they are (GRAY8).


def _gst_x264enc(s: EncoderSettings) -> list[str]:
    return [
        "x264enc", f"speed-preset={X264_PRESET}", f"tune={X264_TUNE}", "bframes=0",
        f"key-int-max={s.keyframe_frames}", f"bitrate={s.bitrate_kbps}", "byte-stream=true",
    ]  # fmt: skip


def _gst_nvv4l2h264enc(s: EncoderSettings) -> list[str]:
    # Jetson (JetPack 4.x+): nvvidconv copies the frame into NVMM (hardware) memory as NV12, the
    # input the V4L2 encoder takes, converting on the VIC, not the CPU. maxperf-enable keeps the
    # encoder at its highest clocks, as jetson-utils runs it.
    return [
        "nvvidconv", "!", "video/x-raw(memory:NVMM),format=NV12", "!",
        "nvv4l2h264enc", f"bitrate={s.bitrate_bps}", "control-rate=1",
        f"iframeinterval={s.keyframe_frames}", f"idrinterval={s.keyframe_frames}",
        "insert-sps-pps=true", "insert-vui=true", "preset-level=1", "maxperf-enable=true",
    ]  # fmt: skip


def _gst_omxh264enc(s: EncoderSettings) -> list[str]:
    # Older Jetson releases (L4T 32 and before): the OpenMAX encoder, fed I420 in NVMM memory.
    return [
        "nvvidconv", "!", "video/x-raw(memory:NVMM),format=I420", "!",
        "omxh264enc", f"bitrate={s.bitrate_bps}", "control-rate=2",
        f"iframeinterval={s.keyframe_frames}", "insert-sps-pps=true",
    ]  # fmt: skip


def _gst_va(element: str) -> Callable[[EncoderSettings], list[str]]:
    # GStreamer's "va" plugin (1.22+), the successor of gstreamer-vaapi. Its encoders take NV12
    # only; vapostproc converts and uploads on the GPU. vah264lpenc is the low-power entry point,
    # the only one some Intel GPUs register.
    def elements(s: EncoderSettings) -> list[str]:
        return [
            "vapostproc", "!", "video/x-raw(memory:VAMemory),format=NV12", "!",
            element, f"bitrate={s.bitrate_kbps}", "rate-control=cbr",
            f"key-int-max={s.keyframe_frames}", "b-frames=0",
        ]  # fmt: skip

    return elements


def _gst_vaapih264enc(s: EncoderSettings) -> list[str]:
    # gstreamer-vaapi's encoder uploads I420 from system memory itself.
    return ["vaapih264enc", f"bitrate={s.bitrate_kbps}", "rate-control=cbr", f"keyframe-period={s.keyframe_frames}", "max-bframes=0"]


def _gst_v4l2h264enc(s: EncoderSettings) -> list[str]:
    # V4L2 memory-to-memory encoder (Raspberry Pi's bcm2835-codec and others), fed I420. The level
    # caps make the Pi's encoder negotiate; repeat_sequence_header puts SPS/PPS before every
    # keyframe.
    controls = f"controls,video_bitrate={s.bitrate_bps},h264_i_frame_period={s.keyframe_frames},repeat_sequence_header=1"
    level = h264_level(s.width, s.height, s.fps, s.bitrate_kbps)
    return ["v4l2h264enc", f"extra-controls={controls}", "!", f"video/x-h264,level=(string){level}"]


# H.264 levels (ITU-T H.264, Table A-1): the largest frame and the most macroblocks (16x16
# pixels) a second each allows, and its bit rate limit for the Main profile in kbit/s (High
# allows 1.25 times that; Main's is the safe bound). Level 1b is left out.
H264_LEVELS = (
    ("1", 99, 1_485, 64), ("1.1", 396, 3_000, 192), ("1.2", 396, 6_000, 384), ("1.3", 396, 11_880, 768),
    ("2", 396, 11_880, 2_000), ("2.1", 792, 19_800, 4_000), ("2.2", 1_620, 20_250, 4_000),
    ("3", 1_620, 40_500, 10_000), ("3.1", 3_600, 108_000, 14_000), ("3.2", 5_120, 216_000, 20_000),
    ("4", 8_192, 245_760, 20_000), ("4.1", 8_192, 245_760, 50_000), ("4.2", 8_704, 522_240, 50_000),
    ("5", 22_080, 589_824, 135_000), ("5.1", 36_864, 983_040, 240_000), ("5.2", 36_864, 2_073_600, 240_000),
    ("6", 139_264, 4_177_920, 240_000), ("6.1", 139_264, 8_355_840, 480_000), ("6.2", 139_264, 16_711_680, 800_000),
)  # fmt: skip


def h264_level(width: int, height: int, fps: float, bitrate_kbps: int) -> str:
    """The lowest H.264 level that allows this frame size, frame rate and bit rate ("4" for
    1080p30 at 2 Mbit/s, "4.2" for 1080p60); ValueError beyond level 6.2."""
    columns, rows = -(-width // 16), -(-height // 16)
    frame = columns * rows
    for level, max_frame, max_rate, max_kbps in H264_LEVELS:
        # Neither side may exceed sqrt(8 * MaxFS) macroblocks (A.3.1).
        fits = frame <= max_frame and max(columns, rows) ** 2 <= 8 * max_frame
        if fits and frame * fps <= max_rate and bitrate_kbps <= max_kbps:
            return level
    raise ValueError(f"{width}x{height} at {fps:g} fps and {bitrate_kbps} kbit/s is beyond every H.264 level")


class RawFeed:
    """A frame as a GStreamer encoder is fed it on the pipe, and how rawvideoparse reads it.

    I420 from BGR or RGB frames is converted by OpenCV (BT.601, limited range, as FFmpeg and
    OpenCV convert by default; the caps say so, else GStreamer would take HD frames for BT.709);
    gray frames become its luma plane (scaled to limited range) under neutral chroma. Where the
    pipeline takes GRAY8 (``gray8``, nvvidconv), gray frames go as they are.
    """

    def __init__(self, settings: EncoderSettings, gray8: bool = False) -> None:
        import cv2  # heavy: imported where used

        width, height = settings.width, settings.height
        self._cv2 = cv2
        self._height = height
        self._to_i420 = {"bgr": cv2.COLOR_BGR2YUV_I420, "rgb": cv2.COLOR_RGB2YUV_I420}.get(settings.pixel_format)
        if settings.pixel_format == "gray" and gray8:
            self.gst_format, self.strides, self.offsets = "gray8", (width,), (0,)
            self.frame_bytes = width * height
            self._frame: Optional[np.ndarray] = None
            return
        chroma = (width // 2) * (height // 2)
        self.gst_format = "i420"
        self.strides = (width, width // 2, width // 2)
        self.offsets = (0, width * height, width * height + chroma)
        self.frame_bytes = width * height + 2 * chroma
        self._frame = np.empty((height * 3 // 2, width), np.uint8)
        self._frame[height:] = 128  # neutral chroma, for gray frames (colour ones overwrite it)
        # Full-range gray 0..255 to limited-range luma 16..235.
        self._luma = np.round(16 + np.arange(256) * (219 / 255)).astype(np.uint8)

    def caps(self) -> list[str]:
        """Caps to set after rawvideoparse (its colorimetry property is GStreamer 1.18+ only)."""
        return ["capssetter", "caps=video/x-raw,colorimetry=bt601"] if self.gst_format == "i420" else []

    def convert(self, image: np.ndarray) -> np.ndarray:
        """The bytes to write for one frame (a buffer reused for the next one)."""
        if self._frame is None:
            return np.ascontiguousarray(image)
        if self._to_i420 is not None:
            self._cv2.cvtColor(image, self._to_i420, dst=self._frame)
        else:
            self._cv2.LUT(image, self._luma, dst=self._frame[: self._height])
        return self._frame


def gst_pipeline(encoder_elements: list[str], feed: RawFeed, settings: EncoderSettings, out_fd: int) -> list[str]:
    """The pipeline as gst-launch-1.0 arguments: raw frames on stdin, H.264 access units on ``out_fd``."""


    rate = settings.frame_rate
    setter = feed.caps()
    return [
        "fdsrc", "fd=0", f"blocksize={feed.frame_bytes}", "!",
        # Our planes are packed; GStreamer would otherwise assume rows padded to 4 bytes.
        "rawvideoparse", f"format={feed.gst_format}", f"width={settings.width}", f"height={settings.height}",
        f"framerate={rate.numerator}/{rate.denominator}",
        f"plane-strides=<{','.join(map(str, feed.strides))}>", f"plane-offsets=<{','.join(map(str, feed.offsets))}>", "!",
        *setter, *(["!"] if setter else []),
        *encoder_elements, "!",
        # config-interval=-1: SPS/PPS in front of every IDR frame, so any keyframe can start a
        # file and a receiver can join a stream there.
        "h264parse", "config-interval=-1", "!",
        "video/x-h264,stream-format=byte-stream,alignment=au", "!",
        "fdsink", f"fd={out_fd}", "sync=false",
    ]  # fmt: skip


class GStreamerEncoder(Encoder):
    """An encoder element run in a ``framebroker.gstreamer.GstProcess`` child, fed over a pipe.

    Threads: ``encode()`` writes frames to the child's stdin on the caller's thread (it blocks if
    the encoder is slower than the frames come; the recorder's queue absorbs that). A reader thread
    splits the child's output into access units and calls ``deliver`` for each; the GstProcess
    keeps the last lines the child printed, for error messages.

    Keyframes come every ``keyframe_frames`` frames: GStreamer offers no way to force one through
    a pipe, so ``encode(keyframe=True)`` is not honoured (``forces_keyframes`` is False).
    """

    _process: Optional[GstProcess] = None

    def __init__(
        self,
        settings: EncoderSettings,
        deliver: Deliver,
        *,
        element: str,
        elements: Callable[[EncoderSettings], list[str]],
        gray8: bool = False,
    ) -> None:
        super().__init__(settings, deliver)
        self.name = element
        self._elements = elements
        self._feed = RawFeed(settings, gray8)
        self._fifo: deque[FrameStamp] = deque()
        self._fifo_lock = threading.Lock()
        self._error: Optional[BaseException] = None
        self._reader: Optional[threading.Thread] = None

    def pipeline(self, out_fd: int) -> list[str]:
        """The pipeline, as gst-launch-1.0 arguments, writing access units to ``out_fd``."""
        return gst_pipeline(self._elements(self.settings), self._feed, self.settings, out_fd)

    def _start(self) -> None:
        import av

        # The parser splits the byte stream into access units (and flags keyframes); it only
        # parses, it decodes nothing.
        self._parser = av.CodecContext.create("h264", "r")
        try:
            elements = self._elements(self.settings)
        except ValueError as exc:  # settings this encoder cannot take (an H.264 level)
            raise fb.EncoderError(f"{self.name}: {exc}") from None
        read_end, write_end = os.pipe()
        try:
            # The child has a session of its own: a Ctrl-C in the terminal is ours to handle, and
            # we end the child with end of stream, in order.
            self._process = GstProcess(
                gst_pipeline(elements, self._feed, self.settings, write_end),
                name=f"{self.name} encoder",
                stdin=subprocess.PIPE,
                pass_fds=(write_end,),
            )
        except OSError as exc:
            os.close(read_end)
            raise fb.EncoderError(f"cannot start the GStreamer child for {self.name}: {exc}") from None
        finally:
            os.close(write_end)
        self._out = read_end
        self._reader = threading.Thread(target=self._read_output, name=f"{self.name}-out", daemon=True)
        self._reader.start()

    def _encode(self, image: np.ndarray, stamp: FrameStamp, keyframe: bool) -> None:
        if self._error is not None:
            raise self._error
        process = self._process
        assert process is not None and process.stdin is not None
        with self._fifo_lock:
            self._fifo.append(stamp)
        try:
            process.stdin.write(self._feed.convert(image).data)
            process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            process.wait(2.0)
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
            if self._process is not None:
                self._process.kill()
        finally:
            os.close(self._out)

    def _hand_on(self, unit: Any) -> None:
        with self._fifo_lock:
            stamp = self._fifo.popleft() if self._fifo else None
        if stamp is None:
            # One access unit per frame is the contract of these pipelines (no B-frames, no
            # frame skipping); say so loudly if an element breaks it instead of mislabelling.
            log.error("%s returned an access unit with no frame waiting for it; dropped it", self.name)
            return
        data = bytes(unit)
        self._emit(EncodedPacket(data, stamp.pts, stamp.pts, bool(unit.is_keyframe) or holds_idr_slice(data), (stamp,)))

    def _failure(self, what: str) -> str:
        process = self._process
        code = process.returncode if process is not None else None
        detail = process.error() if process is not None else ""
        return f"GStreamer encoder {self.name} {what} (exit {code})" + (f": {detail}" if detail else "")

    def _stop(self, flush: bool) -> None:
        process = self._process
        if process is None:
            return
        if not flush:
            process.kill()
        assert process.stdin is not None
        try:
            process.stdin.close()  # end of stream: the pipeline drains and exits
        except (BrokenPipeError, OSError):
            pass
        code = process.wait(GST_STOP_TIMEOUT if flush else 2.0)
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
    hardware: bool
    description: str
    factory: Callable[[EncoderSettings, Deliver], Encoder] = field(repr=False, compare=False)

    def create(self, settings: EncoderSettings, deliver: Deliver) -> Encoder:
        return self.factory(settings, deliver)


def _pyav(codec: str, family: str, hardware: bool, description: str, options: Callable[[EncoderSettings], dict[str, str]], forces: bool) -> EncoderSpec:
    def factory(settings: EncoderSettings, deliver: Deliver) -> Encoder:
        return PyAVEncoder(settings, deliver, codec=codec, options=options, forces_keyframes=forces)

    return EncoderSpec(codec, family, hardware, description, factory)


def _gst(
    element: str, family: str, hardware: bool, description: str, elements: Callable[[EncoderSettings], list[str]], gray8: bool = False
) -> EncoderSpec:
    def factory(settings: EncoderSettings, deliver: Deliver) -> Encoder:
        return GStreamerEncoder(settings, deliver, element=element, elements=elements, gray8=gray8)

    return EncoderSpec(element, family, hardware, description, factory)


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        _gst("nvv4l2h264enc", "jetson", True, "Jetson hardware encoder (GStreamer, NVMM NV12)", _gst_nvv4l2h264enc, gray8=True),
        _gst("omxh264enc", "jetson", True, "older Jetson hardware encoder (GStreamer OpenMAX)", _gst_omxh264enc, gray8=True),
        _pyav("h264_nvenc", "nvenc", True, "NVIDIA NVENC (FFmpeg)", _nvenc_options, True),
        _gst("vah264enc", "vaapi", True, "VAAPI (GStreamer va)", _gst_va("vah264enc")),
        _gst("vah264lpenc", "vaapi", True, "VAAPI low-power (GStreamer va)", _gst_va("vah264lpenc")),
        _gst("vaapih264enc", "vaapi", True, "VAAPI (gstreamer-vaapi)", _gst_vaapih264enc),
        _pyav("h264_v4l2m2m", "v4l2m2m", True, "V4L2 memory-to-memory, e.g. Raspberry Pi (FFmpeg)", _v4l2m2m_options, False),
        _gst("v4l2h264enc", "v4l2m2m", True, "V4L2 memory-to-memory, e.g. Raspberry Pi (GStreamer)", _gst_v4l2h264enc),
        _pyav("libx264", "software", False, "software x264 (FFmpeg)", _x264_options, True),
        _gst("x264enc", "software", False, "software x264 (GStreamer)", _gst_x264enc),
    )
}

# Jetson (then the older OpenMAX one), NVENC, VAAPI, V4L2 M2M, software x264.
AUTO_ORDER = (
    "nvv4l2h264enc",
    "omxh264enc",
    "h264_nvenc",
    "vah264enc",
    "vah264lpenc",
    "vaapih264enc",
    "h264_v4l2m2m",
    "v4l2h264enc",
    "libx264",
)
SOFTWARE_FALLBACK = "libx264"
