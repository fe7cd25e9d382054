"""Derived streams: the daemon resizes and converts each frame once, for every model that needs it.

``framebroker serve SOURCE --derive lores=640x360:rgb --derive det=640x640:rgb:letterbox``
publishes ``cam0.lores`` and ``cam0.det`` beside ``cam0``: rings of their own, which readers open
like any stream. A derived frame carries its main frame's ``seq``, ``timestamp_ns`` and
``wall_time``; how it was drawn from the main frame (``_placement.py``) is in its ring's header,
so ``frame.source_box(box)`` maps what a model found back to the main frame's pixels.

How it stays off the main stream's path. Each derived stream is a ``Deriver``: a thread of the
daemon with a ``Reader`` of the main stream and a ``Publisher`` of its own ring. The daemon
publishes each main frame exactly as without deriving, and the reader wakes like any other; it
then holds the main frame under a lease while it converts it (within its slot budget: one frame,
so a fixed ring needs a slot per derived stream, and a growing one grows by itself). Resizing and
colour conversion run in OpenCV, which releases the GIL, so the main thread keeps capturing on
another core while a derived frame is drawn. A deriver that takes longer than a frame period
takes the newest frame each time it is ready (``Reader.next``): it skips frames and counts them as
its ring's source drops (``skipped`` in status), and nothing waits for it.

Why a lease and not a copy: copying a 1080p BGR frame out for a deriver costs about as much as
converting it (``bench/derive_cost.py`` measures both), and it would have to be made on the main
thread, before the next capture; the lease costs a lock and a few microseconds, on the deriver's
own thread.

A note on threads: one per derived stream. Each runs only while it converts, so two derived
streams convert at once on two cores, and a slow one (a large letterbox) holds back nobody but
itself. They run at a lower priority (nice +10, per thread): a derived frame arrives when a
core is free, never ahead of the capture thread or of the main stream's readers, which wake at
the same moment. OpenCV's own thread pool is set to one thread in a daemon that derives (unless
``OPENCV_FOR_THREADS_NUM`` says otherwise): split over the pool, a resize costs more CPU in all
and takes the cores the capture thread needs at the moment a frame is published
(``bench/derive_cost.py`` measures both).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._errors import FrameTimeout, SourceEnded
from ._layout import StreamState, validate_stream_name
from ._placement import INFO_KEY, MODES, PLACEMENTS_KEPT, Placement
from ._publisher import Publisher
from ._reader import Reader

log = logging.getLogger("framebroker.derive")

FORMATS = ("bgr", "rgb", "gray")
SPEC_FORM = "NAME=WxH[:bgr|rgb|gray][:stretch|letterbox|crop]"
SPEC_EXAMPLE = "lores=640x360:rgb or det=640x640:rgb:letterbox"
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")  # no dot: a derived stream is MAIN.NAME, split at the last dot
MAX_SIDE = 16384
# How long a deriver waits for a main frame before it looks whether it should stop (s): the
# daemon's stop waits at most this plus one conversion.
STOP_CHECK = 0.25
RATE_EVERY = 1.0  # how often a deriver copies the main stream's frame rate (s)
NICENESS = 10  # how much lower than the daemon's the derivers' scheduling priority is (see the note on threads)
ERROR_LOG_EVERY = 10.0  # a conversion that keeps failing is logged at most this often (s)


@dataclass(frozen=True)
class DeriveSpec:
    """One ``--derive NAME=WxH[:FORMAT][:MODE]``."""

    name: str
    width: int
    height: int
    format: str = "bgr"
    mode: str = "stretch"

    @classmethod
    def parse(cls, text: str) -> "DeriveSpec":
        """The spec ``text`` means; ValueError saying what is wrong and what to write."""
        if not isinstance(text, str):
            raise TypeError(f"a derived stream is given as text such as {SPEC_EXAMPLE!r}, not {type(text).__name__}")
        name, equals, rest = text.partition("=")
        if not equals:
            raise ValueError(f"{text!r}: write {SPEC_FORM}, for example {SPEC_EXAMPLE}")
        if not NAME_RE.fullmatch(name):
            raise ValueError(
                f"{text!r}: the name {name!r} must be 1-32 characters from A-Z a-z 0-9 _ - "
                f"(it becomes the stream MAIN.{name or 'NAME'}); write {SPEC_FORM}"
            )
        size, *options = rest.split(":")
        found = re.fullmatch(r"(\d+)x(\d+)", size)
        if found is None:
            raise ValueError(f"{text!r}: {size!r} is not a size: write WxH in pixels, for example 640x360")
        width, height = int(found.group(1)), int(found.group(2))
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise ValueError(f"{text!r}: width and height must be between 1 and {MAX_SIDE} pixels, got {size}")
        chosen: Dict[str, str] = {}
        for option in options:
            kind = "format" if option in FORMATS else "mode" if option in MODES else None
            if kind is None:
                raise ValueError(
                    f"{text!r}: {option!r} is neither a format ({', '.join(FORMATS)}) nor a mode "
                    f"({', '.join(MODES)}); write {SPEC_FORM}"
                )
            if kind in chosen:
                raise ValueError(f"{text!r}: two {kind}s ({chosen[kind]} and {option}); give one")
            chosen[kind] = option
        return cls(name, width, height, chosen.get("format", "bgr"), chosen.get("mode", "stretch"))

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.height, self.width) if self.format == "gray" else (self.height, self.width, 3)

    def __str__(self) -> str:
        return f"{self.name}={self.width}x{self.height}:{self.format}:{self.mode}"


def check_derivations(main: str, specs: Sequence[DeriveSpec], slots: Union[int, str]) -> List[DeriveSpec]:
    """The derived streams of ``main``, checked before anything starts (ValueError: a usage error)."""
    names = set()
    for spec in specs:
        if spec.name in names:
            raise ValueError(f"two derived streams are called {spec.name!r}: give each --derive its own NAME")
        names.add(spec.name)
        stream = f"{main}.{spec.name}"
        if len(stream) > 64:
            raise ValueError(f"derived stream {stream!r} has a name longer than 64 characters: shorten --name or the NAME of --derive {spec}")
        validate_stream_name(stream)
    # Each deriver holds the main frame it converts: one slot of a fixed ring each, and a reader
    # must still fit (a growing ring makes room by itself).
    if specs and isinstance(slots, int) and slots - 2 < len(specs) + 1:
        raise ValueError(
            f"--slots {slots} leaves no room for readers: each derived stream holds one frame of the main ring while "
            f"it converts it; use --slots {len(specs) + 3} or more (or auto)"
        )
    return list(specs)


class Drawing:
    """Draws main frames into derived frames for one spec (resize, then convert the colours:
    fewer pixels to convert when shrinking). Bilinear (``cv2.INTER_LINEAR``), what detectors' own
    preprocessing uses; letterbox bars are black."""

    def __init__(self, spec: DeriveSpec) -> None:
        import cv2  # heavy: imported where used

        self._cv2 = cv2
        self.spec = spec
        self._scratch: Optional[np.ndarray] = None

    def placement(self, shape: Tuple[int, ...]) -> Placement:
        return Placement.fit((shape[1], shape[0]), (self.spec.width, self.spec.height), self.spec.mode)

    def draw(self, image: np.ndarray, image_format: str, placement: Placement, out: np.ndarray) -> None:
        """Draw ``image`` (a main frame in ``image_format``) into ``out`` (a derived frame)."""
        cv2 = self._cv2
        sx, sy, sw, sh = placement.source
        tx, ty, tw, th = placement.target
        region = image[sy : sy + sh, sx : sx + sw]
        target = out[ty : ty + th, tx : tx + tw]
        if image_format == self.spec.format:
            cv2.resize(region, (tw, th), dst=target, interpolation=cv2.INTER_LINEAR)
        else:
            resized = self._scratch_for((th, tw) + region.shape[2:])
            cv2.resize(region, (tw, th), dst=resized, interpolation=cv2.INTER_LINEAR)
            # COLOR_BGR2RGB, COLOR_RGB2GRAY, COLOR_GRAY2BGR, ...: every pair of the three formats.
            cv2.cvtColor(resized, getattr(cv2, f"COLOR_{image_format.upper()}2{self.spec.format.upper()}"), dst=target)
        if (tx, ty, tw, th) != (0, 0, out.shape[1], out.shape[0]):
            # Letterbox bars, every time: the slot may hold a frame drawn with another placement.
            out[:ty] = 0
            out[ty + th :] = 0
            out[ty : ty + th, :tx] = 0
            out[ty : ty + th, tx + tw :] = 0

    def _scratch_for(self, shape: Tuple[int, ...]) -> np.ndarray:
        scratch = self._scratch
        if scratch is None or scratch.shape != shape:
            scratch = self._scratch = np.empty(shape, np.uint8)
        return scratch


def _state_of(publisher: Publisher) -> Tuple[str, str]:
    # The state the daemon reports for the main stream, and why. Publisher has no public getter
    # for what set_state() set; this module runs in the daemon, beside that Publisher.
    return StreamState.NAMES[publisher._stream_state], publisher._reason  # noqa: SLF001


class Deriver:
    """One derived stream: a thread that reads the main stream and publishes into its own ring.

    Made and closed on the daemon's main thread; between ``start()`` and ``close()`` only its
    own thread touches its Reader and Publisher.
    """

    _publisher: Optional[Publisher] = None
    _reader: Optional[Reader] = None

    def __init__(self, main: Publisher, spec: DeriveSpec, ring: Dict[str, Any]) -> None:
        self.spec = spec
        self.stream = f"{main.stream}.{spec.name}"
        self._main = main
        self._drawing = Drawing(spec)
        self._placements: List[List[int]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_error_log = 0.0
        self._publisher = Publisher(
            self.stream, spec.shape, 0.0, format=spec.format, source=f"{main.stream}, {spec}", **ring
        )  # its rate: the main stream's, copied once frames flow
        try:
            self._publisher.set_info(
                format=spec.format,
                group=ring.get("group") or "",
                slots=ring.get("slots"),
                **{INFO_KEY: self._derived_info([])},
            )
            # Attached now, before the first main frame: the derived stream starts with it.
            self._reader = Reader(main.stream, name=f"derive {spec.name}")
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"framebroker-derive-{self.spec.name}", daemon=True)
        self._thread.start()

    def stop_soon(self) -> None:
        """Ask the thread to stop (``close`` waits for it)."""
        self._stop.set()

    def close(self) -> None:
        """Stop the thread (it ends within ``STOP_CHECK`` and one conversion), leave the main
        stream, report the main stream's final state and remove the ring. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # never a timeout: the thread may be writing into the ring
            self._thread = None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            state, reason = _state_of(self._main)
            if state == "ended":
                publisher.set_state("ended", reason)
            else:
                publisher.set_state("stopped", reason if state == "stopped" else f"stream {self._main.stream!r} is stopping")
            publisher.close()
            log.info("%s: stopped, its ring removed", self.stream)

    def _run(self) -> None:
        reader, publisher = self._reader, self._publisher
        assert reader is not None and publisher is not None
        try:
            # Linux schedules threads on their own: this lowers this thread, not the daemon.
            thread = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + NICENESS)
        except OSError:
            log.debug("%s: could not lower the deriving thread's priority", self.stream, exc_info=True)
        last_seq = 0
        shape: Tuple[int, ...] = ()
        placement = Placement((0, 0, 1, 1), (0, 0, 1, 1))  # replaced before the first frame
        next_rate = 0.0
        while not self._stop.is_set():
            try:
                frame = reader.next(timeout=STOP_CHECK)
            except FrameTimeout:
                self._follow_main_state(publisher)
                continue
            except SourceEnded as exc:
                publisher.set_state("ended", str(exc))
                return
            except Exception:  # noqa: BLE001 - a derived stream that fails must not end the daemon
                self._log_failure("reading the main stream")
                self._stop.wait(STOP_CHECK)
                continue
            try:
                with frame:
                    if frame.shape != shape:
                        changed = self._drawing.placement(frame.shape)
                        self._record_placement(publisher, frame.seq, changed)
                        shape, placement = frame.shape, changed
                    if last_seq and frame.seq > last_seq + 1:
                        publisher.add_source_drops(frame.seq - last_seq - 1)
                    writer = publisher.slot(frame.timestamp_ns)
                    with writer as out:
                        writer.seq, writer.wall_time = frame.seq, frame.wall_time
                        self._drawing.draw(frame.array, frame.format, placement, out)
                last_seq = frame.seq
            except Exception:  # noqa: BLE001 - as above; the frame counts as skipped
                self._log_failure(f"drawing frame {frame.seq}")
                continue
            now = time.monotonic()
            if now >= next_rate:
                next_rate = now + RATE_EVERY
                publisher.set_fps(reader.fps)

    def _log_failure(self, what: str) -> None:
        """With its traceback, at most every ERROR_LOG_EVERY seconds: a failure that repeats with
        every frame must not flood the log."""
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY:
            self._last_error_log = now
            log.error("%s: %s failed; going on with the next frame", self.stream, what, exc_info=True)

    def _record_placement(self, publisher: Publisher, seq: int, placement: Placement) -> None:
        """Write the placement into the ring's header before the first frame drawn with it."""
        placements = (self._placements + [placement.as_record(seq)])[-PLACEMENTS_KEPT:]
        publisher.set_info(**{INFO_KEY: self._derived_info(placements)})
        self._placements = placements
        if len(self._placements) > 1:
            sx, sy, sw, sh = placement.source
            tx, ty, tw, th = placement.target
            log.info("%s: from frame %d, main %dx%d+%d+%d drawn at %dx%d+%d+%d", self.stream, seq, sw, sh, sx, sy, tw, th, tx, ty)

    def _derived_info(self, placements: List[List[int]]) -> Dict[str, Any]:
        """What the ring's header says about this derived stream (``_placement.py``)."""
        return {"from": self._main.stream, "name": self.spec.name, "mode": self.spec.mode, "placements": placements}

    def _follow_main_state(self, publisher: Publisher) -> None:
        """No main frame for a while: say what the main stream says (reconnecting, and why)."""
        state, reason = _state_of(self._main)
        if state in ("starting", "reconnecting"):
            publisher.set_state(state, reason)


class Derivations:
    """Every derived stream of a daemon's main stream: made, started and closed together."""

    def __init__(self, main: Publisher, specs: Sequence[DeriveSpec], **ring: Any) -> None:
        self.derivers: List[Deriver] = []
        if specs and "OPENCV_FOR_THREADS_NUM" not in os.environ:
            import cv2

            cv2.setNumThreads(1)  # see "A note on threads" above
        try:
            for spec in specs:
                self.derivers.append(Deriver(main, spec, ring))
                log.info("deriving stream %r: %dx%d %s, %s", self.derivers[-1].stream, spec.width, spec.height, spec.format, spec.mode)
        except BaseException:
            self.close()
            raise
        for deriver in self.derivers:
            deriver.start()

    def close(self) -> None:
        for deriver in self.derivers:
            deriver.stop_soon()
        for deriver in self.derivers:
            deriver.close()
        self.derivers = []
