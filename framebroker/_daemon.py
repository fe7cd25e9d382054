"""``framebroker serve``: the daemon that owns a camera and feeds its ring.

It runs in the foreground (systemd-friendly), logs to stderr, retries a failing source with
exponential backoff while ``status`` shows ``reconnecting`` and why, follows a source that
comes back at another resolution, and on SIGTERM/SIGINT stops cleanly, leaving nothing in
/dev/shm. A file is replayed (``_replay.py``): at a pace, in lockstep with its readers, with
the recording's own seqs and results.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Dict, Optional, Sequence, Tuple, Union

from ._derive import DeriveSpec, Derivations, check_derivations
from ._errors import FrameBrokerError, SourceEnded
from ._layout import MAX_SLOTS, RingLayout
from ._publisher import AUTO_SLOTS, DEFAULT_SLOTS, SHRINK_AFTER, Publisher, check_shape
from ._replay import Replay
from ._retry_log import RetryLog
from ._segment import resolve_group
from ._status import describe_readers
from .sources import GeometryChanged, Source, SourceRenumbered, make_source, parse_source
from .sources._file import FileSource

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
        slots: Union[int, str] = AUTO_SLOTS,
        group: Optional[str] = None,
        max_shm: Optional[int] = None,
        shrink_after: float = SHRINK_AFTER,
        pace: Optional[str] = None,
        wait_readers: int = 0,
        results: Optional[str] = None,
        derive: Sequence[DeriveSpec] = (),
    ) -> None:
        """``pace``, ``wait_readers`` and ``results`` (a path, or "" for the sidecar next to the
        file) are for file sources: see ``_replay.py``."""
        self.stop = threading.Event()
        self.spec = parse_source(source_uri)
        self.source: Source = make_source(
            self.spec, width=width, height=height, fps=fps, pixel_format=pixel_format, stop=self.stop, pace=pace
        )
        self.source.stream = name
        # Everything that can be wrong with the arguments is found here, before anything starts,
        # so the CLI can report it as a usage error (exit 2).
        check_shape(self.source.provisional_shape(), pixel_format)
        RingLayout.compute(DEFAULT_SLOTS if slots == AUTO_SLOTS else slots, 0)  # type: ignore[arg-type]
        resolve_group(group)
        self.replay: Optional[Replay] = None
        if isinstance(self.source, FileSource):
            most = (MAX_SLOTS if slots == AUTO_SLOTS else slots) - 2  # type: ignore[operator]
            if not 0 <= wait_readers <= most:
                raise ValueError(f"--wait-readers {wait_readers}: with --slots {slots} at most {most} readers can attach")
            self.replay = Replay(self.source, self.stop, wait_readers=wait_readers, results=results)
        elif wait_readers or results is not None:
            raise ValueError(f"--wait-readers and --results are for files; {self.spec.display} is a live source")
        self.derive = check_derivations(name, derive, slots)
        self.name = name
        self.pixel_format = pixel_format
        self.slots = slots
        self.group = group
        self.max_shm = max_shm
        self.shrink_after = shrink_after
        self.publisher: Optional[Publisher] = None
        self._known_readers: Dict[Tuple[int, int, int], str] = {}
        self._next_reader_scan = 0.0
        self._published_since_open = False

    def request_stop(self, signum: int = 0, frame: Optional[FrameType] = None) -> None:
        self.stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        """Serve until stopped (0), until a finite source ends (0); errors at start raise."""
        replay = self.replay
        if replay is not None:
            replay.load()  # a damaged index or results file is reported before anything is served
        self.publisher = publisher = self._new_publisher()
        log.info(
            "serving %s as stream %r (%d slots, %s)",
            self.spec.display,
            self.name,
            publisher.slots,
            f"group {self.group}, mode 0660" if self.group else "private, mode 0600",
        )
        derived: Optional[Derivations] = None
        try:
            if replay is not None:
                replay.start(publisher)
            # Derived streams read the main one like any reader: the loop below does not know them.
            derived = Derivations(
                publisher, self.derive, slots=self.slots, group=self.group, max_shm=self.max_shm, shrink_after=self.shrink_after
            )
            return self._loop(publisher)
        finally:
            if replay is not None:
                replay.close()
            self._close_source()
            if derived is not None:
                derived.close()
            self.publisher.close()
            log.info("stopped; removed /dev/shm/framebroker.%s", self.name)

    def _new_publisher(self) -> Publisher:
        source = self.source
        publisher = Publisher(
            self.name,
            source.provisional_shape(),
            source.requested_fps or 0.0,
            format=self.pixel_format,
            slots=self.slots,
            group=self.group,
            max_shm=self.max_shm,
            shrink_after=self.shrink_after,
            source=self.spec.display,
        )
        publisher.set_info(format=self.pixel_format, group=self.group or "", slots=self.slots)
        return publisher

    def _loop(self, publisher: Publisher) -> int:
        """Open the source, pump its frames, and on any failure retry with backoff until stopped.

        Whatever the source raises, the daemon stays up: a ``SourceError`` is the source saying
        what is wrong (unplugged, server gone); anything else (``cv2.error``, ``OSError``, a bug)
        is logged with its traceback and counted (``source_errors`` in status), then handled the
        same way (as is a ``ShmSpaceError`` when the source grew and ``/dev/shm`` is full). Only
        ``SourceEnded`` (a finite file) and the stop signal end the loop. ``RetryLog`` says once
        that it retries and logs the following attempts at debug level (status shows each one),
        so a camera that is plugged in an hour later does not flood the log.
        """
        source = self.source
        backoff = BACKOFF_FIRST
        failures = 0  # in a row, since frames last flowed
        retry_log = RetryLog(log, self.spec.display, BACKOFF_MAX)
        while not self.stop.is_set():
            self._published_since_open = False
            try:
                source.open()
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
                self._show_source_info(publisher)
                self._pump(publisher)
            except SourceEnded as exc:
                log.info("source ended: %s", exc)
                if self.replay is not None and not self.replay.drain(publisher):
                    break  # stopped while the last frame waited for its readers
                publisher.set_state("ended", str(exc))
                return 0
            except SourceRenumbered as exc:
                # As when a daemon restarts: a new ring, which readers attach to by themselves.
                log.info("%s: serving a new ring", exc)
                self._close_source()
                publisher.close()
                self.publisher = publisher = self._new_publisher()
            except Exception as exc:  # noqa: BLE001 - the daemon outlives whatever its source does
                self._close_source()
                if self.stop.is_set():
                    break
                known = isinstance(exc, FrameBrokerError)  # SourceError, or ShmSpaceError on a resize
                if not known:
                    publisher.add_source_error()
                    log.error("the source raised an unexpected error; treating it as a failure and retrying", exc_info=True)
                if self._published_since_open:
                    failures, backoff = 0, BACKOFF_FIRST
                failures += 1
                what = str(exc) if known else f"unexpected {type(exc).__name__}: {exc}"
                retry_log.failed(what, failures, backoff)
                reason = f"{what} (attempt {failures}, next in {backoff:.1f} s)"
                publisher.set_state("reconnecting" if publisher.seq or failures > 1 else "starting", reason)
                self._show_source_info(publisher)
                if self.stop.wait(backoff):
                    break
                backoff = min(backoff * 2, BACKOFF_MAX)
        publisher.set_state("stopped", "stopped by signal")
        return 0

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception:  # noqa: BLE001 - a source that cannot even close must not end the daemon
            log.warning("closing the source failed", exc_info=True)

    def _pump(self, publisher: Publisher) -> None:
        """Move frames from the source into the ring until the source fails or we stop."""
        source = self.source
        replay = self.replay
        previous_ns = 0
        first = True
        while not self.stop.is_set():
            writer = publisher.slot()
            try:
                with writer as buffer:
                    stamp = source.read_into(buffer)
                    writer.timestamp_ns = stamp
                    if replay is not None:
                        replay.before_publish(publisher, writer)
                    if source.frame_origin is not None:  # another machine's frame: its seq and wall time
                        writer.seq, writer.wall_time = source.frame_origin
            except GeometryChanged as change:
                log.info("source changed size to %dx%d", change.shape[1], change.shape[0])
                publisher.set_geometry(change.shape, self.pixel_format)
                continue
            if replay is not None:
                replay.after_publish(publisher)
            if first:
                log.info("first frame published")
                first = False
                self._published_since_open = True
            stamp_ns = writer.timestamp_ns or 0
            period_ns = 1e9 / source.fps if source.fps else 0.0
            if source.may_drop_frames and previous_ns and period_ns and stamp_ns - previous_ns > 1.5 * period_ns:
                publisher.add_source_drops(round((stamp_ns - previous_ns) / period_ns) - 1)
            previous_ns = stamp_ns
            self._log_reader_changes(publisher)

    def _show_source_info(self, publisher: Publisher) -> None:
        info = self.source.info()
        if info:
            try:
                publisher.set_info(**info)
            except ValueError as exc:  # more than the header holds: status goes without it
                log.debug("source info not shown in status: %s", exc)

    def _log_reader_changes(self, publisher: Publisher) -> None:
        now = time.monotonic()
        if now < self._next_reader_scan:
            return
        self._next_reader_scan = now + 1.0
        self._show_source_info(publisher)
        current = {}
        for reader in describe_readers(publisher._segment):  # type: ignore[arg-type]
            current[(reader["pid"], reader["entry"], reader["generation"])] = f"pid {reader['pid']} {reader['name']!r}"
        for key in current.keys() - self._known_readers.keys():
            log.info("reader attached: %s", current[key])
        for key in self._known_readers.keys() - current.keys():
            log.info("reader left: %s", self._known_readers[key])
        self._known_readers = current
