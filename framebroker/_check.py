"""``framebroker check``: the self-check. Do frames flow, how fast, and how old are they?

It checks either a SOURCE, opened directly with the daemon's own source code (so it needs the
camera to be free), or a NAME, the stream a running daemon serves (attached to as a reader).
Over a few seconds it measures resolution, real frame rate against the configured one, frame
age (capture to arrival) and dropped frames, saves the last frame if asked (``-o``), and prints a
verdict: exit 0 only if frames flow, 1 with the reason otherwise.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ._errors import FrameBrokerError, FrameTimeout, SourceEnded, SourceError
from ._layout import STREAM_NAME_RE, segment_path
from ._reader import Reader
from ._status import describe_stream, state_line
from ._supervision import child_line, describe_supervisors

# Measured fps below this share of the configured rate earns a warning (not a failure).
SLOW_SHARE = 0.8


class CheckFailed(Exception):
    """The verdict is FAIL; the message says why and what to do."""


@dataclass
class Target:
    """What to check: ``kind`` is "source" or "stream"; ``note`` explains an ambiguous choice."""

    kind: str
    text: str
    note: str = ""


def resolve_target(text: str) -> Target:
    """Decide whether ``text`` names a stream or a source (URI, device or file).

    URIs and /dev paths are sources; a valid stream name that a daemon has a segment for is a
    stream (even if a file of that name exists: ``./NAME`` checks the file); anything else that
    exists as a file or looks like a path is a source. A bare word that is neither is an error
    naming both readings, not a guess.
    """
    if "://" in text or text.startswith("/dev/"):
        return Target("source", text)
    is_name = STREAM_NAME_RE.fullmatch(text) is not None and set(text) != {"."}
    if is_name and os.path.exists(segment_path(text)):
        note = f"(a file {text!r} exists too; check it with ./{text})" if os.path.exists(text) else ""
        return Target("stream", text, note)
    if os.path.exists(text) or "/" in text or not is_name:
        return Target("source", text)
    raise CheckFailed(
        f"nothing called {text!r}: no stream of that name is served (framebroker status lists them) and there is "
        f"no file {text!r} here. Give a stream name, a file path, or a source URI such as test:// or /dev/video0."
    )


@dataclass
class Sample:
    arrived_ns: int  # CLOCK_MONOTONIC when the frame reached us
    captured_ns: Optional[int]  # its capture time, if the source or stream gives one
    seq: int = 0


@dataclass
class Report:
    """What a check saw."""

    label: str
    samples: list[Sample] = field(default_factory=list)
    started_ns: int = 0
    opened_ns: int = 0
    shape: tuple[int, ...] = ()
    pixel_format: str = "bgr"
    configured_fps: float = 0.0
    dropped: int = 0
    dropped_how: str = ""
    ended: str = ""
    last_image: Optional[np.ndarray] = None
    notes: list[str] = field(default_factory=list)
    supervisors: list[dict] = field(default_factory=list)  # framebroker up's, for this stream

    def measured_fps(self) -> float:
        """Frames per second of capture time (arrival time when the source gives none)."""
        if len(self.samples) < 2:
            return 0.0
        first, last = self.samples[0], self.samples[-1]
        if first.captured_ns is not None and last.captured_ns is not None and last.captured_ns > first.captured_ns:
            span = last.captured_ns - first.captured_ns
        else:
            span = last.arrived_ns - first.arrived_ns
        # Counting by seq includes frames this check skipped; a daemon restart resets seq.
        count = last.seq - first.seq if last.seq > first.seq > 0 else len(self.samples) - 1
        return count * 1e9 / span if span > 0 else 0.0

    def ages_ms(self) -> list[float]:
        return [(s.arrived_ns - s.captured_ns) / 1e6 for s in self.samples if s.captured_ns is not None]


# --- checking a source directly -----------------------------------------------------------------


def check_source(
    uri: str,
    *,
    seconds: float,
    timeout: float,
    width: Optional[int] = None,
    height: Optional[int] = None,
    fps: Optional[float] = None,
    pixel_format: str = "bgr",
    say: Callable[[str], None] = print,
) -> Report:
    """Open ``uri`` with the daemon's source code and read it for ``seconds``.

    Raises ValueError for a malformed URI (a usage error) and CheckFailed when no frame comes.
    The source is read in a helper thread so that a driver call that never returns still ends
    in a verdict after ``timeout``.
    """
    from .sources import GeometryChanged, make_source, parse_source

    spec = parse_source(uri)
    stop = threading.Event()
    source = make_source(spec, width=width, height=height, fps=fps, pixel_format=pixel_format, stop=stop)
    report = Report(label=f"source {spec.display}", pixel_format=pixel_format)
    say(f"checking {report.label} (opened directly, as framebroker serve would)")
    opened = threading.Event()
    first_frame = threading.Event()
    finished = threading.Event()
    failure: list[BaseException] = []
    report.started_ns = time.monotonic_ns()

    def run() -> None:
        try:
            source.open()
            report.opened_ns = time.monotonic_ns()
            report.configured_fps = source.fps
            opened.set()
            # Two buffers, filled in turn: the other one always holds the last complete frame,
            # even if a read fails half way through filling this one.
            buffers = [np.empty(source.shape, np.uint8), np.empty(source.shape, np.uint8)]
            turn = 0
            while not stop.is_set():
                try:
                    stamp = source.read_into(buffers[turn])
                except GeometryChanged as change:
                    buffers = [np.empty(change.shape, np.uint8), np.empty(change.shape, np.uint8)]
                    continue
                report.samples.append(Sample(time.monotonic_ns(), stamp))
                report.last_image = buffers[turn]
                report.shape = buffers[turn].shape
                turn = 1 - turn
                first_frame.set()
        except SourceEnded as exc:
            report.ended = str(exc)
        except SourceError as exc:
            if not stop.is_set():
                failure.append(exc)
        except Exception as exc:  # an unexpected error still has to end in a verdict
            failure.append(exc)
        finally:
            source.close()
            finished.set()

    reader = threading.Thread(target=run, name="framebroker-check", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not first_frame.is_set() and not finished.is_set() and time.monotonic() < deadline:
            first_frame.wait(0.05)
        if failure:
            raise CheckFailed(_describe_failure(failure[0], spec.display))
        if not first_frame.is_set():
            if report.ended:
                raise CheckFailed(f"{spec.display} ended before its first frame: {report.ended}")
            if not opened.is_set():
                raise CheckFailed(
                    f"{spec.display} did not open within {timeout:g} s (a camera or network that does not answer); "
                    "check the device or address, or allow longer with --timeout"
                )
            raise CheckFailed(
                f"no frame from {spec.display} within {timeout:g} s after opening it; "
                "is the camera busy with another program, or the stream paused? (--timeout allows longer)"
            )
        finished.wait(seconds)
        if failure:
            raise CheckFailed(f"{spec.display} failed after {len(report.samples)} frames: {_describe_failure(failure[0], spec.display)}")
    finally:
        stop.set()
        reader.join(timeout=5.0)
    if reader.is_alive():
        report.notes.append("the source did not close within 5 s after the check (a driver call that hangs)")
    period_ns = 1e9 / report.configured_fps if report.configured_fps else 0.0
    stamps = [s.captured_ns for s in report.samples if s.captured_ns is not None]
    if not source.may_drop_frames:
        report.dropped_how = f"{spec.kind} frames are made on a schedule: a late one is late, not lost"
    elif period_ns and len(stamps) > 1:
        # The daemon's rule: a gap of more than 1.5 frame periods between capture times is
        # frames the source lost.
        report.dropped = sum(round((b - a) / period_ns) - 1 for a, b in zip(stamps, stamps[1:]) if b - a > 1.5 * period_ns)
        report.dropped_how = "from gaps in capture times"
    return report


def _describe_failure(exc: BaseException, display: str) -> str:
    if isinstance(exc, SourceError):
        return str(exc)
    return f"{display}: unexpected {type(exc).__name__}: {exc}"


# --- checking a stream --------------------------------------------------------------------------


def check_stream(name: str, *, seconds: float, timeout: float, say: Callable[[str], None] = print) -> Report:
    """Attach to stream ``name`` as a reader called "check" and take every frame for ``seconds``."""
    report = Report(label=f"stream {name}")
    before = describe_stream(name)
    detail = f" (served by pid {before['pid']} from {before['source'] or '?'})" if "pid" in before else ""
    say(f"checking {report.label}{detail}, attached as a reader")
    if before["state"] == "dead" or before.get("alive") is False:
        raise CheckFailed(f"stream {name} {state_line(before)}")
    report.configured_fps = before.get("configured_fps") or 0.0
    report.started_ns = time.monotonic_ns()
    try:
        # hold=2: asking for the next frame gives back the one before it, and the last one taken
        # must still be there for the snapshot when the next never comes.
        reader = Reader(name, name="check", hold=2)
    except FrameBrokerError as exc:
        raise CheckFailed(str(exc)) from None
    with reader:
        report.opened_ns = time.monotonic_ns()
        frame = None
        measure_until: Optional[float] = None
        wait = timeout
        while True:
            try:
                frame = reader.next(timeout=wait)
            except FrameTimeout:
                if frame is None:
                    now = describe_stream(name)
                    raise CheckFailed(
                        f"no frame from stream {name} within {timeout:g} s: it is {state_line(now)}. "
                        "Look at the daemon's log, or check its source directly while the daemon is stopped"
                    ) from None
                break
            except SourceEnded as exc:
                report.ended = str(exc)
                break
            report.samples.append(Sample(time.monotonic_ns(), frame.timestamp_ns, frame.seq))
            report.shape = frame.shape
            report.pixel_format = frame.format
            now_s = time.monotonic()
            if measure_until is None:
                measure_until = now_s + seconds
            if now_s >= measure_until:
                break
            wait = max(0.001, measure_until - now_s)
        if frame is None:
            raise CheckFailed(f"stream {name} ended before its first frame: {report.ended}")
        report.last_image = frame.copy()
    after = describe_stream(name)
    seqs = [s.seq for s in report.samples]
    missed = sum(b - a - 1 for a, b in zip(seqs, seqs[1:]) if b > a + 1)
    at_source = (after.get("source_drops") or 0) - (before.get("source_drops") or 0)
    report.dropped = max(0, at_source)
    report.dropped_how = "at the source during the check"
    if missed:
        report.notes.append(f"this check skipped {missed} frame{'s' if missed > 1 else ''} of the stream (it reads the newest frame, so a busy machine skips)")
    if "configured_fps" in after:
        report.configured_fps = after["configured_fps"] or report.configured_fps
    report.supervisors = describe_supervisors(name)
    return report


# --- the verdict --------------------------------------------------------------------------------


def summarize(report: Report, snapshot: Optional[str], say: Callable[[str], None] = print) -> tuple[bool, list[str]]:
    """Print what was measured; return (frames flow, warnings)."""
    count = len(report.samples)
    height, width = report.shape[:2] if report.shape else (0, 0)
    measured = report.measured_fps()
    first = report.samples[0].arrived_ns if report.samples else 0
    if report.opened_ns:
        say(f"  opened in {(report.opened_ns - report.started_ns) / 1e9:.2f} s; first frame {(first - report.opened_ns) / 1e9:.2f} s later")
    span = (report.samples[-1].arrived_ns - first) / 1e9 if count > 1 else 0.0
    configured = f"{report.configured_fps:g}" if report.configured_fps else "unknown"
    say(f"  {width}x{height} {report.pixel_format}; {count} frames in {span:.1f} s: {measured:.1f} fps measured, {configured} configured")
    ages = report.ages_ms()
    warnings: list[str] = []
    if ages and any(age > 0 for age in ages):
        median = statistics.median(ages)
        say(f"  frame age on arrival (capture to here): median {median:.1f} ms, max {max(ages):.1f} ms")
        period_ms = 1000.0 / (report.configured_fps or measured or 30.0)
        if median > 3 * period_ms and median > 50:
            warnings.append(
                f"frames are {median:.0f} ms old on arrival, more than 3 frame periods: something buffers them "
                "(a decoder or network jitter buffer, or an overloaded machine)"
            )
    else:
        say("  frame age: unknown (the source gives no capture time)")
    if report.dropped_how:
        say(f"  dropped frames: {report.dropped} ({report.dropped_how})")
    for note in report.notes:
        say(f"  note: {note}")
    if report.ended:
        say(f"  the source ended during the check: {report.ended}")
    if snapshot:
        say(f"  snapshot: {snapshot}")
    warnings += _supervised(report, say)
    if report.configured_fps and count > 1 and not report.ended and measured < SLOW_SHARE * report.configured_fps:
        warnings.append(
            f"measured {measured:.1f} fps is {measured / report.configured_fps:.0%} of the configured {report.configured_fps:g}: "
            "the camera delivers fewer frames (low light lengthens exposure; USB bandwidth; CPU load)"
        )
    return count > 0, warnings


def _supervised(report: Report, say: Callable[[str], None]) -> list[str]:
    """Say what framebroker up runs for the stream; a child that is not running is a warning
    (frames may flow while the recorder keeps dying)."""
    warnings = []
    for supervisor in report.supervisors:
        if "error" in supervisor:
            say(f"  supervisor: {supervisor['error']}")
            continue
        if not supervisor["alive"]:
            warnings.append(f"framebroker up pid {supervisor['pid']} ({supervisor.get('config', '?')}) is gone: nothing restarts this stream's processes")
            continue
        say(f"  supervised by framebroker up pid {supervisor['pid']} ({supervisor.get('config', '?')}):")
        for child in supervisor["children"]:
            say(f"    {child_line(child)}")
            if child["state"] not in ("running", "finished"):
                warnings.append(child_line(child))
    return warnings


__all__ = ["CheckFailed", "Report", "Target", "check_source", "check_stream", "resolve_target", "summarize"]
