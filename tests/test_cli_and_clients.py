"""The framebroker command, the example consumers and the demo, run as a user would run them."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from framebroker._status import describe_stream

from conftest import shm_objects, wait_until

REPOSITORY = Path(__file__).resolve().parent.parent
RAW_NUMBER = re.compile(r"\d{10,}")  # a capture time in ns (or any number that long): not for people


def test_three_consumers_on_one_stream_at_once(env):
    daemon, name = env.serve("test://", None, "--fps", "30")
    faces = env.cli("faces", name, "--frames", "40")
    motion = env.cli("motion", name, "--frames", "60")
    reader = env.cli("read", name, "--verify", "--frames", "90", "--every")
    wait_until(lambda: len(describe_stream(name)["readers"]) == 3, 20, "three readers attached at once")
    for proc in (faces, motion, reader):
        assert proc.wait(timeout=60) == 0, proc.output()
    summary = r"faces: analysed \d+ frames/s, no face \(the test pattern has none\); result \d+ ms after capture"
    assert any(re.fullmatch(summary, line) for line in faces.stdout), faces.output()
    moving = r"motion: frame \d+: \d+ moving regions?, largest \d+x\d+ at \(\d+, \d+\); result \d+ ms after capture"
    assert any(re.fullmatch(moving, line) for line in motion.stdout), motion.output()
    frame_lines = [line for line in reader.stdout if re.fullmatch(r"read: frame \d+: 640x480 bgr, [\d.]+ ms old", line)]
    assert len(frame_lines) == 90
    assert "0 bad" in reader.stdout[-1]
    for proc in (faces, motion, reader):
        assert not any(RAW_NUMBER.search(line) for line in proc.stdout), proc.output()


def test_faces_and_motion_publish_what_they_find_as_models(env):
    import framebroker as fb
    from framebroker import testpattern

    daemon, name = env.serve("test://", None, "--fps", "30")
    faces = env.cli("faces", name, "--model", "faces-a")
    motion = env.cli("motion", name)

    def published() -> "dict | None":
        models = {m["name"]: m for m in describe_stream(name)["models"]}
        ready = set(models) == {"faces-a", "motion"} and all(m["results"] > 5 for m in models.values())
        return models if ready else None

    models = wait_until(published, 30, "both models in status, publishing")
    assert models["motion"]["pid"] == motion.pid and models["faces-a"]["pid"] == faces.pid
    with fb.ResultReader(name, "motion") as results:
        # The test pattern's square moves 8 px a frame: motion finds it (and the changing band).
        found = [r for r in (results.latest(timeout=5.0) for _ in range(20)) if r.objects]
        assert found, "motion found nothing on test://"
        result = found[-1]
        x, y, side = testpattern._box(480, 640, result.seq)  # noqa: SLF001 - where the square is
        boxes = [o["box"] for o in result.objects]
        assert all(o["label"] == "motion" and 0 < o["score"] <= 1 for o in result.objects)
        assert any(bx <= x + side and x <= bx + bw and by <= y + side and y <= by + bh for bx, by, bw, bh in boxes), (boxes, (x, y, side))
    with fb.ResultReader(name, "faces-a") as results:
        assert results.latest(timeout=5.0).data == {"objects": []}, "no face in the test pattern, and said so"
    for proc in (faces, motion):
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.output()
    assert describe_stream(name)["models"] == [], "a stopped model takes its results ring with it"


def first_result_event(url: str, model: str) -> dict:
    """The first ``result`` event of ``model`` with objects, from the preview's /results."""
    import urllib.request

    with urllib.request.urlopen(url + "results", timeout=20) as events:
        assert events.headers["Content-Type"].startswith("text/event-stream")
        kind = ""
        for raw in events:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: ") and kind == "result":
                event = json.loads(line[len("data: ") :])
                if event["model"] == model and event["objects"]:
                    return event
    raise AssertionError(f"no result of {model} with objects")


