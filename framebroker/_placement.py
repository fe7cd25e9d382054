"""Where a derived frame's pixels come from: the ``Placement`` of a main-frame rectangle in a
derived frame, and how a derived ring keeps the history of its placements in its header.

A derived stream (``serve --derive``, ``_derive.py``) draws the rectangle ``source`` (x, y, w, h)
of each main frame, resized, into the rectangle ``target`` of its own frame: the whole frame into
the whole frame (``stretch``), the whole frame into a centred rectangle with black bars
(``letterbox``), or a centred rectangle of the main frame into the whole frame (``crop``). Boxes
use the convention of results, ``[x, y, w, h]`` in pixels, where pixel i covers [i, i + 1); on
that convention ``cv2.resize`` maps edges linearly (pixel centres stay aligned), so a box maps with
one scale and one offset per axis, exactly.

The placement changes only when the main frame's size does (a camera that comes back at another
resolution). The derived ring's header keeps the last ``PLACEMENTS_KEPT`` placements, each with
the seq of the first frame drawn with it, in its JSON info (``EXTRA``)::

    "derived": {"from": "cam0", "name": "det", "mode": "letterbox",
                "placements": [[seq, sx, sy, sw, sh, tx, ty, tw, th], ...]}

The deriver writes a placement there before it publishes the first frame drawn with it, so a
frame always finds its own; ``Frame.source_box`` reads it only when called, never on the frame
path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from ._layout import EXTRA_OFFSET, EXTRA_SIZE, decode_text

MODES = ("stretch", "letterbox", "crop")
PLACEMENTS_KEPT = 4  # geometry changes a held frame may outlive; the header's JSON is 1 KiB in all
INFO_KEY = "derived"
# The header's JSON is rewritten in place, byte by byte, when the placement changes: a reader that
# reads it twice alike has not raced that write (placements change seconds apart, not twice while
# 1 KiB is copied).
_READ_ATTEMPTS = 5

Rectangle = Tuple[int, int, int, int]


@dataclass(frozen=True)
class Placement:
    """The rectangle ``source`` (x, y, w, h) of a main frame, resized into ``target`` of a
    derived frame."""

    source: Rectangle
    target: Rectangle

    @classmethod
    def fit(cls, source_size: Tuple[int, int], target_size: Tuple[int, int], mode: str) -> "Placement":
        """How a ``source_size`` (width, height) frame goes into a ``target_size`` one by ``mode``."""
        width, height = source_size
        out_width, out_height = target_size
        if mode == "stretch":
            return cls((0, 0, width, height), (0, 0, out_width, out_height))
        if mode == "letterbox":
            scale = min(out_width / width, out_height / height)
            inner_width = min(out_width, max(1, round(width * scale)))
            inner_height = min(out_height, max(1, round(height * scale)))
            left, top = (out_width - inner_width) // 2, (out_height - inner_height) // 2
            return cls((0, 0, width, height), (left, top, inner_width, inner_height))
        if mode == "crop":
            scale = max(out_width / width, out_height / height)
            crop_width = min(width, max(1, round(out_width / scale)))
            crop_height = min(height, max(1, round(out_height / scale)))
            left, top = (width - crop_width) // 2, (height - crop_height) // 2
            return cls((left, top, crop_width, crop_height), (0, 0, out_width, out_height))
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")

    def to_source(self, box: Sequence[float]) -> List[float]:
        """A box in derived-frame pixels, in main-frame pixels."""
        return _map(box, self.target, self.source)

    def to_target(self, box: Sequence[float]) -> List[float]:
        """A box in main-frame pixels, in derived-frame pixels."""
        return _map(box, self.source, self.target)

    def as_record(self, seq: int) -> List[int]:
        return [seq, *self.source, *self.target]

    @classmethod
    def from_record(cls, record: Sequence[int]) -> Tuple[int, "Placement"]:
        """(first seq, placement) of one entry of the header's list."""
        seq, *numbers = (int(value) for value in record)
        return seq, cls(tuple(numbers[:4]), tuple(numbers[4:8]))  # type: ignore[arg-type]


def _map(box: Sequence[float], origin: Rectangle, destination: Rectangle) -> List[float]:
    x, y, width, height = check_box(box)
    kx = destination[2] / origin[2]
    ky = destination[3] / origin[3]
    return [
        destination[0] + (x - origin[0]) * kx,
        destination[1] + (y - origin[1]) * ky,
        width * kx,
        height * ky,
    ]


def check_box(box: Any) -> Tuple[float, float, float, float]:
    """``box`` as four floats [x, y, w, h]; TypeError/ValueError naming what is wrong."""
    try:
        values = [float(value) for value in box]
    except (TypeError, ValueError):
        raise TypeError(f"a box is [x, y, w, h] (four numbers, in pixels), not {box!r}") from None
    if len(values) != 4:
        raise ValueError(f"a box is [x, y, w, h] (four numbers, in pixels), got {len(values)} values: {box!r}")
    return values[0], values[1], values[2], values[3]


def read_derived_info(control: Any) -> Optional[dict]:
    """The ``derived`` object of a ring's header info, None for a main stream's ring."""
    raw = b""
    for _ in range(_READ_ATTEMPTS):
        first = bytes(control[EXTRA_OFFSET : EXTRA_OFFSET + EXTRA_SIZE])
        raw = bytes(control[EXTRA_OFFSET : EXTRA_OFFSET + EXTRA_SIZE])
        if first == raw:
            break
    try:
        info = json.loads(decode_text(raw) or "{}")
    except ValueError:
        return None
    derived = info.get(INFO_KEY) if isinstance(info, dict) else None
    return derived if isinstance(derived, dict) else None


def placement_of(derived: dict, seq: int) -> Optional[Tuple[int, Placement]]:
    """(its first seq, the placement) frame ``seq`` was drawn with, from a ``derived`` info
    object; None if the frame is older than every placement kept."""
    found: Optional[Tuple[int, Placement]] = None
    for record in derived.get("placements") or ():
        first, placement = Placement.from_record(record)
        if first <= seq and (found is None or first > found[0]):
            found = (first, placement)
    return found
