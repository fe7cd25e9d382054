"""The program ``framebroker.gstreamer`` runs in its child: gst-launch-1.0 without the command line.

Started as ``python -I -S _gst_launch.py --config-fd N [--name LABEL]`` (by path, so that it
imports nothing but the standard library, and starts in tens of milliseconds). Everything about
the pipeline arrives on file descriptor N, never in argv, which every local user can read in
/proc/PID/cmdline: a JSON object

    {"args": [...],              the pipeline, as gst-launch-1.0 arguments (gst_parse_launchv)
     "properties": {"NAME": {"PROPERTY": "VALUE"}},   string properties of named elements, set
                                 after parsing, byte for byte (credentials: no quoting involved)
     "caps_of": "NAME"}          print "caps CAPS" on stdout whenever NAME's sink pad negotiates

GStreamer is driven through ctypes on libgstreamer-1.0 (PyGObject does not build from PyPI on
Debian 12). Like gst-launch-1.0, the pipeline runs until end of stream (exit 0) or an error
(exit 1); errors and warnings are printed on stderr, one line each:
``ERROR: <element>: <message> (<detail>)``. SIGINT ends it as ``gst-launch-1.0 -e`` does: the
sources are sent end of stream, what is in flight flows out, and the pipeline is taken down in
order once the end reaches the sinks (exit 0). That is how a camera is let go of cleanly
(Jetson's nvarguscamerasrc wants end of stream to close its Argus session) and how a muxer in
the pipeline gets to write its index. SIGTERM ends it at once. ``--has-element NAME`` exits 0
if this machine's GStreamer has the element, 1 if not.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys

# GstMessageType values (gstmessage.h); extended types share low bits with basic ones, so
# messages are popped unfiltered and compared for equality.
MESSAGE_EOS = 1 << 0
MESSAGE_ERROR = 1 << 1
MESSAGE_WARNING = 1 << 2
MESSAGE_CLOCK_LOST = 1 << 10
MESSAGE_LATENCY = 1 << 19
MESSAGE_ANY = 0xFFFFFFFF
STATE_NULL, STATE_PAUSED, STATE_PLAYING = 1, 3, 4
STATE_CHANGE_FAILURE = 0
G_TYPE_STRING = 16 << 2  # G_TYPE_MAKE_FUNDAMENTAL (16)
POLL_NS = 100_000_000  # how long one wait on the bus lasts; caps are looked at in between
LIBRARIES = ("libgstreamer-1.0.so.0", "libgobject-2.0.so.0", "libglib-2.0.so.0")


class GError(ctypes.Structure):
    _fields_ = [("domain", ctypes.c_uint32), ("code", ctypes.c_int), ("message", ctypes.c_char_p)]


class MiniObject(ctypes.Structure):  # GstMiniObject, public ABI of GStreamer 1.x
    _fields_ = [
        ("type", ctypes.c_size_t),
        ("refcount", ctypes.c_int),
        ("lockstate", ctypes.c_int),
        ("flags", ctypes.c_uint),
        ("copy", ctypes.c_void_p),
        ("dispose", ctypes.c_void_p),
        ("free", ctypes.c_void_p),
        ("priv_uint", ctypes.c_uint),
        ("priv_pointer", ctypes.c_void_p),
    ]


class Message(ctypes.Structure):  # the public head of GstMessage
    _fields_ = [("mini_object", MiniObject), ("type", ctypes.c_uint), ("timestamp", ctypes.c_uint64), ("src", ctypes.c_void_p)]


class ParamSpec(ctypes.Structure):  # the public head of GParamSpec
    _fields_ = [("g_class", ctypes.c_void_p), ("name", ctypes.c_char_p), ("flags", ctypes.c_uint), ("value_type", ctypes.c_size_t)]


class GValue(ctypes.Structure):
    _fields_ = [("g_type", ctypes.c_size_t), ("data", ctypes.c_uint64 * 2)]


_P = ctypes.c_void_p
_SIGNATURES = {
    "gst_init_check": (ctypes.c_int, [_P, _P, ctypes.POINTER(ctypes.POINTER(GError))]),
    "gst_parse_launchv": (_P, [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.POINTER(GError))]),
    "gst_element_factory_find": (_P, [ctypes.c_char_p]),
    "gst_bin_get_type": (ctypes.c_size_t, []),
    "g_type_check_instance_is_a": (ctypes.c_int, [_P, ctypes.c_size_t]),
    "gst_pipeline_new": (_P, [ctypes.c_char_p]),
    "gst_bin_add": (ctypes.c_int, [_P, _P]),
    "gst_bin_get_by_name": (_P, [_P, ctypes.c_char_p]),
    "gst_bin_recalculate_latency": (ctypes.c_int, [_P]),
    "gst_element_set_state": (ctypes.c_int, [_P, ctypes.c_int]),
    "gst_element_get_bus": (_P, [_P]),
    "gst_element_get_static_pad": (_P, [_P, ctypes.c_char_p]),
    "gst_element_send_event": (ctypes.c_int, [_P, _P]),
    "gst_event_new_eos": (_P, []),
    "gst_element_add_property_deep_notify_watch": (ctypes.c_ulong, [_P, ctypes.c_char_p, ctypes.c_int]),
    "gst_bus_timed_pop_filtered": (ctypes.POINTER(Message), [_P, ctypes.c_uint64, ctypes.c_uint]),
    "gst_message_parse_error": (None, [_P, ctypes.POINTER(ctypes.POINTER(GError)), ctypes.POINTER(_P)]),
    "gst_message_parse_warning": (None, [_P, ctypes.POINTER(ctypes.POINTER(GError)), ctypes.POINTER(_P)]),
    "gst_pad_get_current_caps": (_P, [_P]),
    "gst_caps_to_string": (_P, [_P]),
    "gst_object_get_name": (_P, [_P]),
    "gst_object_unref": (None, [_P]),
    "gst_mini_object_unref": (None, [_P]),
    "g_object_class_find_property": (ctypes.POINTER(ParamSpec), [_P, ctypes.c_char_p]),
    "g_object_set_property": (None, [_P, ctypes.c_char_p, ctypes.POINTER(GValue)]),
    "g_value_init": (ctypes.POINTER(GValue), [ctypes.POINTER(GValue), ctypes.c_size_t]),
    "g_value_set_string": (None, [ctypes.POINTER(GValue), ctypes.c_char_p]),
    "g_value_unset": (None, [ctypes.POINTER(GValue)]),
    "g_error_free": (None, [ctypes.POINTER(GError)]),
    "g_free": (None, [_P]),
}


class Failure(Exception):
    """Ends the launcher with exit 1 and this message on stderr."""


class EndRequest:
    """Remembers a SIGINT until the bus loop can act on it (signal handlers only set flags: the
    loop runs between waits on the bus, at most ``POLL_NS`` apart)."""

    requested = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._request)

    def _request(self, signum: int, frame: object) -> None:
        self.requested = True


class Gst:
    """The few GStreamer, GObject and GLib functions the launcher calls, with their C signatures."""

    def __init__(self) -> None:
        libraries = []
        for name in LIBRARIES:
            try:
                libraries.append(ctypes.CDLL(name))
            except OSError as exc:
                raise Failure(
                    f"GStreamer is not installed ({exc}): "
                    "apt-get install gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
                ) from None
        for function, (restype, argtypes) in _SIGNATURES.items():
            library = next(lib for lib in libraries if hasattr(lib, function))
            c_function = getattr(library, function)
            c_function.restype = restype
            c_function.argtypes = argtypes
            setattr(self, function, c_function)
        error = ctypes.POINTER(GError)()
        if not self.gst_init_check(None, None, ctypes.byref(error)):
            raise Failure(f"GStreamer could not start: {self.take_error(error)}")

    def take_error(self, error: "ctypes._Pointer[GError]") -> str:
        text = error.contents.message.decode("utf-8", "replace") if error else "unknown error"
        if error:
            self.g_error_free(error)
        return text

    def take_string(self, pointer: "int | None") -> str:
        if not pointer:
            return ""
        text = ctypes.string_at(pointer).decode("utf-8", "replace")
        self.g_free(pointer)
        return text


def build(gst: Gst, args: "list[str]") -> int:
    """The pipeline for gst-launch-1.0 style ``args`` (a single element gets a pipeline around it)."""
    argv = (ctypes.c_char_p * (len(args) + 1))(*[arg.encode() for arg in args], None)
    error = ctypes.POINTER(GError)()
    pipeline = gst.gst_parse_launchv(argv, ctypes.byref(error))
    if error:  # set also when a pipeline came back with parts missing, as gst-launch-1.0 refuses it
        if pipeline:
            gst.gst_object_unref(pipeline)
        raise Failure(f"ERROR: pipeline could not be constructed: {gst.take_error(error)}")
    if not pipeline:
        raise Failure("ERROR: pipeline could not be constructed")
    if not gst.g_type_check_instance_is_a(pipeline, gst.gst_bin_get_type()):
        bin_ = gst.gst_pipeline_new(None)
        gst.gst_bin_add(bin_, pipeline)
        pipeline = bin_
    return pipeline


def set_properties(gst: Gst, pipeline: int, properties: "dict[str, dict[str, str]]") -> None:
    """Set string properties of named elements, exactly as given (no parsing, no unescaping)."""
    for element_name, values in properties.items():
        element = gst.gst_bin_get_by_name(pipeline, element_name.encode())
        if not element:
            raise Failure(f"ERROR: the pipeline has no element named {element_name!r}")
        try:
            g_class = ctypes.cast(element, ctypes.POINTER(ctypes.c_void_p))[0]  # GTypeInstance.g_class
            for name, value in values.items():
                spec = gst.g_object_class_find_property(g_class, name.encode())
                if not spec or spec.contents.value_type != G_TYPE_STRING:
                    raise Failure(f"ERROR: element {element_name!r} has no text property {name!r}")
                holder = GValue()
                gst.g_value_init(ctypes.byref(holder), G_TYPE_STRING)
                gst.g_value_set_string(ctypes.byref(holder), value.encode())
                gst.g_object_set_property(element, name.encode(), ctypes.byref(holder))
                gst.g_value_unset(ctypes.byref(holder))
        finally:
            gst.gst_object_unref(element)


def describe(gst: Gst, message: "ctypes._Pointer[Message]", kind: str) -> str:
    """``ERROR: <element>: <message> (<last line of the debug text>)``."""
    parse = gst.gst_message_parse_error if kind == "ERROR" else gst.gst_message_parse_warning
    error = ctypes.POINTER(GError)()
    debug = ctypes.c_void_p()
    parse(message, ctypes.byref(error), ctypes.byref(debug))
    text = gst.take_error(error)
    details = gst.take_string(debug.value).strip().splitlines()
    source = gst.take_string(gst.gst_object_get_name(message.contents.src)) if message.contents.src else "pipeline"
    detail = details[-1].strip() if details else ""
    return f"{kind}: {source}: {text}" + (f" ({detail})" if detail and detail not in text else "")


class CapsReporter:
    """Prints the caps of an element's sink pad on stdout each time they change."""

    def __init__(self, gst: Gst, pipeline: int, element_name: str) -> None:
        self.gst = gst
        self.last = ""
        element = gst.gst_bin_get_by_name(pipeline, element_name.encode())
        if not element:
            raise Failure(f"ERROR: the pipeline has no element named {element_name!r}")
        self.pad = gst.gst_element_get_static_pad(element, b"sink")
        gst.gst_object_unref(element)
        if not self.pad:
            raise Failure(f"ERROR: element {element_name!r} has no sink pad")
        # Caps changes are then announced on the bus, so they are seen without waiting a poll.
        gst.gst_element_add_property_deep_notify_watch(pipeline, b"caps", 0)

    def check(self) -> None:
        caps = self.gst.gst_pad_get_current_caps(self.pad)
        if not caps:
            return
        text = self.gst.take_string(self.gst.gst_caps_to_string(caps))
        self.gst.gst_mini_object_unref(caps)
        if text != self.last:
            self.last = text
            print(f"caps {text}", flush=True)


