"""The recording pipeline: ring -> reader thread -> bounded queue -> encode thread -> encoder -> router -> outputs.

A note on threads:

* The **reader thread** owns the ``fb.Reader`` (a Reader is for one thread). It takes every
  frame in order (``ordered()``), copies it, releases the slot at once and puts the copy in a
  bounded queue without ever waiting: when the queue is full the frame is dropped and counted.
  So a slow encoder costs frames, never the ring's or the camera's time. The one exception is a
  file replayed in lockstep (``serve FILE --pace lockstep``), where the daemon waits for its
  readers anyway: there the reader thread waits for room in the queue, and no frame is lost.
  It also publishes the recorder's counters with ``Reader.set_info`` for ``framebroker status``,
  and each output's state (``Output.status()``: a live output's link, its bit rate, reconnects).
* The **encode thread** takes frames from the queue, draws the overlays, gives each frame its PTS
  (from its capture ``timestamp_ns``) and feeds the encoder. Packets reach the ``PacketRouter``
  from this thread (PyAV) or from the encoder's own pipe-reading thread (GStreamer). With
  ``burn_in``, it first waits for the models' results of the frame (``ResultFeed.for_frame``),
  at most until ``burn_in_wait`` seconds after the frame's capture, and draws their boxes: the
  wait happens here, so frames pile up in the queue (which is made that much longer), never in
  the ring, and once the queue is full frames are dropped there and counted, as ever.
* The **caller** (the CLI's main thread) starts, asks to stop, waits, and reads ``stats``.

Counters are plain ints, each written by one thread and read by the others.
"""

from __future__ import annotations

import enum
import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional

import numpy as np

import framebroker as fb

from .encoders import Encoder, EncoderSettings, EncoderSpec
from .outputs import Output
from .packets import FrameStamp, PacketRouter, StreamInfo, pts_from_ns
from .results import ResultFeed, draw_results

log = logging.getLogger("framebroker.recorder")

# How often the reader thread wakes when no frame comes, to check for stop and duration (s).
READ_TIMEOUT = 0.25
# How often counters are published to the reader table for `framebroker status` (s).
INFO_PERIOD = 0.5
# The outputs' entries in status, ever shorter until they fit the reader table's few hundred
# bytes: (characters of each output's name, of a failure's reason; None: all, 0: none).
STATUS_CUTS = ((None, None), (None, 40), (48, 24), (32, 0), (20, 0), (12, 0))
# How long the recorder trusts what it last read about the stream's pace (s).
PACE_CHECK_PERIOD = 1.0
# Frames looked at (or how long, s) before opening the encoder, to measure the stream's rate.
RATE_SAMPLE_FRAMES = 6
RATE_SAMPLE_SECONDS = 0.3
DEFAULT_FPS = 30.0
# Without --queue, the queue holds this much video: with the encoder behind, kill -9 then still
# loses at most about this much (plus the packet being written), and a short hiccup drops nothing.
QUEUE_SECONDS = 0.4
QUEUE_MAX_FRAMES = 30
QUEUE_FIRST_FRAMES = 12  # until the stream's rate is known
_SENTINEL = None


@dataclass
class RecorderOptions:
    duration: Optional[float] = None  # seconds of capture time, from the first frame
    text: Optional[str] = None
    clock: bool = False
    bitrate_kbps: Optional[int] = None  # None: about 0.1 bit per pixel at the stream's rate
    queue_frames: Optional[int] = None  # None: QUEUE_SECONDS (+ burn_in_wait) of frames at the stream's rate
    keyframe_interval: Fraction = Fraction(1)
    burn_in: tuple[str, ...] = ()  # models whose boxes are drawn into the video
    burn_in_wait: float = 0.5  # how long after its capture a frame may wait for those results (s)


@dataclass
class CapturedFrame:
    image: np.ndarray
    seq: int
    timestamp_ns: int
    wall_time: float
    pixel_format: str


