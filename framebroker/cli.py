"""The ``framebroker`` command: one entry point for the daemon, status, and every client.

Exit codes: 0 success, 1 runtime failure, 2 usage error. Client commands (bridge, faces, motion,
read, record, snapshot, view) live in the ``framebroker_clients`` package (the repository's
``clients/`` folder) and use only the public API. A client module is imported only when its
command is parsed: ``framebroker --help`` lists every command from ``CLIENT_COMMANDS`` alone,
and ``framebroker record --help`` imports the recorder to show its options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ._errors import FrameBrokerError
from . import arguments
from ._layout import MAX_SLOTS
from .arguments import float_in, int_in, stream_name

if TYPE_CHECKING:
    from ._daemon import Daemon

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

CLIENTS_PACKAGE = "framebroker_clients"

# command -> (module in framebroker_clients, one-line help)
CLIENT_COMMANDS = {
    "faces": ("face_detector", "example ML consumer: Haar-cascade face detector; publishes its boxes as model 'faces'"),
    "motion": ("motion_detector", "example ML consumer: motion detector; publishes moving regions as model 'motion'"),
    "read": ("plain_reader", "plain reader: prints the frames it gets (rate, frame age, frames skipped)"),
    "record": ("recorder", "recorder: H.264 with true timestamps, one encode for every output: files (.ts, .mp4, .mkv), segments, RTSP/SRT/UDP streams, event clips"),
    "view": ("preview", "browser preview: live picture with the models' boxes, status page and Prometheus /metrics (127.0.0.1:8080)"),
    "snapshot": ("snapshot", "save the stream's current picture: framebroker snapshot NAME -o FILE.jpg (or .png)"),
    "bridge": ("bridge", "frames (H.264), status and results of a stream to other machines through Zenoh; remotes serve zenoh://NAME"),
}

LOG_LEVELS = ["debug", "info", "warning", "error"]
LOG_LEVEL_HELP = "log verbosity on stderr (default info); before or after the command's name"


class UsageError(Exception):
    """Bad command-line input found after parsing; exits with code 2."""


class ClientsMissing(FrameBrokerError):
    """The client commands' package is not installed (a bare source checkout)."""


