"""``test://``: the deterministic test pattern (``framebroker.testpattern``) at a steady rate."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from .. import testpattern
from ._base import Pacer, Source


class TestPatternSource(Source):
    """Frame ``n`` (1, 2, 3, ...) is ``testpattern.render(n)``, drawn straight into the slot."""

    __test__ = False  # not a pytest test class, despite the name
    may_drop_frames = False

    def open(self) -> None:
        height, width = self.shape[:2]
        if width < testpattern.BITS or height < 16:
            raise ValueError(f"test:// needs at least {testpattern.BITS}x16 pixels, got {width}x{height}")
        self.fps = self.requested_fps or 30.0
        self._pacer = Pacer(self.fps, self.stop)
        self._number = 0

    def read_into(self, out: np.ndarray) -> Optional[int]:
        self._pacer.wait()
        captured = time.monotonic_ns()
        self._number += 1
        testpattern.render_into(out, self._number, self.pixel_format)
        return captured