def test_demo_runs_until_ctrl_c_and_ends_cleanly(env):
    import urllib.request

    name = env.name("demo")
    demo = env.cli("demo", "--name", name, "--port", "0")
    line = demo.wait_line(lambda text: text.startswith("demo: open http://"), 30)
    url = re.search(r"http://\S+/", line).group(0)
    # The preview shows the models' boxes: its page gets their results, with boxes to draw.
    event = first_result_event(url, "motion")
    assert all(len(o["box"]) == 4 and o["label"] == "motion" for o in event["objects"]), event

    def models() -> set:
        with urllib.request.urlopen(url + "status.json", timeout=10) as reply:
            return {m["name"] for m in json.loads(reply.read())["streams"][0]["models"]}

    wait_until(lambda: models() == {"faces", "motion"}, 20, "both models in the preview's status")
    # It runs until every consumer has shown output and a status summary has listed each of them.
    for pattern in (
        r"^\[faces\]  analysed \d+ frames/s, no face \(the test pattern has none\)",
        r"^\[motion\] frame \d+: \d+ moving region",
        r"^\[read\]   [\d.]+ frames/s, frame age \d+ ms, lag \d+, .*, 0 bad$",
        r"^  model faces: writer pid \d+ +[\d.]+ results/s",
        r"^  model motion: writer pid \d+ +[\d.]+ results/s",
    ):
        demo.wait_line(lambda line: re.search(pattern, line) is not None, timeout=60)
    for label in ("faces", "motion", "reader"):
        demo.wait_line(lambda line: re.match(rf"^\s+\d+\s+{label}\s", line) is not None, timeout=60)
    assert any(f"stream {name}: streaming" in line for line in demo.stdout), demo.output()
    demo.signal(signal.SIGINT)  # Ctrl-C
    assert demo.wait(timeout=60) == 0, demo.output()
    assert "/dev/shm is clean" in demo.stdout[-1], demo.output()
    # Read at a glance: nothing wraps on a 100-column terminal, no raw nanosecond timestamps.
    too_long = [line for line in demo.stdout if len(line) > 100]
    assert not too_long, "\n".join(too_long)
    assert not any(RAW_NUMBER.search(line) for line in demo.stdout), demo.output()
    assert shm_objects(name) == []


def test_demo_duration_ends_it_by_itself(env):
    name = env.name("demo")
    result = env.run_cli("demo", "--name", name, "--duration", "1", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/dev/shm is clean" in result.stdout
    assert shm_objects(name) == []


def test_read_reports_no_skipped_frame_on_start(env):
    daemon, name = env.serve("test://", None, "--fps", "30")
    for _ in range(3):
        reader = env.cli("read", name, "--frames", "20")
        assert reader.wait(timeout=30) == 0, reader.output()
        assert reader.stdout[-1] == "read: done after 20 frames, none skipped, 0 bad", reader.output()


def test_status_of_a_missing_stream_exits_1(env):
    name = env.name()
    result = env.run_cli("status", name)
    assert result.returncode == 1
    assert "nothing serves it" in result.stdout


def test_status_json_and_table(env):
    daemon, name = env.serve("test://", None, "--fps", "20")
    reader = env.cli("read", name, "--reader-name", "watcher")

    def measured() -> Optional[dict]:
        """The --json stream once it lists the reader and shows the rate measured at about 20 fps
        (the daemon measures about once a second; the first window may include its start)."""
        result = env.run_cli("status", name, "--json")
        assert result.returncode == 0, result.stderr
        stream = json.loads(result.stdout)["streams"][0]
        return stream if stream["readers"] and 15 <= stream["measured_fps"] <= 25 else None

    stream = wait_until(measured, 20, "the reader and a measured rate of 15-25 fps in status --json")
    assert stream["state"] == "streaming" and stream["pid"] == daemon.pid and stream["source"] == "test://"
    assert (stream["width"], stream["height"], stream["format"]) == (640, 480, "bgr")
    (entry,) = stream["readers"]
    assert entry["name"] == "watcher" and entry["pid"] == reader.pid and entry["mode"] == "next"
    table = env.run_cli("status", name).stdout
    assert f"stream {name}: streaming" in table and "watcher" in table and str(reader.pid) in table


def test_help_lists_every_command(env):
    result = env.run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "status", "demo", "faces", "motion", "read"):
        assert command in result.stdout


