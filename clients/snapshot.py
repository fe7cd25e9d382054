"""``framebroker snapshot NAME -o FILE.jpg``: save the stream's current picture as JPEG or PNG.

"Current" means fresh: a frame older than ``--max-age`` (the stream is reconnecting, its
camera stalled) is not saved; the snapshot waits for a new one and fails after ``--timeout``
with the daemon's reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import framebroker as fb

from ._common import exit_on_sigterm, say

EXTENSIONS = (".jpg", ".jpeg", ".png")


def image_file(text: str) -> str:
    if os.path.splitext(text)[1].lower() not in EXTENSIONS:
        raise argparse.ArgumentTypeError(f"{text!r}: the file name must end in .jpg, .jpeg or .png (it chooses the format)")
    return text


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected more than 0 seconds, got {text}")
    return value


def quality(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be a whole number from 1 to 100, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="stream to take the picture from")
    parser.add_argument("-o", "--output", required=True, type=image_file, metavar="FILE", help="where to save it: FILE.jpg or FILE.png")
    parser.add_argument("--timeout", type=seconds, default=5.0, help="exit 1 if no fresh frame arrives within this many seconds (default 5)")
    parser.add_argument("--max-age", type=seconds, default=1.0, help="a frame older than this many seconds waits for a newer one (default 1)")
    parser.add_argument("--quality", type=quality, default=90, help="JPEG quality 1-100 (default 90)")


def encode(image: np.ndarray, pixel_format: str, extension: str, quality: int) -> bytes:
    import cv2  # heavy: imported where used

    if pixel_format == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension != ".png" else []
    ok, encoded = cv2.imencode(extension, image, params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {image.shape} frame as {extension}")
    return encoded.tobytes()


def write_atomically(path: str, data: bytes) -> None:
    """A reader of ``path`` sees the old file or the new one, never half of one."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".snapshot-")
    try:
        with os.fdopen(handle, "wb") as output:
            output.write(data)
        umask = os.umask(0o077)  # read it back (there is no other way), then restore it
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would have made it: mkstemp makes 0600
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    extension = os.path.splitext(args.output)[1].lower()
    exit_on_sigterm()
    deadline = time.monotonic() + args.timeout
    with fb.Reader(args.name, name="snapshot") as cam:
        try:
            frame = cam.latest(timeout=args.timeout)
            # wall_time is when the daemon published it: comparable across processes.
            while time.time() - frame.wall_time > args.max_age:
                frame = cam.next(timeout=max(0.001, deadline - time.monotonic()))
        except fb.FrameTimeout as exc:
            warn(f"snapshot: no fresh frame within {args.timeout:g} s ({exc}); nothing saved. See framebroker status {args.name}")
            return 1
        except fb.SourceEnded as exc:
            warn(f"snapshot: {exc}; nothing saved")
            return 1
        with frame:
            data = encode(frame.array, frame.format, extension, args.quality)
            seq, width, height, pixel_format, age = frame.seq, frame.width, frame.height, frame.format, time.time() - frame.wall_time
    try:
        write_atomically(args.output, data)
    except OSError as exc:
        warn(f"snapshot: cannot write {args.output}: {exc.strerror or exc}; choose a writable place with -o")
        return 1
    say(f"snapshot: saved {args.output} ({width}x{height} {pixel_format}, seq {seq}, {age * 1000:.0f} ms old)")
    return 0
