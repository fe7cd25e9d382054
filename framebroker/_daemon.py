"""``framebroker serve``: the daemon that owns a camera and feeds its ring.

It runs in the foreground (systemd-friendly), logs to stderr, retries a failing source with
exponential backoff while ``status`` shows ``reconnecting`` and why, follows a source that
comes back at another resolution, and on SIGTERM/SIGINT stops cleanly, leaving nothing in
/dev/shm.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Optional

from ._errors import SourceEnded, SourceError
from ._layout import RingLayout
from ._publisher import DEFAULT_SLOTS, Publisher, check_shape
from ._retry_log import RetryLog
from ._segment import resolve_group
from ._status import describe_readers
from .sources import GeometryChanged, Source, make_source, parse_source

log = logging.getLogger("framebroker.serve")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0


class Daemon:
    """One stream: a source, a Publisher, and the loop between them."""

    def __init__(
        self,
        source_uri: str,
        name: str = "cam0",
        *,
        width: Optional[int] = None,
        height: Optional[int] = None,
        fps: Optional[float] = None,
        pixel_format: str = "bgr",
        slots: int = DEFAULT_SLOTS,
        group: Optional[str] = None,
    ) -> None:
        self.stop = threading.Event()
        self.spec = parse_source(source_uri)
        self.source: Source = make_source(
            self.spec, width=width, height=height, fps=fps, pixel_format=pixel_format, stop=self.stop
        )
        # Everything that can be wrong with the arguments is found here, before anything starts,
        # so the CLI can report it as a usage error (exit 2).
        check_shape(self.source.provisional_shape(), pixel_format)
        RingLayout.compute(slots, 0)
        resolve_group(group)
        self.name = name
        self.pixel_format = pixel_format
        self.slots = slots
        self.group = group
        self.publisher: Optional[Publisher] = None
        self._known_readers: dict[tuple[int, int], str] = {}
        self._next_reader_scan = 0.0

    def request_stop(self, signum: int = 0, frame: Optional[FrameType] = None) -> None:
        self.stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        """Serve until stopped (0), until a finite source ends (0); errors at start raise."""
        source = self.source
        self.publisher = Publisher(
            self.name,
            source.provisional_shape(),
            source.requested_fps or 0.0,
            format=self.pixel_format,
            slots=self.slots,
            group=self.group,
            source=self.spec.display,
        )
        publisher = self.publisher
        publisher.set_info(format=self.pixel_format, group=self.group or "", slots=self.slots)
        log.info(
            "serving %s as stream %r (%d slots, %s)",
            self.spec.display,
            self.name,
            publisher.slots,
            f"group {self.group}, mode 0660" if self.group else "private, mode 0600",
        )
        try:
            return self._loop(publisher)
        finally:
            source.close()
            publisher.close()
            log.info("stopped; removed /dev/shm/framebroker.%s", self.name)

    def _loop(self, publisher: Publisher) -> int:
        source = self.source
        backoff = BACKOFF_FIRST
        attempt = 0
        retry_log = RetryLog(log, self.spec.display, BACKOFF_MAX)
        while not self.stop.is_set():
            try:
                source.open()
            except SourceError as exc:
                if self.stop.is_set():
                    break
                attempt += 1
                reason = f"{exc} (attempt {attempt}, next in {backoff:.1f} s)"
                retry_log.failed(str(exc), attempt, backoff)
                publisher.set_state("reconnecting" if attempt > 1 or publisher.seq else "starting", reason)
                if self.stop.wait(backoff):
                    break
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            retry_log.opened()
            log.info(
                "source open: %dx%d %s at %s fps",
                source.shape[1],
                source.shape[0],
                self.pixel_format,
                f"{source.fps:g}" if source.fps else "unknown",
            )
            publisher.set_geometry(source.shape, self.pixel_format)
            publisher.set_fps(source.fps)
            try:
                self._pump(publisher)
                backoff = BACKOFF_FIRST
            except SourceEnded as exc:
                log.info("source ended: %s", exc)
                publisher.set_state("ended", str(exc))
                return 0
            except SourceError as exc:
                source.close()
                if self.stop.is_set():
                    break
                attempt = 1
                reason = f"{exc} (next attempt in {backoff:.1f} s)"
                log.warning("source failed: %s", reason)
                publisher.set_state("reconnecting", reason)
                if self.stop.wait(backoff):
                    break
                backoff = min(backoff * 2, BACKOFF_MAX)
        publisher.set_state("stopped", "stopped by signal")
        return 0

    def _pump(self, publisher: Publisher) -> None:
        """Move frames from the source into the ring until the source fails or we stop."""
        source = self.source
        previous_ns = 0
        first = True
        while not self.stop.is_set():
            writer = publisher.slot()
            try:
                with writer as buffer:
                    stamp = source.read_into(buffer)
                    writer.timestamp_ns = stamp
            except GeometryChanged as change:
                log.info("source changed size to %dx%d", change.shape[1], change.shape[0])
                publisher.set_geometry(change.shape, self.pixel_format)
                continue
            if first:
                log.info("first frame published")
                first = False
            stamp_ns = writer.timestamp_ns or 0
            period_ns = 1e9 / source.fps if source.fps else 0.0
            if source.may_drop_frames and previous_ns and period_ns and stamp_ns - previous_ns > 1.5 * period_ns:
                publisher.add_source_drops(round((stamp_ns - previous_ns) / period_ns) - 1)
            previous_ns = stamp_ns
            self._log_reader_changes(publisher)

    def _log_reader_changes(self, publisher: Publisher) -> None:
        now = time.monotonic()
        if now < self._next_reader_scan:
            return
        self._next_reader_scan = now + 1.0
        current = {}
        for reader in describe_readers(publisher._segment):  # type: ignore[arg-type]
            current[(reader["pid"], reader["generation"])] = f"pid {reader['pid']} {reader['name']!r}"
        for key in current.keys() - self._known_readers.keys():
            log.info("reader attached: %s", current[key])
        for key in self._known_readers.keys() - current.keys():
            log.info("reader left: %s", self._known_readers[key])
        self._known_readers = current
