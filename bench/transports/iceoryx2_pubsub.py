"""iceoryx2's Python binding: publish-subscribe with a loaned payload, woken by its event service.

One publish-subscribe service ``fbbench/TAG`` whose payload type is a fixed-size
``ctypes.c_uint8 * (H * W * 3)`` (a frame, so each sample is one chunk of iceoryx2's shared-memory
data segment), and one event service of the same name for wake-ups.

Service settings, chosen to match what framebroker offers its readers: at most one publisher;
``max_subscribers = readers``; ``subscriber_max_buffer_size = 1`` with safe overflow, so a new
sample replaces one a reader has not taken yet (the reader always gets the newest, nothing
queues up); ``subscriber_max_borrowed_samples = 1`` (a reader holds one frame, like ``hold=1``);
no history. iceoryx2 sizes its data segment from these (readers x 2 chunks + the loan).

Producer: ``loan_uninit()`` lends a chunk of the data segment; the frame is copied straight into
it through a numpy view of ``payload_ptr`` (one copy, into shared memory), then
``assume_init().send()`` and ``notifier.notify()`` wakes every listener.

Reader: ``listener.timed_wait()`` sleeps in the kernel until notified; then the previous sample is
released (``delete()``) and ``subscriber.receive()`` takes the newest. The returned array is a
numpy view of the sample's payload in the subscriber's read-only mapping of the data segment.

Numpy views are cached by payload address on both sides: chunks are reused, and building a
ctypes array and a numpy view per frame would charge iceoryx2 for wrapping work any user would
hoist. A view is only handed out while its sample is held.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, Optional

import iceoryx2 as iox2
import numpy as np

from . import ProducerEnd, ReaderEnd, RunSpec

# How long a reader retries opening the services (it starts after the producer reported ready,
# so this only matters on a very loaded machine).
OPEN_TIMEOUT = 10.0


def service_name(spec: RunSpec) -> str:
    return f"fbbench/{spec.tag}"


def prepare(ctx: Any, spec: RunSpec) -> dict:
    return {"service": service_name(spec)}


def cleanup(resources: dict) -> None:
    # iceoryx2 removes a service with its last port. After a crash its dead-node cleanup (run by
    # the next node that looks) reclaims what the dead process left.
    pass


def _quiet() -> None:
    # Without a config file iceoryx2 warns, once per process, that it uses its defaults.
    iox2.set_log_level(iox2.LogLevel.Error)


def _payload_type(spec: RunSpec) -> Any:
    return ctypes.c_uint8 * spec.nbytes


def _pubsub_builder(node: Any, spec: RunSpec) -> Any:
    return (
        node.service_builder(iox2.ServiceName.new(service_name(spec)))
        .publish_subscribe(_payload_type(spec))
        .max_publishers(1)
        .max_subscribers(spec.readers)
        .subscriber_max_buffer_size(1)
        .subscriber_max_borrowed_samples(1)
        .history_size(0)
        .enable_safe_overflow(True)
    )


def _event_builder(node: Any, spec: RunSpec) -> Any:
    return node.service_builder(iox2.ServiceName.new(service_name(spec))).event().max_notifiers(1).max_listeners(spec.readers)


class _Views:
    """Numpy views of payloads, one per chunk address."""

    def __init__(self, spec: RunSpec, writable: bool) -> None:
        self._shape = spec.shape
        self._type = _payload_type(spec)
        self._writable = writable
        self._views: dict[int, np.ndarray] = {}

    def at(self, address: int) -> np.ndarray:
        view = self._views.get(address)
        if view is None:
            view = np.ndarray(self._shape, np.uint8, buffer=self._type.from_address(address))
            if not self._writable:
                view.flags.writeable = False
            self._views[address] = view
        return view


class Producer(ProducerEnd):
    def __init__(self, spec: RunSpec, resources: dict) -> None:
        _quiet()
        self._node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        self._pubsub = _pubsub_builder(self._node, spec).create()
        self._publisher = self._pubsub.publisher_builder().max_loaned_samples(1).create()
        self._events = _event_builder(self._node, spec).create()
        self._notifier = self._events.notifier_builder().create()
        self._views = _Views(spec, writable=True)

    def publish(self, frame: np.ndarray, timestamp_ns: int) -> None:
        sample = self._publisher.loan_uninit()
        np.copyto(self._views.at(sample.payload_ptr), frame)
        sample.assume_init().send()
        self._notifier.notify()

    def close(self) -> None:
        self._notifier.delete()
        self._publisher.delete()
        self._views = None
        self._events = self._pubsub = self._node = None


class Reader(ReaderEnd):
    def __init__(self, spec: RunSpec, resources: dict, index: int) -> None:
        _quiet()
        self._node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                self._pubsub = _pubsub_builder(self._node, spec).open()
                self._events = _event_builder(self._node, spec).open()
                break
            except (iox2.PublishSubscribeOpenError, iox2.EventOpenError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._subscriber = self._pubsub.subscriber_builder().buffer_size(1).create()
        self._listener = self._events.listener_builder().create()
        self._views = _Views(spec, writable=False)
        self._sample: Any = None

    def wait_next(self, timeout: float) -> Optional[np.ndarray]:
        subscriber = self._subscriber
        if not subscriber.has_samples():
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                # Returns every pending notification at once; one may be for a sample already
                # taken, hence the loop.
                self._listener.timed_wait(iox2.Duration.from_secs_f64(remaining))
                if subscriber.has_samples():
                    break
        if self._sample is not None:
            self._sample.delete()
            self._sample = None
        sample = subscriber.receive()
        if sample is None:
            return None
        self._sample = sample
        return self._views.at(sample.payload_ptr)

    def close(self) -> None:
        if self._sample is not None:
            self._sample.delete()
            self._sample = None
        self._views = None
        self._listener.delete()
        self._subscriber.delete()
        self._events = self._pubsub = self._node = None
