"""``framebroker view NAME``: a browser preview of one stream.

One page (``/``) shows the live picture next to the stream's status, refreshed every second
from ``/status.html``, with each model's boxes drawn over the frame they were computed on (a
checkbox per model). The picture is MJPEG (``/stream.mjpg``, multipart/x-mixed-replace, which
every browser plays in an ``<img>``); each part also names its frame (``X-Frame-Seq``,
``X-Frame-Time``), and the page's script (``/preview.js``, see ``_preview_script``) reads the
stream itself to draw each JPEG on a canvas with that frame's results, which come as
Server-Sent Events from ``/results`` (``ResultHub``). ``/status.json`` is ``framebroker status
NAME --json`` plus the preview's own counters; ``/metrics`` is the same in Prometheus text
format.

HTTP comes from the standard library's ``ThreadingHTTPServer``: a thread per connection suits
a handful of long-lived MJPEG viewers, and the preview adds no dependency to install on a
Jetson. JPEG encoding happens once per frame in ``JpegHub`` however many browsers watch, and
not at all while none does. It binds to 127.0.0.1 unless ``--host`` says otherwise: there is
no authentication.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import select
import socket
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import framebroker as fb
from framebroker.arguments import float_in, int_in, stream_name

from . import _prometheus
from ._common import exit_on_sigterm, say
from ._hub import ViewerHub
from ._mjpeg import JpegHub
from ._models import model_colour_hex
from ._preview_script import SCRIPT
from ._result_hub import ResultHub

log = logging.getLogger("framebroker.view")

BOUNDARY = b"framebroker-frame"
# The page is told the models (their colours, latency, whether they publish) this often (s).
MODELS_EVENT_PERIOD = 1.0

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", type=stream_name, help="stream to show (it may start later)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int_in(0, 65535, "--port"), default=8080, help="TCP port (default 8080; 0 picks a free one)")
    parser.add_argument("--quality", type=int_in(1, 100, "--quality"), default=80, help="JPEG quality 1-100 (default 80)")
    parser.add_argument("--max-fps", type=float_in(0, 1000, "--max-fps", low_inclusive=True), default=15.0, help="encode at most this many pictures a second (default 15; 0: every frame)")
    parser.add_argument("--max-viewers", type=int_in(1, 1000, "--max-viewers"), default=16, help="MJPEG viewers at once (default 16)")


# --- the page -------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>framebroker: {name}</title>
<style>
  body {{ margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; background: #f4f4f2; color: #1d1d1b; }}
  header {{ background: #1d1d1b; color: #f4f4f2; padding: 10px 16px; font-size: 16px; }}
  header b {{ color: #ffd75e; }}
  main {{ display: flex; flex-wrap: wrap; gap: 16px; padding: 16px; align-items: flex-start; }}
  figure {{ margin: 0; }}
  #picture {{ display: block; max-width: 100%; min-width: 320px; min-height: 240px; background: #000; }}
  #models {{ margin-top: 6px; }}
  #models label {{ display: block; }}
  #models .swatch {{ display: inline-block; width: 10px; height: 10px; margin: 0 2px 0 4px; border: 1px solid #555; }}
  #status {{ flex: 1; min-width: 360px; }}
  h2 {{ font-size: 18px; margin: 0 0 8px; }}
  h3 {{ font-size: 15px; margin: 16px 0 6px; }}
  table {{ border-collapse: collapse; }}
  th, td {{ text-align: left; padding: 2px 10px 2px 0; vertical-align: top; }}
  table.readers th {{ border-bottom: 1px solid #bbb; }}
  table.readers td.n {{ text-align: right; }}
  .state {{ padding: 1px 8px; border-radius: 9px; color: #fff; background: #777; font-weight: normal; }}
  .state-streaming {{ background: #2f7d32; }}
  .state-reconnecting, .state-starting {{ background: #b26a00; }}
  .state-dead, .state-absent, .state-ended, .state-stopped {{ background: #b3261e; }}
  .message {{ background: #fff3cd; border: 1px solid #e0c36c; padding: 6px 10px; }}
  .preview {{ color: #555; margin-top: 16px; }}
</style>
</head>
<body>
<header>framebroker &middot; stream <b>{name}</b> on {host}</header>
<main>
<figure>
<canvas id="picture" width="640" height="480" aria-label="live picture of stream {name}"></canvas>
<noscript><img id="picture" src="stream.mjpg" alt="live picture of stream {name}"></noscript>
<figcaption id="models"></figcaption>
</figure>
<section id="status">{status}</section>
</main>
<script src="preview.js"></script>
</body>
</html>
"""


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _clock(wall: Optional[float]) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) if wall else "-"


