"""``framebroker view``: the browser preview, seen by a real headless Chromium, and its /metrics."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from framebroker import testpattern
from framebroker._status import describe_stream

from conftest import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless Chromium as root on a machine without a network: no sandbox (root), no GPU, and none
# of the background traffic (component updates, sync, QUIC) that would stall on the closed network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,720",
]
FRAME = (480, 640)  # test:// default size


def start_view(env, name: str, *args: str):
    view = env.cli("view", name, "--port", "0", *args)
    line = view.wait_line(lambda text: text.startswith("view: stream "), 20)
    return view, re.search(r"http://\S+/", line).group(0)


def get(url: str) -> tuple[int, dict, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def metrics(url: str) -> dict:
    """/metrics parsed by prometheus_client: {family name: family}."""
    status, headers, body = get(url + "metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(body)}


def value(families: dict, sample: str, **labels: str) -> float:
    """The one sample called ``sample`` with these labels (a counter's family drops "_total")."""
    family = families[sample[: -len("_total")] if sample.endswith("_total") else sample]
    found = [s.value for s in family.samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, family.samples)
    return found[0]


class MjpegViewer(threading.Thread):
    """A browser stand-in: reads the MJPEG stream and notes the test:// number of each picture."""

    def __init__(self, url: str, wanted: int = 0) -> None:
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
        self.path = parts.path + "stream.mjpg"
        self.wanted = wanted
        self.numbers: list[int] = []
        self.error: "BaseException | None" = None
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            self.connection.request("GET", self.path)
            reply = self.connection.getresponse()
            assert reply.status == 200
            boundary = reply.getheader("Content-Type").split("boundary=")[1].encode()
            while not self.stop.is_set() and (not self.wanted or len(self.numbers) < self.wanted):
                assert reply.readline().strip() == b"--" + boundary
                headers = {}
                while (line := reply.readline().strip()) != b"":
                    key, _, text = line.decode().partition(":")
                    headers[key.lower()] = text.strip()
                assert headers["content-type"] == "image/jpeg"
                jpeg = reply.read(int(headers["content-length"]))
                assert reply.read(2) == b"\r\n"
                image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                number = testpattern.identify(image)
                assert image.shape[:2] == FRAME and number is not None, "not a picture of a test:// frame"
                assert int(headers["x-frame-seq"]) == number, "each part names the frame it holds"
                self.numbers.append(number)
        except BaseException as exc:
            if not self.stop.is_set():
                self.error = exc
        finally:
            self.connection.close()

    def finish(self) -> list[int]:
        """Wait for the wanted pictures, or (wanted=0) hang up now; the numbers seen."""
        if self.wanted:
            self.join(timeout=60)
        else:
            self.stop.set()
            if self.connection.sock is not None:
                self.connection.sock.shutdown(socket.SHUT_RDWR)
            self.join(timeout=10)
        assert not self.is_alive() and self.error is None, self.error
        return self.numbers


# --- in a real browser ------------------------------------------------------------------------------


def run_chromium(tmp_path: Path, label: str, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    argv = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + label)}", *args]
    # Its own session, so that whatever it leaves (zygote, renderers) is ended by its group id.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


