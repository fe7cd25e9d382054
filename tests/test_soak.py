"""The 20-second soak: nothing grows (memory, descriptors, shared memory), nothing is left over.

The ten-minute soak is ``python bench/soak.py`` (its last run is in bench/results/soak-600s.json);
in the suite, 15 s after a 5 s warm-up: enough for a leak of one object per frame to show.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.soak

ROOT = Path(__file__).resolve().parent.parent

# Bounds for 15 s at 30 fps (about 450 frames): a leak of a frame-sized object per frame shows
# up as hundreds of megabytes, of a small one per frame at least as a steady climb; steady state
# stays within allocator noise.
PRIVATE_GROWTH_MB = 4.0


def test_soak(tmp_path):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "20", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert set(report["processes"]) == {"daemon", "read-latest", "read-next", "read-ordered", "read-slow", "recorder"}
    for label, entry in report["processes"].items():
        assert entry["private_growth_mb"] <= PRIVATE_GROWTH_MB, (label, entry)
        assert entry["fd_growth"] == 0, (label, entry)
    assert report["shm_bytes"]["start"] == report["shm_bytes"]["end"] > 0
    assert report["shm_left_after_stop"] == []
    assert report["frames_published"] >= 0.9 * 20 * report["fps"]
    recorder = report["recorder"]
    assert recorder is not None and recorder["dropped_ring"] == 0 and recorder["dropped_queue"] == 0, recorder
    assert report["readers"]["ordered"]["dropped"] == 0
