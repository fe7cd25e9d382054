"""What a framebroker recording leaves beside its video, read back for a replay.

* The **index** ``<stem>.csv`` (the recorder writes one per segment and clip, and for
  ``-o FILE --index``): one row per frame, columns ``seq, pts, pts_time, wall_time,
  timestamp_ns``, ``pts`` in 90 kHz ticks as the video file carries them. ``RecordingIndex``
  finds a decoded frame's row by its PTS, so the replay can publish it under its original
  ``seq`` and ``wall_time``.
* The **results sidecar** (``record --results``): JSON lines, one result per line, at least
  ``{"seq", "pts", "pts_time", "wall_time", "model", "data"}``, next to the video as
  ``<file>.results.jsonl`` or ``<stem>.results.jsonl``. ``RecordedResults`` groups them by
  seq, for republishing on the same frames.

Both are read whole when the daemon starts, so a damaged file is reported before anything is
served, naming the line.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._errors import SourceError
from .._layout import validate_model_name
from .._results import encode_result

log = logging.getLogger("framebroker.serve")

PTS_HZ = 90_000
INDEX_COLUMNS = ("seq", "pts", "pts_time", "wall_time", "timestamp_ns")
# How far a decoded frame's PTS may be from its index row. Matroska keeps milliseconds while the
# index keeps 90 kHz ticks, so rows and frames differ by up to half a millisecond there.
PTS_TOLERANCE_TICKS = 90


def index_path(video: str) -> Path:
    """Where the recorder puts a video's index: the same name with ``.csv``."""
    return Path(video).with_suffix(".csv")


def results_candidates(video: str) -> List[Path]:
    """Where a video's results sidecar may be, in the order they are tried."""
    path = Path(video)
    return [Path(str(path) + ".results.jsonl"), path.with_suffix(".results.jsonl")]


@dataclass(frozen=True)
class RecordedFrame:
    """A frame as the recording's index describes it."""

    seq: int
    wall_time: float


class RecordingIndex:
    """A recording's index: which ``seq`` and ``wall_time`` the frame at each PTS had."""

    def __init__(self, path: Path, rows: List[Tuple[int, int, float]]) -> None:
        self.path = path
        rows.sort()
        self._pts = [pts for pts, _seq, _wall in rows]
        self._frames = [RecordedFrame(seq, wall) for _pts, seq, wall in rows]

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def span_s(self) -> float:
        """Seconds from the first frame's PTS to the last one's."""
        return (self._pts[-1] - self._pts[0]) / PTS_HZ if self._pts else 0.0

    def find(self, pts_ticks: int) -> Optional[RecordedFrame]:
        """The row of the frame shown at ``pts_ticks`` (90 kHz), None if the index has none."""
        pts = self._pts
        at = bisect.bisect_left(pts, pts_ticks)
        best = None
        for candidate in (at - 1, at):
            if 0 <= candidate < len(pts) and abs(pts[candidate] - pts_ticks) <= PTS_TOLERANCE_TICKS:
                if best is None or abs(pts[candidate] - pts_ticks) < abs(pts[best] - pts_ticks):
                    best = candidate
        return None if best is None else self._frames[best]

    @classmethod
    def beside(cls, video: str) -> Optional["RecordingIndex"]:
        """The index next to ``video``, None if there is none; SourceError if it is damaged."""
        path = index_path(video)
        if not path.is_file():
            return None
        lines, cut = _read_lines(path, "the recording's index")
        header = next(csv.reader(lines[:1]), None)
        if header is None or tuple(column.strip() for column in header[: len(INDEX_COLUMNS)]) != INDEX_COLUMNS:
            log.warning(
                "%s is not a framebroker index (its first line is not %s): frames get new seqs and wall times",
                path,
                ",".join(INDEX_COLUMNS),
            )
            return None
        if cut:
            # A number cut short still parses (as another number): never trust that line.
            _cut_short(path, len(lines))
            lines.pop()
        rows = []
        for number, row in enumerate(csv.reader(lines[1:]), start=2):
            if not row:
                continue
            try:
                rows.append((int(row[1]), int(row[0]), float(row[3])))
            except (IndexError, ValueError):
                raise SourceError(
                    f"{path}, line {number}: expected seq,pts,pts_time,wall_time,timestamp_ns as numbers, "
                    f"got {','.join(row)[:80]!r}: repair the line, or move the index away to replay without it"
                ) from None
        return cls(path, rows) if rows else None


def _read_lines(path: Path, what: str) -> Tuple[List[str], bool]:
    """The lines of a sidecar, and whether the last one lacks its newline (a recorder killed
    mid-line leaves one, which is not damage: the caller ignores it, with a warning)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            lines = handle.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    cut = bool(lines[-1])
    if not cut:
        lines.pop()
    return [line.rstrip("\r") for line in lines], cut


def _cut_short(path: Path, number: int) -> None:
    log.warning("%s: line %d, the last, is cut short (the recorder was killed?): ignored", path, number)


class RecordedResults:
    """A recording's results sidecar: each model's results, by the seq of their frame."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_seq: Dict[int, List[Tuple[str, Dict[str, Any]]]] = {}
        self.count = 0
        self._load()

    @property
    def models(self) -> List[str]:
        return sorted({model for results in self.by_seq.values() for model, _data in results})

    @classmethod
    def find(cls, video: str, given: str) -> "RecordedResults":
        """The sidecar ``given`` (a path), or, when it is empty, the one next to ``video``."""
        if given:
            path = Path(given)
            if not path.is_file():
                raise SourceError(f"results file not found: {given} (--results PATH names a .results.jsonl file)")
            return cls(path)
        candidates = results_candidates(video)
        for path in candidates:
            if path.is_file():
                return cls(path)
        raise SourceError(
            f"no recorded results next to {video}: looked for {' and '.join(str(p) for p in candidates)}; "
            "record with framebroker record --results, or name the file: --results PATH"
        )

    def _load(self) -> None:
        path = self.path
        seen: Dict[Tuple[int, str], int] = {}
        lines, cut = _read_lines(path, "the results file")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                parsed = self._parse(line, number)
            except SourceError:
                if cut and number == len(lines):
                    _cut_short(path, number)
                    break
                raise
            if parsed is None:
                continue  # the recorder's header line (what the file is, its time base)
            seq, model, data = parsed
            first = seen.setdefault((seq, model), number)
            if first != number:
                raise SourceError(
                    f"{path}, line {number}: a second result of model {model!r} for frame {seq} (the first is on line "
                    f"{first}): keep one of them"
                )
            self.by_seq.setdefault(seq, []).append((model, data))
            self.count += 1

    def _parse(self, line: str, number: int) -> Optional[Tuple[int, str, Dict[str, Any]]]:
        where = f"{self.path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise SourceError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected a JSON object with seq, model and data")
        if number == 1 and "framebroker_results" in record:
            return None
        seq, model, data = record.get("seq"), record.get("model"), record.get("data")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise SourceError(f"{where}: \"seq\" must be a frame number >= 1, got {seq!r}")
        try:
            validate_model_name(model)
        except (TypeError, ValueError) as exc:
            raise SourceError(f"{where}: {exc}") from None
        try:
            encode_result(data)  # what the results channel takes: a JSON object of at most 64 KiB
        except (TypeError, ValueError) as exc:
            raise SourceError(f"{where}: \"data\": {exc}") from None
        return seq, model, data


__all__ = ["RecordedFrame", "RecordedResults", "RecordingIndex", "index_path", "results_candidates"]
