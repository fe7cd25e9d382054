"""``framebroker service CONFIG.toml``: the systemd unit that runs ``framebroker up`` at boot.

It prints the unit (``--install`` writes it into /etc/systemd/system). What the unit says and why:

* ``Type=notify``: ``up`` says READY=1 once every stream publishes or is retrying its source,
  so units ordered after this one start when frames flow, and boot never waits on a camera that
  is not plugged in. ``WatchdogSec``: ``up`` pings from its own loop (``_notify``).
* ``KillMode=mixed``: SIGTERM goes to ``up`` alone, which stops the readers, then the daemons, and
  cleans /dev/shm; only what is left after ``TimeoutStopSec`` gets SIGKILL. (The default,
  SIGTERM to every process at once, would stop daemons under their readers.)
* ``Restart=on-failure`` with ``RestartPreventExitStatus=2``: a crash is restarted, a config
  file with problems (exit 2) is not: restarting cannot mend it.
* /dev/shm and the cameras stay shared with the rest of the machine (``PrivateDevices=no``,
  ``PrivateIPC=no``; readers run outside the unit), ``RemoveIPC=no`` (the user's other streams
  survive a stop), and ``ProtectSystem=full`` with ``ReadWritePaths=/dev/shm`` keeps /usr, /boot
  and /etc read-only while the rest (recordings under /var, /srv, /home) stays writable.
* ``User=``, and ``SupplementaryGroups=`` for the groups the streams open themselves to
  (``group`` keys) and ``--group`` (``video`` for USB and CSI cameras).
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import sys
from typing import Dict, List, Optional

from ._config import Config, load_config
from ._errors import FrameBrokerError

DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_WATCHDOG = 30.0
STOP_TIMEOUT = 45  # up's two grace periods (readers, then daemons: 10 s each) and some margin


def systemd_word(text: str) -> str:
    """One ExecStart= argument as systemd reads it: ``%`` and ``$`` escaped (specifiers and
    variables), quoted when it has spaces or quotes."""
    text = text.replace("%", "%%").replace("$", "$$")
    if re.search(r'[\s"\'\\;]', text) or not text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def default_unit_name(config_path: str) -> str:
    """``framebroker-<file name without .toml>``, in the characters unit names allow."""
    stem = os.path.splitext(os.path.basename(config_path))[0]
    return "framebroker-" + (re.sub(r"[^A-Za-z0-9_.:-]", "-", stem) or "config")


def default_user() -> str:
    """Who runs the command (the user behind sudo, if any)."""
    if os.getuid() == 0 and os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    return pwd.getpwuid(os.getuid()).pw_name


def read_environment_file(path: str) -> Dict[str, str]:
    """``NAME=value`` lines as systemd's EnvironmentFile= reads them (comments, quotes), for
    checking a config whose sources name ``${NAME}``. ValueError names a line it cannot read."""
    values: Dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for number, raw in enumerate(file, 1):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("export "):
                line = line[len("export ") :].lstrip()
            name, equals, value = line.partition("=")
            name = name.strip()
            if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{path}:{number}: expected NAME=value")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[name] = value
    return values


def render_unit(
    config: Config,
    *,
    user: str,
    groups: List[str],
    watchdog: float = DEFAULT_WATCHDOG,
    environment_file: Optional[str] = None,
    unit_name: str = "",
) -> str:
    unit_name = unit_name or default_unit_name(config.path)
    command = " ".join(systemd_word(word) for word in (sys.executable, "-m", "framebroker", "up", config.path))
    supplementary = list(dict.fromkeys(groups + config.groups))
    lines = [
        f"# {unit_name}.service, made by: framebroker service {config.path}",
        f"# Install: framebroker service {config.path} --install, then: systemctl daemon-reload && systemctl enable --now {unit_name}",
        "# Reload after editing the config file: systemctl reload " + unit_name + " (only what changed restarts)",
        "[Unit]",
        f"Description=framebroker: {', '.join(config.streams)} from {config.path}",
        # RTSP cameras need the network; local cameras are waited for by the daemons themselves.
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={command}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        f"User={user}",
    ]
    if user == "root":
        lines.insert(lines.index("User=root"), "# Runs as root: give --user NAME to run it as an unprivileged user.")
    if supplementary:
        lines.append(f"SupplementaryGroups={' '.join(supplementary)}")
    if environment_file:
        lines.append("# ${NAME} in a source or output comes from here (keep it mode 0600): credentials stay off command lines.")
        lines.append(f"EnvironmentFile={os.path.abspath(environment_file)}")
    lines += [
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if watchdog:
        lines.append(f"WatchdogSec={watchdog:g}")
    lines += [
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=2",
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT}",
        "# /dev/shm and the cameras are shared with readers outside this unit.",
        "PrivateDevices=no",
        "PrivateIPC=no",
        "RemoveIPC=no",
        "ReadWritePaths=/dev/shm",
        "ProtectSystem=full",
        "NoNewPrivileges=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def service_command(args: argparse.Namespace) -> int:
    """``framebroker service``: check the file (with ``--environment-file``'s variables), then print
    the unit or install it. ValueError for a usage error, FrameBrokerError if it cannot write."""
    added: Dict[str, Optional[str]] = {}
    if args.environment_file:
        try:
            environment = read_environment_file(args.environment_file)
        except OSError as exc:
            raise ValueError(f"--environment-file {args.environment_file}: {exc.strerror or exc}") from None
        added = {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)  # for the check only: ${NAME} in sources
    try:
        config = load_config(args.config)
    finally:
        for name, value in added.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    user = args.user or default_user()
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"--user {user}: no such user (create one: useradd --system --groups video {user})") from None
    for group in args.group:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ValueError(f"--group {group}: no such group (create it with groupadd {group}, or pick an existing one)") from None
    name = args.name or default_unit_name(config.path)
    text = render_unit(config, user=user, groups=args.group, watchdog=args.watchdog, environment_file=args.environment_file, unit_name=name)
    if not args.install:
        sys.stdout.write(text)
        return 0
    try:
        path = install_unit(text, name, args.unit_dir)
    except OSError as exc:
        hint = ": run it as root (sudo), or choose --unit-dir" if isinstance(exc, PermissionError) else ""
        raise FrameBrokerError(f"cannot write the unit into {args.unit_dir}: {exc.strerror or exc}{hint}") from None
    print(f"wrote {path}")
    print(f"now: systemctl daemon-reload && systemctl enable --now {name}   (logs: journalctl -u {name})")
    return 0


def install_unit(text: str, unit_name: str, unit_dir: str = DEFAULT_UNIT_DIR) -> str:
    """Write the unit (mode 0644, replacing one of the same name); its path. OSError if it cannot."""
    path = os.path.join(unit_dir, f"{unit_name}.service")
    draft = path + ".new"
    with open(draft, "w", encoding="utf-8") as file:
        file.write(text)
    os.chmod(draft, 0o644)
    os.replace(draft, path)
    return path


__all__ = [
    "default_unit_name",
    "default_user",
    "install_unit",
    "read_environment_file",
    "render_unit",
    "service_command",
    "systemd_word",
]
