"""What ``framebroker status`` (and the preview's /metrics) know about streams and readers.

Everything here reads segments through a read-only mapping and decides liveness from OFD locks
(``_ring.py``), so it needs no cooperation from the daemon, works when the daemon is dead, and
never disturbs a reader. The JSON schema it produces is documented in docs/status.md.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from ._errors import AccessDenied, IncompatibleSegment, StreamNotFound
from ._layout import (
    COUNTERS,
    COUNTERS_OFFSET,
    FRAME_COUNTERS,
    FRAME_COUNTERS_OFFSET,
    EXTRA_OFFSET,
    EXTRA_SIZE,
    GEOMETRY,
    GEOMETRY_OFFSET,
    NEWEST_SEQ,
    results_ring_name,
    NEWEST_SEQ_OFFSET,
    REASON_OFFSET,
    REASON_SIZE,
    SOURCE_OFFSET,
    SOURCE_SIZE,
    STATE_SINCE,
    STATE_SINCE_OFFSET,
    PixelFormat,
    ReaderMode,
    StreamState,
    decode_text,
)
from ._placement import INFO_KEY as DERIVED_INFO_KEY, placement_of
from ._reader import RATE_WINDOW_NS
from ._results import model_ring_names
from ._segment import Segment, list_stream_names, open_segment
from ._supervision import describe_supervisors, render_supervisors
from ._table import live_entries, read_entry

SCHEMA_VERSION = 1


def _json_text(raw: str) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {"text": raw}


def _read_extra(control: Any) -> Any:
    """The producer's JSON (EXTRA) field. The producer rewrites it in place now and then, so a
    read may catch half a rewrite: read until two reads agree."""
    raw = bytes(control[EXTRA_OFFSET : EXTRA_OFFSET + EXTRA_SIZE])
    for _ in range(5):
        again = bytes(control[EXTRA_OFFSET : EXTRA_OFFSET + EXTRA_SIZE])
        if again == raw:
            break
        raw = again
    return _json_text(decode_text(raw))


def describe_readers(segment: Segment) -> list[dict[str, Any]]:
    """Every live reader of an opened, mapped segment (dead and closed ones are not shown)."""
    control = segment.control
    assert control is not None
    (newest,) = NEWEST_SEQ.unpack_from(control, NEWEST_SEQ_OFFSET)
    now = time.time()
    readers = []
    for index, offset in live_entries(segment.locks, segment.layout, control):
        entry = read_entry(control, offset)
        last_frame = entry["last_frame_wall"]
        fps = entry["fps"]
        # A reader refreshes its rate with the first frame it takes RATE_WINDOW after the last
        # refresh, so a much older refresh means it stopped taking frames (stuck, or the stream
        # stalled): its last rate would be a lie.
        if fps and last_frame and now - last_frame > 2 * RATE_WINDOW_NS / 1e9 + 3.0 / fps:
            fps = 0.0
        readers.append(
            {
                "entry": index,
                "pid": entry["pid"],
                "name": entry["name"],
                "mode": ReaderMode.NAMES.get(entry["mode"], "unknown"),
                "fps": round(fps, 2),
                "frames": entry["frames"],
                "last_seq": entry["last_seq"],
                "lag": max(0, newest - entry["last_seq"]) if entry["last_seq"] else None,
                "dropped": entry["dropped"],
                "held": entry["held"],
                "hold": entry["hold"],
                "attached_since": entry["attached_wall"],
                "last_frame_age_s": round(now - last_frame, 3) if last_frame else None,
                "generation": entry["generation"],
                "info": _json_text(entry["info"]),
            }
        )
    return readers


def describe_segment(segment: Segment) -> dict[str, Any]:
    """Stream-level facts of an opened, mapped segment, with its readers."""
    control = segment.control
    assert control is not None
    header = segment.header
    layout = segment.layout
    newest, _slot, state, last_mono_ns, last_wall = FRAME_COUNTERS.unpack_from(control, FRAME_COUNTERS_OFFSET)
    published = newest  # every published frame gets the next seq
    info = _read_extra(control)
    fmt, height, width, channels = GEOMETRY.unpack_from(control, GEOMETRY_OFFSET)
    configured_fps, measured_fps, source_drops, publisher_drops, reconnects, source_errors = COUNTERS.unpack_from(control, COUNTERS_OFFSET)
    (state_since,) = STATE_SINCE.unpack_from(control, STATE_SINCE_OFFSET)
    alive = segment.owner_alive()
    now_mono = time.monotonic_ns()
    state_name = StreamState.NAMES.get(state, "unknown")
    if not alive:
        state_name = "dead"
    last_age = (now_mono - last_mono_ns) / 1e9 if last_mono_ns else None
    # The daemon refreshes its measured rate about once a second while frames flow; once they
    # stop (or the daemon died) the last value would be a lie: report what is flowing now.
    expected_fps = configured_fps or measured_fps
    if not alive or (last_age is not None and last_age > 1.0 + 3.0 / max(expected_fps, 0.1)):
        measured_fps = 0.0
    return {
        "name": segment.stream,
        "state": state_name,
        "reason": decode_text(control[REASON_OFFSET : REASON_OFFSET + REASON_SIZE]),
        "state_since": state_since,
        "alive": alive,
        "pid": header.owner_pid,
        "source": decode_text(control[SOURCE_OFFSET : SOURCE_OFFSET + SOURCE_SIZE]),
        "width": width,
        "height": height,
        "channels": channels,
        "format": PixelFormat.NAMES.get(fmt, "unknown"),
        "configured_fps": round(configured_fps, 3),
        "measured_fps": round(measured_fps, 2),
        "seq": newest,
        "frames": published,
        "source_drops": source_drops,
        "publisher_drops": publisher_drops,
        "reconnects": reconnects,
        "source_errors": source_errors,
        "last_frame_age_s": round(last_age, 3) if last_age is not None else None,
        "last_frame_wall": last_wall or None,
        "started": header.created_wall,
        "uptime_s": round((now_mono - header.created_mono_ns) / 1e9, 1),
        "slots": layout.slot_count,
        "slot_bytes": layout.slot_capacity,
        "shm_bytes": layout.total_size,
        "mode": f"{segment.mode:04o}",
        "gid": segment.gid,
        "info": info,
        **_ring_growth(info),
        **_derivation(info, newest, source_drops),
        "readers": describe_readers(segment),
        "models": describe_models(segment.stream, newest, header.epoch),
    }


def _ring_growth(info: Any) -> dict[str, Any]:
    """A growing ring's limit and its size changes (``serve --slots auto``); nulls for a fixed one."""
    ring = info.get("ring") if isinstance(info, dict) else None
    if not isinstance(ring, dict):
        return {"max_shm_bytes": None, "starting_slots": None, "ring_history": []}
    return {
        "max_shm_bytes": ring.get("max_shm_bytes"),
        "starting_slots": ring.get("starting_slots"),
        "ring_history": ring.get("history", []),
    }


