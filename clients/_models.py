"""Following a stream's models: every result each one publishes, as it comes (public API only).

``ModelFollower`` gives each model a thread of its own with its own ``fb.ResultReader`` (a
reader is for one thread) that reads every result in order and hands it to a callback. It
follows the models it is given, or every model of the stream (``fb.models``) including those
that start later. A model that is not there yet is looked for again every ``DISCOVER_PERIOD``;
in "every model" mode, one that stops publishing is let go after ``FORGET_AFTER`` seconds and
taken up again when it returns. A writer that restarts is followed by the reader itself.

The preview (boxes over the picture) and the recorder (sidecars, burn-in, clip rules) use it;
``model_colour`` gives both the same colour for a model, so a box looks the same in the browser
and in a recording.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import framebroker as fb

log = logging.getLogger("framebroker.models")

# How often the stream's models are listed again (s).
DISCOVER_PERIOD = 1.0
# Longest single wait for a result, so that stop() is noticed (s).
RESULT_WAIT = 0.5
# In "every model" mode, a model no longer listed for this long is let go (s).
FORGET_AFTER = 3.0

# Saturated colours, far from greys and from each other (RGB). None of them occurs in the test
# pattern's gradient (its channels are always about 85 levels apart), which the tests rely on.
PALETTE = ((0, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 140, 0), (40, 120, 255))


def model_colour(model: str) -> tuple[int, int, int]:
    """The colour (R, G, B) boxes of ``model`` are drawn in: the same in every process and run."""
    code = 0
    for char in model:
        code = (code * 31 + ord(char)) & 0xFFFFFFFF
    return PALETTE[code % len(PALETTE)]


def model_colour_hex(model: str) -> str:
    return "#%02x%02x%02x" % model_colour(model)


class ModelFollower:
    """Reads every result of ``models`` (None: every model of the stream) and calls
    ``on_result(result)`` from the model's thread. ``start()``, then ``stop()``.

    A note on threads: one discovery thread lists the models and starts a reader thread per
    model; ``on_result`` runs in the reader threads, so it must be thread-safe. An exception it
    raises is logged and the result skipped. ``listed`` (the models publishing now, as last
    seen) and the counters are read by anyone.
    """

    def __init__(
        self,
        stream: str,
        models: Optional[Sequence[str]],
        on_result: Callable[[fb.Result], None],
        reader_name: str = "results",
    ) -> None:
        self.stream = stream
        self.wanted = None if models is None else list(dict.fromkeys(models))
        self.on_result = on_result
        self.reader_name = reader_name
        self.listed: frozenset[str] = frozenset()
        self.results = 0
        self.dropped = 0  # results a reader missed because it fell a whole ring behind
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._readers: Dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._missing_since: Dict[str, float] = {}
        self._discovery: Optional[threading.Thread] = None

    # --- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start following. Safe to call twice."""
        if self._discovery is not None:
            return
        self._discovery = threading.Thread(target=self._discover_loop, name="models-discover", daemon=True)
        self._discovery.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every thread and close every reader. Safe to call twice."""
        self._stop.set()
        if self._discovery is not None:
            self._discovery.join(timeout)
        with self._lock:
            threads = [thread for thread, _ in self._readers.values()]
        for thread in threads:
            thread.join(timeout)

    @property
    def following(self) -> List[str]:
        """The models a reader is attached to now."""
        with self._lock:
            return sorted(model for model, (thread, _) in self._readers.items() if thread.is_alive())

    # --- the discovery thread ---------------------------------------------------------------------

    def _discover_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._discover()
            except Exception:
                log.exception("listing the models of stream %r failed", self.stream)
            self._stop.wait(DISCOVER_PERIOD)

    def _discover(self) -> None:
        try:
            listed = frozenset(fb.models(self.stream))
        except (fb.FrameBrokerError, OSError):
            listed = frozenset()
        self.listed = listed
        wanted = listed if self.wanted is None else [m for m in self.wanted if m in listed]
        now = time.monotonic()
        with self._lock:
            for model in wanted:
                self._missing_since.pop(model, None)
                running = self._readers.get(model)
                if running is None or not running[0].is_alive():
                    stop = threading.Event()
                    thread = threading.Thread(target=self._follow, args=(model, stop), name=f"model-{model}", daemon=True)
                    self._readers[model] = (thread, stop)
                    thread.start()
            if self.wanted is None:
                for model, (_, stop) in list(self._readers.items()):
                    if model in listed:
                        continue
                    since = self._missing_since.setdefault(model, now)
                    if now - since >= FORGET_AFTER:
                        stop.set()
                        del self._readers[model]
                        del self._missing_since[model]

    # --- a model's thread ---------------------------------------------------------------------------

    def _follow(self, model: str, stop: threading.Event) -> None:
        try:
            reader = fb.ResultReader(self.stream, model, name=self.reader_name)
        except (fb.ModelNotFound, fb.StreamNotFound):
            return  # gone again before we came: the discovery thread looks again
        log.info("following the results of model %r on stream %r", model, self.stream)
        try:
            results = reader.ordered(timeout=RESULT_WAIT)
            while not (self._stop.is_set() or stop.is_set()):
                try:
                    result = next(results)
                except fb.FrameTimeout:
                    continue
                except StopIteration:
                    return
                self.results += 1
                self.dropped += result.dropped
                try:
                    self.on_result(result)
                except Exception:
                    log.exception("handling a result of model %r failed", model)
        except fb.FrameBrokerError as exc:
            log.warning("stopped following model %r of stream %r: %s", model, self.stream, exc)
        finally:
            reader.close()


__all__ = ["ModelFollower", "PALETTE", "model_colour", "model_colour_hex"]