class Stats:
    """What the recorder did so far; written by the pipeline's threads, read by anyone."""

    def __init__(self) -> None:
        self.frames_read = 0
        self.ring_dropped = 0  # frames the ring overwrote before we read them (frame.dropped)
        self.queue_dropped = 0  # frames dropped because the encoder queue was full
        self.frames_encoded = 0
        self.first_timestamp_ns: Optional[int] = None
        self.last_timestamp_ns: Optional[int] = None
        self.encoder = ""
        self.queue_depth = 0
        self.burn_in_late = 0  # frames encoded before every --burn-in model had got to them
        self.encode_seconds: deque[float] = deque(maxlen=2000)

    @property
    def recorded_seconds(self) -> float:
        if self.first_timestamp_ns is None or self.last_timestamp_ns is None:
            return 0.0
        return (self.last_timestamp_ns - self.first_timestamp_ns) / 1e9

    @property
    def encode_ms_median(self) -> Optional[float]:
        samples = list(self.encode_seconds)
        return statistics.median(samples) * 1000.0 if samples else None


def default_bitrate_kbps(width: int, height: int, fps: float) -> int:
    """About 0.1 bit per pixel: 1280x720 at 30 fps -> 2765 kbit/s."""
    return max(200, int(width * height * fps * 0.1 / 1000))