@pytest.mark.parametrize("command", [["read"], ["faces"], ["motion"]])
def test_clients_stop_cleanly_on_sigterm_while_waiting(env, command):
    daemon, name = env.serve("test://", None, "--fps", "0.5")
    client = env.cli(*command, name)
    # Its first frame counted: it is waiting for the next one, two seconds away.
    wait_until(lambda: any(r["frames"] >= 1 for r in describe_stream(name)["readers"]), 20, "the client's first frame")
    client.signal(signal.SIGTERM)
    assert client.wait(timeout=5) == 0, client.output()
    wait_until(lambda: not describe_stream(name)["readers"], 2, "the client to leave the table")


def test_clean_removes_only_what_dead_daemons_left(env):
    dead, dead_name = env.serve()
    live, live_name = env.serve()
    dead.signal(signal.SIGKILL)
    dead.wait()
    assert shm_objects(dead_name), "a killed daemon leaves its segment (until reclaimed)"
    foreign = env.name("foreign")
    path = f"/dev/shm/framebroker.{foreign}"
    with open(path, "wb") as handle:
        handle.write(b"someone else's data")
    try:
        # One name at a time (a bare `framebroker clean` sweeps every stream on the machine,
        # including other test runs' deliberately stale ones). --dry-run first: it removes nothing.
        left = shm_objects(dead_name)
        semaphores = len([obj for obj in left if obj.startswith("sem.")])
        result = env.run_cli("clean", dead_name, "--dry-run")
        assert result.stdout == (
            f"{dead_name}: would remove /dev/shm/framebroker.{dead_name} and {semaphores} semaphore(s) "
            f"/dev/shm/sem.framebroker.{dead_name}@* (its daemon, pid {dead.pid}, is gone)\n"
        ), result.stdout
        assert result.returncode == 0 and semaphores > 0
        result = env.run_cli("clean", live_name, "--dry-run")
        assert result.stdout == f"{live_name}: live (daemon pid {live.pid}), would be left alone\n"
        result = env.run_cli("clean", foreign, "--dry-run")
        assert result.stdout.startswith(f"{foreign}: would be left alone: ") and "not a framebroker ring" in result.stdout
        assert result.returncode == 1
        assert shm_objects(dead_name) == left

        result = env.run_cli("clean", dead_name)
        assert result.stdout == f"{dead_name}: removed (its daemon, pid {dead.pid}, is gone)\n" and result.returncode == 0
        result = env.run_cli("clean", live_name)
        assert result.stdout == f"{live_name}: live (daemon pid {live.pid}), left alone\n" and result.returncode == 0
        result = env.run_cli("clean", foreign)
        assert result.stdout.startswith(f"{foreign}: left alone: ") and "not a framebroker ring" in result.stdout
        assert result.returncode == 1
        assert shm_objects(dead_name) == []
        assert describe_stream(live_name)["alive"]
        assert open(path, "rb").read() == b"someone else's data"
    finally:
        os.unlink(path)


# --- the command line: --log-level before or after the command, unknown names -----------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_is_accepted_before_and_after_the_command(env, where):
    name = env.name()
    level = ["--log-level", "error"]
    snapshot = ["snapshot", name, "-o", "never.jpg"]  # a client command: its parser is loaded late
    result = env.run_cli(*level, *snapshot) if where == "before" else env.run_cli(*snapshot, *level)
    assert result.returncode == 1 and "nothing serves it" in result.stderr, result.stderr
    result = env.run_cli("status", name, "--log-level", "debug")
    assert result.returncode == 1 and "nothing serves it" in result.stdout, result.stdout + result.stderr


