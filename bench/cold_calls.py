"""What the first calls after a frame period of idling cost, against the same calls back to back.

    python bench/cold_calls.py

Each step of the frame path (an OFD lock and unlock, a struct read of the ring's header, building
an ndarray view, a clock read, a semaphore read, and an empty Python call for reference) is timed
once after sleeping 1/30 s, 60 times, and 3000 times back to back; medians, in one run. This is
why the frame path is organised as few steps, with work moved before the wait (_ring.py).
"""

from __future__ import annotations

import statistics
import time
import uuid

import numpy as np

import framebroker as fb
from framebroker._layout import HEAD, LIVE_OFFSET, LOCK_SLOT_BASE


def main() -> int:
    name = f"cold-{uuid.uuid4().hex[:6]}"
    with fb.Publisher(name, shape=(1080, 1920, 3), slots=8) as publisher, fb.Reader(name, name="cold") as reader:
        with publisher.slot():
            pass
        attachment = reader._attachment  # noqa: SLF001 - the raw pieces, timed one by one
        assert attachment is not None
        locks, control, data = attachment.locks, attachment.control, attachment.data

        def nothing() -> None:
            pass

        def lock_pair() -> None:
            locks.try_shared(LOCK_SLOT_BASE + 5)
            locks.unlock(LOCK_SLOT_BASE + 5)

        steps = {
            "empty Python call": nothing,
            "fcntl lock + unlock": lock_pair,
            "read the ring header": lambda: HEAD.unpack_from(control, LIVE_OFFSET),
            "build an ndarray view": lambda: np.ndarray((1080, 1920, 3), np.uint8, buffer=data, offset=0),
            "time.monotonic()": time.monotonic,
            "semaphore value": lambda: attachment.semaphore.value,
        }
        print(f"{'step':<24} {'back to back':>13} {'after 1/30 s idle':>18}")
        for label, step in steps.items():
            hot = []
            for _ in range(3000):
                started = time.perf_counter_ns()
                step()
                hot.append(time.perf_counter_ns() - started)
            cold = []
            for _ in range(60):
                time.sleep(1 / 30)
                started = time.perf_counter_ns()
                step()
                cold.append(time.perf_counter_ns() - started)
            print(f"{label:<24} {statistics.median(hot) / 1000:>10.2f} us {statistics.median(cold) / 1000:>15.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