def draw_overlays(image: np.ndarray, text: Optional[str], wall_time: Optional[float]) -> None:
    """``--text`` bottom left, ``--clock`` (the frame's capture wall time) bottom right, in place.

    The top of the picture is left alone (the test pattern's frame number lives there).
    """
    import cv2

    height, width = image.shape[:2]
    scale = max(0.4, height / 720.0)
    thickness = max(1, round(2 * scale))
    margin = max(4, round(10 * scale))
    white: Any = 255 if image.ndim == 2 else (255, 255, 255)
    black: Any = 0 if image.ndim == 2 else (0, 0, 0)
    font = cv2.FONT_HERSHEY_SIMPLEX

    def put(label: str, right: bool) -> None:
        (w, _), base = cv2.getTextSize(label, font, scale, thickness)
        x = width - w - margin if right else margin
        y = height - margin - base
        # A dark outline keeps the label readable on any background.
        cv2.putText(image, label, (x, y), font, scale, black, thickness + 2 * max(1, thickness // 2), cv2.LINE_AA)
        cv2.putText(image, label, (x, y), font, scale, white, thickness, cv2.LINE_AA)

    if text:
        put(text, right=False)
    if wall_time is not None:
        local = time.localtime(wall_time)
        millis = int((wall_time % 1) * 1000)
        put(time.strftime("%Y-%m-%d %H:%M:%S", local) + f".{millis:03d}", right=True)


class KeyframeClock:
    """Asks for a keyframe whenever a frame's PTS enters a new keyframe interval.

    Interval boundaries are multiples of the interval from the recording's start, computed from
    each PTS exactly (a Fraction), so keyframes land on segment boundaries and never drift.
    """

    def __init__(self, interval: Fraction) -> None:
        self._ticks = Fraction(interval) * 90_000
        self._last = -1

    def due(self, pts: int) -> bool:
        index = int(pts * self._ticks.denominator // self._ticks.numerator)
        if index > self._last:
            self._last = index
            return True
        return False


class RecorderState(enum.Enum):
    NEW = "new"
    RECORDING = "recording"
    STOPPING = "stopping"  # asked to stop (or --duration, or the stream ended): draining and closing
    STOPPED = "stopped"  # everything written and closed; see ``error``


class Recorder:
    """Records one stream: start(), then request_stop() (or --duration, or the stream's end), wait()."""

    def __init__(
        self,
        reader: fb.Reader,
        encoder: EncoderSpec,
        outputs: list[Output],
        options: RecorderOptions,
        output_label: str = "",
        router: Optional[PacketRouter] = None,
        extra_info: Optional[Callable[[], dict]] = None,
        results: Optional[ResultFeed] = None,
    ) -> None:
        if options.queue_frames is not None and options.queue_frames < 1:
            raise ValueError(f"the queue must hold at least 1 frame, got {options.queue_frames}")
        if options.burn_in and results is None:
            raise ValueError("burn-in needs the models' results: pass results=ResultFeed(...)")
        self.reader = reader
        self.results = results
        self.spec = encoder
        self.options = options
        self.router = router or PacketRouter()
        for output in outputs:
            self.router.attach(output)
        self.outputs = list(outputs)
        self.output_label = output_label
        self.extra_info = extra_info  # more key/values for status (why software encodes, the clip buffer)
        self.stats = Stats()
        self.stats.encoder = encoder.name
        self.end_reason = ""
        self.error: Optional[BaseException] = None
        self.encoder: Optional[Encoder] = None
        # Unbounded as a container; the reader thread (its only producer) enforces queue_limit,
        # which the encode thread lowers once it knows the stream's rate.
        self._queue: "queue.Queue[Optional[CapturedFrame]]" = queue.Queue()
        self.queue_limit = options.queue_frames or QUEUE_FIRST_FRAMES
        self._room = threading.Condition()  # notified whenever the encode thread takes an item
        self._lockstep = False
        self._pace_checked = -PACE_CHECK_PERIOD
        self._stop = threading.Event()
        self._done = threading.Event()
        self._encoder_failed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._started = False
        self._last_pts = -1
        self._info_due = 0.0

    # --- control ---------------------------------------------------------------------------------

    @property
    def state(self) -> RecorderState:
        if self._done.is_set():
            return RecorderState.STOPPED
        if self._stop.is_set():
            return RecorderState.STOPPING
        return RecorderState.RECORDING if self._started else RecorderState.NEW

    def start(self) -> None:
        with self._lock:
            if self._started:
                raise ValueError(f"the recorder was already started ({self.state.value})")
            self._started = True
        reader = threading.Thread(target=self._read_loop, name="recorder-read", daemon=True)
        encoder = threading.Thread(target=self._encode_loop, name="recorder-encode", daemon=True)
        self._threads = [reader, encoder]
        encoder.start()
        reader.start()

    def request_stop(self, reason: str = "stopped") -> None:
        """Finish the recording: frames already queued are still encoded and written. Safe from
        any thread and from a signal handler; the first reason given is kept."""
        if not self._stop.is_set():
            self.end_reason = self.end_reason or reason
            self._stop.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once everything is written and closed."""
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # --- the reader thread ---------------------------------------------------------------------------

    def _frames(self) -> Iterator[Optional[fb.Frame]]:
        """Frames in order; None whenever READ_TIMEOUT passes without one. Ends with the stream."""
        while True:
            try:
                yield from self.reader.ordered(timeout=READ_TIMEOUT)
                return
            except fb.FrameTimeout:
                yield None

    def _read_loop(self) -> None:
        stats = self.stats
        duration_ns = None if self.options.duration is None else int(self.options.duration * 1e9)
        try:
            for frame in self._frames():
                if self._stop.is_set() or self._encoder_failed.is_set():
                    break
                if frame is None:
                    if duration_ns is not None and stats.first_timestamp_ns is not None:
                        if time.monotonic_ns() - stats.first_timestamp_ns >= duration_ns:
                            self.request_stop("duration reached")
                            break
                    self.publish_info()
                    continue
                with frame:
                    if stats.first_timestamp_ns is None:
                        stats.first_timestamp_ns = frame.timestamp_ns
                    else:
                        stats.ring_dropped += frame.dropped
                    if duration_ns is not None and frame.timestamp_ns - stats.first_timestamp_ns >= duration_ns:
                        self.request_stop("duration reached")
                        break
                    captured = CapturedFrame(frame.copy(), frame.seq, frame.timestamp_ns, frame.wall_time, frame.format)
                stats.frames_read += 1
                stats.last_timestamp_ns = captured.timestamp_ns
                if self._queue.qsize() >= self.queue_limit and self._stream_in_lockstep():
                    self._wait_for_room()
                if self._queue.qsize() < self.queue_limit:
                    self._queue.put_nowait(captured)
                else:
                    stats.queue_dropped += 1
                stats.queue_depth = self._queue.qsize()
                self.publish_info()
            else:
                self.request_stop("the stream ended")
        except BaseException as exc:
            self.error = self.error or exc
            self.request_stop("reading failed")
        finally:
            self.publish_info(force=True)
            # The encode thread drains what is queued, then ends at the sentinel.
            if not self._encoder_failed.is_set():
                self._queue.put(_SENTINEL)
            try:
                self.reader.close()
            except Exception as exc:
                log.debug("closing the reader: %s", exc)

    def _stream_in_lockstep(self) -> bool:
        """Whether the stream is a file replayed in lockstep (its daemon waits for us anyway)."""
        now = time.monotonic()
        if now - self._pace_checked >= PACE_CHECK_PERIOD:
            self._pace_checked = now
            streams = fb.status(self.reader.stream)["streams"]
            info = streams[0].get("info") if streams else None
            replay = info.get("replay") if isinstance(info, dict) else None
            self._lockstep = isinstance(replay, dict) and replay.get("pace") == "lockstep"
        return self._lockstep

    def _wait_for_room(self) -> None:
        with self._room:
            while self._queue.qsize() >= self.queue_limit and not (self._stop.is_set() or self._encoder_failed.is_set()):
                self._room.wait(READ_TIMEOUT)

    def _take(self, timeout: Optional[float] = None) -> Optional[CapturedFrame]:
        """The next item for the encode thread (queue.Empty after ``timeout``)."""
        item = self._queue.get(timeout=timeout)
        with self._room:
            self._room.notify()
        return item

    def publish_info(self, force: bool = False) -> None:
        """Counters and each output's state for ``framebroker status`` (at most every INFO_PERIOD
        unless forced); from one thread at a time (the reader thread, once it runs)."""
        now = time.monotonic()
        if not force and now < self._info_due:
            return
        self._info_due = now + INFO_PERIOD
        stats = self.stats
        info: dict[str, Any] = {
            "encoder": stats.encoder,
            "written": self.router.frames,
            "dropped_ring": stats.ring_dropped,
            "dropped_queue": stats.queue_dropped,
            "queue": stats.queue_depth,
        }
        if self.options.burn_in:
            info["burn_in_late"] = stats.burn_in_late
        extra = self.extra_info() if self.extra_info is not None else {}
        info.update(extra)
        statuses = [output.status() for output in self.outputs]
        for label_chars, reason_chars in STATUS_CUTS:
            if "out" not in extra:  # a program built on the recorder (the bridge) may say what it sends to
                info["out"] = [status.text(label_chars, reason_chars) for status in statuses] or self.output_label
            try:
                self.reader.set_info(**info)
                return
            except ValueError:  # too long for the reader table: cut the outputs' entries shorter
                continue
            except fb.FrameBrokerError as exc:
                log.debug("publishing recorder status: %s", exc)
                return
        log.debug("recorder status does not fit the reader table even cut short: %s", info)

    # --- the encode thread -----------------------------------------------------------------------------

    def _encode_loop(self) -> None:
        encoder: Optional[Encoder] = None
        try:
            first = self._take()
            if first is _SENTINEL:
                return
            batch = self._rate_sample(first)
            encoder = self._open_encoder(batch)
            ended = False
            for item in batch:
                if item is _SENTINEL:
                    ended = True
                    break
                self._encode(encoder, item)
            while not ended:
                item = self._take()
                if item is _SENTINEL:
                    break
                self._encode(encoder, item)
            encoder.stop()
            encoder = None
        except BaseException as exc:
            self.error = self.error or exc
            self._encoder_failed.set()
            self.request_stop("encoding failed")
            if encoder is not None:
                encoder.abort()
        finally:
            try:
                self.router.close()
            except BaseException as exc:
                self.error = self.error or exc
            self._done.set()

    def _rate_sample(self, first: CapturedFrame) -> list[Optional[CapturedFrame]]:
        """The first few frames (held back at most RATE_SAMPLE_SECONDS) to measure the rate."""
        batch: list[Optional[CapturedFrame]] = [first]
        deadline = time.monotonic() + RATE_SAMPLE_SECONDS
        limit = min(RATE_SAMPLE_FRAMES, max(1, self.queue_limit // 2))
        while len(batch) < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._take(remaining)
            except queue.Empty:
                break
            batch.append(item)
            if item is _SENTINEL:
                break
        return batch

    @staticmethod
    def _measure_fps(batch: list[Optional[CapturedFrame]]) -> float:
        frames = [item for item in batch if item is not None]
        if len(frames) >= 2:
            first, last = frames[0], frames[-1]
            # seq counts every captured frame, so frames dropped in between do not skew the rate.
            elapsed = (last.timestamp_ns - first.timestamp_ns) / 1e9
            if last.seq > first.seq and elapsed > 0:
                fps = (last.seq - first.seq) / elapsed
                if math.isfinite(fps):
                    return round(min(max(fps, 1.0), 240.0), 3)
        return DEFAULT_FPS

    def _open_encoder(self, batch: list[Optional[CapturedFrame]]) -> Encoder:
        first = batch[0]
        assert first is not None
        height, width = first.image.shape[:2]
        self._geometry = (height - height % 2, width - width % 2)
        self._pixel_format = first.pixel_format
        fps = self._measure_fps(batch)
        if self.options.queue_frames is None:
            # Burn-in holds frames up to burn_in_wait longer: the queue grows by as much.
            seconds = QUEUE_SECONDS + (self.options.burn_in_wait if self.options.burn_in else 0.0)
            self.queue_limit = min(round(QUEUE_MAX_FRAMES * seconds / QUEUE_SECONDS), max(2, round(seconds * fps)))
        bitrate = self.options.bitrate_kbps or default_bitrate_kbps(self._geometry[1], self._geometry[0], fps)
        settings = EncoderSettings(
            width=self._geometry[1],
            height=self._geometry[0],
            pixel_format=first.pixel_format,
            fps=fps,
            bitrate_kbps=bitrate,
            keyframe_interval=self.options.keyframe_interval,
        )
        self._keyframes = KeyframeClock(self.options.keyframe_interval)
        encoder = self.spec.create(settings, self.router.deliver)
        self.encoder = encoder
        encoder.start()
        log.info(
            "recording %dx%d %s at %.3g fps, %d kbit/s, keyframe every %g s, encoder %s (%s)",
            settings.width, settings.height, first.pixel_format, fps, bitrate,
            float(self.options.keyframe_interval), self.spec.name, self.spec.description,
        )  # fmt: skip
        self.router.open(StreamInfo(self.reader.stream, settings.width, settings.height, self.spec.name))
        return encoder

    def _conform(self, item: CapturedFrame) -> np.ndarray:
        """The frame as the encoder was opened for: same format, same even size."""
        import cv2

        image = item.image
        if item.pixel_format != self._pixel_format:
            image = _convert(image, item.pixel_format, self._pixel_format)
        height, width = self._geometry
        if image.shape[:2] != (height, width):
            if image.shape[0] - image.shape[0] % 2 == height and image.shape[1] - image.shape[1] % 2 == width:
                image = np.ascontiguousarray(image[:height, :width])  # odd size: drop the last row/column
            else:
                # The camera changed resolution mid-recording: keep one size for the whole file.
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        return image

    def _burn_in(self, item: CapturedFrame) -> None:
        """Draw the --burn-in models' boxes into the frame (its private copy), in the frame's own
        pixels, before it is converted or resized for the encoder."""
        assert self.results is not None
        deadline_ns = item.timestamp_ns + int(self.options.burn_in_wait * 1e9)
        found, late = self.results.for_frame(self.options.burn_in, item.seq, item.timestamp_ns, deadline_ns)
        if late:
            self.stats.burn_in_late += 1
        if found:
            draw_results(item.image, found, item.pixel_format)

    def _encode(self, encoder: Encoder, item: CapturedFrame) -> None:
        stats = self.stats
        first_ns = stats.first_timestamp_ns
        assert first_ns is not None
        pts = pts_from_ns(item.timestamp_ns - first_ns)
        if pts <= self._last_pts:
            # Two frames in the same 1/90000 s, or a clock that stepped back: keep PTS increasing.
            pts = self._last_pts + 1
        self._last_pts = pts
        if self.options.burn_in:
            self._burn_in(item)
        image = self._conform(item)
        if self.options.text or self.options.clock:
            if not image.flags.writeable:
                image = image.copy()
            draw_overlays(image, self.options.text, item.wall_time if self.options.clock else None)
        stamp = FrameStamp(item.seq, item.timestamp_ns, item.wall_time, pts)
        started = time.perf_counter()
        encoder.encode(image, stamp, keyframe=self._keyframes.due(pts))
        stats.encode_seconds.append(time.perf_counter() - started)
        stats.frames_encoded += 1
        stats.queue_depth = self._queue.qsize()


def _convert(image: np.ndarray, source: str, target: str) -> np.ndarray:
    import cv2

    codes = {
        ("gray", "bgr"): cv2.COLOR_GRAY2BGR,
        ("gray", "rgb"): cv2.COLOR_GRAY2RGB,
        ("bgr", "gray"): cv2.COLOR_BGR2GRAY,
        ("rgb", "gray"): cv2.COLOR_RGB2GRAY,
        ("bgr", "rgb"): cv2.COLOR_BGR2RGB,
        ("rgb", "bgr"): cv2.COLOR_RGB2BGR,
    }
    return cv2.cvtColor(image, codes[(source, target)])


__all__ = ["CapturedFrame", "KeyframeClock", "Recorder", "RecorderOptions", "RecorderState", "Stats", "default_bitrate_kbps", "draw_overlays"]
