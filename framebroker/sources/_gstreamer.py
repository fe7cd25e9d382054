"""Sources that run a GStreamer pipeline in a child process and read raw frames from a pipe.

Used for ``csi://`` (Jetson's nvarguscamerasrc), ``rtsp://`` and ``gst://``. The opencv-python
wheels carry no GStreamer and PyGObject does not build from PyPI on Debian 12; the pipeline runs
in a ``framebroker.gstreamer.GstProcess`` child instead, which writes raw BGR/RGB/GRAY8 frames
to a pipe we read straight into the ring slot and reports the negotiated caps of our sink, from
which the frame size is taken. Nothing of the pipeline is on that child's command line, so an
RTSP password is not either.

Frames are stamped when their last byte arrives, which trails the true capture by the
pipeline's latency (decoding, jitter buffer): raw frames on a pipe carry no timestamps.
"""

from __future__ import annotations

import os
import select
import shlex
import threading
import time
from typing import Any, Optional

import numpy as np

from .._errors import SourceEnded, SourceError
from ..gstreamer import GstProcess, element_available
from ._base import Source

SINK = "fbsink"  # the name of our fdsink, whose caps give the frame size
RTSP_ELEMENT = "fbsrc"  # the name of rtspsrc, whose URL and credentials are set as properties
_GST_FORMATS = {"bgr": ("BGR", 3), "rgb": ("RGB", 3), "gray": ("GRAY8", 1)}
OPEN_TIMEOUT = 20.0  # seconds to wait for the first caps (RTSP servers can be slow to answer)
STALL_TIMEOUT = 5.0  # seconds without a byte before the pipeline is declared stuck


class GstPipeSource(Source):
    """Base for pipeline sources; subclasses build the head of the pipeline."""

    _process: Optional[GstProcess] = None
    _pipe: int = -1
    _renegotiated = False

    def pipeline_head(self) -> str:
        raise NotImplementedError

    def properties(self) -> dict[str, dict[str, str]]:
        """String properties of named elements, set in the child after parsing (credentials)."""
        return {}

    def check_available(self) -> None:
        """Raise SourceError if something this source needs is missing (before starting it)."""

    def pipeline(self) -> str:
        """The full description: head, conversion to the ring's format and size, our sink."""
        gst_format, _ = _GST_FORMATS[self.pixel_format]
        caps = [f"video/x-raw,format={gst_format}"]
        tail = ["videoconvert"]
        if self.width and self.height:
            tail.append("videoscale")
            caps.append(f"width={self.width},height={self.height}")
        if self.requested_fps:
            tail.append("videorate")
            caps.append(f"framerate={_fraction(self.requested_fps)}")
        return f"{self.pipeline_head()} ! {' ! '.join(tail)} ! {','.join(caps)} ! fdsink name={SINK} fd={{fd}} sync=false"

    def open(self) -> None:
        self.check_available()
        read_end, write_end = os.pipe()
        description = self.pipeline().replace("{fd}", str(write_end))
        self._caps: Optional[dict[str, Any]] = None
        self._caps_event = threading.Event()
        try:
            self._process = GstProcess(
                # The description is split like a shell would, as gst-launch-1.0 gets it.
                shlex.split(description),
                name=f"{self.spec.kind} source",
                properties=self.properties(),
                caps_of=SINK,
                on_caps=self._caps_arrived,
                pass_fds=(write_end,),
                secrets=self.spec.secrets,
            )
        except OSError as exc:
            os.close(read_end)
            raise SourceError(f"{self.description}: cannot start the GStreamer child: {exc}") from None
        finally:
            os.close(write_end)
        self._pipe = read_end
        deadline = time.monotonic() + OPEN_TIMEOUT
        while not self._caps_event.wait(0.1):
            if self.stop.is_set():
                self.close()
                raise SourceError("stopping")
            if self._process.poll() is not None:
                reason = self._failure()
                self.close()
                raise SourceError(reason)
            if time.monotonic() > deadline:
                self.close()
                raise SourceError(f"{self.description}: no video within {OPEN_TIMEOUT:g} s")
        caps = self._caps or {}
        width, height = int(caps.get("width", 0)), int(caps.get("height", 0))
        if width <= 0 or height <= 0:
            self.close()
            raise SourceError(f"{self.description}: pipeline negotiated no frame size ({caps})")
        self.shape = self._shape_for(height, width)
        self.fps = float(caps.get("framerate") or self.requested_fps or 0.0)
        _, channels = _GST_FORMATS[self.pixel_format]
        row = width * channels
        # GStreamer pads every row of packed RGB/BGR/GRAY8 to a multiple of 4 bytes.
        self._stride = (row + 3) & ~3
        self._scratch = None if self._stride == row else np.empty((height, self._stride), np.uint8)

    def _caps_arrived(self, caps: dict[str, Any]) -> None:
        previous = self._caps
        if previous is not None and (caps.get("width"), caps.get("height")) != (previous.get("width"), previous.get("height")):
            self._renegotiated = True
        self._caps = caps
        self._caps_event.set()

    def _failure(self) -> str:
        """A one-line reason from what the pipeline printed before it ended."""
        process = self._process
        detail = process.error() if process is not None else ""
        code = process.returncode if process is not None else None
        if not detail and code == 0:
            detail = "the source ended the stream (end of stream)"
        return f"{self.description}: pipeline stopped (exit {code})" + (f": {detail}" if detail else "")

    def read_into(self, out: np.ndarray) -> Optional[int]:
        if self._renegotiated:
            raise SourceError(f"{self.description}: the stream changed its frame size; reconnecting to follow it")
        target = self._scratch if self._scratch is not None else out
        view = memoryview(target).cast("B")  # type: ignore[arg-type]
        filled = 0
        total = len(view)
        last_progress = time.monotonic()
        while filled < total:
            ready, _, _ = select.select([self._pipe], [], [], 0.25)
            if self.stop.is_set():
                raise SourceError("stopping")
            if not ready:
                if time.monotonic() - last_progress > STALL_TIMEOUT:
                    raise SourceError(f"{self.description}: no data for {STALL_TIMEOUT:g} s")
                continue
            count = os.readv(self._pipe, [view[filled:]])
            if count == 0:
                if self._process is not None:
                    self._process.wait(timeout=2)
                if self._ends_cleanly():
                    raise SourceEnded(f"{self.description}: end of stream")
                raise SourceError(self._failure())
            filled += count
            last_progress = time.monotonic()
        arrived = time.monotonic_ns()
        if self._scratch is not None:
            row = out.shape[1] * (out.shape[2] if out.ndim == 3 else 1)
            np.copyto(out.reshape(out.shape[0], row), self._scratch[:, :row])
        return arrived

    def _ends_cleanly(self) -> bool:
        """Whether the pipeline finishing on its own ends the stream (only for gst:// with exit 0)."""
        return False

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop()
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        self._renegotiated = False


