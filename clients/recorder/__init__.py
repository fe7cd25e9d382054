"""``framebroker record``: H.264 from a stream, with true timestamps, in MPEG-TS, MP4 or Matroska.

    framebroker record cam0 -o cam0.ts --duration 60      # or cam0.mp4 (fragmented), cam0.mkv
    framebroker record cam0 --segment 60 --dir /var/lib/cams --keep 1440
    framebroker record cam0 -o udp://192.168.1.50:5000 --text "TX2 DEMO" --clock
    framebroker record cam0 -o cam0.ts -o rtsp://127.0.0.1:8554/cam0 -o 'srt://nvr:9000?passphrase=${SRT_PASS}'
    framebroker record cam0 --clips /var/lib/clips --pre-roll 5 --post-roll 5   # + framebroker trigger cam0
    framebroker record cam0 -o cam0.ts --results                # + cam0.results.jsonl: every model's results
    framebroker record cam0 --clips /var/lib/clips --trigger-on faces --trigger-on detector:person>=0.6

The package, one job per module:

* ``packets``: ``EncodedPacket`` and the ``PacketRouter`` every packet passes through.
* ``encoders``: FFmpeg (PyAV) and GStreamer encoders, the registry and ``auto`` order.
* ``h264``: NAL units of the byte stream; SPS/PPS in front of every keyframe.
* ``selection``: choosing the encoder by a test encode.
* ``lifecycle``: the start/stop states encoders and outputs share.
* ``outputs``: the ``Output`` base; a .ts, .mp4 or .mkv file, segmented .ts files with sidecar indexes.
* ``live``: UDP, SRT and RTSP outputs, each sent from a thread of its own, reconnecting with backoff.
* ``rtsp_publish``: the program an rtsp:// output runs in its child (FFmpeg's RTSP muxer).
* ``clips``: the pre-roll buffer and the event clips it writes on triggers.
* ``results``: the models' results: sidecars beside each file, burn-in, ``--trigger-on`` rules.
* ``recorder``: the pipeline (reader thread, bounded queue, encode thread).
* this module: the command line.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import FrameType
from typing import Callable, Optional

import framebroker as fb
from framebroker.arguments import float_in, int_in, model_name

from .._common import add_wait_option, open_reader
from .clips import HISTORY_MARGIN_SECONDS, ClipEvent, PreRollOutput
from .encoders import ENCODERS
from .live import LiveOutput
from .outputs import FileOutput, Output, SegmentedOutput, make_output, segment_stamp
from .recorder import Recorder, RecorderOptions, Stats
from .results import FRAME_MEMORY_SECONDS, ResultFeed, Rule, Sidecars
from .selection import select_encoder

log = logging.getLogger("framebroker.recorder")

# How often the progress line is redrawn on a terminal (s).
PROGRESS_PERIOD = 0.5
# How long to wait for the encoder and outputs to finish after a stop (s).
STOP_TIMEOUT = 30.0
# Keyframes at least this often, whatever the segment length (s).
MAX_KEYFRAME_INTERVAL = 1


class _UsageError(ValueError):
    pass


def _model_list(text: str) -> list[str]:
    """``faces,motion``: model names, each checked."""
    names = [name.strip() for name in text.split(",")]
    return [model_name(name) for name in names]


def _rule(text: str) -> Rule:
    try:
        return Rule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="stream to record")
    parser.add_argument(
        "-o",
        "--output",
        action="append",
        metavar="OUT",
        help="FILE.ts (MPEG-TS), FILE.mp4 (fragmented MP4), FILE.mkv (Matroska), rtsp://[USER:PASS@]HOST[:PORT]/PATH "
        "(publish to an RTSP server: mediamtx, go2rtc), srt://HOST:PORT[?mode=listener&latency=...&passphrase=${VAR}] "
        "or udp://HOST:PORT; repeatable: one encode, every output (${VAR}: from the environment, off the command "
        "line; a stream that fails reconnects, the others and the files go on) "
        "(default: NAME-<UTC start>.ts in the current directory)",
    )
    parser.add_argument("--duration", type=float_in(0, 1e9, "--duration"), metavar="S", help="stop after S seconds of video")
    parser.add_argument("--segment", type=float_in(0, 1e6, "--segment"), metavar="S", help="start a new file every S seconds (on a keyframe)")
    parser.add_argument("--dir", metavar="DIR", help="directory for --segment files (default: current directory)")
    parser.add_argument("--keep", type=int_in(1, 10**9, "--keep"), metavar="N", help="with --segment: keep only the newest N files")
    parser.add_argument(
        "--encoder",
        default="auto",
        metavar="auto|NAME",
        help="auto (default: the first that passes a test encode of: Jetson, NVENC, VAAPI, V4L2 M2M, "
        f"else software x264) or one of: {', '.join(ENCODERS)}",
    )
    parser.add_argument("--bitrate", type=int_in(1, 10**7, "--bitrate"), metavar="KBPS", help="target bitrate in kbit/s (default: about 0.1 bit per pixel)")
    parser.add_argument("--text", help="text drawn on the video (bottom left)")
    parser.add_argument("--clock", action="store_true", help="draw each frame's capture date and time (bottom right)")
    parser.add_argument("--index", action="store_true", help="with -o FILE: also write FILE.csv mapping seq -> PTS -> wall time")
    parser.add_argument(
        "--queue",
        type=int_in(1, 100_000, "--queue"),
        metavar="FRAMES",
        help="frames buffered in front of the encoder; beyond that frames are dropped and counted "
        "(default: 0.4 s of frames, at most 30)",
    )
    add_wait_option(parser, 10.0)
    parser.add_argument(
        "--clips",
        metavar="DIR",
        help="keep the last --pre-roll seconds encoded in memory and write a clip to DIR whenever a trigger "
        "arrives (framebroker trigger NAME, or fb.trigger() from any process); alone, or with -o/--segment",
    )
    parser.add_argument("--pre-roll", type=float_in(0, 3600, "--pre-roll", low_inclusive=True), default=5.0, metavar="S", help="with --clips: seconds before a trigger (default 5)")
    parser.add_argument("--post-roll", type=float_in(0, 3600, "--post-roll", low_inclusive=True), default=5.0, metavar="S", help="with --clips: seconds after the last trigger (default 5)")
    parser.add_argument(
        "--results",
        nargs="?",
        const=[],
        type=_model_list,
        metavar="MODEL,...",
        help="write the models' results beside each file (-o FILE, each segment, each clip) as FILE.results.jsonl: "
        "seq, the frame's PTS in the file's time base, wall time, model and data per result (default: every model of "
        "the stream, also those that start later; put NAME before it, or write --results=MODEL)",
    )
    parser.add_argument(
        "--burn-in",
        type=_model_list,
        metavar="MODEL[,MODEL]",
        help="draw these models' boxes into the video (each frame waits up to --burn-in-wait for its results)",
    )
    parser.add_argument(
        "--burn-in-wait",
        type=float_in(0, 10, "--burn-in-wait", low_inclusive=True),
        metavar="S",
        help="with --burn-in: how long after its capture a frame may wait for its results (default 0.5); "
        "the encoder queue grows by as much",
    )
    parser.add_argument(
        "--trigger-on",
        type=_rule,
        action="append",
        metavar="MODEL[:LABEL][>=SCORE]",
        help="with --clips: open or extend a clip when a result of MODEL has an object (with that label, with at "
        "least that score); the pre-roll counts from the frame the object was seen on (repeatable)",
    )
    parser.add_argument("--reader-name", default="recorder", help="name shown by framebroker status")


def check_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError for what the parser cannot judge (options that go together, directories
    that must exist), starting nothing: ``framebroker up --check`` calls it for a config file."""
    _check_encoder(args)
    _check_result_options(args)
    _build_outputs(args, None)


