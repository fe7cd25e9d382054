"""Event clips: the seconds before a trigger, from an in-memory ring of encoded keyframe groups.

``PreRollOutput`` is an output like a file: the router hands it every encoded packet. It keeps the
packets of the last ``pre_roll`` seconds as groups that each start with a keyframe (megabytes of
H.264, not gigabytes of raw frames), always reaching back to a keyframe at least ``pre_roll``
seconds before the newest packet. An event opens a clip: a trigger (``fb.trigger()`` from any
process, through the recorder's ``TriggerInbox``), or a model's result that matches a
``--trigger-on`` rule. The clip starts at the newest keyframe that is at least ``pre_roll``
seconds before the event's moment (for a result: the capture of the frame the model saw it on,
not when inference finished), holds the buffered groups from there, then the live packets until
``post_roll`` seconds after the last event: an event that arrives while a clip is open extends
it instead of starting another.

Each clip is ``DIR/<stream>-<UTC start>-<label>.ts`` with ``.csv`` (seq, PTS, wall time per frame,
as for segments), with ``record --results`` a ``.results.jsonl``, and ``.json`` (the events that
made it, its span, the encoder, how much pre-roll it got).

A note on threads: packets arrive from the encoder's thread through the router (one at a time);
events arrive from the recorder's trigger thread and the models' threads and are only queued
here (``add_event``), then placed on the packets' timeline by the packet thread, which owns all
other state. So the buffer and the open clip are touched by one thread only.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import framebroker as fb

from .outputs import FileOutput, Output, OutputError, OutputStatus, segment_stamp
from .packets import PTS_HZ, EncodedPacket, StreamInfo, pts_from_ns
from .results import Sidecars, sidecar_path

log = logging.getLogger("framebroker.recorder")

# A trigger naming a frame that has not been encoded yet waits at most this long for it (s of
# stream time past the trigger's own moment) before it is placed by its timestamp instead.
SEQ_WAIT_SECONDS = 2.0
# History kept beyond the pre-roll, so that a trigger about a moment up to this long ago (an ML
# process's latency, the encoder queue) still gets its full pre-roll.
HISTORY_MARGIN_SECONDS = 2.0
# Events listed in a clip's .json at most (a rule matching every frame of a long clip would list
# thousands); the .json also says how many there were.
MAX_EVENTS_LISTED = 1000


def _label_for_file(label: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._")[:32]
    return cleaned or "event"


@dataclass(frozen=True)
class ClipEvent:
    """Something that opens or extends a clip: a trigger, or a result that matched a rule.

    ``seq`` and ``timestamp_ns`` name the moment (the frame, its capture time); ``record`` is
    what the clip's .json lists about the event; ``announce`` logs it at INFO (a result
    matching on every frame would flood the log: those go to DEBUG)."""

    label: str
    timestamp_ns: int
    seq: Optional[int]
    post_roll: Optional[float]
    record: dict
    announce: bool = True

    @classmethod
    def from_trigger(cls, trigger: fb.Trigger) -> "ClipEvent":
        return cls(trigger.label, trigger.timestamp_ns, trigger.seq, trigger.post_roll, trigger.to_json())


@dataclass
class _Clip:
    path: Path
    output: FileOutput
    start_pts: int
    end_pts: int
    pre_roll_seconds: float  # how far before the first trigger the clip really starts
    triggers: list[dict] = field(default_factory=list)
    events: int = 0  # all of them, listed in triggers or not
    frames: int = 0
    last_pts: int = 0
    first_wall: float = 0.0
    last_wall: float = 0.0


class PreRollOutput(Output):
    """Keeps ``pre_roll`` seconds of packets and writes a clip around each trigger (see module doc)."""

    def __init__(self, directory: Union[str, Path], prefix: str, pre_roll: float, post_roll: float, results: Optional[Sidecars] = None) -> None:
        super().__init__()
        if not pre_roll >= 0 or not post_roll >= 0:
            raise ValueError(f"pre-roll and post-roll must be >= 0 s, got {pre_roll} and {post_roll}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.pre_roll = float(pre_roll)
        self.post_roll = float(post_roll)
        self._results = results
        self._pre_ticks = round(self.pre_roll * PTS_HZ)
        self._keep_ticks = round((self.pre_roll + HISTORY_MARGIN_SECONDS) * PTS_HZ)
        self._groups: "collections.deque[list[EncodedPacket]]" = collections.deque()
        self._bytes = 0
        self._pending: "collections.deque[ClipEvent]" = collections.deque()  # from other threads
        self._waiting: list[ClipEvent] = []  # naming frames not encoded yet
        self._clip: Optional[_Clip] = None
        self._info: Optional[StreamInfo] = None
        self._newest: Optional[EncodedPacket] = None
        self.clips: list[Path] = []
        self.triggers_received = 0

    def describe(self) -> str:
        return f"clips in {self.directory} (pre-roll {self.pre_roll:g} s, post-roll {self.post_roll:g} s)"

    # --- what status shows ------------------------------------------------------------------------

    @property
    def held_seconds(self) -> float:
        """Seconds of video in the buffer, from its oldest keyframe to its newest packet."""
        if not self._groups or self._newest is None:
            return 0.0
        return (self._newest.pts - self._groups[0][0].pts) / PTS_HZ

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def status(self) -> OutputStatus:
        shown = super().status()
        if shown.state != "writing":
            return shown
        return OutputStatus(shown.label, "writing clip" if self._clip is not None else "buffering", shown.kbps)

    # --- the trigger thread ----------------------------------------------------------------------------

    def add_trigger(self, trigger: fb.Trigger) -> None:
        """Queue a trigger; the packet thread places it."""
        self.add_event(ClipEvent.from_trigger(trigger))

    def add_event(self, event: ClipEvent) -> None:
        """Queue an event, from any thread; the packet thread places it (deque.append is
        thread-safe)."""
        self.triggers_received += 1
        self._pending.append(event)

    # --- the packet thread -------------------------------------------------------------------------------

    def _start(self, info: StreamInfo) -> None:
        if not self.directory.is_dir():
            raise OutputError(f"clip directory {self.directory} does not exist")
        self._info = info

    def _write(self, packet: EncodedPacket) -> None:
        self._newest = packet
        if packet.keyframe or not self._groups:
            self._groups.append([packet])
        else:
            self._groups[-1].append(packet)
        self._bytes += len(packet.data)
        self._trim()
        before = self._clip
        # Triggers first, so one that extends the open clip is seen before this packet could end
        # it. A clip opened now already holds this packet (it is in the buffer).
        if self._pending or self._waiting:
            self._place_triggers(packet)
        clip = self._clip
        if clip is not None and clip is before:
            if packet.pts > clip.end_pts:
                self._finish()
            else:
                self._clip_write(clip, packet)

    def _trim(self) -> None:
        """Drop the oldest group while the next one still starts pre_roll (+ margin) before the newest packet."""
        newest = self._newest
        assert newest is not None
        groups = self._groups
        while len(groups) > 1 and groups[1][0].pts <= newest.pts - self._keep_ticks:
            dropped = groups.popleft()
            self._bytes -= sum(len(p.data) for p in dropped)

    def _trigger_pts(self, trigger: ClipEvent, packet: EncodedPacket) -> Optional[int]:
        """The trigger's moment on the recording's PTS timeline; None while its frame is still to come."""
        if trigger.seq is not None:
            for group in reversed(self._groups):
                for candidate in reversed(group):
                    for stamp in candidate.frames:
                        if stamp.seq == trigger.seq:
                            return stamp.pts
            newest_seq = packet.frames[-1].seq if packet.frames else 0
            if trigger.seq > newest_seq and self._stream_ns(packet) - trigger.timestamp_ns < SEQ_WAIT_SECONDS * 1e9:
                return None
        # By its timestamp, relative to the newest frame (same host, same CLOCK_MONOTONIC).
        reference = packet.frames[-1] if packet.frames else None
        if reference is None:
            return packet.pts
        return reference.pts + pts_from_ns(trigger.timestamp_ns - reference.timestamp_ns)

    @staticmethod
    def _stream_ns(packet: EncodedPacket) -> int:
        return packet.frames[-1].timestamp_ns if packet.frames else 0

    def _place_triggers(self, packet: EncodedPacket) -> None:
        incoming = self._waiting + [self._pending.popleft() for _ in range(len(self._pending))]
        self._waiting = []
        for trigger in incoming:
            pts = self._trigger_pts(trigger, packet)
            if pts is None:
                self._waiting.append(trigger)
                continue
            self._apply(trigger, pts)

    def _apply(self, trigger: ClipEvent, pts: int) -> None:
        post_roll = self.post_roll if trigger.post_roll is None else trigger.post_roll
        end_pts = pts + round(post_roll * PTS_HZ)
        record = {**trigger.record, "pts": pts, "pts_time": round(pts / PTS_HZ, 6)}
        clip = self._clip
        if clip is not None and pts <= clip.end_pts:
            clip.end_pts = max(clip.end_pts, end_pts)
            clip.events += 1
            if len(clip.triggers) < MAX_EVENTS_LISTED:
                clip.triggers.append(record)
            log.log(
                logging.INFO if trigger.announce else logging.DEBUG,
                "%r extends clip %s to %.2f s", trigger.label, clip.path.name, (clip.end_pts - clip.start_pts) / PTS_HZ,
            )  # fmt: skip
            return
        if clip is not None:
            self._finish()
        self._open(trigger, pts, end_pts, record)

    def _open(self, trigger: ClipEvent, pts: int, end_pts: int, record: dict) -> None:
        groups = list(self._groups)
        # The newest group that starts at least pre_roll before the trigger; the oldest we have if
        # the recording is younger than that (the .json then says how much pre-roll there is).
        start = 0
        for index, group in enumerate(groups):
            if group[0].pts <= pts - self._pre_ticks:
                start = index
        first = groups[start][0]
        assert self._info is not None
        wall = first.frames[0].wall_time if first.frames else time.time()
        stem = f"{self.prefix}-{segment_stamp(wall)}-{_label_for_file(trigger.label)}"
        path = self.directory / f"{stem}.ts"
        serial = 0
        while path.exists():
            serial += 1
            path = self.directory / f"{stem}-{serial}.ts"
        output = FileOutput(path, index=True, results=self._results)
        output.start(self._info)
        clip = _Clip(path, output, first.pts, end_pts, (pts - first.pts) / PTS_HZ, [record], events=1)
        self._clip = clip
        log.info("%r: clip %s from %.2f s before it", trigger.label, path.name, clip.pre_roll_seconds)
        for group in groups[start:]:
            for packet in group:
                if packet.pts > end_pts:
                    break
                self._clip_write(clip, packet)

    def _clip_write(self, clip: _Clip, packet: EncodedPacket) -> None:
        clip.output.write(packet)
        clip.frames += len(packet.frames)
        clip.last_pts = packet.pts
        if packet.frames:
            clip.first_wall = clip.first_wall or packet.frames[0].wall_time
            clip.last_wall = packet.frames[-1].wall_time

    def _finish(self) -> None:
        clip, self._clip = self._clip, None
        if clip is None:
            return
        clip.output.stop()
        assert self._info is not None
        summary: dict[str, Any] = {
            "stream": self._info.stream,
            "encoder": self._info.encoder,
            "file": clip.path.name,
            "index": clip.path.with_suffix(".csv").name,
            "start_pts": clip.start_pts,
            "end_pts": clip.last_pts,
            "duration_s": round((clip.last_pts - clip.start_pts) / PTS_HZ, 6),
            "start_wall_time": clip.first_wall,
            "end_wall_time": clip.last_wall,
            "frames": clip.frames,
            "pre_roll_requested_s": self.pre_roll,
            "pre_roll_s": round(clip.pre_roll_seconds, 6),
            "triggers": clip.triggers,
            "triggers_total": clip.events,
        }
        if self._results is not None:
            summary["results"] = sidecar_path(clip.path).name
        clip.path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        self.clips.append(clip.path)
        log.info("clip %s written: %.2f s, %d frame(s), %d event(s)", clip.path.name, summary["duration_s"], clip.frames, clip.events)

    def _stop(self) -> None:
        self._finish()
        self._groups.clear()
        self._bytes = 0


__all__ = ["PreRollOutput"]