def _derivation(info: Any, newest: int, source_drops: int) -> dict[str, Any]:
    """What a derived stream (``serve --derive``) is made from: nulls for a main stream."""
    derived = info.get(DERIVED_INFO_KEY) if isinstance(info, dict) else None
    if not isinstance(derived, dict):
        return {"derived_from": None, "derive": None}
    found = placement_of(derived, newest) if newest else None
    return {
        "derived_from": derived.get("from"),
        "derive": {
            "name": derived.get("name"),
            "mode": derived.get("mode"),
            # Where the newest frame's picture comes from and goes (null before the first frame).
            "from_seq": found[0] if found else None,
            "source_box": list(found[1].source) if found else None,
            "target_box": list(found[1].target) if found else None,
        },
        # The main stream's frames this one did not draw because it was busy with an earlier one.
        "skipped": source_drops,
    }


def group_derived(streams: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each derived stream into its main stream's ``derived`` list, when that is among
    ``streams``; the others (main streams, and derived ones whose main is not listed) in order."""
    by_name = {stream["name"]: stream for stream in streams}
    grouped = []
    for stream in streams:
        stream.setdefault("derived", [])
    for stream in streams:
        main = by_name.get(stream.get("derived_from") or "")
        if main is not None and main is not stream:
            main["derived"].append(stream)
        else:
            grouped.append(stream)
    return grouped


def describe_models(stream: str, stream_seq: int, stream_epoch: int) -> list[dict[str, Any]]:
    """Every model with a results ring on the stream (``_results.py``), live or left behind."""
    models = []
    for model in model_ring_names(stream):
        try:
            segment = open_segment(results_ring_name(stream, model), for_status=True)
        except (StreamNotFound, AccessDenied, IncompatibleSegment) as exc:
            models.append({"name": model, "state": "unreadable", "alive": None, "error": str(exc), "readers": []})
            continue
        try:
            segment.map(control_writable=False, data_access=None)
            models.append(_describe_model(segment, model, stream_seq, stream_epoch))
        finally:
            segment.close()
    return models


def _describe_model(segment: Segment, model: str, stream_seq: int, stream_epoch: int) -> dict[str, Any]:
    control = segment.control
    assert control is not None
    newest, _slot, state, last_mono_ns, _wall = FRAME_COUNTERS.unpack_from(control, FRAME_COUNTERS_OFFSET)
    measured = COUNTERS.unpack_from(control, COUNTERS_OFFSET)[1]
    info = _read_extra(control)
    alive = segment.owner_alive()
    now_mono = time.monotonic_ns()
    age = (now_mono - last_mono_ns) / 1e9 if last_mono_ns else None
    # Results of a daemon that is gone are not behind the new one's frames: they are about others.
    same_daemon = isinstance(info, dict) and info.get("stream_epoch") == stream_epoch
    if not alive or (age is not None and age > 2.0 + 3.0 / max(measured, 0.1)):
        measured = 0.0
    return {
        "name": model,
        "state": StreamState.NAMES.get(state, "unknown") if alive else "dead",
        "alive": alive,
        "pid": segment.header.owner_pid,
        "results": info.get("results", 0) if isinstance(info, dict) else 0,
        "results_per_s": round(measured, 2),
        "latency_p50_ms": info.get("latency_p50_ms") if isinstance(info, dict) else None,
        "latency_p99_ms": info.get("latency_p99_ms") if isinstance(info, dict) else None,
        "seq": newest,
        "lag": max(0, stream_seq - newest) if newest and same_daemon else None,
        "last_result_age_s": round(age, 3) if age is not None else None,
        "readers": describe_readers(segment),
    }


def describe_stream(name: str) -> dict[str, Any]:
    """Status of one stream; problems become a ``state`` with an ``error`` instead of raising."""
    try:
        segment = open_segment(name, for_status=True)
    except StreamNotFound as exc:
        return {"name": name, "state": "absent", "alive": False, "error": str(exc), "readers": []}
    except AccessDenied as exc:
        return {"name": name, "state": "no-access", "alive": None, "error": str(exc), "readers": []}
    except IncompatibleSegment as exc:
        return {"name": name, "state": "incompatible", "alive": None, "error": str(exc), "readers": []}
    try:
        segment.map(control_writable=False, data_access=None)
        return describe_segment(segment)
    finally:
        segment.close()


def collect(name: Optional[str] = None) -> dict[str, Any]:
    """The whole ``status --json`` document."""
    every = list_stream_names()
    # A stream's derived streams are called NAME.SOMETHING: listed with it, under it.
    names = every if name is None else [name] + [n for n in every if n.startswith(name + ".") and "." not in n[len(name) + 1 :]]
    return {
        "schema": SCHEMA_VERSION,
        "time": time.time(),
        "host": os.uname().nodename,
        "streams": group_derived([describe_stream(n) for n in names]),
        # framebroker up's children (of stream ``name`` only, if given): _supervision.py
        "supervisors": describe_supervisors(name),
    }


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _since(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) if wall else "-"


def _fps(value: float) -> str:
    return f"{value:g}" if value else "unknown"


def state_line(stream: dict[str, Any], now: Optional[float] = None) -> str:
    """One line saying what a stream is doing, for how long and why (table and preview page)."""
    if "error" in stream:
        return f"{stream['state']}: {stream['error']}"
    state = stream["state"]
    if state == "dead":
        return (
            f"dead: its daemon (pid {stream['pid']}) is gone, last frame {_age(stream['last_frame_age_s'])} ago; "
            f"shown from the shared memory it left behind (a restarted daemon takes it over; "
            f"framebroker clean {stream['name']} removes it)"
        )
    since = stream.get("state_since") or 0.0
    now = time.time() if now is None else now
    text = state + (f" for {_age(max(0.0, now - since))}" if since else "")
    if stream["reason"] and state != "streaming":
        text += f": {stream['reason']}"
    return text


def render_table(document: dict[str, Any]) -> str:
    """The human-readable form of a ``collect()`` document."""
    lines: list[str] = []
    streams = document["streams"]
    supervisors = render_supervisors(document.get("supervisors", []), document.get("time"))
    if not streams:
        return "\n".join(["no streams (start one with: framebroker serve test:// --name cam0)", ""] + supervisors).rstrip() + "\n"
    now = document.get("time") or time.time()
    for stream in streams:
        lines.append(f"stream {stream['name']}: {state_line(stream, now)}")
        if "error" in stream:
            lines.append("")
            continue
        dead = stream["state"] == "dead"
        lines.append(
            f"  source {stream['source'] or '-'}   {stream['width']}x{stream['height']} {stream['format']}   "
            f"fps {stream['measured_fps']:.1f} measured, {_fps(stream['configured_fps'])} configured"
        )
        lines.append(
            f"  seq {stream['seq']}   dropped at source {stream['source_drops']}   "
            f"last frame {_age(stream['last_frame_age_s'])} ago   reconnects {stream['reconnects']}"
        )
        lines.append(
            f"  daemon pid {stream['pid']}{' (gone)' if dead else ''}   up {'-' if dead else _age(stream['uptime_s'])}   "
            f"{stream['slots']} slots, {stream['shm_bytes'] / (1 << 20):.1f} MiB, mode {stream['mode']}"
        )
        lines.extend(_growth_lines(stream))
        lines.extend(_replay_lines(stream))
        lines.extend(_link_lines(stream))
        if stream.get("derived_from"):
            lines.append(f"  derived from stream {stream['derived_from']}: {_derived_geometry(stream)}, {stream['skipped']} skipped")
            lines.extend(_placement_lines(stream, "  "))
        lines.extend(_reader_lines(stream["readers"], "  "))
        for model in stream.get("models", []):
            lines.extend(_model_lines(model))
        for derived in stream.get("derived", []):
            lines.extend(_derived_lines(derived, now))
        lines.append("")
    return "\n".join(lines + supervisors).rstrip() + "\n"


def _reader_lines(readers: list[dict[str, Any]], indent: str) -> list[str]:
    if not readers:
        return [f"{indent}no readers"]
    lines = [f"{indent}{'PID':>7}  {'NAME':<18} {'MODE':<8} {'FPS':>6} {'LAG':>5} {'DROPPED':>8} {'HELD':>5}  {'SINCE':<8}  INFO"]
    for reader in readers:
        info = reader["info"]
        info_text = " ".join(f"{k}={v}" for k, v in info.items()) if isinstance(info, dict) else str(info)
        lag = "-" if reader["lag"] is None else str(reader["lag"])
        lines.append(
            f"{indent}{reader['pid']:>7}  {reader['name'][:18]:<18} {reader['mode']:<8} {reader['fps']:>6.1f} {lag:>5} "
            f"{reader['dropped']:>8} {reader['held']:>2}/{reader['hold']:<2}  {_since(reader['attached_since']):<8}  {info_text}"
        )
    return lines


def _derived_lines(derived: dict[str, Any], now: float) -> list[str]:
    """A derived stream under its main stream: geometry, rate, frames skipped, where the main
    picture goes, then its own readers and models."""
    if "error" in derived:
        return [f"  derived {derived['name']}: {derived['state']}: {derived['error']}"]
    state = "" if derived["state"] == "streaming" else f"; {state_line(derived, now)}"
    lines = [f"  derived {derived['name']}: {_derived_geometry(derived)}, {derived['measured_fps']:.1f} fps, {derived['skipped']} skipped{state}"]
    lines.extend(_placement_lines(derived, "    "))
    lines.extend(_reader_lines(derived["readers"], "    "))
    for model in derived.get("models", []):
        lines.extend("  " + line for line in _model_lines(model))
    return lines


def _derived_geometry(stream: dict[str, Any]) -> str:
    return f"{stream['width']}x{stream['height']} {stream['format']} {(stream['derive'] or {}).get('mode')}"


def _placement_lines(stream: dict[str, Any], indent: str) -> list[str]:
    """Where the main picture goes, unless it is simply all of it into all of this one (X
    geometry: WxH+X+Y)."""
    derive = stream["derive"] or {}
    source, target = derive.get("source_box"), derive.get("target_box")
    if not source or not target or derive.get("mode") == "stretch":
        return []
    return [indent + "main frame {2}x{3}+{0}+{1} drawn at {6}x{7}+{4}+{5}".format(*source, *target)]


def _growth_lines(stream: dict[str, Any]) -> list[str]:
    if stream.get("max_shm_bytes") is None:
        return []
    text = f"  ring grows as readers need: started at {stream['starting_slots']} slots, up to {stream['max_shm_bytes'] / (1 << 20):.0f} MiB"
    history = stream.get("ring_history") or []
    if history:
        last = history[-1]
        verb = "grew" if last["to"] > last["from"] else "shrank"
        text += f"; {verb} from {last['from']} to {last['to']} at {_since(last['at'])} ({last['why']})"
        if len(history) > 1:
            text += f", {len(history)} changes in all"
    return [text]


def _replay_lines(stream: dict[str, Any]) -> list[str]:
    """A replayed file (``info.replay``, see _replay.py): its pace, where it is, whom it waits for."""
    info = stream.get("info")
    replay = info.get("replay") if isinstance(info, dict) else None
    if not isinstance(replay, dict):
        return []
    frames = f"/{replay['frames']}" if replay.get("frames") else ""
    duration = f"/{replay['duration_s']:.2f}" if replay.get("duration_s") else ""
    line = f"  replay pace {replay.get('pace')}   frame {replay.get('frame', 0)}{frames}   time {replay.get('time_s', 0.0):.2f}{duration} s"
    if replay.get("pass", 1) > 1:
        line += f"   pass {replay['pass']}"
    line += "   recorded seq and wall time" if replay.get("recorded") else "   new seqs (no index)"
    if replay.get("results"):
        line += f"   results of {replay['results']} model(s) republished"
    lines = [line]
    waiting = replay.get("waiting_for")
    if waiting:
        names = ", ".join(f"{r['name']!r} (pid {r['pid']}, took frame {r['last_seq']})" for r in waiting)
        more = replay.get("waiting_count", len(waiting)) - len(waiting)
        lines.append(f"  lockstep: waiting {replay.get('waiting_s', 0.0):.1f} s for {names}{f' and {more} more' if more > 0 else ''}")
    return lines


def _link_lines(stream: dict[str, Any]) -> list[str]:
    """Zenoh links (``framebroker bridge``, ``serve zenoh://``): a remote stream's origin, link and
    latency from capture there to publish here; a bridge's remotes, their latency and losses."""
    lines = []
    info = stream.get("info")
    remote = info.get("remote") if isinstance(info, dict) else None
    if isinstance(remote, dict):
        latency = "-" if remote.get("latency_p50_ms") is None else f"{remote['latency_p50_ms']:.1f}/{remote.get('latency_p99_ms', 0):.1f} ms"
        lines.append(
            f"  remote: from {remote.get('origin')} ({remote.get('origin_state')}) over zenoh {remote.get('key')}   "
            f"link {remote.get('link')} ({remote.get('peers')} peers)   capture to here p50/p99 {latency}   "
            f"lost on link {remote.get('lost')}   skipped to keyframe {remote.get('skipped')}"
        )
    for reader in stream.get("readers", []):
        bridge = reader.get("info")
        if not (isinstance(bridge, dict) and bridge.get("out") == "zenoh" and "link" in bridge):
            continue
        latency = "-" if bridge.get("remote_ms") is None else f"{bridge['remote_ms']:.1f} ms"
        lines.append(
            f"  bridge pid {reader['pid']}: zenoh framebroker/{stream['name']}/video   link {bridge['link']} ({bridge.get('peers')} peers, "
            f"{bridge.get('remotes')} remotes)   capture to remote p50 {latency}   lost on link {bridge.get('lost')}"
        )
    return lines


def _model_lines(model: dict[str, Any]) -> list[str]:
    if "error" in model:
        return [f"  model {model['name']}: {model['state']}: {model['error']}"]
    lag = "-" if model["lag"] is None else str(model["lag"])
    latency = "-" if model["latency_p50_ms"] is None else f"{model['latency_p50_ms']:.1f}/{model['latency_p99_ms']:.1f} ms"
    writer = f"writer pid {model['pid']}" + ("" if model["alive"] else " (gone)")
    readers = ", ".join(f"{r['name']} (pid {r['pid']})" for r in model["readers"]) or "none"
    return [
        f"  model {model['name']}: {writer}   {model['results_per_s']:.1f} results/s   latency p50/p99 {latency}   "
        f"lag {lag}   readers: {readers}"
    ]


__all__ = [
    "SCHEMA_VERSION",
    "collect",
    "describe_models",
    "describe_readers",
    "describe_segment",
    "describe_stream",
    "group_derived",
    "render_table",
    "state_line",
]
