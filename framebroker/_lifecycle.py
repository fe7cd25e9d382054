"""The lifecycle every framebroker object with shared resources goes through."""

from __future__ import annotations

import enum


class Lifecycle(enum.Enum):
    """``OPEN`` from a successful constructor until ``close()``; then ``CLOSED`` for good.

    Using a closed object raises ``ClosedError``; ``close()`` itself is safe to call twice and on
    an object whose constructor failed half way (its class-level default is ``CLOSED``).
    """

    OPEN = "open"
    CLOSED = "closed"
