"""Example ML consumer: finds faces with the Haar cascade OpenCV ships (no download).

Reads the freshest frame each time it is ready for one (``for frame in reader``), so a slow
detector never falls behind the camera: it skips frames instead. Prints every detection with
the frame's seq and capture timestamp, and a summary line once a second.
"""

from __future__ import annotations

import argparse
import time

import framebroker as fb

from ._common import Every, exit_on_sigterm, fresh_frames, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="stream to read")
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames (default: run until the stream ends)")
    parser.add_argument("--reader-name", default="faces", help="name shown by framebroker status")


def main(args: argparse.Namespace) -> int:
    import cv2

    exit_on_sigterm()
    cascade_path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(cascade_path)
    if cascade.empty():
        raise fb.FrameBrokerError(f"could not load the face cascade {cascade_path}: reinstall opencv-python")
    summary = Every(1.0)
    processed = 0
    started = time.monotonic()
    with fb.Reader(args.name, name=args.reader_name, wait=10.0) as cam:
        say(f"faces: reading stream {args.name!r}")
        for frame in fresh_frames(cam, "faces"):
            with frame:
                image = frame.array
                gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
                faces = cascade.detectMultiScale(gray, scaleFactor=1.2, minNeighbors=5, minSize=(24, 24))
                seq, stamp = frame.seq, frame.timestamp_ns
            processed += 1
            if len(faces):
                boxes = " ".join(f"[x={x} y={y} w={w} h={h}]" for x, y, w, h in faces)
                say(f"faces: seq={seq} t={stamp} found {len(faces)} face(s) {boxes}")
            if summary():
                rate = processed / (time.monotonic() - started)
                say(f"faces: seq={seq} t={stamp} {len(faces)} face(s); {processed} frames analysed ({rate:.1f}/s)")
            if args.frames and processed >= args.frames:
                say(f"faces: done after {processed} frames")
                return 0
    return 0