# Puts the pipes on the descriptors Chromium expects (3, 4), then becomes Chromium. Both are
# first moved above 4, so that neither can be overwritten by the other on the way.
_ONTO_3_AND_4 = (
    "import fcntl, os, sys\n"
    "high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 5) for fd in sys.argv[1:3]]\n"
    "os.dup2(high[0], 3)\n"
    "os.dup2(high[1], 4)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages ending in a NUL byte, commands on its fd 3, replies on its fd 4), so that a
    test can wait for what the page reports before it takes a screenshot. ``--screenshot`` on
    the command line shoots at the load event, before the page's script has drawn anything."""

    def __init__(self, tmp_path: Path, label: str) -> None:
        if CHROMIUM is None:
            if os.environ.get("CI"):
                pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
            pytest.skip("needs Debian's chromium (apt-get install chromium)")
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        argv = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + label)}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ONTO_3_AND_4, str(commands_read), str(replies_write), *argv],
            pass_fds=(commands_read, replies_write),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # whatever it starts (zygote, renderers) is ended by group id
        )
        os.close(commands_read)
        os.close(replies_write)
        self._pending = b""
        self._id = 0
        self.session = ""

    def send(self, method: str, params: "dict | None" = None, timeout: float = 30.0) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._pending:
                remaining = deadline - time.monotonic()
                readable, _, _ = select.select([self._replies], [], [], max(0.0, remaining))
                assert readable, f"Chromium did not answer {method} within {timeout} s"
                chunk = os.read(self._replies, 1 << 20)
                assert chunk, "Chromium closed its DevTools pipe"
                self._pending += chunk
            raw, self._pending = self._pending.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, expression: str) -> object:
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")

    def shown(self) -> "dict | None":
        """What the page says it shows: the frame's seq and the results drawn on it."""
        return self.evaluate("window.framebrokerShown")

    def screenshot(self) -> np.ndarray:
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self._commands)
        os.close(self._replies)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def screenshot(tmp_path: Path, url: str, label: str) -> np.ndarray:
    """The page in a fresh browser, once its script has drawn a picture."""
    with Browser(tmp_path, label) as browser:
        browser.open(url)
        wait_until(browser.shown, 30, "the page to draw a picture")
        return browser.screenshot()


def expected_gray(number: int) -> np.ndarray:
    return cv2.cvtColor(testpattern.render(number, (*FRAME, 3)), cv2.COLOR_BGR2GRAY).astype(np.int16)


def locate_picture(page: np.ndarray) -> tuple[int, int, int]:
    """(x, y, frame number) of the test:// picture shown 1:1 near the page's top left."""
    gray = cv2.cvtColor(page, cv2.COLOR_BGR2GRAY)
    for y in range(0, 200, 2):
        for x in range(0, 64, 2):
            crop = gray[y : y + FRAME[0], x : x + FRAME[1]]
            if crop.shape != FRAME:
                continue
            number = testpattern.identify(crop)
            # A crop half on the page can pass for a band; the whole picture must match too
            # (JPEG costs a few grey levels).
            if number and np.abs(crop.astype(np.int16) - expected_gray(number)).mean() < 12:
                # identify() tolerates being a few pixels off; settle on the exact position.
                expected = expected_gray(number)
                offsets = [(dx, dy) for dx in range(-4, 5) for dy in range(-4, 5) if x + dx >= 0 and y + dy >= 0]

                def mismatch(offset: tuple[int, int]) -> float:
                    crop = gray[y + offset[1] : y + offset[1] + FRAME[0], x + offset[0] : x + offset[0] + FRAME[1]]
                    return np.abs(crop.astype(np.int16) - expected).mean() if crop.shape == FRAME else 255.0

                dx, dy = min(offsets, key=mismatch)
                if mismatch((dx, dy)) < 4:  # else a lookalike: keep looking
                    return x + dx, y + dy, number
    raise AssertionError("no test:// picture shown 1:1 near the page's top left")


@pytest.mark.browser
def test_page_in_headless_chromium_shows_the_live_picture_and_the_status(env, tmp_path):
    daemon, name = env.serve("test://", None, "--fps", "15")
    watcher = env.cli("read", name, "--reader-name", "watcher")
    view, url = start_view(env, name)
    wait_until(lambda: any(r["name"] == "watcher" for r in describe_stream(name)["readers"]), 20, "the watcher")

    first = screenshot(tmp_path, url, "first")
    x, y, first_number = locate_picture(first)
    wait_until(lambda: describe_stream(name)["seq"] >= first_number + 15, 20, "a second of new frames")
    second = screenshot(tmp_path, url, "second")
    x2, y2, second_number = locate_picture(second)
    assert (x2, y2) == (x, y)
    assert second_number > first_number, "the browser must show a newer frame"
    picture = np.s_[y : y + FRAME[0], x : x + FRAME[1]]
    changed = np.any(first[picture] != second[picture], axis=2).mean()
    assert changed > 0.5, f"only {changed:.0%} of the picture's pixels changed"

    dom = run_chromium(tmp_path, "dom", "--dump-dom", url).stdout
    text = re.sub(r"<[^>]+>", " ", dom)
    assert f"stream {name}" in text and "streaming for" in text and "test://" in text
    assert "640x480 bgr" in text and "watcher" in text and str(watcher.pid) in text
    assert f"pid {daemon.pid}" in text
    assert '<canvas id="picture"' in dom and '<script src="preview.js">' in dom