def _check_encoder(args: argparse.Namespace) -> None:
    if args.encoder != "auto" and args.encoder not in ENCODERS:
        raise _UsageError(f"unknown --encoder {args.encoder!r}; choose auto or one of: {', '.join(ENCODERS)}")


def _keyframe_interval(segment: Optional[float]) -> Fraction:
    """At most MAX_KEYFRAME_INTERVAL s, and dividing the segment length so cuts land on keyframes."""
    if segment is None:
        return Fraction(MAX_KEYFRAME_INTERVAL)
    length = Fraction(str(segment))
    return length / math.ceil(length / MAX_KEYFRAME_INTERVAL)


def _check_result_options(args: argparse.Namespace) -> None:
    if args.burn_in_wait is not None and not args.burn_in:
        raise _UsageError("--burn-in-wait goes with --burn-in")
    if args.trigger_on and args.clips is None:
        raise _UsageError("--trigger-on opens clips: give --clips DIR too")
    streams_only = bool(args.output) and all("://" in target for target in args.output)
    if args.results is not None and args.clips is None and args.segment is None and streams_only:
        raise _UsageError("--results writes a file beside each video file: give -o FILE, --segment or --clips")


def _result_feed(args: argparse.Namespace) -> tuple[Optional[ResultFeed], Optional[Sidecars]]:
    """The models the recording follows: --results' (every model if none named), --burn-in's, --trigger-on's."""
    if args.results is None and not args.burn_in and not args.trigger_on:
        return None, None
    named = list(args.results or []) + list(args.burn_in or []) + [rule.model for rule in args.trigger_on or []]
    every = args.results is not None and not args.results
    # Long enough for a clip's pre-roll (its frames' results arrived before the clip opened).
    history = max(FRAME_MEMORY_SECONDS, (args.pre_roll if args.clips else 0.0) + HISTORY_MARGIN_SECONDS + 3.0)
    feed = ResultFeed(args.name, None if every else named, args.reader_name, history)
    sidecars = None
    if args.results is not None:
        sidecars = Sidecars(feed, args.name, None if every else args.results)
    return feed, sidecars