def load_client(module: str) -> ModuleType:
    """Import ``framebroker_clients.<module>``; ClientsMissing if the package is not installed."""
    try:
        return importlib.import_module(f"{CLIENTS_PACKAGE}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != CLIENTS_PACKAGE:
            raise
        raise ClientsMissing(
            f"the client commands come from the {CLIENTS_PACKAGE} package (the repository's clients/ folder), "
            "which is not installed: install framebroker with pip install . (or pip install -e . in a checkout)"
        ) from None


class _CommandParser(argparse.ArgumentParser):
    """A command's parser. A client command's options come from its module, imported only when
    this parser runs (``--help`` included); ``--log-level`` is added last, after them."""

    def __init__(self, *args: Any, client: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client = client
        self._complete = False

    def complete(self) -> argparse.ArgumentParser:
        """Add the options that come last or from the client module (once); return the parser.
        ``framebroker up`` calls it to learn a command's options without parsing anything."""
        if not self._complete:
            if self._client:
                load_client(self._client).add_arguments(self)
                self.set_defaults(client_module=self._client)
            # After the command's name too, where it wins over one before it. SUPPRESS: when
            # absent here, the value from before the name (or its default) stays.
            self.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
            self._complete = True
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.complete()
        return super().parse_known_args(args, namespace)


def add_geometry_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int_in(16, 16384, "--width"), help="frame width in pixels (with --height)")
    parser.add_argument("--height", type=int_in(16, 16384, "--height"), help="frame height in pixels (with --width)")
    parser.add_argument("--fps", type=float_in(0, 1000, "--fps"), help="frame rate to ask the source for")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="framebroker",
        description="Share one camera between many processes through a shared-memory ring.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage error. Python API: import framebroker as fb.",
    )
    parser.add_argument("--version", action="version", version=f"framebroker {_version()}")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    commands.required = True

    serve = commands.add_parser(
        "serve",
        help="run the daemon that owns a camera and feeds its ring (foreground)",
        description=(
            "Run the camera daemon in the foreground. SOURCE is test://, file:///path.mp4 (or a path; ?loop=1), "
            "v4l2:///dev/video0, /dev/video0, usb://0, csi://0, rtsp://[user:pass@]host/path (?latency=200), "
            "gst://PIPELINE or zenoh://STREAM?connect=tcp/HOST:7447 (a stream framebroker bridge publishes on another "
            "machine). A file must exist at start; a camera or server that is not there (yet) or fails is "
            "retried with backoff, said once in the log and always in framebroker status. SIGTERM/SIGINT stop cleanly. "
            "A file plays once (?loop=1: again and again) at the --pace chosen."
        ),
    )
    serve.add_argument("source", metavar="SOURCE", help="camera URI (see above)")
    serve.add_argument("--name", type=stream_name, default="cam0", help="stream name readers attach to (default cam0)")
    add_geometry_options(serve)
    serve.add_argument("--format", choices=["bgr", "rgb", "gray"], default="bgr", help="pixel format in the ring (default bgr)")
    serve.add_argument(
        "--slots",
        type=arguments.slots,
        default="auto",
        help="frames in the ring: auto (default) starts at 12 and grows when readers need more, within "
        "--max-shm; a number fixes it (readers may then hold at most SLOTS-2 frames between them)",
    )
    serve.add_argument(
        "--max-shm",
        type=arguments.size_bytes("--max-shm"),
        metavar="SIZE",
        help="most /dev/shm a growing ring may take, e.g. 512M or 2G (default: half of what /dev/shm has free at start)",
    )
    serve.add_argument(
        "--shrink-after",
        type=float_in(0, 86400, "--shrink-after", low_inclusive=True),
        default=60.0,
        metavar="S",
        help="a grown ring goes back to its starting size once readers have needed no more for S seconds (default 60)",
    )
    serve.add_argument("--group", help="open the stream to this group (mode 0660) instead of private (0600)")
    serve.add_argument(
        "--derive",
        action="append",
        type=_derive_spec,
        metavar="NAME=WxH[:FORMAT][:MODE]",
        help="also publish the stream <--name>.NAME (e.g. cam0.lores): every frame resized to WxH once, in the daemon, "
        "for every reader that needs it; FORMAT bgr (default), rgb or gray; MODE stretch (default), letterbox "
        "(whole picture, black bars) or crop (centre, filled). Same seq and timestamps as the main frame; "
        "frame.source_box() maps boxes back. Repeatable: --derive lores=640x360:rgb --derive det=640x640:rgb:letterbox",
    )
    replay = serve.add_argument_group(
        "replaying a file",
        "A file is a stream too, at its own timing or faster; a file framebroker recorded keeps its frames' seq "
        "and wall time (from its index beside it: the same name with .csv).",
    )
    replay.add_argument(
        "--pace",
        choices=["realtime", "max", "lockstep"],
        help="realtime (default): at the file's own timing, holes included; max: as fast as it decodes; "
        "lockstep: each frame only once every ordered() reader took the previous one (no frame lost, "
        "the producer waits: for offline runs)",
    )
    replay.add_argument(
        "--wait-readers",
        type=int_in(0, MAX_SLOTS, "--wait-readers"),
        default=0,
        metavar="K",
        help="hold the first frame until K readers are attached",
    )
    replay.add_argument(
        "--results",
        nargs="?",
        const="",
        metavar="PATH",
        help="republish the recording's model results on their frames (default PATH: FILE.results.jsonl, "
        "else FILE's name with .results.jsonl)",
    )

    status = commands.add_parser("status", help="show streams, their cameras and every reader")
    status.add_argument("name", nargs="?", type=stream_name, metavar="NAME", help="only this stream")
    status.add_argument("--json", action="store_true", help="machine-readable output (schema in docs/status.md)")
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument("--interval", type=float_in(0.05, 3600, "--interval"), default=1.0, help="seconds between --watch refreshes")

    check = commands.add_parser(
        "check",
        help="self-check: do frames flow from a source or stream? fps, frame age (and a snapshot with -o)",
        description=(
            "Open SOURCE directly (test://, a file, /dev/video0, csi://0, rtsp://..., as framebroker serve would; "
            "the camera must be free) or attach to the stream NAME a daemon serves, measure resolution, real fps "
            "against the configured rate, frame age and dropped frames for a few seconds, save the last frame "
            "with -o FILE, and print a verdict. Exit 0 only if frames flow; 1 with the reason otherwise."
        ),
    )
    check.add_argument("target", metavar="SOURCE|NAME", help="a source URI or path, or the name of a served stream")
    check.add_argument("--seconds", type=float_in(0, 3600, "--seconds"), default=3.0, help="how long to measure once frames flow (default 3)")
    check.add_argument(
        "--timeout", type=float_in(0, 3600, "--timeout"), default=10.0, help="fail if no frame arrives within this many seconds (default 10)"
    )
    check.add_argument("-o", "--output", metavar="FILE", help="save the last frame checked to FILE, .jpg or .png (default: no snapshot)")
    add_geometry_options(check)
    check.add_argument("--format", choices=["bgr", "rgb", "gray"], help="pixel format to read a SOURCE in (default bgr)")

    trigger = commands.add_parser(
        "trigger",
        help="send an event trigger to a stream's recorder (it writes a clip with the seconds before)",
        description="Tell every recorder running with --clips on stream NAME that something happened now (or at "
        "frame --seq): it writes a clip from at least --pre-roll seconds before to --post-roll seconds after. "
        "Exits 1 if no recorder listens.",
    )
    trigger.add_argument("name", type=stream_name, metavar="NAME", help="the stream")
    trigger.add_argument("--label", default="", help="what happened (goes into the clip's name and its .json)")
    trigger.add_argument(
        "--post-roll",
        type=float_in(0, 3600, "--post-roll", low_inclusive=True),
        metavar="S",
        help="seconds to record after it (default: the recorder's --post-roll)",
    )
    trigger.add_argument("--seq", type=int_in(1, 2**63 - 1, "--seq"), help="the frame it happened at (default: now)")

    clean = commands.add_parser(
        "clean",
        help="remove the shared memory that dead daemons left behind (never a live stream's)",
        description="Remove segments and semaphores left in /dev/shm by daemons that died (kill -9, crash, "
        "power loss of a container). Live streams and objects framebroker did not create are left alone. "
        "A restarted daemon reclaims its own stream by itself; this is for streams that will not come back.",
    )
    clean.add_argument("name", nargs="?", type=stream_name, metavar="NAME", help="only this stream")
    clean.add_argument("--dry-run", action="store_true", help="say what would be removed and why; remove nothing")

    demo = commands.add_parser(
        "demo",
        help="run a test:// daemon with the example consumers, the preview and a live status summary",
        description="Start a daemon on test://, the face and motion detectors (publishing their results), a plain "
        "reader and the browser preview (which draws the models' boxes), each in its own process, and print a status "
        "summary every few seconds. Ctrl-C ends everything cleanly.",
    )
    demo.add_argument("--name", type=stream_name, default="demo", help="stream name (default demo)")
    demo.add_argument("--duration", type=float_in(0, 1e9, "--duration"), help="stop after this many seconds")
    demo.add_argument("--port", type=int_in(0, 65535, "--port"), default=8080, help="the preview's port (default 8080, else a free one)")

    up = commands.add_parser(
        "up",
        help="run every stream, recorder and preview a config file declares, each supervised (restarted when it dies)",
        description=(
            "Run what CONFIG.toml declares: [streams.NAME] tables take serve's options (source = \"csi://0\", fps = 30, "
            "...), their sub-tables [streams.NAME.record], [streams.NAME.view], ... the options of those commands "
            "(examples in docs/). Each is a child process, restarted with backoff when it dies; its log lines are "
            "prefixed with its name. SIGHUP reads the file again and restarts only what changed; SIGTERM/SIGINT stop "
            "the readers, then the daemons, and leave /dev/shm clean. Under systemd (framebroker service) it "
            "reports READY=1, WATCHDOG=1 and STATUS=."
        ),
    )
    up.add_argument("config", metavar="CONFIG.toml", help="the config file (relative paths in it are relative to its folder)")
    up.add_argument(
        "--check", action="store_true", help="only check the file: exit 0 if it can run, 2 naming each problem's key and line"
    )

    service = commands.add_parser(
        "service",
        help="print (or --install) the systemd unit that runs framebroker up CONFIG.toml at boot",
        description="Check CONFIG.toml, then print a systemd unit that runs framebroker up with it (Type=notify, "
        "WatchdogSec, restart on failure, readers stopped before daemons, /dev/shm shared), or write it with --install.",
    )
    service.add_argument("config", metavar="CONFIG.toml", help="the config file the service runs")
    service.add_argument("--install", action="store_true", help="write the unit into --unit-dir instead of printing it (root)")
    service.add_argument("--user", help="run as this user (default: you, or the user behind sudo)")
    service.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUP",
        help="also in this group (repeatable; SupplementaryGroups=): video for cameras; streams' own group keys are added",
    )
    service.add_argument("--name", metavar="UNIT", help="unit name (default: framebroker-<config file name>)")
    service.add_argument("--unit-dir", metavar="DIR", default="/etc/systemd/system", help="where --install writes (default /etc/systemd/system)")
    service.add_argument(
        "--environment-file",
        metavar="FILE",
        help="NAME=value lines for the ${NAME} in sources and outputs (EnvironmentFile=, mode 0600); the check uses them",
    )
    service.add_argument(
        "--watchdog",
        type=float_in(0, 86400, "--watchdog", low_inclusive=True),
        default=30.0,
        metavar="S",
        help="WatchdogSec= (default 30; 0: no watchdog)",
    )

    for command, (module, help_text) in CLIENT_COMMANDS.items():
        commands.add_parser(command, help=help_text, description=help_text, client=module)
    return parser


