"""USB/V4L2 cameras, read through OpenCV's V4L2 backend (files: ``_file.py``, through PyAV)."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import numpy as np

from .._errors import SourceError
from ._base import GeometryChanged, Source, convert_into

# V4L2 buffer timestamps come from CLOCK_MONOTONIC on current kernels; one further than this
# from "now" means the driver uses another clock, and the arrival time is used instead.
_PLAUSIBLE_DRIVER_CLOCK_NS = 2_000_000_000


class _OpenCVSource(Source):
    _capture: Any = None
    _pending: Optional[np.ndarray] = None

    def _read_bgr(self, out: np.ndarray) -> Optional[np.ndarray]:
        """One BGR frame, decoded into ``out`` when shape and format allow; None at the end."""
        if self._pending is not None:
            image, self._pending = self._pending, None
            return image
        target = out if self.pixel_format == "bgr" and out.shape == self._native_shape else None
        ok, image = self._capture.read(target) if target is not None else self._capture.read()
        if not ok or image is None:
            return None
        if image.ndim == 2:  # some backends hand out gray frames
            import cv2

            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        self._native_shape = image.shape
        if self.width is None and self.height is None and image.shape[:2] != out.shape[:2]:
            self._pending = image
            raise GeometryChanged(self._shape_for(*image.shape[:2]))
        return image

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        self._pending = None


class V4L2Source(_OpenCVSource):
    """USB and other V4L2 cameras (``v4l2:///dev/video0``, ``/dev/video0``, ``usb://0``).

    Reads continuously, so frames never wait in the driver's queue and go stale; uses the
    driver's buffer timestamp (CLOCK_MONOTONIC) as the capture time.
    """

    default_size = (480, 640)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._native_shape = ()

    def open(self) -> None:
        import cv2

        device = self.spec.target
        if not os.path.exists(device):
            raise SourceError(f"no such device {device}: is the camera plugged in? (ls /dev/video*)")
        if not os.access(device, os.R_OK | os.W_OK):
            raise SourceError(
                f"permission denied opening {device}: add your user to the device's group "
                f"(usually 'video': sudo usermod -aG video $USER, then log in again)"
            )
        capture = cv2.VideoCapture(device, cv2.CAP_V4L2)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open {device} as a V4L2 camera (busy, or not a capture device)")
        fourcc = self.spec.options.get("fourcc")
        if fourcc:
            if len(fourcc) != 4:
                capture.release()
                raise SourceError(f"fourcc must be 4 characters such as MJPG, got {fourcc!r}")
            capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*fourcc))
        if self.width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.requested_fps:
            capture.set(cv2.CAP_PROP_FPS, self.requested_fps)
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 2)
        self._capture = capture
        native_h = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) or self.default_size[0]
        native_w = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) or self.default_size[1]
        self._native_shape = (native_h, native_w, 3)
        self.shape = self._shape_for(native_h, native_w)
        reported = capture.get(cv2.CAP_PROP_FPS)
        self.fps = reported if 0 < reported <= 1000 else (self.requested_fps or 0.0)

    def read_into(self, out: np.ndarray) -> Optional[int]:
        import cv2

        if self.stop.is_set():
            raise SourceError("stopping")
        image = self._read_bgr(out)
        arrived = time.monotonic_ns()
        if image is None:
            device = self.spec.target
            if not os.path.exists(device):
                raise SourceError(f"device {device} disappeared (unplugged?)")
            raise SourceError(f"{device} stopped delivering frames")
        convert_into(image, out, self.pixel_format)
        driver_ms = self._capture.get(cv2.CAP_PROP_POS_MSEC)
        driver_ns = int(driver_ms * 1_000_000)
        if driver_ns > 0 and abs(arrived - driver_ns) < _PLAUSIBLE_DRIVER_CLOCK_NS:
            return driver_ns
        return arrived
