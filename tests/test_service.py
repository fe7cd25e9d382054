"""framebroker up / service: one config file, supervised children, systemd.

Everything runs for real: ``framebroker up`` starts real daemons, a recorder and a preview; the
tests kill them with SIGKILL, reload the file with SIGHUP, listen as systemd would on a datagram
socket, and hand the printed unit to ``systemd-analyze verify``.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from framebroker import cli
from framebroker._config import LATER, SECTION_COMMANDS, _command_parsers
from framebroker._toml_lines import KeyLines
from framebroker._status import describe_stream
from framebroker._supervision import describe_supervisors, state_path

from conftest import ffmpeg_decode, shm_objects, wait_until
from test_sources import clip, free_port, require  # noqa: F401 (clip: the looped file fixture)


def children_of(up_pid: int) -> Dict[str, Dict[str, Any]]:
    """The children of the supervisor with this pid, by name, from its status file."""
    for supervisor in describe_supervisors():
        if supervisor.get("pid") == up_pid:
            return {child["name"]: child for child in supervisor["children"]}
    return {}


def wait_children(up, predicate: Callable[[Dict[str, Dict[str, Any]]], bool], what: str, timeout: float = 40.0) -> Dict[str, Dict[str, Any]]:
    def check() -> Any:
        if up.popen.poll() is not None:
            raise AssertionError(f"framebroker up exited with {up.popen.returncode}\n{up.output()}")
        children = children_of(up.pid)
        return children if children and predicate(children) else None

    try:
        return wait_until(check, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nchildren: {json.dumps(children_of(up.pid), indent=1)}\n{up.output()}") from None


def all_running(count: int) -> Callable[[Dict[str, Dict[str, Any]]], bool]:
    return lambda children: len(children) == count and all(child["state"] == "running" for child in children.values())


def frames_after(follower, wall: float) -> bool:
    return any(event.get("event") == "frame" and event["wall"] > wall for event in follower.events)


def test_up_runs_everything_restarts_each_killed_child_and_stops_clean(env, clip, tmp_path):
    camera, looped = env.name("cam"), env.name("file")
    port = free_port()
    (tmp_path / "rec").mkdir()
    config = tmp_path / "cams.toml"
    config.write_text(
        f"""# two streams, a recorder and a preview
[streams.{camera}]
source = "test://"
width = 320
height = 240
fps = 20

[streams.{camera}.record]
segment = 2
dir = "rec"            # relative to this file's folder
reader_name = "archive"

[streams.{looped}]
source = "{clip}?loop=1"

