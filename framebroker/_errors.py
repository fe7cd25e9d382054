"""The exceptions framebroker raises.

Every error framebroker raises on purpose derives from one base class, so a
caller can catch them all at once::

    FrameBrokerError
    ├── StreamNotFound          nothing serves the stream name (no daemon, or it stopped)
    ├── ModelNotFound           no writer publishes that model's results on the stream
    ├── StreamBusy              a live daemon already owns the stream (or a live writer the
    │                           model's results); names its pid
    ├── IncompatibleSegment     /dev/shm holds something under the stream's name that is not
    │                           a framebroker ring we can trust (foreign magic, other layout
    │                           version, truncated, owned by someone else)
    ├── AccessDenied            the ring exists but this user may not open it (also PermissionError)
    ├── ShmSpaceError           /dev/shm cannot hold the ring; names the size needed
    ├── CapacityError           a reader asks to hold more frames than the ring has slots for
    ├── FrameTimeout            no frame within the timeout (also TimeoutError); "nothing yet",
    │                           never a failure of the stream itself
    ├── ResultExpired           a result asked for by seq is older than the results kept
    │                           (also LookupError)
    ├── FrameReleased           a Frame was used after it was released
    ├── ClosedError             a Reader or Publisher was used after close()
    ├── SourceError             a camera source could not be opened or stopped delivering
    │   └── SourceEnded         a finite source (a file without ?loop=1) reached its end
    ├── EncoderError            the recorder's encoder is missing or failed
    └── TriggerError            an event-clip trigger could not be delivered

Bad arguments (an invalid stream name, a negative size, an unknown pixel
format) raise the built-in ``ValueError`` or ``TypeError`` instead.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "CapacityError",
    "ClosedError",
    "EncoderError",
    "FrameBrokerError",
    "FrameReleased",
    "FrameTimeout",
    "IncompatibleSegment",
    "ModelNotFound",
    "ResultExpired",
    "ShmSpaceError",
    "SourceEnded",
    "SourceError",
    "StreamBusy",
    "StreamNotFound",
    "TriggerError",
]


class FrameBrokerError(Exception):
    """Base class of every error framebroker raises on purpose (tree in the module docstring)."""


class StreamNotFound(FrameBrokerError):
    """Nothing serves the requested stream name."""


class ModelNotFound(FrameBrokerError):
    """The stream is served, but no writer publishes the requested model's results on it."""


class ResultExpired(FrameBrokerError, LookupError):
    """A result was asked for by seq after it left the results ring (it keeps the newest few)."""


class StreamBusy(FrameBrokerError):
    """A live daemon already owns the stream."""

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class IncompatibleSegment(FrameBrokerError):
    """A shared-memory object under the stream's name cannot be trusted as a framebroker ring."""


class AccessDenied(FrameBrokerError, PermissionError):
    """The ring exists but this user may not open it."""


class ShmSpaceError(FrameBrokerError):
    """/dev/shm has no room for the ring."""

    def __init__(self, message: str, needed_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes


class CapacityError(FrameBrokerError):
    """A reader asked to hold more frames than the ring can guarantee."""


class FrameTimeout(FrameBrokerError, TimeoutError):
    """No frame arrived within the timeout."""


class FrameReleased(FrameBrokerError):
    """A Frame was used after its slot was given back."""


class ClosedError(FrameBrokerError):
    """A Reader or Publisher was used after close()."""


class SourceError(FrameBrokerError):
    """A camera source could not be opened or stopped delivering frames."""


class SourceEnded(SourceError):
    """A finite source reached its end."""


class EncoderError(FrameBrokerError):
    """The recorder's encoder is missing or failed."""


class TriggerError(FrameBrokerError):
    """An event-clip trigger could not be delivered."""
