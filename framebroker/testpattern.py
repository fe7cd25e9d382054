"""The deterministic picture behind ``test://``: every frame proves its own number and integrity.

Frame ``n`` of a given size and pixel format is always the same bytes:

* a **band** across the top: 32 cells carrying ``n`` in binary (white = 1, most significant bit
  first), and below them the same 32 bits inverted. The cells are large, so the number survives
  lossy H.264 and can be read back from a decoded recording with ``identify()``;
* a **gradient** below the band, shifted by ``3 * n`` grey levels, so every pixel differs between
  consecutive frames: a frame torn between two writes, or changed after it was handed out,
  cannot equal any rendered frame (``verify()`` checks every byte);
* a white **box** moving sideways, for the motion-detector example and for the eye.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np

BITS = 32
_WHITE = 255
_FILLER = 128


def _band_height(height: int) -> int:
    return max(4, (height // 20) // 2 * 2)


def _check(height: int, width: int) -> None:
    if width < BITS or height < 16:
        raise ValueError(f"the test pattern needs at least {BITS}x16 pixels, got {width}x{height}")


@lru_cache(maxsize=16)
def _base(height: int, width: int, pixel_format: str) -> np.ndarray:
    """The gradient of frame 0 (the band and box are drawn on top per frame)."""
    _check(height, width)
    y = np.arange(height, dtype=np.int64)[:, None]
    x = np.arange(width, dtype=np.int64)[None, :]
    plane = x + 2 * y
    if pixel_format == "gray":
        base = (plane & 255).astype(np.uint8)
    else:
        offsets = np.array([0, 85, 170], dtype=np.int64)  # blue, green, red
        if pixel_format == "rgb":
            offsets = offsets[::-1]
        elif pixel_format != "bgr":
            raise ValueError(f"unknown pixel format {pixel_format!r}: use bgr, rgb or gray")
        base = ((plane[:, :, None] + offsets[None, None, :]) & 255).astype(np.uint8)
    base.setflags(write=False)
    return base


def _box(height: int, width: int, n: int) -> tuple[int, int, int]:
    band = _band_height(height)
    side = max(4, min(height - band, width) // 6)
    x0 = (8 * n) % max(1, width - side + 1)
    y0 = band + (height - band - side) // 2
    return x0, y0, side


def render_into(out: np.ndarray, n: int, pixel_format: str = "bgr") -> np.ndarray:
    """Draw frame ``n`` into ``out`` (uint8, (H, W, 3) or (H, W)) and return it."""
    if not 0 <= n < 1 << BITS:
        raise ValueError(f"frame number {n} does not fit in {BITS} bits")
    height, width = out.shape[:2]
    base = _base(height, width, pixel_format)
    np.add(base, np.uint8((3 * n) & 255), out=out)
    band = _band_height(height)
    cell = width // BITS
    half = band // 2
    out[:band] = _FILLER
    for bit in range(BITS):
        on = (n >> (BITS - 1 - bit)) & 1
        x0 = bit * cell
        out[:half, x0 : x0 + cell] = _WHITE if on else 0
        out[half:band, x0 : x0 + cell] = 0 if on else _WHITE
    x0, y0, side = _box(height, width, n)
    out[y0 : y0 + side, x0 : x0 + side] = _WHITE
    return out


def render(n: int, shape: tuple[int, ...] = (480, 640, 3), pixel_format: Optional[str] = None) -> np.ndarray:
    """A new array holding frame ``n``."""
    if pixel_format is None:
        pixel_format = "gray" if len(shape) == 2 else "bgr"
    return render_into(np.empty(shape, np.uint8), n, pixel_format)


def identify(image: np.ndarray) -> Optional[int]:
    """Read the frame number from the band; None if the band is not a valid test pattern.

    Tolerant of lossy compression: it averages the middle of each cell and thresholds at half
    brightness, and requires the inverted copy to agree bit for bit.
    """
    if image.ndim == 3:
        image = image.mean(axis=2)
    height, width = image.shape[:2]
    if width < BITS or height < 16:
        return None
    band = _band_height(height)
    cell = width // BITS
    half = band // 2
    n = 0
    for bit in range(BITS):
        x0 = bit * cell + cell // 4
        x1 = max(x0 + 1, bit * cell + (3 * cell) // 4)
        top = float(image[half // 4 : max(half // 4 + 1, (3 * half) // 4), x0:x1].mean())
        bottom = float(image[half + half // 4 : max(half + half // 4 + 1, half + (3 * half) // 4), x0:x1].mean())
        top_on = top > 127.5
        if top_on == (bottom > 127.5):
            return None
        n = (n << 1) | int(top_on)
    return n


def verify(image: np.ndarray, pixel_format: Optional[str] = None) -> Optional[int]:
    """The frame number if ``image`` is exactly that test frame (every byte), else None."""
    n = identify(image)
    if n is None:
        return None
    if pixel_format is None:
        pixel_format = "gray" if image.ndim == 2 else "bgr"
    expected = render(n, image.shape, pixel_format)
    return n if np.array_equal(image, expected) else None
