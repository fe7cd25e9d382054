"""How the daemon reports a source it keeps retrying: once, clearly, then quietly.

A camera that is not plugged in yet, or a server that is down, is retried for as long as it
takes (days, on a device waiting for its camera). A warning per attempt would bury the journal,
so ``RetryLog`` says it once: what is waited for, why, and how often it is retried. After that
each attempt is a debug line; a reason not seen before in this wait (the camera appeared but is
busy) is a warning again, and so is a reminder every ``REMIND_EVERY`` seconds.
``framebroker status`` shows the latest reason all along.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

# A reminder that the daemon still waits, at most this often (s): a line per ten minutes of an
# unplugged camera, not one per retry.
REMIND_EVERY = 600.0
# New reasons warned about in one wait; reasons that differ at every attempt (a server's
# changing message) then wait for the reminder.
MAX_REASONS_WARNED = 10


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RetryLog:
    """Logs the attempts to open one source; the daemon calls ``failed`` and ``opened``."""

    def __init__(self, log: logging.Logger, source: str, longest_backoff: float) -> None:
        self._log = log
        self._source = source
        self._longest_backoff = longest_backoff
        self._since: Optional[float] = None  # monotonic time of the first failure of this wait
        self._reasons: set[str] = set()
        self._next_reminder = 0.0

    def failed(self, reason: str, attempt: int, next_in: float) -> None:
        """An attempt to open the source failed for ``reason``; the next is in ``next_in`` s."""
        now = time.monotonic()
        self._log.debug("source unavailable: %s (attempt %d, next in %.1f s)", reason, attempt, next_in)
        if self._since is None:
            self._since = now
            self._reasons = {reason}
            self._next_reminder = now + REMIND_EVERY
            self._log.warning(
                "waiting for %s: %s; retrying every %.1f s, backing off to every %g s "
                "(further attempts are logged at debug level)",
                self._source,
                reason,
                next_in,
                self._longest_backoff,
            )
        elif reason not in self._reasons and len(self._reasons) < MAX_REASONS_WARNED:
            self._reasons.add(reason)
            self._next_reminder = now + REMIND_EVERY
            self._log.warning("still waiting for %s, now: %s", self._source, reason)
        elif now >= self._next_reminder:
            self._next_reminder = now + REMIND_EVERY
            self._log.warning(
                "still waiting for %s after %s (%d attempts): %s", self._source, _duration(now - self._since), attempt, reason
            )

    def opened(self) -> None:
        """The source opened: say how long it took if it had to wait, and start afresh."""
        if self._since is not None:
            self._log.info("%s is available after %s of waiting", self._source, _duration(time.monotonic() - self._since))
        self._since = None
