"""pyzmq PUB/SUB over ``ipc://``: the imagezmq pattern.

Producer: one PUB socket bound to ``ipc:///tmp/fbbench-TAG.ipc``; each frame is one message,
``send(frame, copy=True)``. imagezmq sends with ``copy=False``, which is safe there because
OpenCV hands it a new array per frame; here the driver reuses its buffers, and with
``copy=False`` libzmq could still be reading a buffer the driver has begun to rewrite, which
the harness would count against zmq as torn frames. ``copy=True`` is the same single copy that a new array per frame
costs, made inside ``send``. imagezmq also sends a small JSON part with dtype and shape; the
shape is fixed here, so the frame travels alone.

Reader: a SUB socket connected to it and subscribed to everything; ``recv(copy=False)`` and
``np.frombuffer`` give a view of the message libzmq received into private memory (zero-copy
from libzmq's buffer, but not shared memory: the kernel copied it through the socket).

High-water marks are ``HWM`` messages on both sides: a PUB socket drops frames for a subscriber
whose queue is full (it never waits), and the default of 1000 frames of 6 MB per subscriber
would exhaust memory before it dropped anything.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import zmq

from . import ProducerEnd, ReaderEnd, RunSpec

HWM = 2


def prepare(ctx: Any, spec: RunSpec) -> dict:
    path = f"/tmp/fbbench-{spec.tag}.ipc"
    return {"endpoint": f"ipc://{path}", "path": path}


def cleanup(resources: dict) -> None:
    try:
        os.unlink(resources["path"])
    except FileNotFoundError:
        pass


class Producer(ProducerEnd):
    def __init__(self, spec: RunSpec, resources: dict) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(resources["endpoint"])

    def publish(self, frame: np.ndarray, timestamp_ns: int) -> None:
        self._socket.send(frame, copy=True)

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()


class Reader(ReaderEnd):
    def __init__(self, spec: RunSpec, resources: dict, index: int) -> None:
        self._shape = spec.shape
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(resources["endpoint"])
        self._message: Optional[zmq.Frame] = None

    def wait_next(self, timeout: float) -> Optional[np.ndarray]:
        if not self._socket.poll(int(timeout * 1000)):
            return None
        self._message = self._socket.recv(copy=False)
        return np.frombuffer(self._message.buffer, np.uint8).reshape(self._shape)

    def close(self) -> None:
        self._message = None
        self._socket.close(linger=0)
        self._context.term()
