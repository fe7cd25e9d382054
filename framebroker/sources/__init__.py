"""Camera sources: the URIs ``framebroker serve`` accepts and the code that reads each kind.

``parse_source(uri)`` validates a URI (``ValueError`` naming the problem); ``make_source``
builds the reader for it. Kinds: ``test://`` (synthetic), files (PyAV, paced by their PTS),
V4L2/USB cameras (OpenCV), ``csi://``, ``rtsp://`` and ``gst://`` (GStreamer, in a
``framebroker.gstreamer`` child), ``zenoh://`` (a stream ``framebroker bridge`` publishes from
another machine; the key expressions and wire format both ends share are in
``framebroker.zenoh_link``).
``${NAME}`` in rtsp:// and gst:// URIs reads the environment variable NAME (``expand_env``), so
credentials need not be on any command line; ``redact`` hides them in text that is shown.
"""

from __future__ import annotations

import threading
from typing import Optional

from ._base import GeometryChanged, Source, SourceRenumbered
from ._gstreamer import CsiSource, GstSource, RtspSource
from ._file import PACES, FileSource
from ._opencv import V4L2Source
from ._synthetic import TestPatternSource
from .._redact import redact
from ._uri import SourceSpec, expand_env, parse_source, url_escape
from ._zenoh import ZenohSource

_KINDS: dict[str, type[Source]] = {
    "test": TestPatternSource,
    "file": FileSource,
    "v4l2": V4L2Source,
    "csi": CsiSource,
    "rtsp": RtspSource,
    "gst": GstSource,
    "zenoh": ZenohSource,
}


def make_source(
    spec: SourceSpec,
    *,
    width: Optional[int] = None,
    height: Optional[int] = None,
    fps: Optional[float] = None,
    pixel_format: str = "bgr",
    stop: Optional[threading.Event] = None,
    pace: Optional[str] = None,
) -> Source:
    """The Source object for a parsed URI (not opened yet). ``pace`` (``PACES``; default
    realtime) is for files only: a camera's pace is the camera's."""
    if (width is None) != (height is None):
        raise ValueError("give both --width and --height, or neither")
    options = {}
    if pace is not None:
        if spec.kind != "file":
            raise ValueError(f"--pace is for files; {spec.display} is a live source, served at its own rate")
        options["pace"] = pace
    return _KINDS[spec.kind](
        spec,
        width=width,
        height=height,
        fps=fps,
        pixel_format=pixel_format,
        stop=stop or threading.Event(),
        **options,
    )


__all__ = [
    "GeometryChanged",
    "PACES",
    "Source",
    "SourceRenumbered",
    "SourceSpec",
    "expand_env",
    "make_source",
    "parse_source",
    "redact",
    "url_escape",
]
