"""The models' results in a recording: a sidecar beside each file, boxes burnt in, clip rules.

* ``ResultFeed`` follows the models the recording needs (``ModelFollower``: a reader thread per
  model) and keeps each model's results of the last ``history`` seconds, by frame seq. Burn-in
  asks it for a frame's results (``for_frame``, waiting a bounded time); the sidecars and the
  clip rules are handed every result as it arrives (``add_listener``).
* ``Sidecars`` opens a ``ResultSidecar`` for every file an output writes (``-o FILE``, each
  segment, each clip): ``FILE.results.jsonl``, one JSON line per result of a frame in that file,
  with the frame's PTS in the file's own time base. Results arrive after their frames (model
  latency) or, when the encoder is behind, before them: a result is written once its frame is
  in the file, found again in the feed's history when the frame comes later. A file that ends
  keeps its sidecar open until every model has published past its last frame, at most
  ``SETTLE_SECONDS``.
* ``Rule`` is ``--trigger-on MODEL[:LABEL][>=SCORE]``: which results open or extend a clip.
* ``draw_results`` draws boxes into a frame for ``--burn-in``, in the colours the preview uses.

Joining a sidecar to the video needs nothing but ffprobe: each line's ``pts`` is the PTS of its
frame as ``ffprobe -show_frames`` prints it (``time_base`` in the first line says its unit).

A note on threads: results arrive on the feed's model threads; frames reach the sidecars from
the encoder's thread (through the router); burn-in waits on the encode thread; a housekeeping
thread closes sidecars that have settled. The feed's condition guards its history; each
sidecar has a lock of its own. Neither is taken while holding the other, except the feed's
(briefly, to look up history) inside a sidecar's.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import framebroker as fb

from .._models import ModelFollower, model_colour
from .packets import PTS_HZ, FrameStamp

log = logging.getLogger("framebroker.recorder")

# A file's sidecar is closed once every model has published past the file's last frame, or
# this long after the file ended, whichever comes first (s).
SETTLE_SECONDS = 2.0
# A result is written only while its frame is among the last this many seconds of the file:
# a model slower than that is not recording material (s).
FRAME_MEMORY_SECONDS = 10.0
# Results kept per model at most, whatever the history length.
HISTORY_MAX_RESULTS = 5000
# A model's result is drawn on frames it skipped for at most this long (s of capture time).
CARRY_SECONDS = 1.0
# How often settled sidecars are closed (s).
HOUSEKEEPING_PERIOD = 0.25
# The suffix of a sidecar, after the video file's stem.
SIDECAR_SUFFIX = ".results.jsonl"


def sidecar_path(video: Path) -> Path:
    return video.with_suffix(SIDECAR_SUFFIX)


# --- the feed --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameResult:
    """A model's result as drawn on one frame: of that very frame (``exact``) or an earlier one."""

    model: str
    result: fb.Result
    exact: bool