def _apply_rules(rules: list[Rule], clips: PreRollOutput) -> Callable[[fb.Result], None]:
    """--trigger-on: a result that matches a rule becomes a clip event at its frame."""

    def on_result(result: fb.Result) -> None:
        for rule in rules:
            matched = rule.matches(result)
            if not matched:
                continue
            record = {
                "rule": str(rule),
                "label": rule.label or rule.model,
                "model": result.model,
                "seq": result.seq,
                "timestamp_ns": result.timestamp_ns,
                "wall_time": result.wall_time,
                "latency_ms": round(result.latency_ns / 1e6, 3),
                "objects": matched,
            }
            clips.add_event(ClipEvent(rule.label or rule.model, result.timestamp_ns, result.seq, None, record, announce=False))

    return on_result


def _build_outputs(args: argparse.Namespace, sidecars: Optional[Sidecars]) -> tuple[list[Output], Optional[PreRollOutput]]:
    """Every -o (in their order), the segments, the clips; with none of them, NAME-<UTC start>.ts."""
    outputs = [_build_output(target, args, sidecars) for target in args.output or []]
    shown = [output.describe() for output in outputs]
    repeated = next((name for name in shown if shown.count(name) > 1), None)
    if repeated is not None:
        raise _UsageError(f"-o {repeated} is given twice")
    files = [output for output in outputs if isinstance(output, FileOutput)]
    if args.index and not files and args.segment is None and args.clips is None and outputs:
        raise _UsageError("--index goes with -o FILE (segments and clips always have one)")
    if args.segment is not None:
        if files:
            raise _UsageError("give either -o FILE or --segment (with --dir), not both (streams may go with either)")
        outputs.append(_build_segments(args, sidecars))
    elif args.dir is not None or args.keep is not None:
        raise _UsageError("--dir and --keep go with --segment")
    clips: Optional[PreRollOutput] = None
    if args.clips is not None:
        directory = Path(args.clips)
        if not directory.is_dir():
            raise _UsageError(f"--clips {directory}: no such directory (create it first)")
        if not os.access(directory, os.W_OK):
            raise _UsageError(f"--clips {directory}: not writable")
        clips = PreRollOutput(directory, args.name, args.pre_roll, args.post_roll, results=sidecars)
        outputs.append(clips)
    if not outputs:
        outputs.append(_build_output(f"{args.name}-{segment_stamp(time.time())}.ts", args, sidecars))
    return outputs, clips