def test_an_unknown_stream_name_gets_the_served_ones_and_the_closest(env):
    daemon, name = env.serve("test://", None, "--fps", "5")
    typo = name[:-1] + "x"
    for args, stream in ((["status", typo], "stdout"), (["snapshot", typo, "-o", "never.jpg"], "stderr")):
        result = env.run_cli(*args)
        text = getattr(result, stream)
        assert result.returncode == 1, text
        # Other streams may be served on this machine meanwhile: the closest is still ours.
        assert re.search(rf"Served now: .+\. Did you mean '{re.escape(name)}'\?", text), text


# --- waiting: the daemon for its camera, a client for its stream --------------------------------


def test_a_missing_camera_is_announced_once_and_retried_quietly(env):
    quiet, quiet_name = env.serve("/dev/video61", wait=False)
    # --log-level after the command name works like before it; debug shows every attempt.
    chatty, chatty_name = env.serve("/dev/video61", None, "--log-level", "debug", wait=False)
    for name in (quiet_name, chatty_name):
        wait_until(lambda: "attempt 4," in describe_stream(name).get("reason", ""), 30, f"4 attempts of {name}")
    for daemon in (quiet, chatty):
        warnings = [line for line in daemon.stderr if " WARNING: " in line]
        assert len(warnings) == 1, daemon.output()
        assert warnings[0].endswith(
            "WARNING: waiting for /dev/video61: no such device /dev/video61: is the camera plugged in? (ls /dev/video*); "
            "retrying every 0.5 s, backing off to every 10 s (further attempts are logged at debug level)"
        ), daemon.output()
    assert not any(" DEBUG: " in line for line in quiet.stderr), quiet.output()
    attempts = [line for line in chatty.stderr if " DEBUG: source unavailable: no such device /dev/video61" in line]
    assert len(attempts) >= 4, chatty.output()


@pytest.mark.parametrize(
    "command",
    [
        ["read", "--frames", "5"],
        ["faces", "--frames", "5"],
        ["motion", "--frames", "5"],
        ["snapshot", "-o", "{tmp}/now.jpg"],
        ["record", "-o", "{tmp}/rec.ts", "--duration", "1"],
    ],
    ids=lambda command: command[0],
)
def test_a_client_says_once_that_it_waits_for_the_stream(env, tmp_path, command):
    name = env.name()
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    client = env.cli(args[0], name, *args[1:], "--wait", "60")
    announced = f"{args[0]}: waiting up to 60 s for stream {name!r} to appear (no stream {name!r}: nothing serves it"
    client.wait_line(lambda line: line.startswith(announced), timeout=20)
    env.serve("test://", name, "--fps", "15")
    assert client.wait(timeout=60) == 0, client.output()
    assert sum("waiting up to" in line for line in client.stderr) == 1, client.output()


