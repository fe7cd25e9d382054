"""Parsing source URIs (the jetson-utils convention), credentials in them, and hiding those.

Credentials on a command line are public: every local user reads every process's arguments in
/proc/PID/cmdline. So ``${NAME}`` in an ``rtsp://`` or ``gst://`` source (and in the recorder's
``srt://`` outputs) stands for the environment variable NAME, which only the same user and root
can read (/proc/PID/environ is private), and which systemd fills from an ``EnvironmentFile=``:

    CAM_PASSWORD=... framebroker serve 'rtsp://admin:${CAM_PASSWORD}@192.168.1.20/stream1'
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from .._errors import SourceError
from .._redact import redact

SCHEMES = ("test://", "file://", "v4l2://", "usb://", "csi://", "rtsp://", "rtsps://", "gst://", "zenoh://")
_SCHEME_NAMES = tuple(scheme[: -len("://")] for scheme in SCHEMES)
# "word:" at the start, and the slashes after it: how a URI with a mistyped scheme begins.
_SCHEME_LIKE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<slashes>/*)")

_HELP = "use test://, file:///path.mp4 (or a path), v4l2:///dev/video0, /dev/video0, usb://0, csi://0, rtsp://host/path, gst://PIPELINE or zenoh://STREAM?connect=tcp/HOST:7447"

# Query options each kind understands. RTSP URLs may carry the camera's own query parameters,
# so for rtsp:// only these keys are taken out and the rest stays in the URL.
OPTIONS = {
    "test": {},
    "file": {"loop": "0 or 1: start again at the end instead of ending the stream"},
    "v4l2": {"fourcc": "pixel format to ask the camera for, e.g. MJPG or YUYV"},
    "csi": {"flip": "nvvidconv flip-method 0-7", "sensor_mode": "nvarguscamerasrc sensor-mode"},
    "rtsp": {"latency": "jitter buffer in ms (rtspsrc latency), default 200", "transport": "tcp or udp"},
    "gst": {},
    "zenoh": {
        "connect": "a Zenoh endpoint to connect to, e.g. tcp/192.168.1.20:7447 (repeatable)",
        "listen": "a Zenoh endpoint to listen on, e.g. tcp/0.0.0.0:7447 (repeatable)",
        "config": "a Zenoh config file (JSON5)",
    },
}


@dataclass(frozen=True, repr=False)
class SourceSpec:
    """A parsed source URI. ``target`` is the path, device, sensor, URL or pipeline.

    Only ``display`` may be printed: ``repr()`` shows it, never the target (a gst:// pipeline
    may hold credentials), the user name, the password or ``secrets`` (those three plus the
    values of the ``${NAME}`` variables the URI named).
    """

    kind: str
    target: str
    options: dict = field(default_factory=dict)
    username: str = ""
    password: str = ""
    display: str = ""  # the URI with credentials removed: the only form that may be printed
    secrets: tuple = ()  # strings to mask in anything shown about this source

    def __repr__(self) -> str:
        return f"SourceSpec(kind={self.kind!r}, display={self.display!r}, options={self.options!r})"


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(
    text: str, escape: Callable[[str], str] = str, environ: Optional[Mapping[str, str]] = None
) -> tuple[str, tuple[str, ...]]:
    """``text`` with each ``${NAME}`` replaced by ``escape(value)`` of the environment variable
    NAME, and the values put in, raw and escaped (to mask them wherever the text is shown).
    ``escape`` fits the value into its context: ``url_escape`` in a URL, ``shlex.quote`` in a
    pipeline. ``ValueError`` names a variable that is not set. Nothing else is expanded: ``$NAME``
    stays as it is (passwords may contain $)."""
    environ = os.environ if environ is None else environ
    values: list[str] = []

    def value_of(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in environ:
            raise ValueError(f"environment variable {name} is not set ({redact(text)!r} names it as ${{{name}}})")
        escaped = escape(environ[name])
        values.extend((environ[name], escaped) if escaped != environ[name] else (escaped,))
        return escaped

    return _ENV_REFERENCE.sub(value_of, text), tuple(values)


def url_escape(value: str) -> str:
    """A value as it must be written in a URL (percent-encoded), for ``expand_env``."""
    return quote(value, safe="")


def _options(kind: str, query: str, uri_for_errors: str) -> dict:
    known = OPTIONS[kind]
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in known:
            allowed = ", ".join(f"{k} ({v})" for k, v in known.items()) or "none"
            raise ValueError(f"unknown option {key!r} in source {redact(uri_for_errors)!r}: {kind} sources take {allowed}")
        options[key] = value
    return options


def _int_option(options: dict, key: str, low: int, high: int, default: int, uri: str) -> int:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"option {key}={raw!r} in {redact(uri)!r} must be a whole number") from None
    if not low <= value <= high:
        raise ValueError(f"option {key}={value} in {redact(uri)!r} must be between {low} and {high}")
    return value


def parse_source(uri: object) -> SourceSpec:
    """Parse a source URI; raise ValueError naming what is wrong and what is accepted."""
    if not isinstance(uri, str):
        raise TypeError(f"source must be a str, not {type(uri).__name__}")
    text = uri.strip()
    if not text:
        raise ValueError(f"empty source: {_HELP}")
    if "\0" in text or "\n" in text:
        raise ValueError(f"source {redact(text)!r} contains control characters: {_HELP}")
    lower = text.lower()
    if lower.startswith("test://"):
        rest = text[len("test://") :]
        path, _, query = rest.partition("?")
        if path not in ("", "/"):
            raise ValueError(f"test:// takes no path, got {text!r}; size and rate come from --width --height --fps")
        return SourceSpec("test", "", _options("test", query, text), display="test://")
    if lower.startswith("gst://"):
        pipeline, secrets = expand_env(text[len("gst://") :].strip(), shlex.quote)
        if not pipeline:
            raise ValueError("gst:// needs a pipeline that produces raw video, e.g. gst://videotestsrc pattern=ball")
        try:
            shlex.split(pipeline)
        except ValueError as exc:
            raise ValueError(f"malformed gst:// pipeline ({exc}): quote values as you would in a shell") from None
        return SourceSpec("gst", pipeline, {}, display=redact(text), secrets=secrets)
    if lower.startswith("csi://"):
        rest, _, query = text[len("csi://") :].partition("?")
        if not rest.isdigit() or int(rest) > 15:
            raise ValueError(f"csi:// needs a sensor number such as csi://0, got {text!r}")
        options = _options("csi", query, text)
        _int_option(options, "flip", 0, 7, 0, text)
        _int_option(options, "sensor_mode", -1, 64, -1, text)
        return SourceSpec("csi", rest, options, display=text)
    if lower.startswith("usb://"):
        rest, _, query = text[len("usb://") :].partition("?")
        if not rest.isdigit() or int(rest) > 255:
            raise ValueError(f"usb:// needs a camera index such as usb://0 (for /dev/video0), got {text!r}")
        options = _options("v4l2", query, text)
        return SourceSpec("v4l2", f"/dev/video{int(rest)}", options, display=text)
    if lower.startswith("v4l2://"):
        rest, _, query = text[len("v4l2://") :].partition("?")
        if not rest.startswith("/dev/"):
            raise ValueError(f"v4l2:// needs a device path such as v4l2:///dev/video0, got {text!r}")
        return SourceSpec("v4l2", os.path.normpath(rest), _options("v4l2", query, text), display=text)
    if lower.startswith(("rtsp://", "rtsps://")):
        return _parse_rtsp(text)
    if lower.startswith("zenoh://"):
        return _parse_zenoh(text)
    if lower.startswith("file://"):
        rest, _, query = text[len("file://") :].partition("?")
        path = unquote(rest)
        if not path:
            raise ValueError(f"file:// needs a path, e.g. file:///home/me/video.mp4, got {text!r}")
        return SourceSpec("file", path, _options("file", query, text), display=text)
    _refuse_mistyped_uri(text)
    if text.startswith("/dev/"):
        path, _, query = text.partition("?")
        return SourceSpec("v4l2", os.path.normpath(path), _options("v4l2", query, text), display=text)
    path, sep, query = text.partition("?")
    options = _options("file", query, text) if sep else {}
    return SourceSpec("file", path, options, display=text)


def _did_you_mean(word: str) -> str:
    """" (did you mean test://?)" for a word close to one of our scheme names, else ""."""
    # 0.7: "tset", "rstp", "v4l" find theirs; "https" and "srt" are not taken for rtsps and gst.
    close = difflib.get_close_matches(word.lower(), _SCHEME_NAMES, n=1, cutoff=0.7)
    return f" (did you mean {close[0]}://?)" if close else ""


def _refuse_mistyped_uri(text: str) -> None:
    """Raise ValueError for what was meant as a URI but is none we know: a scheme we do not
    have (ftp://), one with its slashes wrong (test:/, usb:0), or a bare scheme name (test).
    Anything else is a file path; ``./NAME`` always is."""
    match = _SCHEME_LIKE.match(text)
    if match is not None:
        scheme, slashes = match.group("scheme"), match.group("slashes")
        hint = _did_you_mean(scheme)
        if slashes == "//":
            raise ValueError(f"unknown source scheme {scheme + '://'!r}{hint}: {_HELP}")
        if slashes or hint:
            # Without "//", redact() would not find a password: then only the scheme is shown.
            quoted = text if "@" not in text else match.group(0) + "..."
            raise ValueError(
                f"source {quoted!r} is not a URI framebroker knows{hint}: a scheme is followed by '://'; {_HELP} "
                "(a file whose name has a ':' in it: ./NAME)"
            )
    if text.lower() in _SCHEME_NAMES:
        raise ValueError(
            f"source {text!r} is a scheme without '://' (did you mean {text.lower()}://?): {_HELP} "
            f"(a file called {text}: ./{text})"
        )


def check_file_exists(spec: SourceSpec) -> None:
    """Raise SourceError if ``spec`` is a file that is not there (or is a directory).

    For ``framebroker serve`` at start: a camera may be plugged in and a server may come up
    later, so those are waited for, but a file named on the command line that does not exist is
    a typo or the wrong directory, and waiting for it would hide the mistake.
    """
    if spec.kind != "file":
        return
    path = spec.target
    if os.path.isdir(path):
        raise SourceError(f"{path} is a directory, not a video file")
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" in {os.getcwd()}"
        # A bare word may be a scheme typed without "://" and misspelt ("tset").
        hint = _did_you_mean(path) if re.fullmatch(r"[A-Za-z0-9+-]+", path) else ""
        raise SourceError(
            f"file not found: {path}{where}{hint}: give an existing video file, "
            "or a camera or test source such as /dev/video0, csi://0 or test://"
        )


def _parse_zenoh(text: str) -> SourceSpec:
    """``zenoh://STREAM?connect=E&listen=E&config=FILE``: the stream a ``framebroker bridge``
    publishes, how to reach it (connect and listen repeat), or a Zenoh config file saying it."""
    from .._layout import validate_stream_name
    from ..zenoh_link import check_endpoint

    stream, _, query = text[len("zenoh://") :].partition("?")
    stream = stream.strip("/")
    try:
        validate_stream_name(stream)
    except ValueError as exc:
        raise ValueError(f"zenoh:// names the origin's stream, as in zenoh://cam0?connect=tcp/192.168.1.20:7447: {exc}") from None
    options: dict = {"connect": [], "listen": []}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in OPTIONS["zenoh"]:
            _options("zenoh", f"{key}=", text)  # raises, naming the options there are
        if key == "config":
            options["config"] = value
        else:
            options[key].append(check_endpoint(value))
    if not (options["connect"] or options["listen"] or options.get("config")):
        raise ValueError(
            f"{text!r} says nowhere to find the bridge: add ?connect=tcp/HOST:7447 (where framebroker bridge "
            f"{stream} --listen ... runs, or a Zenoh router), ?listen=tcp/0.0.0.0:7447, or ?config=FILE"
        )
    return SourceSpec("zenoh", stream, options, display=text)


def _parse_rtsp(raw: str) -> SourceSpec:
    text, values = expand_env(raw, url_escape)
    try:
        spec = _rtsp_spec(text)
    except ValueError as exc:
        raise ValueError(redact(str(exc), values)) from None
    display = spec.display
    if values:  # show the URI as written, ${NAME} and all, rather than the values
        try:
            display = _rtsp_spec(raw).display
        except ValueError:
            display = redact(raw, values)
    return replace(spec, display=redact(display), secrets=tuple(s for s in (spec.password, *values) if s))


def _rtsp_spec(text: str) -> SourceSpec:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"malformed RTSP URL {redact(text)!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"RTSP URL {redact(text)!r} has no host: use rtsp://[user:pass@]host[:port]/path")
    ours = {}
    theirs = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in OPTIONS["rtsp"]:
            ours[key] = value
        else:
            theirs.append((key, value))
    _int_option(ours, "latency", 0, 60000, 200, text)
    if ours.get("transport", "tcp") not in ("tcp", "udp"):
        raise ValueError(f"option transport={ours['transport']!r} in {redact(text)!r} must be tcp or udp")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{port}" if port else "")
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in theirs)
    clean = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    shown = ([query] if query else []) + [f"{k}={v}" for k, v in ours.items()]
    shown_query = "&".join(shown)
    display = urlunsplit((parts.scheme, ("***@" if parts.username else "") + netloc, parts.path, shown_query, ""))
    return SourceSpec(
        "rtsp",
        clean,
        ours,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        display=display,
    )