# --- the models' boxes over the picture -------------------------------------------------------------

BOX_MODEL = str(Path(__file__).resolve().parent / "box_model.py")
LINE = 2  # the page's line width at 640 px: max(2, width / 320)


def start_box_model(env, name: str, *args: str):
    model = env.spawn([sys.executable, BOX_MODEL, name, "--quiet", *args], label="box model")
    model.wait_event("ready")
    return model


def drawn_box(page: np.ndarray, picture: tuple[int, int], colour: tuple[int, int, int], side: int) -> "tuple[int, int, int, int] | None":
    """[x, y, w, h] (in picture pixels) of the box outline drawn in ``colour`` (RGB), from the
    rows and columns where a long run of the page's pixels has that colour (the label's text,
    in the same colour, is too short to count)."""
    x, y = picture
    crop = page[y : y + FRAME[0], x : x + FRAME[1]].astype(np.int16)
    mask = np.all(np.abs(crop - np.array(colour[::-1], np.int16)) <= 40, axis=2)
    columns = np.flatnonzero(mask.sum(axis=0) >= 0.6 * side)
    rows = np.flatnonzero(mask.sum(axis=1) >= 0.6 * side)
    if not len(columns) or not len(rows):
        return None
    # The outline lies just outside the box: LINE pixels on every side.
    return columns[0] + LINE, rows[0] + LINE, columns[-1] - columns[0] + 1 - 2 * LINE, rows[-1] - rows[0] + 1 - 2 * LINE


def test_each_models_boxes_are_drawn_on_the_frame_they_were_computed_on(env, tmp_path):
    """The model's results arrive 0.3 s (about 4 frames, 36 px of the square's travel) after
    their frames: only a page that holds each frame back for its own result draws the box on
    the square. A second model, toggled off, must not be drawn."""
    from box_model import square
    from framebroker_clients._models import model_colour

    daemon, name = env.serve("test://", None, "--fps", "15")
    start_box_model(env, name, "--model", "square", "--latency", "0.3")
    start_box_model(env, name, "--model", "decoy", "--label", "decoy")
    colour, decoy_colour = model_colour("square"), model_colour("decoy")
    assert colour != decoy_colour
    view, url = start_view(env, name)

    with Browser(tmp_path, "boxes") as browser:
        browser.open(url)
        wait_until(lambda: {r["model"] for r in (browser.shown() or {}).get("results", [])} == {"square", "decoy"}, 30, "both models drawn")
        browser.evaluate('document.querySelector("input[data-model=decoy]").click()')
        wait_until(lambda: [r["model"] for r in browser.shown()["results"]] == ["square"], 10, "the decoy model toggled off")
        checked = late = 0
        for _ in range(60):
            if checked == 3:
                break
            shown = browser.shown()
            page = browser.screenshot()
            after = browser.shown()
            x, y, number = locate_picture(page)
            expected = square(number, *FRAME)
            if not (LINE <= expected[0] and expected[0] + expected[2] + LINE <= FRAME[1]):
                continue  # the square touches the picture's edge: its outline is cut off
            drawn = drawn_box(page, (x, y), colour, expected[2])
            assert drawn is not None, f"no box of model 'square' on frame {number} (the page reports {shown})"
            if not all(abs(a - b) <= 2 for a, b in zip(drawn, expected)):
                # Allowed only where the page says it drew this frame with the model's previous
                # result (dashed: the result came later than it waits, on a machine starved of CPU).
                states = [state for state in (shown, after) if state["seq"] == number]
                assert states and not states[0]["results"][0]["exact"], f"frame {number}: box drawn at {drawn}, the square is at {expected}"
                late += 1
                continue
            assert drawn_box(page, (x, y), decoy_colour, expected[2]) is None, "the decoy model is toggled off"
            assert [r["model"] for r in shown["results"]] == ["square"]
            held = shown["heldMs"]
            assert 0 < held <= 1000, shown
            checked += 1
        assert checked == 3, f"only {checked} frames drawn with their own result ({late} with a late one)"

        status = browser.evaluate('document.getElementById("status").innerText')
        assert "models (2)" in status and "square" in status and " ms" in status, status
        caption = browser.evaluate('document.getElementById("models").innerText')
        assert re.search(r"square: [\d.]+ results/s, p50 \d+ ms after capture", caption), caption

    document = json.loads(get(url + "status.json")[2])
    models = {m["name"]: m for m in document["streams"][0]["models"]}
    assert models["square"]["latency_p50_ms"] >= 250 and models["square"]["alive"]
    assert document["preview"]["results_sent"] > 0
    families = metrics(url)
    labels = {"stream": name, "model": "square"}
    assert value(families, "framebroker_model_results_total", **labels) > 0
    assert 0.25 <= value(families, "framebroker_model_latency_seconds", **labels, quantile="0.5") < 1.0
    assert value(families, "framebroker_model_lag_frames", **labels) >= 0
    assert value(families, "framebroker_model_up", **labels) == 1
    assert families["framebroker_model_results"].type == "counter"


