"""The models' results for the browser preview: one set of readers, any number of pages.

``ResultHub`` follows every model of the stream (``ModelFollower``) while at least one page
listens, and keeps the newest results as ready-made Server-Sent Events (``result`` events:
model, frame seq, capture time, latency and the detections); each page's connection sends the
events it has not sent yet. With no page listening it detaches from the models after
``idle_detach`` seconds, as ``JpegHub`` does from the stream.

Only the detection convention travels (``objects`` with a ``box`` of four finite numbers,
``label``, ``score``, ``id``): the page draws boxes, and the rest of a result (up to 64 KiB) is
of no use there.

A note on locking: one condition variable guards the backlog of events, their count, the
viewer count and the state; model threads (through ``_on_result``) append, page threads wait
and copy.
"""

from __future__ import annotations

import collections
import json
import math
import time
from typing import Any, Deque, Optional

import framebroker as fb

from ._hub import ViewerHub
from ._models import ModelFollower, model_colour_hex

# Events kept for pages that connect or fall behind: several seconds of a few models at 30 fps.
BACKLOG = 512
# A label is cut to this many characters on the page.
MAX_LABEL = 64
# Status figures of the models are taken at most this often (s), however many pages ask.
SUMMARY_PERIOD = 0.5


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def drawable_objects(data: dict) -> list[dict[str, Any]]:
    """The detections of a result that can be drawn, reduced to what the page shows."""
    objects = data.get("objects")
    if not isinstance(objects, list):
        return []
    drawable = []
    for item in objects:
        if not isinstance(item, dict):
            continue
        box = item.get("box")
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            continue
        numbers = [_number(v) for v in box]
        if any(v is None for v in numbers) or numbers[2] < 0 or numbers[3] < 0:  # type: ignore[operator]
            continue
        shown: dict[str, Any] = {"box": numbers}
        if isinstance(item.get("label"), str):
            shown["label"] = item["label"][:MAX_LABEL]
        if _number(item.get("score")) is not None:
            shown["score"] = item["score"]
        if isinstance(item.get("id"), (int, str)) and not isinstance(item.get("id"), bool):
            shown["id"] = item["id"]
        drawable.append(shown)
    return drawable


def result_event(result: fb.Result) -> str:
    """A result as the page takes it (one line of JSON): times in ms on CLOCK_MONOTONIC."""
    return json.dumps(
        {
            "model": result.model,
            "seq": result.seq,
            "t": round(result.timestamp_ns / 1e6, 3),
            "latency_ms": round(result.latency_ns / 1e6, 1),
            "objects": drawable_objects(result.data),
        },
        separators=(",", ":"),
    )


def model_summary(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the page needs of each model in status: its colour, whether it publishes, how late."""
    return [
        {
            "name": m["name"],
            "colour": model_colour_hex(m["name"]),
            "alive": bool(m.get("alive")),
            "results_per_s": m.get("results_per_s", 0.0),
            "latency_p50_ms": m.get("latency_p50_ms"),
            "latency_p99_ms": m.get("latency_p99_ms"),
            "lag": m.get("lag"),
        }
        for m in models
        if "error" not in m
    ]


class ResultHub(ViewerHub):
    """Every model's results on ``stream``, read once, for every page (see the module doc)."""

    THREAD_NAME = "framebroker-view-results"

    def __init__(self, stream: str, *, idle_detach: float = 3.0, reader_name: str = "view") -> None:
        super().__init__()
        self.stream = stream
        self.idle_detach = idle_detach
        self.reader_name = reader_name
        self._events: Deque[tuple[int, str]] = collections.deque(maxlen=BACKLOG)
        self._number = 0
        self._sent = 0
        self._follower: Optional[ModelFollower] = None
        self._summary: tuple[float, list[dict[str, Any]]] = (0.0, [])

    # --- pages --------------------------------------------------------------------------------

    def backlog_start(self) -> int:
        """The number to pass to ``wait_events`` first: a new page gets the backlog too (the
        frames it is about to show may have had their results already)."""
        with self._condition:
            return self._events[0][0] - 1 if self._events else self._number

    def wait_events(self, after: int, timeout: float) -> tuple[int, list[str]]:
        """Events numbered above ``after`` (waiting up to ``timeout`` for one), and the number
        to ask after next. A page that fell more than the backlog behind loses the oldest."""
        with self._condition:
            self._condition.wait_for(lambda: self._stopping or self._number > after, timeout)
            fresh = [text for number, text in self._events if number > after]
            self._sent += len(fresh)
            return self._number, fresh

    def models(self) -> list[dict[str, Any]]:
        """The stream's models for the page (``model_summary``), at most SUMMARY_PERIOD old."""
        taken, summary = self._summary
        now = time.monotonic()
        if now - taken >= SUMMARY_PERIOD:
            streams = fb.status(self.stream)["streams"]
            summary = model_summary(streams[0].get("models", [])) if streams else []
            self._summary = (now, summary)
        return summary

    def stats(self) -> dict[str, Any]:
        with self._condition:
            follower = self._follower
            return {
                "results_viewers": self._viewers,
                "results_sent": self._sent,
                "models_followed": follower.following if follower is not None else [],
            }

    # --- the models' threads ------------------------------------------------------------------

    def _on_result(self, result: fb.Result) -> None:
        text = result_event(result)
        with self._condition:
            self._number += 1
            self._events.append((self._number, text))
            self._condition.notify_all()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._stopping or self._viewers > 0)
                if self._stopping:
                    return
            follower = ModelFollower(self.stream, None, self._on_result, reader_name=self.reader_name)
            follower.start()
            with self._condition:
                self._follower = follower
                idle_since: Optional[float] = None
                while not self._stopping:
                    if self._viewers:
                        idle_since = None
                    else:
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since >= self.idle_detach:
                            break
                    self._condition.wait(0.5)
                self._follower = None
            follower.stop()


__all__ = ["ResultHub", "drawable_objects", "model_summary", "result_event"]
