"""What ``framebroker serve FILE`` adds to the daemon's loop: a recording served as a stream.

* **Pace** (``--pace``): ``realtime`` follows the file's PTS (the source waits, ``sources/_file.py``);
  ``max`` decodes flat out; ``lockstep`` publishes frame N+1 only once every ordered reader has
  released frame N and asked for the next (``Publisher.wait_until_consumed``). Lockstep is the
  one place where framebroker's producer waits for readers, and only because the user asked:
  an offline run of a model over a clip, where every frame matters and time does not. Readers
  in ``latest()``/``next()`` mode never hold it back; one that dies or detaches stops holding
  it back at once.
* ``--wait-readers K`` holds the first frame until K readers are attached (any pace).
* **The recording's own numbering**: a file recorded by framebroker has an index beside it
  (``sources/_recording.py``); each frame is published under the ``seq`` and ``wall_time`` it
  had when it was captured. ``timestamp_ns`` stays this machine's CLOCK_MONOTONIC at publish,
  so latency arithmetic (result time minus capture time) keeps working.
* ``--results``: the results the recording kept are republished on their seqs through one
  ``ResultWriter`` per model, each right after its frame.
* **Status**: the pace, the position in the file, and in lockstep whom the stream waits for, in
  the stream's ``info.replay`` (``framebroker status``).

The waits happen between decoding a frame into its slot and publishing it, so decoding the
next frame overlaps with the readers' work on the current one; they wake every ``WAIT_STEP``
to honour the stop event, so SIGTERM ends a replay that waits for a stuck reader at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional

from ._errors import SourceError
from ._publisher import Publisher, SlotWriter
from ._results import ResultWriter
from .sources._file import FilePosition, FileSource
from .sources._recording import RecordedResults, RecordingIndex, index_path

log = logging.getLogger("framebroker.serve")

WAIT_STEP = 0.05  # seconds between looks at the stop event while waiting for readers
REPORT_AFTER = 0.25  # a wait for readers longer than this is shown in status, and who is waited for
REPORT_EVERY = 1.0
STATUS_PERIOD = 0.25  # the position in status is refreshed this often
LISTED_READERS = 3  # the stream's info has 1 KiB: name the first few readers waited for


class Replay:
    """The replay side of one daemon: ``load()`` before serving, ``start(publisher)``, then for
    each frame ``before_publish`` (inside the slot) and ``after_publish``; ``drain`` at the end
    of the file; ``close()``."""

    def __init__(self, source: FileSource, stop: threading.Event, *, wait_readers: int = 0, results: Optional[str] = None) -> None:
        self.source = source
        self.stop = stop
        self.pace = source.pace
        self.wait_readers = wait_readers
        self.results_option = results  # None: not asked; "": the sidecar next to the file
        self.index: Optional[RecordingIndex] = None
        self.results: Optional[RecordedResults] = None
        self._writers: Dict[str, ResultWriter] = {}
        self._first_published = False
        self._recorded_seq = 0  # the recording's seq of the frame being published, 0 if none
        self._renumbered_logged = False
        self._status_due = 0.0
        self._position: Optional[FilePosition] = None  # of the frame published last
        self._waiting: Dict[str, Any] = {}
        self.recorded_frames = 0
        self.results_published = 0
        self.results_failed = 0

    # --- start and end ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the recording's index and, with ``--results``, its results (``SourceError`` naming
        what is wrong), before anything is served."""
        path = self.source.spec.target
        self.index = RecordingIndex.beside(path)
        if self.results_option is not None:
            self.results = RecordedResults.find(path, self.results_option)
            if self.index is None:
                raise SourceError(
                    f"--results needs the recording's index, {index_path(path)}, which gives each frame the seq its "
                    "results refer to, and there is none: record with framebroker record --index (segments and "
                    "clips always have one)"
                )
        what = [f"pace {self.pace}"]
        if self.index is not None:
            what.append(f"{len(self.index)} frames keep their recorded seq and wall time ({self.index.path})")
        if self.results is not None:
            what.append(f"{self.results.count} results of {', '.join(self.results.models) or 'no model'} republished ({self.results.path})")
        if self.wait_readers:
            what.append(f"the first frame waits for {self.wait_readers} reader(s)")
        log.info("replaying %s: %s", self.source.spec.display, "; ".join(what))

    def start(self, publisher: Publisher) -> None:
        """Open a results writer per recorded model (the stream exists now) and show the pace."""
        if self.results is not None:
            for model in self.results.models:
                self._writers[model] = ResultWriter(publisher.stream, model)
        self._show(publisher)

    def drain(self, publisher: Publisher) -> bool:
        """At the end of the file: in lockstep, wait until the last frame was taken too. False if
        the daemon was stopped meanwhile."""
        if self.pace == "lockstep" and publisher.seq and not self._wait_until_consumed(publisher):
            return False
        self._show(publisher)
        log.info(
            "replay done: %d frames with their recorded seq, %d results republished%s%s",
            self.recorded_frames,
            self.results_published,
            f", {self.results_failed} could not be" if self.results_failed else "",
            f", {self.source.damaged_packets} damaged packets skipped" if self.source.damaged_packets else "",
        )
        return True

    def close(self) -> None:
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.close()

    # --- each frame ------------------------------------------------------------------------------

    def before_publish(self, publisher: Publisher, writer: SlotWriter) -> None:
        """The frame is decoded into its slot: hold it as long as the pace says, then give it
        the recording's seq and wall time. Raises SourceError("stopping") on stop."""
        if not self._first_published:
            if self.wait_readers:
                self._hold_for_readers(publisher)
                self.source.restart_timing()
        elif self.pace == "lockstep" and not self._wait_until_consumed(publisher):
            raise SourceError("stopping")
        writer.timestamp_ns = None  # stamped as it is published, after any wait for readers
        self._recorded_seq = 0
        position = self.source.position
        recorded = self.index.find(position.pts_ticks) if self.index is not None and position is not None else None
        if recorded is None:
            return
        if recorded.seq <= publisher.seq:
            # A looping file's next pass (or an index out of order): seqs only go up, so these
            # frames are numbered on by the daemon, and have no recorded results.
            if not self._renumbered_logged:
                self._renumbered_logged = True
                log.info("the recording's seqs are behind the stream's (%d): frames are numbered on from there", publisher.seq)
            return
        writer.seq, writer.wall_time = recorded.seq, recorded.wall_time
        self._recorded_seq = recorded.seq

    def after_publish(self, publisher: Publisher) -> None:
        """The frame is out: republish its results, and keep status up to date."""
        self._first_published = True
        self._position = self.source.position
        seq = self._recorded_seq
        if seq and publisher.seq == seq:
            self.recorded_frames += 1
            if self.results is not None:
                published = set()
                for model, data in self.results.by_seq.get(seq, ()):
                    self._republish(model, seq, data)
                    published.add(model)
                # The models the recording has no result from on this frame skipped it: say so,
                # so a reader's get() of it answers None now instead of waiting for a later one.
                for model in self._writers.keys() - published:
                    self._writers[model].skip(seq)
        if time.monotonic() >= self._status_due:
            self._show(publisher)

    def _republish(self, model: str, seq: int, data: Dict[str, Any]) -> None:
        try:
            # By seq alone: the writer takes the capture time from the frame, newest in the ring.
            self._writers[model].publish(seq, data)
            self.results_published += 1
        except Exception as exc:  # noqa: BLE001 - a result that cannot go out must not stop the frames
            self.results_failed += 1
            if self.results_failed == 1:
                log.warning("republishing the result of model %r for frame %d failed: %s (further failures are counted)", model, seq, exc)

    # --- waiting for readers ---------------------------------------------------------------------

    def _hold_for_readers(self, publisher: Publisher) -> None:
        wanted = self.wait_readers
        shown = -1
        while not publisher.wait_for_readers(wanted, timeout=WAIT_STEP):
            if self.stop.is_set():
                raise SourceError("stopping")
            attached = publisher.reader_count()
            if attached != shown:
                shown = attached
                reason = f"holding the first frame until {wanted} reader(s) attach ({attached} attached)"
                log.info("%s", reason)
                publisher.set_state("starting", reason)
        if shown >= 0:
            log.info("%d reader(s) attached: the replay starts", wanted)

    def _wait_until_consumed(self, publisher: Publisher) -> bool:
        """Lockstep: until every ordered reader has taken the newest frame (True), or stop (False)."""
        return self._wait(publisher, lambda: publisher.wait_until_consumed(timeout=WAIT_STEP))

    def _wait(self, publisher: Publisher, done: Callable[[], bool]) -> bool:
        started = time.monotonic()
        report_at = started + REPORT_AFTER
        reported = False
        while not done():
            if self.stop.is_set():
                return False
            now = time.monotonic()
            if now >= report_at:
                report_at = now + REPORT_EVERY
                reported = True
                self._report_waiting(publisher, now - started)
        if reported:
            self._waiting = {}
            publisher.set_state("streaming", "")
            self._show(publisher)
        return True

    def _report_waiting(self, publisher: Publisher, seconds: float) -> None:
        lagging = publisher.lagging_readers()
        names = ", ".join(f"{r['name']!r} (pid {r['pid']})" for r in lagging[:LISTED_READERS])
        if len(lagging) > LISTED_READERS:
            names += f" and {len(lagging) - LISTED_READERS} more"
        self._waiting = {
            "waiting_for": [{"pid": r["pid"], "name": r["name"][:32], "last_seq": r["last_seq"]} for r in lagging[:LISTED_READERS]],
            "waiting_count": len(lagging),
            "waiting_s": round(seconds, 1),
        }
        publisher.set_state("streaming", f"lockstep: frame {publisher.seq} waits for {names or 'a reader'} to take it")
        self._show(publisher)

    # --- status ------------------------------------------------------------------------------------

    def _show(self, publisher: Publisher) -> None:
        self._status_due = time.monotonic() + STATUS_PERIOD
        source = self.source
        position = self._position
        frames, duration = source.frames, source.duration_s
        if self.index is not None:
            # The index counts exactly what was recorded; containers (MPEG-TS) often only estimate.
            frames = len(self.index)
            duration = self.index.span_s + source.frame_period_s
        info: Dict[str, Any] = {
            "pace": self.pace,
            "frame": position.frame if position else 0,
            "frames": frames,
            "time_s": round(position.time_s, 3) if position else 0.0,
            "duration_s": round(duration, 3) if duration is not None else None,
            "pass": position.pass_number if position else 1,
            "recorded": self.index is not None,
            "results": len(self._writers),
            "wait_readers": self.wait_readers,
            **self._waiting,
        }
        publisher.set_info(replay=info)