# --- /metrics --------------------------------------------------------------------------------------


def test_metrics_parse_with_prometheus_client(env):
    daemon, name = env.serve("test://", None, "--fps", "20")
    odd = 'slow "one" \\ with\nnewline'  # every character the label escaping must handle
    slow = env.cli("read", name, "--mode", "ordered", "--work-ms", "200", "--reader-name", odd)
    view, url = start_view(env, name)
    wait_until(
        lambda: any(r["name"] == odd and r["dropped"] and r["lag"] for r in describe_stream(name)["readers"]), 20, "the slow reader to fall behind"
    )

    families = metrics(url)
    for family in families.values():
        assert family.documentation, f"{family.name} has no HELP"
    kinds = {
        "framebroker_stream_up": "gauge",
        "framebroker_stream_state": "gauge",
        "framebroker_stream_frames": "counter",
        "framebroker_stream_fps": "gauge",
        "framebroker_stream_configured_fps": "gauge",
        "framebroker_stream_source_drops": "counter",
        "framebroker_stream_last_frame_age_seconds": "gauge",
        "framebroker_reader_frames": "counter",
        "framebroker_reader_fps": "gauge",
        "framebroker_reader_lag_frames": "gauge",
        "framebroker_reader_dropped": "counter",
        "framebroker_reader_held_slots": "gauge",
        "framebroker_preview_viewers": "gauge",
        "framebroker_preview_jpeg_encodes": "counter",
        "framebroker_preview_frames_sent": "counter",
    }
    assert {k: families[k].type for k in kinds} == kinds
    assert value(families, "framebroker_stream_up", stream=name) == 1
    assert value(families, "framebroker_stream_state", stream=name, state="streaming") == 1
    assert value(families, "framebroker_stream_state", stream=name, state="dead") == 0
    assert value(families, "framebroker_stream_frames_total", stream=name) > 0
    assert value(families, "framebroker_stream_configured_fps", stream=name) == 20
    reader = {"stream": name, "reader": odd, "pid": str(slow.pid)}
    assert value(families, "framebroker_reader_lag_frames", **reader) > 0
    assert value(families, "framebroker_reader_dropped_total", **reader) > 0
    assert value(families, "framebroker_reader_held_slots", **reader) <= 1
    assert value(families, "framebroker_reader_info", **reader, mode="ordered") == 1
    assert value(families, "framebroker_preview_jpeg_encodes_total", stream=name) == 0, "nobody watched: nothing encoded"

    # Bound to the loopback address only (the default): /proc/net/tcp lists 127.0.0.1 as 0100007F.
    port = urlsplit(url).port
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening


def test_many_viewers_cost_one_jpeg_encode_per_frame_and_none_while_idle(env):
    daemon, name = env.serve("test://", None, "--fps", "30")
    view, url = start_view(env, name, "--max-fps", "0")
    start = describe_stream(name)["seq"]
    wait_until(lambda: describe_stream(name)["seq"] >= start + 30, 20, "a second of frames nobody watches")
    idle = metrics(url)
    assert value(idle, "framebroker_preview_jpeg_encodes_total", stream=name) == 0
    assert "view" not in [r["name"] for r in describe_stream(name)["readers"]], "an unwatched preview stays detached"

    viewers = [MjpegViewer(url, wanted=30) for _ in range(3)]
    seen = [viewer.finish() for viewer in viewers]
    for numbers in seen:
        assert len(numbers) == 30 and numbers == sorted(set(numbers)), "fresh pictures in order, none twice"
    shared = set(seen[0]) & set(seen[1]) & set(seen[2])
    assert len(shared) >= 20, "the three viewers must be sent the same pictures"

    wait_until(lambda: value(metrics(url), "framebroker_preview_viewers", stream=name) == 0, 10, "the viewers to be gone")
    # A few frame periods for an encode that was under way when the last viewer left.
    mark = describe_stream(name)["seq"]
    wait_until(lambda: describe_stream(name)["seq"] >= mark + 5, 20, "a few more frames")
    after = metrics(url)
    encodes = value(after, "framebroker_preview_jpeg_encodes_total", stream=name)
    sent = value(after, "framebroker_preview_frames_sent_total", stream=name)
    assert sent >= 90
    # Each viewer got 30 different pictures: encoding per viewer would take at least 90 encodes.
    assert encodes < 60, f"{encodes} encodes for {sent} pictures sent"

    # Nobody watches again: encoding stops.
    mark = describe_stream(name)["seq"]
    wait_until(lambda: describe_stream(name)["seq"] >= mark + 30, 20, "another second of frames")
    assert value(metrics(url), "framebroker_preview_jpeg_encodes_total", stream=name) == encodes
    # ... and it detaches: gone from status, not left there as a reader with pid 0 (the last
    # frame it encoded still views shared memory, which must not keep its entry alive).
    wait_until(lambda: "view" not in [r["name"] for r in describe_stream(name)["readers"]], 10, "the idle preview to leave status")
    assert view.stop() == 0, view.output()
    assert "Traceback" not in view.output()


def test_preview_waits_for_a_missing_stream_and_follows_a_restart(env):
    name = env.name("late")
    view, url = start_view(env, name)
    status, _, page = get(url)
    assert status == 200
    assert f"no stream {name!r}: nothing serves it" in page.replace("&#x27;", "'")
    families = metrics(url)
    assert value(families, "framebroker_stream_up", stream=name) == 0
    assert value(families, "framebroker_stream_state", stream=name, state="absent") == 1

    viewer = MjpegViewer(url)
    first, _ = env.serve("test://", name, "--fps", "20")
    wait_until(lambda: len(viewer.numbers) >= 5, 20, "pictures once the stream is served")
    assert first.stop() == 0
    mark = len(viewer.numbers)
    env.serve("test://", name, "--fps", "20")
    # Same connection: the preview re-attached to the new daemon by itself.
    wait_until(lambda: len(viewer.numbers) >= mark + 5, 20, "pictures from the restarted daemon")
    viewer.finish()


def test_view_refuses_a_busy_port_and_bad_arguments(env):
    name = env.name()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = env.run_cli("view", name, "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in result.stderr and "--port" in result.stderr
    for args, message in ((["bad/name"], "invalid stream name"), ([name, "--port", "70000"], "--port must be between")):
        result = env.run_cli("view", *args)
        assert result.returncode == 2 and message in result.stderr