def _build_output(target: str, args: argparse.Namespace, sidecars: Optional[Sidecars]) -> Output:
    try:
        output = make_output(target, index=args.index, results=sidecars)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if isinstance(output, FileOutput):
        parent = output.path.resolve().parent
        if not parent.is_dir():
            raise _UsageError(f"-o {target}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise _UsageError(f"-o {target}: cannot write in {parent}")
    return output


def _build_segments(args: argparse.Namespace, sidecars: Optional[Sidecars]) -> SegmentedOutput:
    directory = Path(args.dir or ".")
    if not directory.is_dir():
        raise _UsageError(f"--dir {directory}: no such directory (create it first)")
    if not os.access(directory, os.W_OK):
        raise _UsageError(f"--dir {directory}: not writable")
    return SegmentedOutput(directory, args.name, Fraction(str(args.segment)), args.keep, results=sidecars)


def _extra_info(note: dict, clips: Optional[PreRollOutput], sidecars: Optional[Sidecars]) -> Callable[[], dict]:
    """What status shows beside the recorder's counters: why software encodes, the clip buffer,
    the results written beside the files."""

    def info() -> dict:
        shown = dict(note)
        if clips is not None:
            shown.update(preroll_s=round(clips.held_seconds, 1), preroll_kb=clips.held_bytes // 1024, clips=len(clips.clips))
        if sidecars is not None:
            shown["results"] = sidecars.total_written
        return shown

    return info


def _listen(recorder: Recorder, inbox: fb.TriggerInbox, clips: PreRollOutput) -> threading.Thread:
    """Hand triggers to the clip writer from a thread of their own, until the recording ends.
    The caller joins the thread before closing the inbox."""

    def run() -> None:
        while not recorder.finished:
            trigger = inbox.receive(timeout=PROGRESS_PERIOD)
            if trigger is not None:
                log.info("trigger %r from pid %d (seq %s)", trigger.label, trigger.sender_pid, trigger.seq)
                clips.add_trigger(trigger)

    thread = threading.Thread(target=run, name="recorder-triggers", daemon=True)
    thread.start()
    return thread


class _Rate:
    """Frames per second written over the last progress period."""

    def __init__(self) -> None:
        self.mark = (time.monotonic(), 0)
        self.value = 0.0

    def update(self, written: int) -> float:
        now = time.monotonic()
        then, before = self.mark
        if now - then >= PROGRESS_PERIOD / 2:
            self.value = (written - before) / (now - then)
            self.mark = (now, written)
        return self.value


def _progress_line(stats: Stats, written: int, rate: float) -> str:
    seconds = stats.recorded_seconds
    minutes, secs = divmod(seconds, 60)
    return (
        f"\rrecording {int(minutes):02d}:{secs:04.1f}  {rate:5.1f} fps  {written} frames  "
        f"dropped {stats.ring_dropped} (ring) + {stats.queue_dropped} (queue)  queue {stats.queue_depth}   "
    )


def _summary_of(output: Output) -> str:
    """An output as the summary line names it; a live output with what became of its link."""
    if not isinstance(output, LiveOutput):
        return output.describe()
    if not output.ever_connected:
        return f"{output.describe()} [never connected: {output.reason or output.silence}]"
    down = f" down at the end: {output.reason}" if output.reason else ""
    return f"{output.describe()} [sent_kb={output.sent_bytes // 1024} reconnects={output.reconnects} dropped={output.dropped}{down}]"


def _usage(message: str) -> int:
    print(f"framebroker record: error: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    try:
        _check_encoder(args)
        _check_result_options(args)
        feed, sidecars = _result_feed(args)
        outputs, clips = _build_outputs(args, sidecars)
    except (_UsageError, ValueError) as exc:
        return _usage(str(exc))
    options = RecorderOptions(
        duration=args.duration,
        text=args.text,
        clock=args.clock,
        bitrate_kbps=args.bitrate,
        queue_frames=args.queue,
        keyframe_interval=_keyframe_interval(args.segment),
        burn_in=tuple(dict.fromkeys(args.burn_in or ())),
        burn_in_wait=0.5 if args.burn_in_wait is None else args.burn_in_wait,
    )
    if feed is not None and clips is not None and args.trigger_on:
        feed.add_listener(_apply_rules(args.trigger_on, clips))
    label = " + ".join(output.describe() for output in outputs)
    # Attach first: a stream that does not exist is reported before encoders are probed.
    reader = open_reader(args.name, args.reader_name, args.wait, "record")
    inbox: Optional[fb.TriggerInbox] = None
    try:
        selection = select_encoder(args.encoder)
        spec = selection.spec
        note = {"fallback": selection.fallback_reason} if selection.fallback else {}
        if clips is not None:
            inbox = reader.triggers()
        recorder = Recorder(reader, spec, outputs, options, output_label=label, extra_info=_extra_info(note, clips, sidecars), results=feed)
        recorder.publish_info(force=True)
    except BaseException:
        if inbox is not None:
            inbox.close()
        reader.close()
        raise
    log.info("recording stream %r with encoder %s (%s) to %s", args.name, spec.name, spec.description, label)

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        recorder.request_stop(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    interactive = sys.stdout.isatty()
    rate = _Rate()
    listener: Optional[threading.Thread] = None
    try:
        if feed is not None:
            feed.start()
        recorder.start()
        if inbox is not None and clips is not None:
            listener = _listen(recorder, inbox, clips)
        while not recorder.wait(PROGRESS_PERIOD):
            if interactive:
                written = recorder.router.frames
                sys.stdout.write(_progress_line(recorder.stats, written, rate.update(written)))
                sys.stdout.flush()
            if recorder.end_reason and not recorder.wait(STOP_TIMEOUT):
                raise fb.FrameBrokerError(
                    f"the recorder did not finish writing within {STOP_TIMEOUT:g} s after it was asked to stop"
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if listener is not None:
            listener.join(timeout=2 * PROGRESS_PERIOD + 1)
        if inbox is not None:
            inbox.close()
        if sidecars is not None:
            sidecars.close()  # the results of the last frames, from models a little behind
        if feed is not None:
            feed.stop()
    if interactive:
        written = recorder.router.frames
        sys.stdout.write(_progress_line(recorder.stats, written, rate.update(written)) + "\n")
    stats = recorder.stats
    encode_ms = stats.encode_ms_median
    files = ""
    for output in outputs:
        if isinstance(output, SegmentedOutput):
            files += f" files={len(output.files)} deleted={len(output.deleted)}"
        if isinstance(output, PreRollOutput):
            files += f" clips={len(output.clips)} triggers={output.triggers_received}"
    if sidecars is not None:
        files += f" results={sidecars.total_written}"
    if options.burn_in:
        files += f" burn_in_late={stats.burn_in_late}"
    print(
        f"record: {'failed' if recorder.error else 'done'} ({recorder.end_reason}): "
        f"frames={recorder.router.frames} seconds={stats.recorded_seconds:.3f} encoder={spec.name} "
        f"dropped_ring={stats.ring_dropped} dropped_queue={stats.queue_dropped} "
        f"encode_ms={encode_ms if encode_ms is None else round(encode_ms, 2)}{files} "
        f"output={' + '.join(_summary_of(output) for output in outputs)}",
        flush=True,
    )
    if stats.ring_dropped or stats.queue_dropped:
        log.warning(
            "%d frame(s) were overwritten in the ring before the recorder read them and %d were dropped "
            "because the encoder fell behind (the file keeps true timing: the gaps show as held frames)",
            stats.ring_dropped,
            stats.queue_dropped,
        )
    error = recorder.error
    if error is not None:
        if isinstance(error, (fb.FrameBrokerError, KeyboardInterrupt)):
            raise error
        raise fb.FrameBrokerError(f"recording failed: {type(error).__name__}: {error}") from error
    streams = [output for output in outputs if isinstance(output, LiveOutput)]
    if len(streams) == len(outputs) and not any(output.ever_connected for output in streams):
        reasons = "; ".join(f"{output.describe()}: {output.reason or output.silence}" for output in streams)
        raise fb.FrameBrokerError(f"nothing was sent: no output ever connected ({reasons})")
    return 0
