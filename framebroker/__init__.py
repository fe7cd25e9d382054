"""framebroker: many processes share one camera through a shared-memory ring.

A daemon (``framebroker serve``) owns the camera and writes every frame into
``/dev/shm/framebroker.<stream>``; any number of ``Reader`` processes get the newest frame as a
read-only, zero-copy numpy view. Any program can be a producer with ``Publisher``.

    import framebroker as fb

    with fb.Reader("cam0", name="detector") as cam:
        frame = cam.latest(timeout=1.0)
        frame.array, frame.seq, frame.timestamp_ns

The ring protocol is documented in ``framebroker/_ring.py``; the error tree in
``framebroker/_errors.py`` (``FrameBrokerError``).
"""

from ._errors import (
    AccessDenied,
    CapacityError,
    ClosedError,
    EncoderError,
    FrameBrokerError,
    FrameReleased,
    FrameTimeout,
    IncompatibleSegment,
    ModelNotFound,
    ResultExpired,
    ShmSpaceError,
    SourceEnded,
    SourceError,
    StreamBusy,
    StreamNotFound,
    TriggerError,
)
from ._frame import Frame
from ._publisher import Publisher, SlotWriter
from ._reader import Reader
from ._results import Result, ResultReader, ResultWriter, models
from ._status import collect as _collect
from ._trigger import Trigger, TriggerInbox, trigger

__version__ = "0.1.0"  # the package's only version; pyproject.toml reads it from here


def status(name: "str | None" = None) -> dict:
    """What ``framebroker status --json`` prints: every stream (or only ``name``) with its readers.

    The schema is documented in docs/status.md ("Status JSON"). Works without the daemon's help and
    when it is dead (the stream then shows ``"state": "dead"``).
    """
    return _collect(name)


__all__ = [
    "AccessDenied",
    "CapacityError",
    "ClosedError",
    "EncoderError",
    "Frame",
    "FrameBrokerError",
    "FrameReleased",
    "FrameTimeout",
    "IncompatibleSegment",
    "ModelNotFound",
    "Publisher",
    "Reader",
    "Result",
    "ResultExpired",
    "ResultReader",
    "ResultWriter",
    "ShmSpaceError",
    "SlotWriter",
    "SourceEnded",
    "SourceError",
    "StreamBusy",
    "StreamNotFound",
    "Trigger",
    "TriggerError",
    "TriggerInbox",
    "__version__",
    "models",
    "status",
    "trigger",
]
