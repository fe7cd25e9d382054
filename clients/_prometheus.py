"""The preview's ``/metrics``: a status document (``fb.status()``) in Prometheus text format 0.0.4.

Written by hand (the format is small) so that running the preview needs no extra package.
Label values are escaped as the format requires (backslash, double quote, line feed), since
reader names and sources are free text.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every state a stream can be reported in; exported as one 0/1 series each, so that an alert
# can match on framebroker_stream_state{state="reconnecting"} == 1.
STATES = ("starting", "streaming", "reconnecting", "stopped", "ended", "replaced", "dead", "absent", "no-access", "incompatible")


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """Collects metric families in order and renders them with their HELP and TYPE lines."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def family(self, name: str, kind: str, help_text: str) -> None:
        self._families.setdefault(name, (kind, help_text, []))

    def sample(self, name: str, labels: dict[str, Any], value: Optional[float]) -> None:
        """Add one sample to a declared family; ``None`` (not known) adds nothing."""
        if value is None:
            return
        text = ",".join(f'{key}="{escape_label(str(label))}"' for key, label in labels.items())
        self._families[name][2].append(f"{name}{{{text}}} {format_value(value)}" if text else f"{name} {format_value(value)}")

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


_STREAM_METRICS = (
    # name, type, help, key in the status document
    ("framebroker_stream_frames_total", "counter", "Frames published since the daemon started.", "frames"),
    ("framebroker_stream_seq", "gauge", "Sequence number of the newest frame.", "seq"),
    ("framebroker_stream_fps", "gauge", "Measured frames per second (0 when frames stopped).", "measured_fps"),
    ("framebroker_stream_configured_fps", "gauge", "Frame rate the source is configured for (0: unknown).", "configured_fps"),
    ("framebroker_stream_source_drops_total", "counter", "Frames the source lost before they reached the ring.", "source_drops"),
    ("framebroker_stream_reconnects_total", "counter", "Times the daemon had to reconnect to its source.", "reconnects"),
    ("framebroker_stream_last_frame_age_seconds", "gauge", "Seconds since the newest frame was captured.", "last_frame_age_s"),
    ("framebroker_stream_uptime_seconds", "gauge", "Seconds since the daemon created the stream.", "uptime_s"),
    ("framebroker_stream_width_pixels", "gauge", "Frame width.", "width"),
    ("framebroker_stream_height_pixels", "gauge", "Frame height.", "height"),
    ("framebroker_stream_slots", "gauge", "Frames the ring holds.", "slots"),
)

_READER_METRICS = (
    ("framebroker_reader_frames_total", "counter", "Frames this reader has taken.", "frames"),
    ("framebroker_reader_fps", "gauge", "Frames per second this reader takes (0 when it stopped).", "fps"),
    ("framebroker_reader_lag_frames", "gauge", "Frames between the newest one and the last one this reader took.", "lag"),
    ("framebroker_reader_dropped_total", "counter", "Frames an ordered reader missed because they were overwritten.", "dropped"),
    ("framebroker_reader_held_slots", "gauge", "Frames this reader holds right now.", "held"),
    ("framebroker_reader_hold_slots", "gauge", "Frames this reader may hold at most (its reserved slots).", "hold"),
)

_MODEL_METRICS = (
    ("framebroker_model_results_total", "counter", "Results the model's writer has published.", "results"),
    ("framebroker_model_results_per_second", "gauge", "Results per second the model publishes (0 when it stopped).", "results_per_s"),
    ("framebroker_model_lag_frames", "gauge", "Frames between the stream's newest frame and the model's newest result.", "lag"),
    ("framebroker_model_last_result_age_seconds", "gauge", "Seconds since the model published its newest result.", "last_result_age_s"),
)


def _render_models(out: Exposition, stream: dict[str, Any]) -> None:
    for model in stream.get("models", []):
        labels = {"stream": stream["name"], "model": model["name"]}
        out.sample("framebroker_model_up", labels, 1 if model.get("alive") else 0)
        if "error" in model:
            continue
        out.sample("framebroker_model_info", {**labels, "pid": model["pid"]}, 1)
        for name, _kind, _help, key in _MODEL_METRICS:
            out.sample(name, labels, model.get(key))
        for quantile, key in (("0.5", "latency_p50_ms"), ("0.99", "latency_p99_ms")):
            latency = model.get(key)
            out.sample("framebroker_model_latency_seconds", {**labels, "quantile": quantile}, None if latency is None else latency / 1000)
        out.sample("framebroker_model_readers", labels, len(model["readers"]))