[streams.{looped}.view]
port = {port}
"""
    )
    up = env.cli("up", str(config))
    children = wait_children(up, all_running(4), "every child to run")
    assert set(children) == {f"{camera}/serve", f"{camera}/record", f"{looped}/serve", f"{looped}/view"}
    env.wait_streaming(camera)
    env.wait_streaming(looped)
    followers = {camera: env.worker("follow", camera, "--seconds", "120"), looped: env.worker("follow", looped, "--seconds", "120")}
    for follower in followers.values():
        follower.wait_event("frame")

    def preview_status() -> Any:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=2) as reply:
                return json.loads(reply.read())
        except OSError:
            return None

    for name in (f"{camera}/serve", f"{camera}/record", f"{looped}/serve", f"{looped}/view"):
        before = children_of(up.pid)[name]
        killed_at = time.time()
        os.kill(before["pid"], signal.SIGKILL)
        after = wait_children(
            up,
            lambda c: c[name]["state"] == "running" and c[name]["pid"] != before["pid"],
            f"{name} to be restarted",
        )[name]
        assert after["restarts"] == before["restarts"] + 1
        assert after["last_exit"] == "killed by SIGKILL"
        stream = name.split("/")[0]
        if name.endswith("/serve"):
            # The readers re-attach by themselves to the restarted daemon: frames captured after the kill.
            wait_until(lambda: frames_after(followers[stream], killed_at), 20, f"frames from the restarted daemon of {stream}")
            assert describe_stream(stream)["pid"] == after["pid"]
        elif name.endswith("/record"):
            wait_until(
                lambda: any(r["name"] == "archive" and r["pid"] == after["pid"] for r in describe_stream(camera)["readers"]),
                20,
                "the restarted recorder to read the stream",
            )
        else:
            document = wait_until(preview_status, 20, "the restarted preview to answer")
            # Item 4: the preview's status.json reports the supervisor's children of its stream.
            (supervisor,) = document["supervisors"]
            assert supervisor["pid"] == up.pid
            shown = {child["name"]: child for child in supervisor["children"]}
            assert set(shown) == {f"{looped}/serve", f"{looped}/view"}
            assert shown[f"{looped}/serve"]["restarts"] == 1 and shown[f"{looped}/view"]["restarts"] == 1
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.html", timeout=5) as reply:
                page = reply.read().decode()
            assert f"supervised by framebroker up (pid {up.pid})" in page and f"<td>{looped}/view</td>" in page
            # A second framebroker up for the same file is refused: its daemons could never serve.
            second = env.run_cli("up", str(config))
            assert second.returncode == 1 and f"framebroker up pid {up.pid} already runs" in second.stderr
    for follower in followers.values():
        assert follower.popen.poll() is None, follower.output()  # never restarted: they re-attached

    table = env.run_cli("status", camera)
    assert table.returncode == 0, table.stderr
    assert f"supervisor pid {up.pid}: running" in table.stdout
    row = next(line for line in table.stdout.splitlines() if line.strip().startswith(f"{camera}/record"))
    assert "running" in row and "killed by SIGKILL" in row and row.split()[3] == "1", table.stdout
    check = env.run_cli("check", camera, "--seconds", "1")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"supervised by framebroker up pid {up.pid}" in check.stdout
    assert f"{camera}/record running" in check.stdout

    pids = [child["pid"] for child in children_of(up.pid).values()]
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=40) == 0, up.output()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"child {pid} outlived framebroker up"
    assert shm_objects(camera) == [] and shm_objects(looped) == []
    assert not os.path.exists(state_path(up.pid))
    stderr = "\n".join(up.stderr)
    assert stderr.index("stopping: 2 reader(s), then 2 daemon(s)") < stderr.index("stopped")
    # The log: each child's lines, prefixed with its name; the readers stopped before the daemons.
    out = up.stdout
    assert any(line.startswith(f"[{camera}/serve] ") and "first frame published" in line for line in out)
    last_reader = max(i for i, line in enumerate(out) if line.startswith((f"[{camera}/record]", f"[{looped}/view]")))
    first_daemon_stop = min(i for i, line in enumerate(out) if "framebroker.serve INFO: stopped" in line)
    assert last_reader < first_daemon_stop, "\n".join(out)
    segments = sorted((tmp_path / "rec").glob(f"{camera}-*.ts"))
    assert len(segments) >= 2
    decoded = ffmpeg_decode(segments[-1])
    assert decoded.returncode == 0, decoded.stderr


def test_sighup_restarts_only_the_changed_stream(env, tmp_path):
    first, second = env.name("a"), env.name("b")
    port = free_port()
    config = tmp_path / "two.toml"

    def write(first_fps: int) -> None:
        config.write_text(
            f"""[streams.{first}]
source = "test://"
width = 160
height = 120
fps = {first_fps}

[streams.{first}.view]
port = {port}

