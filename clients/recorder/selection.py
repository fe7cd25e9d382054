"""Choosing the encoder: a short test encode decides, never a listing.

``ffmpeg -encoders`` lists ``h264_nvenc`` on machines with no NVIDIA GPU, and GStreamer registers
elements whose hardware is absent, so each candidate is asked to encode a few small test frames
(``probe_encoder``) within a time limit. ``auto`` takes the first candidate of ``AUTO_ORDER`` that
passes; when only software x264 is left it warns in one loud line (each candidate's reason is
logged at debug level, and ``Selection.fallback_reason`` goes into ``framebroker status``). A named
encoder that fails its probe is an ``fb.EncoderError`` that says why.

``select_encoder`` takes the probe as a parameter, so tests can simulate any machine.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import framebroker as fb
from framebroker import testpattern

from .encoders import AUTO_ORDER, ENCODERS, SOFTWARE_FALLBACK, EncoderSettings, EncoderSpec
from .packets import EncodedPacket, FrameStamp, pts_from_ns

log = logging.getLogger("framebroker.recorder")

PROBE_SHAPE = (240, 320, 3)
PROBE_FRAMES = 5
# A hardware encoder that is there answers in well under a second; the limit is for a GStreamer
# registry being rebuilt on first use (a few seconds on a fresh machine) and for wedged drivers.
PROBE_TIMEOUT = 15.0

Probe = Callable[[EncoderSpec], Optional[str]]


def probe_encoder(spec: EncoderSpec, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """Encode a few 320x240 test frames with ``spec``; None if it works, else the reason it does not."""
    settings = EncoderSettings(width=PROBE_SHAPE[1], height=PROBE_SHAPE[0], fps=30.0, bitrate_kbps=500)
    packets: list[EncodedPacket] = []
    outcome: list[Optional[str]] = []
    encoder = spec.create(settings, packets.append)

    def run() -> None:
        try:
            encoder.start()
            for n in range(1, PROBE_FRAMES + 1):
                stamp_ns = (n - 1) * 33_333_333
                encoder.encode(testpattern.render(n, PROBE_SHAPE), FrameStamp(n, stamp_ns, 0.0, pts_from_ns(stamp_ns)), keyframe=n == 1)
            encoder.stop()
        except Exception as exc:
            encoder.abort()
            outcome.append(str(exc) or type(exc).__name__)
            return
        if not packets:
            outcome.append("it produced no output")
        elif not packets[0].keyframe:
            outcome.append("its first packet was not a keyframe")
        elif len(packets) != PROBE_FRAMES:
            outcome.append(f"it returned {len(packets)} packets for {PROBE_FRAMES} frames")
        else:
            outcome.append(None)  # type: ignore[arg-type]

    thread = threading.Thread(target=run, name=f"probe-{spec.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        encoder.abort()  # a GStreamer child is killed; a wedged in-process codec is left behind
        return f"the test encode did not finish within {timeout:g} s"
    return outcome[0] if outcome else "the test encode ended without a result"


@dataclass
class Selection:
    """The encoder chosen and what was tried before it (name, reason it failed)."""

    spec: EncoderSpec
    tried: list[tuple[str, str]] = field(default_factory=list)
    fallback: bool = False  # auto found no hardware encoder and fell back to software x264

    @property
    def fallback_reason(self) -> str:
        """Why software was chosen, in a few words (for status); "" when it was not a fallback."""
        return f"no hardware encoder works ({len(self.tried)} tried)" if self.fallback else ""

    @property
    def warning(self) -> str:
        """One short, loud line; each candidate's reason is logged at debug level."""
        if not self.fallback:
            return ""
        return f"!!! SOFTWARE H.264 ({self.spec.name}): {self.fallback_reason}; it costs CPU. Reasons: --log-level debug"


def select_encoder(requested: str = "auto", probe: Probe = probe_encoder, order: tuple[str, ...] = AUTO_ORDER) -> Selection:
    """The encoder to record with.

    ``requested`` is "auto" or a name from ``ENCODERS`` (``ValueError`` otherwise). Raises
    ``fb.EncoderError`` if the named encoder (or, for auto, even software x264) fails its probe.
    """
    if requested != "auto":
        spec = ENCODERS.get(requested)
        if spec is None:
            raise ValueError(f"unknown encoder {requested!r}; choose auto or one of: {', '.join(ENCODERS)}")
        reason = probe(spec)
        if reason is not None:
            raise fb.EncoderError(
                f"encoder {spec.name} ({spec.description}) does not work on this machine: {reason}. "
                "Use --encoder auto to record with the best encoder that does."
            )
        log.info("encoder %s (%s) passed its test encode", spec.name, spec.description)
        return Selection(spec)
    tried: list[tuple[str, str]] = []
    for name in order:
        spec = ENCODERS[name]
        reason = probe(spec)
        if reason is None:
            selection = Selection(spec, tried, fallback=not spec.hardware and name == SOFTWARE_FALLBACK)
            if selection.fallback:
                log.warning(selection.warning)
            else:
                log.info("encoder %s (%s) chosen; tried before it: %s", name, spec.description, tried or "none")
            return selection
        log.debug("encoder %s does not work here: %s", name, reason)
        tried.append((name, reason))
    details = "; ".join(f"{name}: {reason}" for name, reason in tried)
    raise fb.EncoderError(f"no H.264 encoder works on this machine, not even software x264. Tried: {details}")