def render(streams: Iterable[dict[str, Any]], preview: Optional[dict[str, Any]] = None) -> str:
    """Prometheus text for the streams of a status document, plus the preview's own counters."""
    out = Exposition()
    out.family("framebroker_stream_up", "gauge", "1 while a live daemon serves the stream, else 0.")
    out.family("framebroker_stream_state", "gauge", "1 for the state the stream is in, 0 for the others.")
    out.family("framebroker_stream_info", "gauge", "Always 1; the labels carry the source (credentials removed) and pixel format.")
    for name, kind, help_text, _key in _STREAM_METRICS:
        out.family(name, kind, help_text)
    out.family("framebroker_stream_readers", "gauge", "Readers attached to the stream.")
    out.family("framebroker_reader_info", "gauge", "Always 1; the labels carry the reader's mode (live, next, ordered, idle).")
    for name, kind, help_text, _key in _READER_METRICS:
        out.family(name, kind, help_text)
    out.family("framebroker_model_up", "gauge", "1 while a live writer publishes the model's results, else 0.")
    out.family("framebroker_model_info", "gauge", "Always 1; the labels carry the writer's pid.")
    for name, kind, help_text, _key in _MODEL_METRICS:
        out.family(name, kind, help_text)
    out.family(
        "framebroker_model_latency_seconds",
        "gauge",
        "Capture to result, over the writer's last 512 results: the median (quantile 0.5) and the 99th percentile.",
    )
    out.family("framebroker_model_readers", "gauge", "Processes reading the model's results.")
    for stream in streams:
        stream_label = {"stream": stream["name"]}
        out.sample("framebroker_stream_up", stream_label, 1 if stream.get("alive") else 0)
        for state in STATES:
            out.sample("framebroker_stream_state", {**stream_label, "state": state}, 1 if stream["state"] == state else 0)
        if "error" in stream:
            continue
        out.sample("framebroker_stream_info", {**stream_label, "source": stream["source"], "format": stream["format"]}, 1)
        for name, _kind, _help, key in _STREAM_METRICS:
            out.sample(name, stream_label, stream.get(key))
        out.sample("framebroker_stream_readers", stream_label, len(stream["readers"]))
        for reader in stream["readers"]:
            labels = {**stream_label, "reader": reader["name"], "pid": reader["pid"]}
            out.sample("framebroker_reader_info", {**labels, "mode": reader["mode"]}, 1)
            for name, _kind, _help, key in _READER_METRICS:
                out.sample(name, labels, reader.get(key))
        _render_models(out, stream)
    if preview is not None:
        label = {"stream": preview["stream"]}
        out.family("framebroker_preview_viewers", "gauge", "Browsers watching the MJPEG picture now.")
        out.sample("framebroker_preview_viewers", label, preview["viewers"])
        out.family("framebroker_preview_jpeg_encodes_total", "counter", "JPEG encodes: one per frame shown, however many browsers watch.")
        out.sample("framebroker_preview_jpeg_encodes_total", label, preview["jpeg_encodes"])
        out.family("framebroker_preview_frames_sent_total", "counter", "JPEG pictures sent, added up over all browsers.")
        out.sample("framebroker_preview_frames_sent_total", label, preview["frames_sent"])
        out.family("framebroker_preview_encode_seconds_total", "counter", "Time spent encoding JPEGs.")
        out.sample("framebroker_preview_encode_seconds_total", label, preview["encode_seconds"])
        if "results_viewers" in preview:
            out.family("framebroker_preview_results_viewers", "gauge", "Pages receiving the models' results now.")
            out.sample("framebroker_preview_results_viewers", label, preview["results_viewers"])
            out.family("framebroker_preview_results_sent_total", "counter", "Results sent to pages, added up over all pages.")
            out.sample("framebroker_preview_results_sent_total", label, preview["results_sent"])
    return out.render()
