"""Saving a frame as a picture file (``Frame.save``, ``framebroker check``, ``framebroker snapshot``)."""

from __future__ import annotations

import os
import tempfile

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def save_image(image: np.ndarray, pixel_format: str, path: str, quality: int = 90) -> None:
    """Write a frame as JPEG or PNG (by extension), atomically: a reader never sees half a file."""
    import cv2  # heavy: imported where used

    extension = os.path.splitext(path)[1].lower()
    if extension not in IMAGE_EXTENSIONS:
        raise ValueError(f"cannot save {path!r}: the file name must end in .jpg, .jpeg or .png")
    if pixel_format == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension != ".png" else []
    ok, encoded = cv2.imencode(extension, image, params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {image.shape} image as {extension}")
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".framebroker-", suffix=extension)
    try:
        with os.fdopen(handle, "wb") as output:
            output.write(encoded.tobytes())
        os.chmod(temporary, 0o666 & ~_umask())  # as open() would have made it: mkstemp makes 0600
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