def status_fragment(stream: dict[str, Any], preview: dict[str, Any], supervisors: Optional[list] = None) -> str:
    """The status part of the page: the same facts as ``framebroker status NAME``, escaped."""
    e = html.escape
    state = stream["state"]
    if "error" in stream:
        state_text = state
    elif state == "dead":
        state_text = f"dead: daemon pid {stream['pid']} is gone"
    else:
        since = stream.get("state_since")
        state_text = state + (f" for {_age(max(0.0, time.time() - since))}" if since else "")
    parts = [f'<h2>stream {e(stream["name"])} <span class="state state-{e(state)}">{e(state_text)}</span></h2>']
    problems = [text for text in (stream.get("error"), stream.get("reason") if state != "streaming" else "", preview["message"]) if text]
    for text in dict.fromkeys(problems):  # in order, without repeats
        parts.append(f'<p class="message">{e(text)}</p>')
    if "error" not in stream:
        configured = f"{stream['configured_fps']:g}" if stream["configured_fps"] else "unknown"
        facts = [
            ("source", stream["source"] or "-"),
            ("picture", f"{stream['width']}x{stream['height']} {stream['format']}"),
            ("fps", f"{stream['measured_fps']:.1f} measured, {configured} configured"),
            ("seq", str(stream["seq"])),
            ("dropped at source", str(stream["source_drops"])),
            ("last frame", f"{_age(stream['last_frame_age_s'])} ago"),
            ("reconnects", str(stream["reconnects"])),
            (
                "daemon",
                f"pid {stream['pid']}{' (gone)' if state == 'dead' else ''}, up {_age(stream['uptime_s'])}, "
                f"{stream['slots']} slots ({stream['shm_bytes'] / (1 << 20):.1f} MiB), mode {stream['mode']}",
            ),
        ]
        facts += _remote_facts(stream)
        parts.append('<table class="facts">' + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts) + "</table>")
        readers = stream["readers"]
        parts.append(f"<h3>readers ({len(readers)})</h3>")
        if readers:
            header = "".join(f"<th>{h}</th>" for h in ("pid", "name", "mode", "fps", "lag", "dropped", "held", "since", "info"))
            rows = []
            for reader in readers:
                info = reader["info"]
                info_text = " ".join(f"{k}={v}" for k, v in info.items()) if isinstance(info, dict) else str(info)
                cells = [
                    ("n", str(reader["pid"])),
                    ("", reader["name"]),
                    ("", reader["mode"]),
                    ("n", f"{reader['fps']:.1f}"),
                    ("n", "-" if reader["lag"] is None else str(reader["lag"])),
                    ("n", str(reader["dropped"])),
                    ("n", f"{reader['held']}/{reader['hold']}"),
                    ("", _clock(reader["attached_since"])),
                    ("", info_text),
                ]
                rows.append("<tr>" + "".join(f'<td class="{c}">{e(v)}</td>' for c, v in cells) + "</tr>")
            parts.append(f'<table class="readers"><tr>{header}</tr>{"".join(rows)}</table>')
        else:
            parts.append("<p>no readers</p>")
        parts.append(models_fragment(stream.get("models", [])))
    parts += _supervised_fragment(supervisors or [])
    viewers = preview["viewers"]
    limit = f"at most {preview['max_fps']:g} fps" if preview["max_fps"] else "every frame"
    parts.append(
        f'<p class="preview">preview: {viewers} viewer{"" if viewers == 1 else "s"}, {preview["jpeg_encodes"]} JPEG encodes, '
        f'{preview["frames_sent"]} pictures sent, quality {preview["quality"]}, {limit} &middot; '
        '<a href="metrics">metrics</a> &middot; <a href="status.json">status.json</a></p>'
    )
    return "\n".join(parts)