def test_a_client_gives_up_after_wait_seconds(env):
    name = env.name()
    started = time.monotonic()
    result = env.run_cli("read", name, "--wait", "0.5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started >= 0.5
    assert f"read: waiting up to 0.5 s for stream {name!r} to appear" in result.stderr
    assert f"framebroker read: error: waited 0.5 s in vain: no stream {name!r}: nothing serves it" in result.stderr
    result = env.run_cli("snapshot", name, "-o", "never.jpg")  # snapshot's default: no waiting
    assert result.returncode == 1 and "waiting" not in result.stderr, result.stderr


# --- packaging: clients use the public API, load on demand, and install cleanly -------------------

PUBLIC_MODULES = {"framebroker", "framebroker.arguments", "framebroker.gstreamer", "framebroker.sources", "framebroker.testpattern", "framebroker.zenoh_link"}


def test_clients_import_only_the_public_api():
    import framebroker

    public_names = set(framebroker.__all__) | {"arguments", "testpattern"}
    for path in sorted((REPOSITORY / "clients").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
                if node.module == "framebroker":
                    private = {alias.name for alias in node.names} - public_names
                    assert not private, f"{path.relative_to(REPOSITORY)} imports {private} from framebroker"
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "framebroker":
                    assert module in PUBLIC_MODULES, f"{path.relative_to(REPOSITORY)} imports {module}"
    # In code, or in code handed to `python -c` as a string.
    edits_sys_path = re.compile(r"sys\.path(\.(pop|insert|append|extend|remove)\(|\s*\+?=[^=]|\[)")
    for folder in ("framebroker", "clients"):
        for path in (REPOSITORY / folder).rglob("*.py"):
            assert not edits_sys_path.search(path.read_text()), f"{path.relative_to(REPOSITORY)} edits sys.path"


def test_help_imports_no_client_and_a_command_help_shows_its_options(env):
    probe = (
        "import sys\n"
        "from framebroker.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('clients loaded:', sorted(m for m in sys.modules if 'clients' in m))\n"
    )
    listing = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True, timeout=60)
    assert "clients loaded: []" in listing.stdout, listing.stdout + listing.stderr
    for command in ("serve", "status", "check", "trigger", "clean", "demo", "faces", "motion", "read", "record", "view", "snapshot"):
        assert re.search(rf"^    {command} +\S", listing.stdout, re.M), f"{command} and its help line\n{listing.stdout}"
    record = subprocess.run([sys.executable, "-c", probe, "record", "--help"], capture_output=True, text=True, timeout=60)
    assert "--segment S" in record.stdout and "--wait S" in record.stdout and "--log-level" in record.stdout, record.stdout
    assert "'framebroker_clients.recorder'" in record.stdout and "'framebroker_clients.preview'" not in record.stdout


@pytest.mark.parametrize("how", ["wheel", "editable"])
def test_a_fresh_install_runs_every_command(env, tmp_path, how):
    """`pip install .` and `pip install -e .` into a new venv: the clients are found from any
    directory, the checkout's own folder included, and the demo's children start."""
    # A copy of what the build reads, so its build/ and egg-info stay out of the repository.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for entry in REPOSITORY.iterdir():
        if entry.is_file():
            shutil.copy2(entry, checkout)
    for package in ("framebroker", "clients"):
        shutil.copytree(REPOSITORY / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # The dependencies (numpy, OpenCV, PyAV, posix_ipc) come from this environment; framebroker
    # itself only from the new install.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    ours = [path for path in sys.path if path.endswith(("site-packages", "dist-packages"))]
    Path(site, "dependencies.pth").write_text("\n".join(ours) + "\n")
    target = ["-e", str(checkout)] if how == "editable" else [str(checkout)]
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", *target],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    framebroker = str(venv / "bin" / "framebroker")
    for cwd in (str(tmp_path), str(checkout)):
        for argv in ([framebroker, "record", "--help"], [python, "-m", "framebroker", "record", "--help"]):
            result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and "--segment S" in result.stdout, f"{argv} in {cwd}\n{result.stderr}"
    name = env.name("demo")
    demo = subprocess.run(
        [framebroker, "demo", "--name", name, "--duration", "4"], cwd=str(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert f"stream {name}: streaming" in demo.stdout
    for label in ("[faces]", "[motion]", "[read]"):
        assert re.search(rf"^{re.escape(label)} ", demo.stdout, re.M), demo.stdout
    assert "/dev/shm is clean" in demo.stdout


def test_without_the_clients_package_the_command_says_so():
    # What a bare source checkout gives: framebroker importable, framebroker_clients not.
    hide_clients = (
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'framebroker_clients':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "from framebroker.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-c", hide_clients]
    listing = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "record" in listing.stdout, listing.stderr
    result = subprocess.run([*command, "read", "cam0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "the client commands come from the framebroker_clients package" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
