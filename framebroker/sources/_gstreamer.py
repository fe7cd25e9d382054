"""Sources that run a GStreamer pipeline in a child process and read raw frames from a pipe.

Used for ``csi://`` (Jetson's nvarguscamerasrc), ``rtsp://`` and ``gst://``. The opencv-python
wheels carry no GStreamer and PyGObject does not build from PyPI on Debian 12; the pipeline runs
in a ``framebroker.gstreamer.GstProcess`` child instead, which writes raw frames to a pipe we
read straight into the ring slot and reports the negotiated caps of our sink, from which the
frame size and layout are taken. Nothing of the pipeline is on that child's command line, so an
RTSP password is not either.

Our sink takes the ring's format (BGR, RGB, GRAY8) or its 4-byte form (BGRx, RGBA), which is
what Jetson's nvvidconv produces: it cannot write 3-byte RGB, and a CPU ``videoconvert`` after
it costs a core at 1080p. The 4th byte is dropped as the frame is copied into the ring (OpenCV,
well under a millisecond at 1080p; ``bench/gst_feed.py``). The alternative, 4-byte rings, would
make every reader convert instead of the daemon once, and readers expect 3 channels. On a Jetson
the decoder and nvvidconv do the conversion and scaling in hardware, so the CPU only copies.

Stopping ends the pipeline in order (``GstProcess.end_stream``, reading on until it is through),
then by signal if that takes more than ``END_TIMEOUT``: nvarguscamerasrc wants end of stream to
close its Argus session, and rtspsrc says TEARDOWN to the camera.

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
# What our sink takes for each ring format: the format itself, then (if any) its 4-byte form,
# which nvvidconv makes and we copy into the ring without the 4th byte.
SINK_FORMATS = {"bgr": ("BGR", "BGRx"), "rgb": ("RGB", "RGBA"), "gray": ("GRAY8",)}
BYTES_PER_PIXEL = {"BGR": 3, "RGB": 3, "GRAY8": 1, "BGRx": 4, "RGBA": 4}
OPEN_TIMEOUT = 20.0  # seconds to wait for the first caps (RTSP servers can be slow to answer)
STALL_TIMEOUT = 5.0  # seconds without a byte before the pipeline is declared stuck
END_TIMEOUT = 3.0  # seconds for end of stream to get through the pipeline when we stop it


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

    def head_converts(self) -> bool:
        """Whether the head ends in nvvidconv (on a Jetson), which converts and scales to what
        our caps ask in hardware, into system memory: then no CPU conversion follows it."""
        return False

    def pipeline(self) -> str:
        """The full description: head, conversion to the ring's format and size, our sink."""
        formats = SINK_FORMATS[self.pixel_format]
        if self.head_converts():
            formats = formats[-1:]  # nvvidconv makes the 4-byte form, never 3-byte RGB
        caps = ["video/x-raw,format=" + (formats[0] if len(formats) == 1 else "{" + ",".join(formats) + "}")]
        steps = [self.pipeline_head()]
        if not self.head_converts():
            # videoconvert passes a 4-byte form through untouched (we drop the 4th byte), and
            # converts YUV from a decoder straight to the 3-byte form.
            steps.append("videoconvert")
            if self.width and self.height:
                steps.append("videoscale")
        if self.width and self.height:
            caps.append(f"width={self.width},height={self.height}")
        if self.requested_fps:
            steps.append("videorate")
            caps.append(f"framerate={_fraction(self.requested_fps)}")
        return " ! ".join([*steps, ",".join(caps), f"fdsink name={SINK} fd={{fd}} sync=false"])

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
        pixel_bytes = BYTES_PER_PIXEL.get(str(caps.get("format")))
        if pixel_bytes is None:
            self.close()
            wanted = " or ".join(SINK_FORMATS[self.pixel_format])
            raise SourceError(f"{self.description}: pipeline negotiated format {caps.get('format')}, not {wanted}")
        self.shape = self._shape_for(height, width)
        self.fps = float(caps.get("framerate") or self.requested_fps or 0.0)
        # GStreamer pads every row of packed RGB/BGR/GRAY8 to a multiple of 4 bytes.
        stride = (width * pixel_bytes + 3) & ~3
        self._pixel_bytes = pixel_bytes
        exact = stride == width * self.channels
        self._scratch = None if exact else np.empty((height, stride), np.uint8)

    def _caps_arrived(self, caps: dict[str, Any]) -> None:
        previous = self._caps
        if previous is not None and any(caps.get(key) != previous.get(key) for key in ("width", "height", "format")):
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
            self._copy_out(out)
        return arrived

    def _copy_out(self, out: np.ndarray) -> None:
        """The frame in the scratch buffer into ``out``: without row padding and 4th bytes."""
        height, width = out.shape[:2]
        pixels = self._scratch[:, : width * self._pixel_bytes]  # type: ignore[index]
        if self._pixel_bytes == 4:
            import cv2  # heavy: imported where used

            # OpenCV drops the 4th byte at memory speed (0.8 ms at 1080p here), numpy's strided
            # copy takes almost 30 times as long (bench/gst_feed.py). BGRA2BGR is RGBA2RGB too.
            cv2.cvtColor(pixels.reshape(height, width, 4), cv2.COLOR_BGRA2BGR, dst=out)
        else:
            np.copyto(out.reshape(height, -1), pixels)

    def _ends_cleanly(self) -> bool:
        """Whether the pipeline finishing on its own ends the stream (only for gst:// with exit 0)."""
        return False

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None and self._pipe >= 0:
                process.end_stream()
                self._drain_until_exit(process, END_TIMEOUT)
            process.stop()
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        self._renegotiated = False

    def _drain_until_exit(self, process: GstProcess, timeout: float) -> None:
        """Read and drop what the pipeline still writes until it exits (the end of the pipe) or
        ``timeout`` s pass: our sink must not block on a full pipe while the end comes through."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self._pipe], [], [], min(left, 0.25))
            if ready and not os.read(self._pipe, 1 << 20):
                process.wait(max(0.0, deadline - time.monotonic()))
                return


def _fraction(fps: float) -> str:
    if float(fps).is_integer():
        return f"{int(fps)}/1"
    return f"{round(fps * 1000)}/1000"


class GstSource(GstPipeSource):
    """``gst://PIPELINE``: any pipeline that produces raw video in system memory (on a Jetson,
    end it with ``nvvidconv ! video/x-raw,format=BGRx``: NVMM buffers are the GPU's)."""

    def pipeline_head(self) -> str:
        return self.spec.target

    def _ends_cleanly(self) -> bool:
        return self._process is None or self._process.returncode == 0

    def _failure(self) -> str:
        reason = super()._failure()
        if "memory:NVMM" in reason or "not-negotiated" in reason:
            reason += "; a gst:// pipeline must end in raw video in system memory (on a Jetson: ... ! nvvidconv ! video/x-raw,format=BGRx)"
        return reason