[streams.{second}]
source = "test://"
width = 160
height = 120
fps = 10
"""
        )

    write(10)
    up = env.cli("up", str(config))
    before = wait_children(up, all_running(3), "every child to run")
    env.wait_streaming(first)

    write(15)  # one stream's rate changes (and the lines move: that alone changes nothing)
    config.write_text("# a comment that moves every line\n" + config.read_text())
    up.signal(signal.SIGHUP)
    after = wait_children(
        up,
        lambda c: c[f"{first}/serve"]["state"] == "running" and c[f"{first}/serve"]["pid"] != before[f"{first}/serve"]["pid"],
        "the changed stream's daemon to restart",
    )
    for name in (f"{first}/view", f"{second}/serve"):
        assert after[name]["pid"] == before[name]["pid"] and after[name]["restarts"] == 0, f"{name} was restarted"
    wait_until(lambda: describe_stream(first).get("configured_fps") == 15, 20, "the new fps")
    up.wait_line(lambda line: f"reloaded: restarting {first}/serve; adding nothing; removed nothing" in line)

    # A file with a problem is refused: everything keeps running as it was.
    config.write_text(config.read_text().replace("fps = 10", "fps = -1"))
    up.signal(signal.SIGHUP)
    up.wait_line(lambda line: "the file has problems; the running children stay as they are" in line)
    up.wait_line(lambda line: "fps = -1: --fps must be > 0" in line)
    unchanged = children_of(up.pid)
    assert {name: child["pid"] for name, child in unchanged.items()} == {name: child["pid"] for name, child in after.items()}
    up.signal(signal.SIGTERM)
    assert up.wait(timeout=40) == 0, up.output()


def test_a_killed_supervisor_takes_its_children_along(env, tmp_path, request):
    """kill -9 of up itself: its children get SIGTERM from the kernel (no orphan keeps a camera),
    clean up, and the status file it could not remove shows it gone until the next up removes it."""
    name = env.name("cam")
    config = tmp_path / "one.toml"
    config.write_text(f'[streams.{name}]\nsource = "test://"\nwidth = 160\nheight = 120\n\n[streams.{name}.view]\nport = 0\n')
    up = env.cli("up", str(config))
    children = wait_children(up, all_running(2), "every child to run")
    env.wait_streaming(name)
    request.addfinalizer(lambda: Path(state_path(up.pid)).unlink() if os.path.exists(state_path(up.pid)) else None)
    os.kill(up.pid, signal.SIGKILL)
    up.wait(timeout=10)
    for child in children.values():
        wait_until(lambda: not Path(f"/proc/{child['pid']}").exists(), 20, f"{child['name']} to end with its supervisor")
    assert shm_objects(name) == []
    (gone,) = [s for s in describe_supervisors() if s["pid"] == up.pid]
    assert gone["alive"] is False
    table = env.run_cli("status")
    assert f"supervisor pid {up.pid} ({config}): gone without cleaning up" in table.stdout
    again = env.cli("up", str(config))
    wait_children(again, all_running(2), "the new supervisor's children to run")
    assert not os.path.exists(state_path(up.pid))
    again.signal(signal.SIGTERM)
    assert again.wait(timeout=40) == 0, again.output()


# --- up --check ---------------------------------------------------------------------------------------

GOOD_STREAM = '[streams.cam]\nsource = "test://"\n'


def _serve_has(flag: str) -> bool:
    return any(flag in action.option_strings for action in _command_parsers()["serve"]._actions)


BROKEN = [
    # (file text, line, what the message must name, what it must say to do)
    (GOOD_STREAM + "fsp = 30\n", 3, "streams.cam.fsp", "did you mean fps?"),
    (GOOD_STREAM + "fps = -5\n", 3, "streams.cam.fps = -5", "--fps must be > 0 and <= 1000"),
    (GOOD_STREAM + 'format = "yuv"\n', 3, 'streams.cam.format = "yuv"', "choose from 'bgr', 'rgb', 'gray'"),
    (GOOD_STREAM + 'width = "wide"\nheight = 480\n', 3, "streams.cam.width", "--width must be a whole number"),
    (GOOD_STREAM + "fps = [10, 20]\n", 3, "streams.cam.fps", "takes one value"),
    (GOOD_STREAM + "slots = true\n", 3, "streams.cam.slots = true", "--slots takes a value"),
    (GOOD_STREAM + 'group = "no-such-group-fb"\n', 3, "streams.cam.group", "unknown group"),
    ('[streams.cam]\nsource = "missing.mp4"\n', 2, "streams.cam.source", "file not found"),
    ('[streams.cam]\nsource = "tset://"\n', 2, "streams.cam.source", "test://"),
    ("[streams.cam]\nfps = 30\n", 1, "[streams.cam]", 'add source = ...'),
    ('[streams."cam 0"]\nsource = "test://"\n', 1, '[streams."cam 0"]', "invalid stream name"),
    (GOOD_STREAM + 'name = "other"\n', 3, "streams.cam.name", "remove name"),
    (GOOD_STREAM + "clock = true\n", 3, "streams.cam.clock", "put it under [streams.cam.record]"),
    (GOOD_STREAM + '\n[streams.cam.record]\nsegment = 5\ndir = "nowhere"\n', 6, 'streams.cam.record.dir = "nowhere"', "create it first"),
    (GOOD_STREAM + '\n[streams.cam.record]\nkeep = 3\n', 5, "streams.cam.record.keep = 3", "--keep go with --segment"),
    (GOOD_STREAM + "\n[streams.cam.record]\nclock = 1\n", 5, "streams.cam.record.clock = 1", "write clock = true"),
    (GOOD_STREAM + "\n[streams.cam.view]\nport = 70000\n", 5, "streams.cam.view.port = 70000", "--port must be between 0 and 65535"),
    (GOOD_STREAM + "\n[[streams.cam.view]]\nport = 8081\n[[streams.cam.view]]\nprot = 8082\n", 7, "streams.cam.view[1].prot", "did you mean port?"),
    (GOOD_STREAM + "\n[streams.cam.recrod]\nsegment = 5\n", 4, "[streams.cam.recrod]", "did you mean record?"),
    (GOOD_STREAM + "\n[streams.cam.serve]\nfps = 5\n", 4, "[streams.cam.serve]", "move these keys there"),
    ('[stream.cam]\nsource = "test://"\n', 1, "stream", "did you mean streams?"),
    (GOOD_STREAM + 'fps = \n', 3, "", "not valid TOML"),
    ('title = "cams"\n', 1, "title", "[streams.NAME] tables only"),
    ("", 0, "", "no streams, nothing to run"),
]


@pytest.mark.parametrize("text, line, key, advice", BROKEN, ids=[f"{case[2] or case[3]}" for case in BROKEN])
def test_check_names_key_line_and_what_to_do(tmp_path, capsys, text, line, key, advice):
    config = tmp_path / "broken.toml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exited:
        cli.main(["up", "--check", str(config)])
    assert exited.value.code == 2
    message = capsys.readouterr().err
    location = f"broken.toml:{line}: " if line else "broken.toml: "
    assert location + (f"{key}" if key else "") in message, message
    assert advice in message, message


def test_check_says_a_section_or_key_is_for_a_later_version(tmp_path, capsys, monkeypatch):
    """The product documents commands (bridge) and serve options (derive) that other versions add;
    --check says so rather than "unknown". Tested through a made-up command and option too, so the
    test outlives the day bridge and derive exist."""
    monkeypatch.setattr("framebroker._config.SECTION_COMMANDS", SECTION_COMMANDS + ("teleport",))
    monkeypatch.setitem(LATER, "teleport", "frames by teleportation")
    monkeypatch.setitem(LATER, "hyperspeed", "faster than light")
    config = tmp_path / "later.toml"
    config.write_text(GOOD_STREAM + "hyperspeed = true\n\n[streams.cam.teleport]\ntarget = \"mars\"\n")
    with pytest.raises(SystemExit):
        cli.main(["up", "--check", str(config)])
    message = capsys.readouterr().err
    assert "later.toml:3: streams.cam.hyperspeed: framebroker" in message and "lacks serve --hyperspeed, which a later version adds" in message
    assert "later.toml:5: [streams.cam.teleport]: framebroker" in message and "lacks the teleport command" in message
    if "bridge" not in cli.CLIENT_COMMANDS:
        config.write_text(GOOD_STREAM + '\n[streams.cam.bridge]\nconnect = "tcp/127.0.0.1:7447"\n')
        with pytest.raises(SystemExit):
            cli.main(["up", "--check", str(config)])
        assert "later.toml:4: [streams.cam.bridge]: framebroker" in capsys.readouterr().err
    if not _serve_has("--derive"):
        config.write_text(GOOD_STREAM + 'derive = ["lores=640x360:rgb"]\n')
        with pytest.raises(SystemExit):
            cli.main(["up", "--check", str(config)])
        assert "lacks serve --derive, which a later version adds (derived streams)" in capsys.readouterr().err


def test_check_accepts_the_examples_and_prints_the_commands(env, tmp_path):
    """docs/'s examples are valid (their devices may be absent: cameras are waited for, not
    checked), and a good file gives exit 0 with each child's command line."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    examples = sorted(docs.glob("*.toml"))
    assert len(examples) >= 2
    for example in examples:
        text = example.read_text()
        # Their recording folders are the machine's (/var/lib/...); here, folders that exist.
        for directory in {line.split('"')[1] for line in text.splitlines() if line.startswith(("dir = ", "clips = "))}:
            text = text.replace(f'"{directory}"', f'"{tmp_path}"')
        copy = tmp_path / example.name
        copy.write_text(text)
        result = env.run_cli("up", "--check", str(copy))
        assert result.returncode == 0, f"{example.name}: {result.stdout}{result.stderr}"
        assert "OK:" in result.stdout and "framebroker serve" in result.stdout
    result = env.run_cli("up", "--check", str(tmp_path / "nothing-here.toml"))
    assert result.returncode == 2 and "no such file" in result.stderr