class ResultFeed:
    """The results of ``models`` (None: every model of the stream) for one recording."""

    def __init__(self, stream: str, models: Optional[Sequence[str]], reader_name: str, history: float) -> None:
        self.stream = stream
        self.history_ns = int(history * 1e9)
        self._condition = threading.Condition()
        self._history: Dict[str, "collections.OrderedDict[int, fb.Result]"] = {}
        self._newest: Dict[str, int] = {}
        self._arrived = 0  # results so far
        self._listeners: List[Callable[[fb.Result], None]] = []
        self._tickers: List[Callable[[], None]] = []
        self._stopping = threading.Event()
        self._housekeeper: Optional[threading.Thread] = None
        self.follower = ModelFollower(stream, models, self._on_result, reader_name=reader_name)

    def add_listener(self, on_result: Callable[[fb.Result], None], tick: Optional[Callable[[], None]] = None) -> None:
        """Call ``on_result(result)`` for every result (from a model's thread; thread-safe
        callers only), and ``tick()`` every HOUSEKEEPING_PERIOD. Before ``start()``."""
        self._listeners.append(on_result)
        if tick is not None:
            self._tickers.append(tick)

    def start(self) -> None:
        self.follower.start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="recorder-results", daemon=True)
        self._housekeeper.start()

    def stop(self) -> None:
        """Detach from the models. Safe to call twice."""
        self._stopping.set()
        self.follower.stop()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout=5.0)
        with self._condition:
            self._condition.notify_all()

    def _housekeeping(self) -> None:
        while not self._stopping.wait(HOUSEKEEPING_PERIOD):
            for tick in self._tickers:
                try:
                    tick()
                except Exception:
                    log.exception("closing settled result sidecars failed")

    # --- arriving results ---------------------------------------------------------------------

    def _on_result(self, result: fb.Result) -> None:
        model = result.model
        with self._condition:
            kept = self._history.get(model)
            if kept is None or result.seq <= self._newest.get(model, 0):
                # New, or its writer (or the daemon) started again: its old seqs mean nothing now.
                kept = self._history[model] = collections.OrderedDict()
            kept[result.seq] = result
            oldest = result.timestamp_ns - self.history_ns
            while len(kept) > HISTORY_MAX_RESULTS or next(iter(kept.values())).timestamp_ns < oldest:
                kept.popitem(last=False)
            self._newest[model] = result.seq
            self._arrived += 1
            self._condition.notify_all()
        for listener in self._listeners:
            listener(result)

    # --- looking up ---------------------------------------------------------------------------

    def wait_result(self, timeout: float) -> None:
        """Return when a result arrives (or the feed stops), at the latest after ``timeout`` s."""
        with self._condition:
            arrived = self._arrived
            self._condition.wait_for(lambda: self._arrived != arrived or self._stopping.is_set(), timeout)

    def newest(self) -> Dict[str, int]:
        """Each model's newest seq (the models that published since the feed started)."""
        with self._condition:
            return dict(self._newest)

    def publishing(self) -> frozenset[str]:
        """The models with a live writer, as last listed (at most about a second old)."""
        return self.follower.listed

    def results_of(self, seq: int) -> List[fb.Result]:
        """The results kept for frame ``seq``, every model's."""
        with self._condition:
            return [kept[seq] for kept in self._history.values() if seq in kept]

    def for_frame(self, models: Sequence[str], seq: int, timestamp_ns: int, deadline_ns: int) -> Tuple[List[FrameResult], bool]:
        """What to draw on frame ``seq`` for each of ``models``, waiting until each one that
        publishes has got that far (then its result for the frame is known, or that it skipped
        it) or until ``deadline_ns`` (CLOCK_MONOTONIC). Returns the results, and whether any
        model was still behind at the deadline."""
        with self._condition:

            def decided() -> bool:
                listed = self.follower.listed
                return all(self._newest.get(m, 0) >= seq or m not in listed for m in models)

            timeout = max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9)
            complete = self._condition.wait_for(lambda: self._stopping.is_set() or decided(), timeout)
            found = []
            for model in models:
                kept = self._history.get(model)
                if not kept:
                    continue
                if seq in kept:
                    found.append(FrameResult(model, kept[seq], True))
                    continue
                earlier = next((r for s, r in reversed(kept.items()) if s < seq), None)
                if earlier is not None and timestamp_ns - earlier.timestamp_ns <= CARRY_SECONDS * 1e9:
                    found.append(FrameResult(model, earlier, False))
            return found, not complete


# --- sidecars ------------------------------------------------------------------------------------


def _time_base(container: str) -> Fraction:
    """The time base FFmpeg's muxer gives the video stream of our files (Matroska counts ms)."""
    return Fraction(1, 1000) if container == "matroska" else Fraction(1, PTS_HZ)