class RtspSource(GstPipeSource):
    """``rtsp://[user:pass@]host[:port]/path[?latency=200&transport=tcp]`` through rtspsrc.

    The URL (without credentials) and the credentials go to rtspsrc's location, user-id and
    user-pw properties, which the GStreamer child receives privately (see
    ``framebroker.gstreamer``): they are on no command line and in no message we print.

    Only the video stream is linked, whichever place the camera gives it in its description
    (many announce audio first, and an unfiltered ``rtspsrc ! decodebin`` takes the first pad
    that appears). On a Jetson the stream is depayloaded and parsed (``parsebin``: H.264, H.265
    or whatever the camera sends) into the hardware decoder, and nvvidconv scales it and brings
    it to system memory; elsewhere ``decodebin`` picks a decoder.
    """

    def pipeline_head(self) -> str:
        spec = self.spec
        latency = int(spec.options.get("latency", 200))
        protocols = spec.options.get("transport", "tcp")
        head = f"rtspsrc name={RTSP_ELEMENT} latency={latency} protocols={protocols} ! application/x-rtp,media=video"
        if self.head_converts():
            return f"{head} ! parsebin ! nvv4l2decoder ! nvvidconv"
        return f"{head} ! decodebin"

    def head_converts(self) -> bool:
        return _on_jetson()

    def properties(self) -> dict[str, dict[str, str]]:
        spec = self.spec
        values = {"location": spec.target}
        if spec.username:
            values["user-id"] = spec.username
        if spec.password:
            values["user-pw"] = spec.password
        return {RTSP_ELEMENT: values}


class CsiSource(GstPipeSource):
    """``csi://N``: a Jetson onboard camera through nvarguscamerasrc, converted by nvvidconv
    (NVMM NV12 to the ring's 4-byte format in system memory) with no CPU conversion."""

    default_size = (720, 1280)

    def check_available(self) -> None:
        if not element_available("nvarguscamerasrc"):
            raise SourceError(
                f"{self.description} needs NVIDIA's nvarguscamerasrc (a Jetson with JetPack); "
                "this machine's GStreamer does not have it"
            )

    def head_converts(self) -> bool:
        return True

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
            f"framerate={_fraction(fps)},format=NV12 ! nvvidconv flip-method={flip}"
        )


_jetson: Optional[bool] = None


def _on_jetson() -> bool:
    global _jetson
    if _jetson is None:
        _jetson = os.path.exists("/etc/nv_tegra_release") and element_available("nvvidconv")
    return _jetson
