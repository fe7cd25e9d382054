"""Telling systemd how ``framebroker up`` is doing: the sd_notify protocol, without libsystemd.

The protocol is one datagram per message on the AF_UNIX socket named by ``$NOTIFY_SOCKET``:
newline-separated ``KEY=VALUE`` fields (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``,
``RELOADING=1``, ``STOPPING=1``). A name starting with ``@`` is in the abstract namespace (the
``@`` stands for a leading NUL byte). ``$WATCHDOG_USEC`` is the unit's ``WatchdogSec``; systemd
asks for a ping at least that often, and its documentation recommends every half of it. Outside
systemd ``$NOTIFY_SOCKET`` is unset and every call here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping, Optional

log = logging.getLogger("framebroker.up")

# What the notification protocol puts in a child's environment: the supervisor alone speaks for
# the service, so its children must not see these (``child_environment``).
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address: Optional[str] = ("\0" + address[1:] if address.startswith("@") else address) or None
        self.watchdog_interval: Optional[float] = None
        usec = environ.get("WATCHDOG_USEC", "")
        meant_for = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not meant_for or meant_for == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._socket: Optional[socket.socket] = None
        self._next_watchdog = 0.0
        self._status = ""
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        """One message; a failure is logged once (the service manager may have gone away)."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify the service manager at %s: %s", self.address.replace("\0", "@"), exc)
                self._failed = True

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd (253+) pairs the reload with the READY=1 that ends it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading the config file")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: readers first, then the stream daemons")

    def status(self, status: str) -> None:
        """STATUS= when it changed (``systemctl status`` shows the last one)."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        """WATCHDOG=1 if one is due: called from the supervisor's loop, so a ping means the loop runs."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now >= self._next_watchdog:
            self._next_watchdog = now + self.watchdog_interval
            self.send("WATCHDOG=1")

    def seconds_to_watchdog(self) -> Optional[float]:
        if self.watchdog_interval is None:
            return None
        return max(0.0, self._next_watchdog - time.monotonic())

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


__all__ = ["Notifier", "SYSTEMD_VARIABLES"]
