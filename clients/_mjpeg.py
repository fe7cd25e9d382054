"""One JPEG encoder feeding any number of MJPEG viewers (the browser preview's picture).

``JpegHub`` owns a reader thread: while at least one viewer watches, it takes the newest frame
of the stream, encodes it to JPEG once, and hands that one JPEG to every viewer, as a
``Picture`` that also carries the frame's seq and capture time (so a viewer can match the
models' results to the very frame it shows). With nobody
watching it encodes nothing, and after ``idle_detach`` seconds it detaches from the stream, so
an unwatched preview neither costs CPU nor keeps a reader slot reserved.

A note on locking: one condition variable guards the newest JPEG, its number, the viewer
count, the counters and the state message. The reader thread is the only one that touches
the ``fb.Reader`` (a Reader is for one thread) and the only one that encodes; viewer threads
only wait on the condition and copy a reference to the newest JPEG.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple, Optional

import framebroker as fb

from ._hub import ViewerHub

log = logging.getLogger("framebroker.view")

# How often the reader thread looks again for a stream that is not served (seconds).
RETRY_ATTACH = 1.0
# Longest single wait for a frame, so that stop() and viewers leaving are noticed (seconds).
FRAME_WAIT = 0.5
# Seconds without a frame before the page says the stream has stalled, and why.
STALL_NOTICE = 2.0


class Picture(NamedTuple):
    """One encoded frame: ``number`` counts the hub's JPEGs; ``seq`` and ``timestamp_ns`` are
    the frame's own."""

    number: int
    seq: int
    timestamp_ns: int
    jpeg: bytes


class JpegHub(ViewerHub):
    """The newest frame of ``stream`` as JPEG, encoded once per frame for all viewers."""

    THREAD_NAME = "framebroker-view-encoder"

    def __init__(self, stream: str, *, quality: int = 80, max_fps: float = 15.0, idle_detach: float = 3.0, reader_name: str = "view") -> None:
        super().__init__()
        self.stream = stream
        self.quality = quality
        self.min_interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self.idle_detach = idle_detach
        self.reader_name = reader_name
        self._picture: Optional[Picture] = None  # the newest JPEG
        self._number = 0  # counts JPEGs made; viewers ask for one newer than the last they sent
        self._encodes = 0
        self._sent = 0
        self._encode_seconds = 0.0
        self._message = "no viewer yet: the preview attaches to the stream when a browser shows the picture"

    # --- viewers ------------------------------------------------------------------------------

    def wait_newer(self, after: int, timeout: float) -> Optional[Picture]:
        """The newest picture once it is newer than number ``after``; None on timeout or stop."""
        with self._condition:
            ready = self._condition.wait_for(lambda: self._stopping or self._number > after, timeout)
            if not ready or self._stopping:
                return None
            return self._picture

    def count_sent(self) -> None:
        with self._condition:
            self._sent += 1

    def stats(self) -> dict[str, Any]:
        with self._condition:
            return {
                "stream": self.stream,
                "viewers": self._viewers,
                "jpeg_encodes": self._encodes,
                "frames_sent": self._sent,
                "encode_seconds": round(self._encode_seconds, 6),
                "seq": self._picture.seq if self._picture is not None else 0,
                "message": self._message,
                "quality": self.quality,
                "max_fps": round(1.0 / self.min_interval, 3) if self.min_interval else 0,
            }

    # --- the reader thread --------------------------------------------------------------------

    def _set_message(self, text: str) -> None:
        with self._condition:
            self._message = text

    def _wait_for_viewers(self, reader: Optional[fb.Reader]) -> Optional[fb.Reader]:
        """Sleep while nobody watches; detach once that has lasted ``idle_detach`` seconds."""
        idle_since = time.monotonic()
        with self._condition:
            while not self._stopping and self._viewers == 0:
                remaining = self.idle_detach - (time.monotonic() - idle_since)
                if reader is not None and remaining <= 0:
                    reader.close()
                    reader = None
                    self._message = "no viewer: detached from the stream until a browser shows the picture"
                self._condition.wait(None if reader is None else max(remaining, 0.01))
        return reader

    def _run(self) -> None:
        reader: Optional[fb.Reader] = None
        next_info = 0.0
        next_frame_at = 0.0
        last_frame_at = time.monotonic()
        try:
            while True:
                reader = self._wait_for_viewers(reader)
                if self._stopping:
                    return
                if reader is None:
                    reader = self._attach()
                    last_frame_at = time.monotonic()
                    if reader is None:
                        with self._condition:
                            self._condition.wait_for(lambda: self._stopping, RETRY_ATTACH)
                        continue
                delay = next_frame_at - time.monotonic()
                if delay > 0:
                    # Pacing to --max-fps: the next frame taken is the newest one at that time.
                    with self._condition:
                        self._condition.wait_for(lambda: self._stopping, delay)
                    continue
                try:
                    frame = reader.next(timeout=FRAME_WAIT)
                except fb.FrameTimeout as exc:
                    # A slow stream is not a stalled one: say so only after a few quiet seconds.
                    if time.monotonic() - last_frame_at > STALL_NOTICE:
                        self._set_message(str(exc))
                    continue
                except fb.SourceEnded as exc:
                    self._set_message(f"{exc}; the picture resumes when a daemon serves {self.stream!r} again")
                    reader.close()
                    reader = None
                    continue
                last_frame_at = time.monotonic()
                # On a fixed schedule, not "interval after this frame": the wait for the next
                # frame would otherwise add up to a frame period to every interval.
                next_frame_at = max(next_frame_at + self.min_interval, last_frame_at - self.min_interval)
                with self._condition:
                    watched = self._viewers > 0
                if not watched:  # the last viewer left while we waited for this frame
                    frame.release()
                    continue
                self._encode(frame)
                if time.monotonic() >= next_info:
                    next_info = time.monotonic() + 1.0
                    with self._condition:
                        viewers, encodes = self._viewers, self._encodes
                    reader.set_info(viewers=viewers, jpeg_encodes=encodes)
        except Exception:
            log.exception("the preview's encoder thread failed")
            self._set_message("the preview's encoder failed (see its log); restart framebroker view")
        finally:
            if reader is not None:
                reader.close()

    def _attach(self) -> Optional[fb.Reader]:
        try:
            reader = fb.Reader(self.stream, name=self.reader_name)
        except fb.StreamNotFound as exc:
            self._set_message(f"{exc} The picture appears by itself once it is served.")
            return None
        except fb.FrameBrokerError as exc:
            self._set_message(f"cannot attach to stream {self.stream!r}: {exc}")
            return None
        self._set_message("")
        log.info("attached to stream %r", self.stream)
        return reader

    def _encode(self, frame: fb.Frame) -> None:
        import cv2  # heavy: imported where used

        started = time.perf_counter()
        with frame:
            image = frame.array
            if frame.format == "rgb":
                image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            seq, timestamp_ns = frame.seq, frame.timestamp_ns
        spent = time.perf_counter() - started
        if not ok:
            self._set_message(f"OpenCV could not encode frame {seq} as JPEG")
            return
        jpeg = encoded.tobytes()
        with self._condition:
            self._number += 1
            self._picture = Picture(self._number, seq, timestamp_ns, jpeg)
            self._encodes += 1
            self._encode_seconds += spent
            self._message = ""
            self._condition.notify_all()
