"""The public Python API: names, errors, lifetimes, zero-copy."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import framebroker as fb
from framebroker import testpattern


def test_public_names_are_exactly_these():
    expected = [
        "AccessDenied",
        "CapacityError",
        "ClosedError",
        "EncoderError",
        "Frame",
        "FrameBrokerError",
        "FrameReleased",
        "FrameTimeout",
        "IncompatibleSegment",
        "ModelNotFound",
        "Publisher",
        "Reader",
        "Result",
        "ResultExpired",
        "ResultReader",
        "ResultWriter",
        "ShmSpaceError",
        "SlotWriter",
        "SourceEnded",
        "SourceError",
        "StreamBusy",
        "StreamNotFound",
        "Trigger",
        "TriggerError",
        "TriggerInbox",
        "__version__",
        "models",
        "status",
        "trigger",
    ]
    assert fb.__all__ == sorted(fb.__all__)
    assert fb.__all__ == expected
    for name in fb.__all__:
        assert hasattr(fb, name), name


def test_error_tree():
    for name in fb.__all__:
        obj = getattr(fb, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, fb.FrameBrokerError), name
            assert name in fb.FrameBrokerError.__module__ and name in (fb.FrameBrokerError.__doc__ or "") or name in (
                __import__("framebroker._errors", fromlist=["x"]).__doc__ or ""
            ), f"{name} missing from the error tree docstring"
    assert issubclass(fb.FrameTimeout, TimeoutError)
    assert issubclass(fb.AccessDenied, PermissionError)
    assert issubclass(fb.SourceEnded, fb.SourceError)


def test_stream_not_found_says_what_to_do(env):
    name = env.name()
    with pytest.raises(fb.StreamNotFound, match=f"framebroker serve SOURCE --name {name}"):
        fb.Reader(name)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"stream": "a/b"}, ValueError),
        ({"stream": ".."}, ValueError),
        ({"stream": "has space"}, ValueError),
        ({"stream": "x" * 65}, ValueError),
        ({"stream": 5}, TypeError),
        ({"stream": "ok", "hold": 0}, ValueError),
        ({"stream": "ok", "hold": 1.5}, TypeError),
        ({"stream": "ok", "name": "n" * 80}, ValueError),
        ({"stream": "ok", "wait": -1}, ValueError),
    ],
)
def test_reader_arguments_are_checked(kwargs, error):
    with pytest.raises(error):
        fb.Reader(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"shape": (480, 640, 4)}, ValueError),
        ({"shape": (0, 640, 3)}, ValueError),
        ({"shape": (480, 70000, 3)}, ValueError),
        ({"shape": "480x640"}, TypeError),
        ({"shape": (480, 640, 3), "fps": -1}, ValueError),
        ({"shape": (480, 640, 3), "fps": float("nan")}, ValueError),
        ({"shape": (480, 640, 3), "slots": 2}, ValueError),
        ({"shape": (480, 640, 3), "slots": 100000}, ValueError),
        ({"shape": (480, 640, 3), "format": "yuv"}, ValueError),
        ({"shape": (480, 640), "format": "bgr"}, ValueError),
        ({"shape": (480, 640, 3), "group": "no-such-group-here"}, ValueError),
    ],
)
def test_publisher_arguments_are_checked(env, kwargs, error):
    with pytest.raises(error):
        fb.Publisher(env.name(), **kwargs)


def test_publish_checks_arrays(env):
    with fb.Publisher(env.name(), shape=(8, 32, 3)) as pub:
        with pytest.raises(TypeError):
            pub.publish([[1, 2]])  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            pub.publish(np.zeros((8, 32, 3), np.float32))
        assert pub.publish(np.zeros((8, 32, 3), np.uint8)) == 1


def test_timeout_is_nothing_yet_not_failure(env):
    name = env.name()
    with fb.Publisher(name, shape=(16, 32, 3)) as pub, fb.Reader(name, name="early") as cam:
        started = time.monotonic()
        with pytest.raises(fb.FrameTimeout) as raised:
            cam.latest(timeout=0.2)
        assert time.monotonic() - started >= 0.19
        assert isinstance(raised.value, TimeoutError)
        assert "starting" in str(raised.value)
        pub.publish(np.zeros((16, 32, 3), np.uint8))
        assert cam.latest(timeout=0).seq == 1


def test_latest_next_and_iteration(env):
    name = env.name()
    shape = (16, 32, 3)
    with fb.Publisher(name, shape=shape) as pub, fb.Reader(name, name="modes") as cam:
        pub.publish(testpattern.render(1, shape))
        first = cam.latest(timeout=1)
        assert cam.latest(timeout=1) is first, "latest() returns the held frame when nothing is newer"
        with pytest.raises(fb.FrameTimeout):
            cam.next(timeout=0.1)
        timer = threading.Timer(0.2, lambda: pub.publish(testpattern.render(2, shape)))
        timer.start()
        second = cam.next(timeout=5)
        timer.join()
        assert second.seq == 2
        assert first.released, "asking for a frame beyond hold=1 releases the previous one"
        with pytest.raises(fb.FrameReleased, match="hold=N"):
            first.array
        pub.publish(testpattern.render(3, shape))
        pub.publish(testpattern.render(4, shape))
        assert next(iter(cam)).seq == 4, "iteration skips to the freshest frame"


def test_hold_budget(env):
    name = env.name()
    shape = (16, 32, 3)
    with fb.Publisher(name, shape=shape, slots=6) as pub:
        with fb.Reader(name, name="three", hold=3) as cam:
            frames = []
            for n in range(1, 5):
                pub.publish(testpattern.render(n, shape))
                frames.append(cam.next(timeout=1))
            assert [f.released for f in frames] == [True, False, False, False]
            with pytest.raises(fb.CapacityError, match="3 of the 4 .* --slots 7 or more"):
                fb.Reader(name, name="too-many", hold=2)
            with fb.Reader(name, name="fits", hold=1):
                pass
        with pytest.raises(fb.CapacityError, match="cannot guarantee 5"):
            fb.Reader(name, hold=5)


def test_frame_context_manager_and_copy(env):
    name = env.name()
    shape = (16, 32, 3)
    with fb.Publisher(name, shape=shape) as pub, fb.Reader(name) as cam:
        pub.publish(testpattern.render(7, shape))
        with cam.latest(timeout=1) as frame:
            private = frame.copy()
            asarray = np.asarray(frame)
        assert frame.released
        private[0, 0, 0] = 1  # a copy is writable and ours
        assert asarray.shape == shape
        frame.release()  # twice is fine


def test_closed_objects_refuse_use(env):
    name = env.name()
    pub = fb.Publisher(name, shape=(16, 32, 3))
    cam = fb.Reader(name)
    pub.publish(np.zeros((16, 32, 3), np.uint8))
    frame = cam.latest(timeout=1)
    cam.close()
    cam.close()
    assert frame.released
    with pytest.raises(fb.ClosedError):
        cam.latest()
    pub.close()
    pub.close()
    with pytest.raises(fb.ClosedError):
        pub.publish(np.zeros((16, 32, 3), np.uint8))


def _shm_ranges(stream: str) -> list[tuple[int, int, str]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == f"/dev/shm/framebroker.{stream}":
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end, parts[1]))
    return ranges


def test_views_are_zero_copy_read_only_shared_memory(env):
    name = env.name()
    shape = (48, 64, 3)
    with fb.Publisher(name, shape=shape) as pub, fb.Reader(name) as cam:
        writer = pub.slot()
        with writer as buf:
            testpattern.render_into(buf, 1)
            buffer_address = buf.ctypes.data
        frame = cam.latest(timeout=1)
        address = frame.array.ctypes.data
        ranges = _shm_ranges(name)
        reader_maps = [r for r in ranges if r[0] <= address < r[1]]
        assert reader_maps, "the reader's array does not point into the shared segment"
        assert reader_maps[0][2].startswith("r-"), f"reader mapping should be read-only, is {reader_maps[0][2]}"
        assert any(start <= buffer_address < end and perms.startswith("rw") for start, end, perms in ranges), (
            "pub.slot() must hand out the slot itself (write in place)"
        )
        assert testpattern.verify(frame.array) == 1


def test_torch_shares_memory_without_copy(env):
    torch = pytest.importorskip("torch")
    name = env.name()
    with fb.Publisher(name, shape=(16, 32, 3)) as pub, fb.Reader(name) as cam:
        pub.publish(testpattern.render(3, (16, 32, 3)))
        frame = cam.latest(timeout=1)
        with pytest.warns(UserWarning, match="not writable"):
            tensor = torch.from_numpy(frame.array)
        assert tensor.data_ptr() == frame.array.ctypes.data


def test_reader_waits_for_a_stream_to_appear(env):
    name = env.name()
    with pytest.raises(fb.StreamNotFound):
        fb.Reader(name, wait=0.2)  # a wait that runs out ends as without one
    ready = threading.Event()

    def start_later():
        # Not synchronisation: the reader must attach whenever the stream appears; the delay
        # only makes it appear while the reader waits.
        time.sleep(0.3)
        with fb.Publisher(name, shape=(16, 32, 3)) as pub:
            pub.publish(np.zeros((16, 32, 3), np.uint8))
            ready.wait(5)

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with fb.Reader(name, wait=30) as cam:
            assert cam.latest(timeout=5).seq == 1
    finally:
        ready.set()
        thread.join()


def test_reader_does_not_survive_fork(env):
    name = env.name()
    with fb.Publisher(name, shape=(16, 32, 3)) as pub, fb.Reader(name) as cam:
        pub.publish(np.zeros((16, 32, 3), np.uint8))
        frame = cam.latest(timeout=1)
        pid = os.fork()
        if pid == 0:
            try:
                cam.latest()
                os._exit(3)
            except fb.ClosedError:
                os._exit(0)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert not frame.released, "the child must not release the parent's lease"
        assert cam.latest(timeout=1) is frame


def test_signal_during_a_wait_is_a_wake_up_not_a_lost_stream(env):
    import signal

    name = env.name()
    shape = (16, 32, 3)
    fired = threading.Event()
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.set())
    try:
        with fb.Publisher(name, shape=shape) as pub, fb.Reader(name) as cam:
            attachment = cam._attachment  # noqa: SLF001

            def publish_after_the_signal() -> None:
                if fired.wait(30):
                    pub.publish(testpattern.render(1, shape))

            publisher = threading.Thread(target=publish_after_the_signal)
            publisher.start()
            signal.setitimer(signal.ITIMER_REAL, 0.1)  # fires while next() waits
            try:
                frame = cam.next(timeout=30)
            finally:
                fired.set()
                publisher.join()
            assert frame.seq == 1
            assert cam._attachment is attachment, "an interrupted wait must not look like a dead daemon"  # noqa: SLF001
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_ordered_iterator_survives_a_timeout_and_fps_is_public(env):
    name = env.name()
    shape = (16, 32, 3)
    with fb.Publisher(name, shape=shape, fps=25) as pub, fb.Reader(name) as cam:
        assert cam.fps == 25.0
        frames = cam.ordered(timeout=0.1)
        with pytest.raises(fb.FrameTimeout):
            next(frames)
        pub.publish(testpattern.render(1, shape))
        pub.publish(testpattern.render(2, shape))
        assert next(frames).seq == 2, "ordered() starts with the newest frame"
        pub.publish(testpattern.render(3, shape))
        assert next(frames).seq == 3
        with pytest.raises(fb.FrameTimeout):
            next(frames)
        pub.publish(testpattern.render(4, shape))
        assert next(frames).seq == 4, "the same iterator goes on after a timeout"