def run(gst: Gst, config: dict, end: EndRequest) -> int:
    pipeline = build(gst, list(config["args"]))
    try:
        set_properties(gst, pipeline, config.get("properties") or {})
        reporter = CapsReporter(gst, pipeline, config["caps_of"]) if config.get("caps_of") else None
        bus = gst.gst_element_get_bus(pipeline)
        try:
            if gst.gst_element_set_state(pipeline, STATE_PLAYING) == STATE_CHANGE_FAILURE:
                raise Failure(first_error(gst, bus))
            return watch(gst, pipeline, bus, reporter, end)
        finally:
            gst.gst_object_unref(bus)
    finally:
        gst.gst_element_set_state(pipeline, STATE_NULL)
        gst.gst_object_unref(pipeline)


def first_error(gst: Gst, bus: int) -> str:
    """Why the pipeline refused to start: the error the failing element posted on the bus."""
    while True:
        message = gst.gst_bus_timed_pop_filtered(bus, POLL_NS, MESSAGE_ANY)
        if not message:
            return "ERROR: the pipeline refused to start"
        try:
            if message.contents.type == MESSAGE_ERROR:
                return describe(gst, message, "ERROR")
        finally:
            gst.gst_mini_object_unref(message)


def watch(gst: Gst, pipeline: int, bus: int, reporter: "CapsReporter | None", end: EndRequest) -> int:
    """Follow the bus until end of stream (0) or an error (Failure), as gst-launch-1.0 does;
    after a SIGINT, send the pipeline end of stream (once) and wait for it to come through."""
    sent_end = False
    while True:
        if end.requested and not sent_end:
            sent_end = True
            gst.gst_element_send_event(pipeline, gst.gst_event_new_eos())  # takes the event
        message = gst.gst_bus_timed_pop_filtered(bus, POLL_NS, MESSAGE_ANY)
        if reporter is not None:
            reporter.check()
        if not message:
            continue
        try:
            kind = message.contents.type
            if kind == MESSAGE_EOS:
                return 0
            if kind == MESSAGE_ERROR:
                raise Failure(describe(gst, message, "ERROR"))
            if kind == MESSAGE_WARNING:
                print(describe(gst, message, "WARNING"), file=sys.stderr, flush=True)
            elif kind == MESSAGE_CLOCK_LOST:  # pick a new clock, as gst-launch-1.0 does
                gst.gst_element_set_state(pipeline, STATE_PAUSED)
                gst.gst_element_set_state(pipeline, STATE_PLAYING)
            elif kind == MESSAGE_LATENCY:
                gst.gst_bin_recalculate_latency(pipeline)
        finally:
            gst.gst_mini_object_unref(message)


def main() -> int:
    parser = argparse.ArgumentParser(prog="framebroker-gst-launch")
    parser.add_argument("--config-fd", type=int, help="file descriptor to read the JSON pipeline configuration from")
    parser.add_argument("--name", default="", help="a label for ps; not used")
    parser.add_argument("--has-element", metavar="NAME", help="exit 0 if GStreamer has the element NAME, else 1")
    args = parser.parse_args()
    end = EndRequest()
    end.install()
    try:
        gst = Gst()
        if args.has_element:
            factory = gst.gst_element_factory_find(args.has_element.encode())
            if factory:
                gst.gst_object_unref(factory)
            return 0 if factory else 1
        if args.config_fd is None:
            parser.error("give --config-fd or --has-element")
        with os.fdopen(args.config_fd, "rb") as source:
            config = json.loads(source.read().decode())
        return run(gst, config, end)
    except Failure as failure:
        print(failure, file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