def _fraction(fps: float) -> str:
    if float(fps).is_integer():
        return f"{int(fps)}/1"
    return f"{round(fps * 1000)}/1000"


class GstSource(GstPipeSource):
    """``gst://PIPELINE``: any pipeline that produces raw video."""

    def pipeline_head(self) -> str:
        return self.spec.target

    def _ends_cleanly(self) -> bool:
        return self._process is None or self._process.returncode == 0


class RtspSource(GstPipeSource):
    """``rtsp://[user:pass@]host[:port]/path[?latency=200&transport=tcp]`` through rtspsrc.

    The URL (without credentials) and the credentials go to rtspsrc's location, user-id and
    user-pw properties, which the GStreamer child receives privately (see
    ``framebroker.gstreamer``): they are on no command line and in no message we print.
    """

    def pipeline_head(self) -> str:
        spec = self.spec
        latency = int(spec.options.get("latency", 200))
        protocols = spec.options.get("transport", "tcp")
        head = f"rtspsrc name={RTSP_ELEMENT} latency={latency} protocols={protocols} ! decodebin"
        if _on_jetson():
            # Jetson's decoder hands out NVMM buffers; nvvidconv brings them to system memory.
            head += " ! nvvidconv ! video/x-raw,format=BGRx"
        return head

    def properties(self) -> dict[str, dict[str, str]]:
        spec = self.spec
        values = {"location": spec.target}
        if spec.username:
            values["user-id"] = spec.username
        if spec.password:
            values["user-pw"] = spec.password
        return {RTSP_ELEMENT: values}


class CsiSource(GstPipeSource):
    """``csi://N``: a Jetson onboard camera through nvarguscamerasrc, converted by nvvidconv."""

    default_size = (720, 1280)

    def check_available(self) -> None:
        if not element_available("nvarguscamerasrc"):
            raise SourceError(
                f"{self.description} needs NVIDIA's nvarguscamerasrc (a Jetson with JetPack); "
                "this machine's GStreamer does not have it"
            )

    def pipeline_head(self) -> str:
        spec = self.spec
        height, width = self.shape[:2]
        fps = self.requested_fps or 30
        sensor_mode = int(spec.options.get("sensor_mode", -1))
        flip = int(spec.options.get("flip", 0))
        source = f"nvarguscamerasrc sensor-id={int(spec.target)}"
        if sensor_mode >= 0:
            source += f" sensor-mode={sensor_mode}"
        return (
            f"{source} ! video/x-raw(memory:NVMM),width={width},height={height},"
            f"framerate={_fraction(fps)},format=NV12 ! nvvidconv flip-method={flip} ! video/x-raw,format=BGRx"
        )


_jetson: Optional[bool] = None


def _on_jetson() -> bool:
    global _jetson
    if _jetson is None:
        _jetson = os.path.exists("/etc/nv_tegra_release") and element_available("nvvidconv")
    return _jetson
