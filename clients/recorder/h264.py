"""H.264 Annex B byte streams: their NAL units, and SPS/PPS in front of every keyframe.

A file, segment or clip can start at a keyframe only if the sequence and picture parameter sets
(SPS, PPS) come before it. Most encoders repeat them in front of every IDR frame; FFmpeg's
``h264_v4l2m2m`` (the Raspberry Pi's encoder, RPi-Distro/ffmpeg#10) sends them once, in a packet
of their own before the first frame. ``ParameterSets`` repairs such a stream packet by packet.
"""

from __future__ import annotations

from typing import Optional

START_CODE = b"\x00\x00\x00\x01"
IDR, SPS, PPS = 5, 7, 8
_PICTURE_TYPES = frozenset(range(1, 6))  # coded slices (VCL NAL units): a packet with a picture


def nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream, without start codes (3 or 4 bytes) or trailing
    zeros (a NAL unit never ends in a zero byte)."""
    units = []
    start = data.find(b"\x00\x00\x01")
    while start >= 0:
        end = data.find(b"\x00\x00\x01", start + 3)
        unit = data[start + 3 : end if end >= 0 else len(data)].rstrip(b"\x00")
        if unit:
            units.append(unit)
        start = end
    return units


def nal_type(unit: bytes) -> int:
    return unit[0] & 0x1F


def holds_idr_slice(access_unit: bytes) -> bool:
    """Whether an access unit holds an IDR slice: a keyframe. PyAV's H.264 parser flags keyframes
    only from PyAV 18 on; earlier releases (12, the last for Python 3.8 on JetPack 5, and 13 to
    17) leave every parsed unit unflagged."""
    return any(nal_type(unit) == IDR for unit in nal_units(access_unit))


class ParameterSets:
    """Keeps the latest SPS and PPS of a stream and puts them in front of every keyframe that
    comes without them. A packet of parameter sets with no picture (the first packet of
    ``h264_v4l2m2m``) is held back and put in front of the next packet, so that every packet
    still carries exactly one frame. For one encoder, from one thread.
    """

    def __init__(self) -> None:
        self._sets: dict[int, list[bytes]] = {SPS: [], PPS: []}
        self._held = b""
        self._held_types: set[int] = set()
        self._held_keyframe = False

    def complete(self, data: bytes, keyframe: bool) -> Optional[tuple[bytes, bool]]:
        """``(data, keyframe)`` to pass on for one encoded packet, or None if it held no picture
        (it goes in front of the next one)."""
        units = nal_units(data)
        types = {nal_type(unit) for unit in units}
        for kind in (SPS, PPS):
            if kind in types:
                self._sets[kind] = [unit for unit in units if nal_type(unit) == kind]
        if not types & _PICTURE_TYPES:
            self._held += data
            self._held_types |= types
            self._held_keyframe |= keyframe
            return None
        keyframe = keyframe or self._held_keyframe or IDR in types
        present = types | self._held_types
        data = self._held + data
        self._held, self._held_types, self._held_keyframe = b"", set(), False
        if keyframe and SPS not in present and self._sets[SPS]:
            data = b"".join(START_CODE + unit for unit in self._sets[SPS] + self._sets[PPS]) + data
        return data, keyframe