def test_line_numbers_survive_multiline_values_and_inline_tables():
    text = '''# comment [streams.fake]
[streams.cam]
source = """
fps = 1
"""
derive = [
  "a=1x1",  # [streams.cam.view]
]
'quoted key' = 1
record = { segment = 5 }

[[streams.cam.view]]
port = 1
[[streams.cam.view]]
port = 2
'''
    lines = KeyLines(text)
    assert lines.line_of(("streams", "cam")) == 2
    assert lines.line_of(("streams", "cam", "source")) == 3
    assert lines.line_of(("streams", "cam", "fps")) == 2  # inside a string: not a key
    assert lines.line_of(("streams", "cam", "derive")) == 6
    assert lines.line_of(("streams", "cam", "quoted key")) == 9
    assert lines.line_of(("streams", "cam", "record", "segment")) == 10  # inside an inline table: its key's line
    assert lines.line_of(("streams", "cam", "view", 0, "port")) == 13
    assert lines.line_of(("streams", "cam", "view", 1, "port")) == 15


# --- systemd ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_watchdog_and_status_with_an_unplugged_camera(env, tmp_path, abstract):
    """READY=1 comes once the test stream publishes, although the other camera is not plugged in
    (its daemon retries; boot must not wait for it), then WATCHDOG=1 keeps coming while it retries."""
    present, unplugged = env.name("cam"), env.name("usb")
    config = tmp_path / "notify.toml"
    config.write_text(
        f'[streams.{present}]\nsource = "test://"\nwidth = 160\nheight = 120\nfps = 10\n\n'
        f'[streams.{unplugged}]\nsource = "/dev/video{90 + os.getpid() % 9}"\n'
    )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"framebroker-test-{uuid.uuid4().hex}"
        listener.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        listener.bind(address)
    listener.settimeout(30)
    environment = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000")
    messages: List[str] = []
    with listener:
        up = env.cli("up", str(config), env=environment)

        def receive_until(predicate: Callable[[str], bool]) -> str:
            while True:
                try:
                    message = listener.recv(4096).decode()
                except socket.timeout:
                    raise AssertionError(f"no such notification in 30 s; got {messages}\n{up.output()}") from None
                messages.append(message)
                if predicate(message):
                    return message

        ready = receive_until(lambda m: "READY=1" in m.splitlines())
        assert describe_stream(present)["seq"] > 0
        waiting = describe_stream(unplugged)
        assert waiting["alive"] and waiting["state"] in ("starting", "reconnecting") and "no such device" in waiting["reason"]
        assert any(line.startswith("STATUS=2 stream(s), 2/2 children running") for line in ready.splitlines()), ready
        for _ in range(3):  # every 0.5 s (half of WATCHDOG_USEC), while the camera is still missing
            receive_until(lambda m: m == "WATCHDOG=1")
        assert describe_stream(unplugged)["seq"] == 0
        up.signal(signal.SIGTERM)
        receive_until(lambda m: "STOPPING=1" in m.splitlines())
        assert up.wait(timeout=40) == 0, up.output()
    assert shm_objects(present) == [] and shm_objects(unplugged) == []


