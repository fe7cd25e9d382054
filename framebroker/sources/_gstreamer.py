"""Sources that run a GStreamer pipeline in a ``gst-launch-1.0`` child and read raw frames from a pipe.

Used for ``csi://`` (Jetson's nvarguscamerasrc), ``rtsp://`` and ``gst://``. The opencv-python
wheels carry no GStreamer and PyGObject does not build from PyPI on Debian 12, while
``gst-launch-1.0`` needs neither: the child writes raw BGR/RGB/GRAY8 frames to a pipe we read
straight into the ring slot, and prints the negotiated caps (``-v``) on its stdout, from which
the frame size is taken.

Frames are stamped when their last byte arrives, which trails the true capture by the
pipeline's latency (decoding, jitter buffer): raw frames on a pipe carry no timestamps.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from typing import Any, Optional

import numpy as np

from .._errors import SourceEnded, SourceError
from ._base import Source
from ._uri import redact

GST_LAUNCH = "gst-launch-1.0"
# Caps line that gst-launch -v prints when our sink's pad negotiates.
_CAPS_RE = re.compile(r"GstFdSink:fbsink\.GstPad:sink: caps = (?P<caps>video/x-raw.*)")
_GST_FORMATS = {"bgr": ("BGR", 3), "rgb": ("RGB", 3), "gray": ("GRAY8", 1)}
OPEN_TIMEOUT = 20.0  # seconds to wait for the first caps (RTSP servers can be slow to answer)
STALL_TIMEOUT = 5.0  # seconds without a byte before the pipeline is declared stuck


def gst_quote(value: str) -> str:
    """Quote a property value in a description; ``open()`` splits it like a shell would, and
    gst-launch then escapes each argument, so the value reaches the element verbatim."""
    return shlex.quote(value)


def element_available(name: str) -> bool:
    """True if GStreamer on this machine has the element ``name``."""
    inspect = shutil.which("gst-inspect-1.0")
    if inspect is None:
        return False
    result = subprocess.run([inspect, "--exists", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return result.returncode == 0


def parse_caps(caps: str) -> dict[str, Any]:
    """Fields of a raw-video caps string: format, width, height, framerate (as float)."""
    fields: dict[str, Any] = {}
    for match in re.finditer(r"(\w[\w-]*)=\((\w+)\)([^,]+)", caps):
        key, kind, value = match.group(1), match.group(2), match.group(3).strip()
        if kind == "int":
            fields[key] = int(value)
        elif kind == "fraction":
            num, _, den = value.partition("/")
            fields[key] = float(num) / float(den) if float(den or 0) else 0.0
        else:
            fields[key] = value
    return fields


class GstPipeSource(Source):
    """Base for pipeline sources; subclasses build the head of the pipeline."""

    default_size = (480, 640)
    _process: Optional[subprocess.Popen] = None
    _pipe: int = -1

    def pipeline_head(self) -> str:
        raise NotImplementedError

    def check_available(self) -> None:
        if shutil.which(GST_LAUNCH) is None:
            raise SourceError(
                f"{self.description} needs GStreamer's {GST_LAUNCH}: install gstreamer1.0-tools and the plugins "
                "(apt-get install gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good)"
            )

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
        return f"{self.pipeline_head()} ! {' ! '.join(tail)} ! {','.join(caps)} ! fdsink name=fbsink fd={{fd}} sync=false"

    def open(self) -> None:
        self.check_available()
        read_end, write_end = os.pipe()
        description = self.pipeline().replace("{fd}", str(write_end))
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._caps: Optional[dict[str, Any]] = None
        self._caps_event = threading.Event()
        try:
            self._process = subprocess.Popen(
                [GST_LAUNCH, "-v", "-e", *shlex.split(description)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(write_end,),
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not the child's
            )
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            raise SourceError(f"cannot start {GST_LAUNCH}: {exc}") from None
        os.close(write_end)
        self._pipe = read_end
        threading.Thread(target=self._watch_stdout, daemon=True, name="gst-stdout").start()
        threading.Thread(target=self._watch_stderr, daemon=True, name="gst-stderr").start()
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

    def _watch_stdout(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        for raw in process.stdout:
            match = _CAPS_RE.search(raw.decode("utf-8", "replace"))
            if match:
                caps = parse_caps(match.group("caps"))
                if self._caps is not None and (caps.get("width"), caps.get("height")) != (
                    self._caps.get("width"),
                    self._caps.get("height"),
                ):
                    self._renegotiated = True
                self._caps = caps
                self._caps_event.set()

    def _watch_stderr(self) -> None:
        process = self._process
        assert process is not None and process.stderr is not None
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._stderr_tail.append(redact(line))

    def _failure(self) -> str:
        """A one-line reason from what the pipeline printed before it ended."""
        lines = list(self._stderr_tail)
        detail = ""
        for index, line in enumerate(lines):
            if line.startswith("ERROR: from element"):
                # "ERROR: from element /GstPipeline:pipeline0/GstRTSPSrc:rtspsrc0: Unauthorized"
                detail = line.rsplit(": ", 1)[-1]
                debug = [entry for entry in lines[index + 2 : index + 4] if not entry.endswith(":") and "(" in entry]
                if debug and debug[-1] not in detail:
                    detail += f" ({debug[-1]})"
                break
        else:
            errors = [line for line in lines if line.startswith(("ERROR", "WARNING"))]
            detail = errors[0] if errors else ""
        code = self._process.returncode if self._process is not None else None
        if not detail and code == 0:
            detail = "the source ended the stream (end of stream)"
        return redact(f"{self.description}: pipeline stopped (exit {code})" + (f": {detail}" if detail else ""))

    _renegotiated = False

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
                process = self._process
                if process is not None:
                    try:
                        process.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        pass
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
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=3)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
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

    Credentials go to rtspsrc's user-id/user-pw properties, never into the URL we print. They
    are on the gst-launch command line, which /proc shows to the same user and root (and to
    other users unless /proc is mounted with hidepid).
    """

    def pipeline_head(self) -> str:
        spec = self.spec
        latency = int(spec.options.get("latency", 200))
        protocols = spec.options.get("transport", "tcp")
        parts = [f"rtspsrc location={gst_quote(spec.target)} latency={latency} protocols={protocols}"]
        if spec.username:
            parts.append(f"user-id={gst_quote(spec.username)}")
        if spec.password:
            parts.append(f"user-pw={gst_quote(spec.password)}")
        head = " ".join(parts) + " ! decodebin"
        if _on_jetson():
            # Jetson's decoder hands out NVMM buffers; nvvidconv brings them to system memory.
            head += " ! nvvidconv ! video/x-raw,format=BGRx"
        return head


class CsiSource(GstPipeSource):
    """``csi://N``: a Jetson onboard camera through nvarguscamerasrc, converted by nvvidconv."""

    default_size = (720, 1280)

    def check_available(self) -> None:
        super().check_available()
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