def _remote_facts(stream: dict[str, Any]) -> list[tuple[str, str]]:
    """A stream served from another machine (``zenoh://``): where from, the link, its latency."""
    info = stream.get("info")
    remote = info.get("remote") if isinstance(info, dict) else None
    if not isinstance(remote, dict):
        return []
    latency = remote.get("latency_p50_ms")
    return [
        ("origin", f"{remote.get('origin')} ({remote.get('origin_state')}) over zenoh {remote.get('key')}"),
        (
            "link",
            f"{remote.get('link')}, {remote.get('peers')} peers, capture to here "
            f"{'-' if latency is None else f'{latency:.1f} ms'} (p50), {remote.get('lost')} units lost",
        ),
    ]


def _supervised_fragment(supervisors: list) -> list[str]:
    """The stream's processes that ``framebroker up`` runs (the status document's ``supervisors``)."""
    e = html.escape
    parts = []
    for supervisor in supervisors:
        if "error" in supervisor or not supervisor.get("alive"):
            reason = supervisor.get("error") or f"framebroker up pid {supervisor['pid']} is gone: nothing restarts them"
            parts.append(f'<p class="message">{e(reason)}</p>')
            continue
        rows = []
        for child in supervisor["children"]:
            cells = [child["name"], child["state"], str(child.get("pid") or "-"), str(child["restarts"]), child.get("last_exit") or "-"]
            rows.append("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in cells) + "</tr>")
        header = "".join(f"<th>{h}</th>" for h in ("process", "state", "pid", "restarts", "last exit"))
        parts.append(f"<h3>supervised by framebroker up (pid {supervisor['pid']})</h3>")
        parts.append(f'<table class="readers"><tr>{header}</tr>{"".join(rows)}</table>')
    return parts


def models_fragment(models: list[dict[str, Any]]) -> str:
    """The models publishing results on the stream: the same facts as ``framebroker status``."""
    e = html.escape
    if not models:
        return "<h3>models (0)</h3><p>no model publishes results (fb.ResultWriter)</p>"
    header = "".join(f"<th>{h}</th>" for h in ("", "name", "writer", "results/s", "latency p50/p99", "lag", "readers"))
    rows = []
    for model in models:
        swatch = f'<span style="color:{model_colour_hex(model["name"])}">&#9632;</span>'
        if "error" in model:
            rows.append(f"<tr><td>{swatch}</td><td>{e(model['name'])}</td><td colspan=5>{e(model['state'])}: {e(model['error'])}</td></tr>")
            continue
        p50, p99 = model["latency_p50_ms"], model["latency_p99_ms"]
        cells = [
            ("", model["name"]),
            ("", f"pid {model['pid']}" + ("" if model["alive"] else " (gone)")),
            ("n", f"{model['results_per_s']:.1f}"),
            ("n", "-" if p50 is None else f"{p50:.0f} / {p99:.0f} ms"),
            ("n", "-" if model["lag"] is None else str(model["lag"])),
            ("", ", ".join(f"{r['name']} ({r['pid']})" for r in model["readers"]) or "none"),
        ]
        rows.append(f"<tr><td>{swatch}</td>" + "".join(f'<td class="{c}">{e(v)}</td>' for c, v in cells) + "</tr>")
    return f'<h3>models ({len(models)})</h3><table class="readers models"><tr>{header}</tr>{"".join(rows)}</table>'


# --- HTTP -----------------------------------------------------------------------------------------


class PreviewServer(ThreadingHTTPServer):
    """The HTTP server; a thread per connection, none of which keeps the process alive."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: JpegHub, results: ResultHub, stream: str, max_viewers: int) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.hub = hub
        self.results = results
        self.stream = stream
        self.max_viewers = max_viewers
        super().__init__(address, PreviewHandler)

    def status(self) -> dict[str, Any]:
        document = fb.status(self.stream)
        document["preview"] = {**self.hub.stats(), **self.results.stats()}
        return document


class PreviewHandler(BaseHTTPRequestHandler):
    server: PreviewServer
    server_version = "framebroker-view"
    # Socket timeout: a browser that stops reading gives up its thread after this long.
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._page()
            elif path == "/stream.mjpg":
                self._mjpeg()
            elif path == "/preview.js":
                self._send(HTTPStatus.OK, "text/javascript; charset=utf-8", SCRIPT.encode())
            elif path == "/results":
                self._results()
            elif path == "/status.html":
                document = self.server.status()
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", status_fragment(document["streams"][0], document["preview"], document.get("supervisors")).encode())
            elif path == "/status.json":
                self._send(HTTPStatus.OK, "application/json", json.dumps(self.server.status(), indent=2).encode())
            elif path == "/metrics":
                document = self.server.status()
                self._send(HTTPStatus.OK, _prometheus.CONTENT_TYPE, _prometheus.render(document["streams"], document["preview"]).encode())
            elif path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, "image/x-icon", b"")
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found: try / (the page), /stream.mjpg, /results, /status.json or /metrics\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the browser went away; nothing to tell it

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _page(self) -> None:
        document = self.server.status()
        page = PAGE.format(
            name=html.escape(self.server.stream),
            host=html.escape(document["host"]),
            status=status_fragment(document["streams"][0], document["preview"], document.get("supervisors")),
        )
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode())

    def _stream(self, hub: ViewerHub, content_type: str, body: Callable[[], None]) -> None:
        """A response that lasts while the browser watches: one viewer of ``hub`` (a 503 if it
        has ``--max-viewers`` already), the headers, then ``body()`` writes until it is done."""
        if not hub.add_viewer(self.server.max_viewers):
            message = f"too many viewers: at most {self.server.max_viewers} (framebroker view --max-viewers)\n"
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", message.encode())
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Connection", "close")
            self.end_headers()
            body()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            hub.remove_viewer()

    def _mjpeg(self) -> None:
        self._stream(self.server.hub, f"multipart/x-mixed-replace; boundary={BOUNDARY.decode()}", self._send_pictures)

    def _send_pictures(self) -> None:
        hub = self.server.hub
        number = 0
        while not hub.stopping:
            newest = hub.wait_newer(number, timeout=1.0)
            if newest is None:
                if self._browser_left():
                    return
                continue
            number = newest.number
            # The frame's seq and capture time (ms, CLOCK_MONOTONIC) ride along in headers an
            # <img> ignores: the page's script matches the models' results to them.
            head = b"--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\nX-Frame-Seq: %d\r\nX-Frame-Time: %.3f\r\n\r\n" % (
                BOUNDARY, len(newest.jpeg), newest.seq, newest.timestamp_ns / 1e6,
            )  # fmt: skip
            self.wfile.write(head + newest.jpeg + b"\r\n")
            hub.count_sent()

    def _results(self) -> None:
        """Server-Sent Events: each model's results (``result``) and, every second, the models
        with their colours and latency (``models``). See ``_preview_script``."""
        self._stream(self.server.results, "text/event-stream; charset=utf-8", self._send_results)

    def _send_results(self) -> None:
        hub = self.server.results
        self.wfile.write(b"retry: 2000\n\n")
        number = hub.backlog_start()
        models_due = 0.0
        while not hub.stopping:
            chunks = []
            if time.monotonic() >= models_due:
                models_due = time.monotonic() + MODELS_EVENT_PERIOD
                chunks.append("event: models\ndata: " + json.dumps(hub.models(), separators=(",", ":")) + "\n\n")
            number, events = hub.wait_events(number, timeout=MODELS_EVENT_PERIOD)
            chunks.extend(f"event: result\ndata: {text}\n\n" for text in events)
            if chunks:
                self.wfile.write("".join(chunks).encode())
                self.wfile.flush()

    def _browser_left(self) -> bool:
        """While no picture is sent, a closed connection is seen only by looking: EOF is readable."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


# --- the command ----------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    exit_on_sigterm()
    hub = JpegHub(args.name, quality=args.quality, max_fps=args.max_fps)
    results = ResultHub(args.name)
    try:
        server = PreviewServer((args.host, args.port), hub, results, args.name, args.max_viewers)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(
            f"framebroker view: cannot listen on {args.host} port {args.port}: {reason}. "
            "Pick another --port (0 picks a free one) or --host",
            file=sys.stderr,
        )
        return 1
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    if not (host.startswith("127.") or host in ("::1", "localhost")):
        print(
            f"framebroker view: warning: listening on {host}: anyone who can reach this machine on port {port} "
            "sees the camera (there is no authentication)",
            file=sys.stderr,
        )
    hub.start()
    results.start()
    say(f"view: stream {args.name} at http://{shown}:{port}/ (picture /stream.mjpg, metrics /metrics); Ctrl-C to stop")
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        hub.stop()
        results.stop()
        server.server_close()
    return 0