def test_service_unit_passes_systemd_analyze_and_installs(env, tmp_path):
    analyze = require("systemd-analyze")
    config = tmp_path / "front door.toml"  # a space: the unit must quote it
    config.write_text(GOOD_STREAM + 'group = "%s"\n' % grp.getgrgid(os.getgid()).gr_name)
    printed = env.run_cli("service", str(config), "--watchdog", "20")
    assert printed.returncode == 0, printed.stderr
    unit = printed.stdout
    for line in ("Type=notify", "WatchdogSec=20", "KillMode=mixed", "Restart=on-failure", "RestartPreventExitStatus=2", "ReadWritePaths=/dev/shm"):
        assert line in unit.splitlines(), unit
    assert f'up "{config}"' in unit
    assert f"SupplementaryGroups={grp.getgrgid(os.getgid()).gr_name}" in unit
    units = tmp_path / "units"
    units.mkdir()
    installed = env.run_cli("service", str(config), "--watchdog", "20", "--install", "--unit-dir", str(units))
    assert installed.returncode == 0, installed.stderr
    path = units / "framebroker-front-door.service"
    assert path.read_text() == unit and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "systemctl daemon-reload && systemctl enable --now framebroker-front-door" in installed.stdout
    verified = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    # systemd-analyze exits 0 even for lines it ignores: any complaint at all fails the test.
    assert verified.returncode == 0 and verified.stderr.strip() == "" and verified.stdout.strip() == "", verified.stderr


def test_service_checks_the_file_with_its_environment_file(env, tmp_path):
    variable = f"FB_TEST_PASS_{uuid.uuid4().hex[:6].upper()}"
    config = tmp_path / "door.toml"
    config.write_text(f'[streams.door]\nsource = "rtsp://admin:${{{variable}}}@127.0.0.1:1/stream"\n')
    missing = env.run_cli("service", str(config))
    assert missing.returncode == 2 and f"environment variable {variable} is not set" in missing.stderr
    assert "door.toml:2: streams.door.source" in missing.stderr
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"# credentials\n{variable}='s3cret'\n")
    printed = env.run_cli("service", str(config), "--environment-file", str(secrets))
    assert printed.returncode == 0, printed.stderr
    assert f"EnvironmentFile={secrets}" in printed.stdout and "s3cret" not in printed.stdout
