"""Example ML consumer: finds faces with the Haar cascade OpenCV ships (no download).

Reads the gray picture the daemon derives for it, ``NAME.faces`` (``serve --derive
faces=640x360:gray``: resized and converted once in the daemon, for every model that wants it),
and reports boxes in the pixels of the main stream NAME (``frame.source_box``). A daemon that
derives no such stream is read directly, each frame converted here. Reads the freshest frame each
time it is ready for one (``for frame in reader``), so a slow detector never falls behind the
camera: it skips frames instead. Publishes what it found on every frame it analysed through
``fb.ResultWriter`` on NAME (model ``faces``, ``--model`` to change), joined to the frame by its
seq: ``{"objects": [{"box": [x, y, w, h], "label": "face", "neighbours": n}]}``, an empty list
when there is none, so readers can tell "no face" from "not analysed". A Haar cascade gives no
calibrated score: ``neighbours`` (how many overlapping detections were merged into the face;
higher is surer) stands in for it. Prints a line when the number of faces in view changes (with
the frame's number and the boxes), and once a second what it analysed: frames per second, how
many had faces, and how old a frame is when its result is ready.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Tuple

import framebroker as fb
from framebroker.arguments import stream_name

from ._common import Every, add_model_option, add_wait_option, age_ms, exit_on_sigterm, fresh_frames, open_reader, say

BOXES_SHOWN = 3  # a line lists at most this many faces, so it stays readable
MIN_NEIGHBOURS = 5  # overlapping detections a face needs (OpenCV's minNeighbors)
DERIVED = "faces"
# A daemon makes its derived streams right after its main one: one just started may not have it yet.
DERIVED_GRACE = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="stream to find faces in (boxes are given in its pixels)")
    parser.add_argument(
        "--derived",
        default=DERIVED,
        type=stream_name,
        metavar="D",
        help=f"read the derived stream NAME.D (default {DERIVED}: a gray picture the daemon makes once, e.g. "
        f"serve ... --derive {DERIVED}=640x360:gray, keeping the camera's aspect ratio); if NAME has no such stream, "
        "read NAME and convert each frame here. 'none': always read NAME",
    )
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames (default: run until the stream ends)")
    parser.add_argument("--reader-name", default="faces", help="name shown by framebroker status")
    add_model_option(parser, "faces")
    add_wait_option(parser, 10.0)


def _serves_test_pattern(stream: str) -> bool:
    streams = fb.status(stream)["streams"]
    return bool(streams) and streams[0].get("source") == "test://"


def _open_input(args: argparse.Namespace) -> Tuple[fb.Reader, Optional[str]]:
    """A Reader of NAME.D if the daemon derives it, else of NAME; and the derived stream's name."""
    derived = f"{args.name}.{args.derived}" if args.derived != "none" else None
    if derived is not None:
        try:
            return fb.Reader(derived, name=args.reader_name), derived
        except fb.StreamNotFound:
            pass
    cam = open_reader(args.name, args.reader_name, args.wait, "faces")
    if derived is None:
        return cam, None
    try:
        found = fb.Reader(derived, name=args.reader_name, wait=DERIVED_GRACE)
    except fb.StreamNotFound:
        return cam, None
    cam.close()
    return found, derived


def main(args: argparse.Namespace) -> int:
    import cv2

    exit_on_sigterm()
    cascade_path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(cascade_path)
    if cascade.empty():
        raise fb.FrameBrokerError(f"could not load the face cascade {cascade_path}: reinstall opencv-python")
    summary = Every(1.0)
    processed = 0
    window_start, window_frames, window_with_faces = time.monotonic(), 0, 0
    in_view = 0
    cam, derived = _open_input(args)
    with cam, fb.ResultWriter(args.name, args.model) as out:
        # Said, not guessed: a face detector that finds nothing on a test pattern is working.
        nothing_to_find = " (the test pattern has none)" if _serves_test_pattern(args.name) else ""
        if derived is not None:
            say(f"faces: reading {derived!r} (derived by the daemon), publishing as model {args.model!r}")
        elif args.derived != "none":
            say(f"faces: reading {args.name!r}, converting each frame here: no derived stream {args.name + '.' + args.derived!r}")
            say(f"faces: (a daemon serving with --derive {args.derived}=640x360:gray makes it once for every reader)")
        else:
            say(f"faces: reading stream {args.name!r}, publishing as model {args.model!r}")
        for frame in fresh_frames(cam, "faces"):
            with frame:
                image = frame.array
                gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY if frame.format == "rgb" else cv2.COLOR_BGR2GRAY)
                found, neighbours = cascade.detectMultiScale2(gray, scaleFactor=1.2, minNeighbors=MIN_NEIGHBOURS, minSize=(24, 24))
                # In the main stream's pixels, whatever picture was analysed.
                faces = [[round(value) for value in frame.source_box(box)] for box in found]
                seq, stamp, wall = frame.seq, frame.timestamp_ns, frame.wall_time
            objects = [{"box": box, "label": "face", "neighbours": int(n)} for box, n in zip(faces, neighbours)]
            # By seq on the main stream: a derived frame has the main frame's seq and capture time.
            out.publish(seq, {"objects": objects}, timestamp_ns=stamp, wall_time=wall)
            latency_ms = age_ms(stamp)
            processed += 1
            window_frames += 1
            if len(faces):
                window_with_faces += 1
            if len(faces) != in_view:
                if len(faces):
                    boxes = " ".join(f"[x={x} y={y} w={w} h={h}]" for x, y, w, h in faces[:BOXES_SHOWN])
                    more = f" and {len(faces) - BOXES_SHOWN} more" if len(faces) > BOXES_SHOWN else ""
                    say(f"faces: frame {seq}: {len(faces)} face{'s' if len(faces) > 1 else ''} {boxes}{more}")
                else:
                    say(f"faces: frame {seq}: no face any more")
                in_view = len(faces)
            if summary():
                now = time.monotonic()
                rate = window_frames / (now - window_start)
                if window_with_faces:
                    found = f"faces in {window_with_faces} of {window_frames}"
                else:
                    found = f"no face{nothing_to_find}"
                say(f"faces: analysed {rate:.0f} frames/s, {found}; result {latency_ms:.0f} ms after capture")
                window_start, window_frames, window_with_faces = now, 0, 0
            if args.frames and processed >= args.frames:
                say(f"faces: done after {processed} frames")
                return 0
    return 0