class ResultSidecar:
    """``VIDEO.results.jsonl``: the results of the frames in one video file (see the module doc).

    The first line describes the file; each further line is one result: ``seq``, ``pts`` (the
    frame's PTS in the video's time base), ``pts_time`` (s), ``wall_time`` (epoch s of capture),
    ``timestamp_ns`` (capture, CLOCK_MONOTONIC), ``model``, ``latency_ms`` (capture to result)
    and ``data`` (what the model published). Lines come in the order results arrived: in frame
    order per model. Line-buffered, like the video.
    """

    def __init__(self, video: Path, container: str, stream: str, models: Optional[Sequence[str]], feed: ResultFeed) -> None:
        self.path = sidecar_path(video)
        self.models = None if models is None else frozenset(models)
        self.written = 0
        self._feed = feed
        self._time_base = _time_base(container)
        self._lock = threading.Lock()
        self._frames: "collections.OrderedDict[int, FrameStamp]" = collections.OrderedDict()
        self._done: set[tuple[str, int]] = set()  # (model, seq) already written
        self._last_seq = 0
        self._settle_by: Optional[float] = None
        self._file = open(self.path, "w", buffering=1)
        header = {
            "framebroker_results": 1,
            "video": video.name,
            "stream": stream,
            "models": sorted(self.models) if self.models is not None else "all",
            "time_base": f"{self._time_base.numerator}/{self._time_base.denominator}",
            "lines": "one result per line: seq, pts (of its frame, in time_base units, as ffprobe -show_frames "
            "prints it), pts_time, wall_time, timestamp_ns, model, latency_ms, data",
        }
        self._file.write(json.dumps(header) + "\n")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def _pts(self, stamp: FrameStamp) -> int:
        if self._time_base.denominator == PTS_HZ:
            return stamp.pts
        # As FFmpeg rescales packet times: to the nearest unit, halves away from zero.
        return int(Fraction(stamp.pts, PTS_HZ) / self._time_base + Fraction(1, 2))

    def _write(self, result: fb.Result, stamp: FrameStamp) -> None:
        key = (result.model, result.seq)
        if key in self._done or self._file.closed:
            return
        self._done.add(key)
        pts = self._pts(stamp)
        line = {
            "seq": result.seq,
            "pts": pts,
            "pts_time": round(float(pts * self._time_base), 6),
            "wall_time": round(result.wall_time, 6),
            "timestamp_ns": result.timestamp_ns,
            "model": result.model,
            "latency_ms": round(result.latency_ns / 1e6, 3),
            "data": result.data,
        }
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.written += 1

    def _wanted(self, result: fb.Result) -> bool:
        return self.models is None or result.model in self.models

    def frames_written(self, stamps: Sequence[FrameStamp]) -> None:
        """The video file got these frames (the router's thread): write their results so far."""
        if not stamps:
            return
        with self._lock:
            for stamp in stamps:
                if stamp.seq < self._last_seq:  # the daemon restarted: its frames count from 1 again
                    self._frames.clear()
                    self._done.clear()
                self._frames[stamp.seq] = stamp
                self._last_seq = stamp.seq
                for result in self._feed.results_of(stamp.seq):
                    if self._wanted(result):
                        self._write(result, stamp)
            oldest = stamps[-1].timestamp_ns - FRAME_MEMORY_SECONDS * 1e9
            while self._frames and next(iter(self._frames.values())).timestamp_ns < oldest:
                seq, _ = self._frames.popitem(last=False)
                self._done = {key for key in self._done if key[1] > seq}

    def offer(self, result: fb.Result) -> None:
        """A result arrived (a model's thread): written if its frame is in this file."""
        if not self._wanted(result):
            return
        with self._lock:
            stamp = self._frames.get(result.seq)
            if stamp is not None:
                self._write(result, stamp)

    def finish(self) -> None:
        """The video file ended: close once settled (``settle``)."""
        with self._lock:
            if self._settle_by is None:
                self._settle_by = time.monotonic() + SETTLE_SECONDS

    def settle(self, force: bool = False) -> bool:
        """Close if the file ended and every model publishing has got past its last frame (or
        the wait is over, or ``force``); True once closed."""
        with self._lock:
            if self._file.closed:
                return True
            if self._settle_by is None:
                return False
            newest = self._feed.newest()
            models = self._feed.publishing() if self.models is None else self.models & self._feed.publishing()
            if force or time.monotonic() >= self._settle_by or all(newest.get(m, 0) >= self._last_seq for m in models):
                self._file.close()
                return True
            return False


class Sidecars:
    """Makes a ``ResultSidecar`` for each video file, feeds them, and closes them once settled.

    Outputs call ``open(path, container)`` when they start a file; the sidecar is then told of
    every frame written to it and ``finish()``-ed when the file ends."""

    def __init__(self, feed: ResultFeed, stream: str, models: Optional[Sequence[str]]) -> None:
        self.feed = feed
        self.stream = stream
        self.models = models
        self._lock = threading.Lock()
        self._open: List[ResultSidecar] = []
        self.written = 0  # result lines in sidecars that are closed
        feed.add_listener(self._offer, self._tick)

    def open(self, video: Path, container: str) -> ResultSidecar:
        sidecar = ResultSidecar(video, container, self.stream, self.models, self.feed)
        with self._lock:
            self._open.append(sidecar)
        return sidecar

    @property
    def total_written(self) -> int:
        with self._lock:
            return self.written + sum(s.written for s in self._open)

    def _offer(self, result: fb.Result) -> None:
        with self._lock:
            sidecars = list(self._open)
        for sidecar in sidecars:
            sidecar.offer(result)

    def _tick(self, force: bool = False) -> None:
        with self._lock:
            sidecars = list(self._open)
        for sidecar in sidecars:
            if sidecar.settle(force):
                with self._lock:
                    if sidecar in self._open:
                        self._open.remove(sidecar)
                        self.written += sidecar.written

    def close(self, timeout: float = SETTLE_SECONDS) -> None:
        """Wait (up to ``timeout``) for the sidecars of ended files to settle, then close all."""
        deadline = time.monotonic() + timeout
        while True:
            self._tick()
            with self._lock:
                if not self._open:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for sidecar in list(self._open):
                    sidecar.finish()
                self._tick(force=True)
                return
            # A sidecar settles when a model gets past its last frame, or when its wait is over.
            self.feed.wait_result(min(remaining, HOUSEKEEPING_PERIOD))