def _derive_spec(text: str) -> Any:
    """``--derive``: a DeriveSpec, or a usage error that says what to write."""
    from ._derive import DeriveSpec

    try:
        return DeriveSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version() -> str:
    from . import __version__

    return __version__


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def build_daemon(args: argparse.Namespace) -> "Daemon":
    """The daemon ``serve`` would run for these arguments, not started: every mistake in them is a
    UsageError, and a file source that is not there a SourceError (``framebroker up --check``
    validates a config file's streams with this too)."""
    from ._daemon import Daemon
    from .sources._uri import check_file_exists

    try:
        daemon = Daemon(
            args.source,
            args.name,
            width=args.width,
            height=args.height,
            fps=args.fps,
            pixel_format=args.format,
            slots=args.slots,
            group=args.group,
            max_shm=args.max_shm,
            shrink_after=args.shrink_after,
            pace=args.pace,
            wait_readers=args.wait_readers,
            results=args.results,
            derive=args.derive or (),
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    # Cameras and servers are waited for; a file that is not there now is a mistake (exit 1).
    check_file_exists(daemon.spec)
    return daemon


def _serve(args: argparse.Namespace) -> int:
    daemon = build_daemon(args)
    daemon.install_signal_handlers()
    return daemon.run()


def _status(args: argparse.Namespace) -> int:
    from ._status import collect, render_table

    if not args.watch:
        document = collect(args.name)
        if args.json:
            print(json.dumps(document, indent=2))
        else:
            sys.stdout.write(render_table(document))
        if args.name is not None and document["streams"][0]["state"] in ("absent", "incompatible", "no-access"):
            return EXIT_FAILURE
        return EXIT_OK
    _exit_on_sigterm()
    if args.json:
        # One compact document per line whatever stdout is, so a log or `jq` can follow it.
        while True:
            print(json.dumps(collect(args.name)), flush=True)
            time.sleep(args.interval)
    if sys.stdout.isatty():
        return _watch_in_place(args)
    # Not a terminal (a pipe, a log file): cursor movements would be garbage there, so each
    # refresh is appended under a time stamp instead.
    while True:
        sys.stdout.write(time.strftime("--- %H:%M:%S framebroker status\n") + render_table(collect(args.name)) + "\n")
        sys.stdout.flush()
        time.sleep(args.interval)


def _watch_in_place(args: argparse.Namespace) -> int:
    """Redraw the status table over itself until Ctrl-C, like top(1)."""
    from ._status import collect, render_table

    out = sys.stdout
    out.write("\x1b[?25l\x1b[H\x1b[2J")  # hide the cursor; clear the screen once
    try:
        while True:
            size = shutil.get_terminal_size()
            text = time.strftime("%H:%M:%S  framebroker status (Ctrl-C to quit)\n\n") + render_table(collect(args.name))
            rows: list[str] = []
            for line in text.splitlines():
                # Wrap by hand so the row count is exact: the redraw must cover the screen's rows.
                rows.extend(line[start : start + size.columns] for start in range(0, max(len(line), 1), size.columns))
            if len(rows) >= size.lines:
                hidden = len(rows) - size.lines + 2
                rows = rows[: size.lines - 2] + [f"... {hidden} more lines: enlarge the terminal or name one stream"]
            # Home, each row cleared to its end, then everything below: no full clear, no flicker.
            out.write("\x1b[H" + "".join(row + "\x1b[K\n" for row in rows) + "\x1b[J")
            out.flush()
            time.sleep(args.interval)
    finally:
        out.write("\x1b[?25h")
        out.flush()


def _exit_on_sigterm() -> None:
    """SIGTERM ends a long-running command like Ctrl-C does (exit 0, terminal restored)."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _check(args: argparse.Namespace) -> int:
    from ._check import CheckFailed, check_source, check_stream, resolve_target, summarize
    from ._images import IMAGE_EXTENSIONS, save_image

    if args.output and not args.output.lower().endswith(IMAGE_EXTENSIONS):
        raise UsageError(f"--output {args.output!r}: the snapshot file name must end in .jpg, .jpeg or .png")
    source_options = [flag for flag in ("width", "height", "fps", "format") if getattr(args, flag) is not None]

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        target = resolve_target(args.target)
        if target.kind == "stream":
            if source_options:
                raise UsageError(
                    f"--{', --'.join(source_options)} {'apply' if len(source_options) > 1 else 'applies'} only to a SOURCE; "
                    f"stream {target.text!r} already has its geometry "
                    "(set it on framebroker serve)"
                )
            if target.note:
                say(f"note: {target.text!r} is a stream {target.note}")
            report = check_stream(target.text, seconds=args.seconds, timeout=args.timeout, say=say)
        else:
            try:
                report = check_source(
                    target.text,
                    seconds=args.seconds,
                    timeout=args.timeout,
                    width=args.width,
                    height=args.height,
                    fps=args.fps,
                    pixel_format=args.format or "bgr",
                    say=say,
                )
            except (ValueError, TypeError) as exc:
                raise UsageError(str(exc)) from None
    except CheckFailed as exc:
        say(f"FAIL: {exc}{_busy_hint(args.target)}")
        return EXIT_FAILURE
    snapshot_error = ""
    snapshot: "str | None" = args.output
    if snapshot is not None:
        try:
            save_image(report.last_image, report.pixel_format, snapshot)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            snapshot_error = f"could not save the snapshot to {snapshot}: {exc}"
            snapshot = None
    flowing, warnings = summarize(report, snapshot, say=say)
    for warning in warnings:
        say(f"  warning: {warning}")
    if not flowing:
        say(f"FAIL: no frame from {report.label}: {report.ended or 'nothing arrived'}")
        return EXIT_FAILURE
    if snapshot_error:
        say(f"FAIL: frames flow from {report.label}, but {snapshot_error}. Choose a writable file with -o")
        return EXIT_FAILURE
    height, width = report.shape[:2]
    extra = f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''} above)" if warnings else ""
    say(f"OK: frames flow from {report.label}: {width}x{height} at {report.measured_fps():.1f} fps{extra}")
    return EXIT_OK


def _busy_hint(target: str) -> str:
    """A failed source check may fail only because a daemon holds the camera: say which one."""
    from ._status import collect
    from .sources import parse_source

    try:
        display = parse_source(target).display
    except (ValueError, TypeError):
        return ""
    for stream in collect()["streams"]:
        if stream.get("alive") and stream.get("source") == display:
            return (
                f". Note: stream {stream['name']!r} (daemon pid {stream['pid']}) serves this source and may hold the "
                f"device; check the stream instead: framebroker check {stream['name']}"
            )
    return ""


def _trigger(args: argparse.Namespace) -> int:
    from ._trigger import trigger

    try:
        count = trigger(args.name, args.label, post_roll=args.post_roll, seq=args.seq)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"trigger {args.label!r} sent to {count} recorder(s) of stream {args.name!r}")
    return EXIT_OK


def _clean(args: argparse.Namespace) -> int:
    from ._segment import list_stream_names

    names = [args.name] if args.name else list_stream_names()
    clean_one = _would_clean if args.dry_run else _clean_stream
    failed = False
    for name in names:
        line, ok = clean_one(name)
        print(line)
        failed = failed or not ok
    if not names:
        print("nothing to clean")
    return EXIT_FAILURE if failed else EXIT_OK


def _clean_stream(name: str) -> tuple[str, bool]:
    """Remove what a dead daemon left under ``name``: (what happened, False if refused)."""
    from ._errors import IncompatibleSegment, StreamBusy
    from ._segment import remove_stale

    try:
        header = remove_stale(name)
    except StreamBusy as exc:
        return f"{name}: live (daemon pid {exc.pid}), left alone", True
    except (IncompatibleSegment, OSError) as exc:
        return f"{name}: left alone: {exc}", False
    if header is None:
        return f"{name}: nothing to remove", True
    return f"{name}: removed (its daemon, pid {header.owner_pid}, is gone)", True


def _would_clean(name: str) -> tuple[str, bool]:
    """What ``clean`` would do with ``name``, judged the way ``status`` judges it (reading only)."""
    from ._layout import SHM_DIR, segment_path, semaphore_file_prefix
    from ._status import describe_stream

    stream = describe_stream(name)
    if stream["state"] == "absent":
        return f"{name}: nothing to remove", True
    if "error" in stream:
        return f"{name}: would be left alone: {stream['error']}", False
    if stream["alive"]:
        return f"{name}: live (daemon pid {stream['pid']}), would be left alone", True
    prefix = semaphore_file_prefix(name)
    semaphores = sum(entry.startswith(prefix) for entry in os.listdir(SHM_DIR))
    return (
        f"{name}: would remove {segment_path(name)} and {semaphores} semaphore(s) {SHM_DIR}/{prefix}* "
        f"(its daemon, pid {stream['pid']}, is gone)",
        True,
    )


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(args.name, args.duration, args.port)


def _up(args: argparse.Namespace) -> int:
    from ._config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.check:
        print(f"{args.config}: OK: {len(config.streams)} stream(s), {len(config.children)} children:")
        width = max(len(child.name) for child in config.children)
        for child in config.children:
            print(f"  {child.name:<{width}}  {child.display()}")
        return EXIT_OK
    from ._supervisor import run_up

    return run_up(config)


def _service(args: argparse.Namespace) -> int:
    from ._service import service_command

    try:
        return service_command(args)
    except ValueError as exc:  # the config file's problems, an unknown user or group
        raise UsageError(str(exc)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ClientsMissing as exc:
        print(f"framebroker: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    _configure_logging(args.log_level)
    handlers = {
        "serve": _serve,
        "status": _status,
        "check": _check,
        "demo": _demo,
        "clean": _clean,
        "trigger": _trigger,
        "up": _up,
        "service": _service,
    }
    try:
        handler = handlers.get(args.command)
        if handler is not None:
            return handler(args)
        return int(load_client(args.client_module).main(args) or 0)
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"framebroker {args.command}: error: {exc}\n")
    except FrameBrokerError as exc:
        print(f"framebroker {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