# --- rules ---------------------------------------------------------------------------------------

_RULE = re.compile(r"(?P<model>[A-Za-z0-9_.-]{1,64})(?::(?P<label>[^>]+?))?(?:>=(?P<score>[^>]+))?")


@dataclass(frozen=True)
class Rule:
    """``MODEL[:LABEL][>=SCORE]``: a result of MODEL with an object (of that label, with at least
    that score) matches. Without LABEL and SCORE any object matches: a result with an empty
    ``objects`` list never does."""

    model: str
    label: Optional[str] = None
    score: Optional[float] = None

    @classmethod
    def parse(cls, text: str) -> "Rule":
        """ValueError naming what is wrong with ``text``."""
        match = _RULE.fullmatch(text.strip())
        if match is None or (match.group("model") or "").strip(".") == "":
            raise ValueError(
                f"--trigger-on {text!r}: give MODEL[:LABEL][>=SCORE], e.g. faces, motion>=0.5 or detector:person>=0.6 "
                "(model names: A-Z a-z 0-9 _ . -)"
            )
        score: Optional[float] = None
        if match.group("score") is not None:
            try:
                score = float(match.group("score"))
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                raise ValueError(f"--trigger-on {text!r}: the score after >= must be a number, got {match.group('score')!r}")
        return cls(match.group("model"), match.group("label"), score)

    def __str__(self) -> str:
        return self.model + (f":{self.label}" if self.label is not None else "") + (f">={self.score:g}" if self.score is not None else "")

    def matches(self, result: fb.Result) -> List[Dict[str, Any]]:
        """The objects of ``result`` that satisfy the rule (none: no match)."""
        if result.model != self.model:
            return []
        found = []
        for item in result.objects:
            if not isinstance(item, dict):
                continue
            if self.label is not None and item.get("label") != self.label:
                continue
            if self.score is not None:
                score = item.get("score")
                if isinstance(score, bool) or not isinstance(score, (int, float)) or not score >= self.score:
                    continue
            found.append(item)
        return found


# --- burn-in -------------------------------------------------------------------------------------


def _colour(model: str, pixel_format: str) -> Any:
    red, green, blue = model_colour(model)
    if pixel_format == "gray":
        return 255
    return (red, green, blue) if pixel_format == "rgb" else (blue, green, red)


def _fill(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, colour: Any) -> None:
    """Paint the pixels x0 <= x < x1, y0 <= y < y1 that lie inside the image."""
    height, width = image.shape[:2]
    image[max(0, y0) : max(0, min(height, y1)), max(0, x0) : max(0, min(width, x1))] = colour


def draw_results(image: np.ndarray, results: Sequence[FrameResult], pixel_format: str) -> None:
    """Draw each result's ``objects`` into ``image`` (in place): a box just outside each one,
    solid for the frame's own result and thin for an earlier one, with its label and score."""
    import cv2

    height, width = image.shape[:2]
    # Thicker than the preview's lines: H.264 keeps colour at half the resolution (4:2:0), and a
    # 2-pixel coloured line comes out of the decoder washed out.
    thickness = max(4, round(width / 240))
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.4, thickness / 4)
    for found in results:
        colour = _colour(found.model, pixel_format)
        dark: Any = 0 if pixel_format == "gray" else (0, 0, 0)
        line = thickness if found.exact else 1
        for item in found.result.objects:
            box = item.get("box") if isinstance(item, dict) else None
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                continue
            try:
                x, y, w, h = (int(round(float(v))) for v in box)
            except (TypeError, ValueError, OverflowError):
                continue
            # The outline lies just outside the box, ``line`` pixels wide on every side (filled
            # bands: cv2.rectangle's thick lines come out wider than asked).
            _fill(image, x - line, y - line, x + w + line, y, colour)
            _fill(image, x - line, y + h, x + w + line, y + h + line, colour)
            _fill(image, x - line, y, x, y + h, colour)
            _fill(image, x + w, y, x + w + line, y + h, colour)
            text = str(item.get("label", ""))[:32]
            score = item.get("score")
            if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
                text = f"{text} {score:.2f}".strip()
            if text:
                (tw, th), base = cv2.getTextSize(text, font, scale, 1)
                top = max(0, y - line - th - base - 2)
                cv2.rectangle(image, (x - line, top), (x - line + tw + 4, top + th + base + 2), dark, -1)
                cv2.putText(image, text, (x - line + 2, top + th + 1), font, scale, colour, 1, cv2.LINE_AA)


__all__ = ["FrameResult", "ResultFeed", "ResultSidecar", "Rule", "Sidecars", "draw_results", "sidecar_path"]
