"""Open-file-description (OFD) byte-range locks: leases and liveness that the kernel keeps.

Why OFD locks (``F_OFD_SETLK``, Linux 3.15+) and not counters in shared memory:

* The kernel releases every lock of a process the moment it dies, whatever instruction it
  died at. A reader killed with ``kill -9`` in the middle of taking a frame leaves no count
  behind to repair, and "is this reader alive?" is answered by "does it still hold its
  entry lock?", which pid reuse cannot fool.
* Taking and dropping a lock is one system call, serialised by the kernel: the lock decision is
  linearisable on every architecture and carries acquire/release ordering (see ``_ring.py``).
* Non-blocking ``F_OFD_SETLK`` never waits: the producer *tries* to lock a slot and moves on to
  another one if any reader holds it.

Unlike classic POSIX locks, OFD locks belong to the open file description, not the process:
two Readers in one process (each with its own ``open()``) conflict with each other as they
should, and closing an unrelated descriptor of the same file does not drop them.
"""

from __future__ import annotations

import fcntl
import os
import struct

# struct flock on LP64 Linux (x86_64, aarch64): short l_type, short l_whence, 4 bytes padding,
# off_t l_start, off_t l_len, pid_t l_pid, 4 bytes padding. OFD locks require l_pid == 0.
_FLOCK = struct.Struct("hhxxxxqqixxxx")
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)


def _flock(kind: int, offset: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0)


class ByteLocks:
    """One-byte OFD locks on one open file description.

    The packed ``struct flock`` arguments are cached per offset, so a lock or unlock on the
    frame path costs one ``fcntl`` call and no packing.
    """

    __slots__ = ("_fd", "_shared", "_exclusive", "_unlock")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._shared: dict[int, bytes] = {}
        self._exclusive: dict[int, bytes] = {}
        self._unlock: dict[int, bytes] = {}

    def try_shared(self, offset: int) -> bool:
        arg = self._shared.get(offset)
        if arg is None:
            arg = self._shared[offset] = _flock(fcntl.F_RDLCK, offset)
        try:
            fcntl.fcntl(self._fd, _F_OFD_SETLK, arg)
        except BlockingIOError:
            return False
        return True

    def try_exclusive(self, offset: int) -> bool:
        arg = self._exclusive.get(offset)
        if arg is None:
            arg = self._exclusive[offset] = _flock(fcntl.F_WRLCK, offset)
        try:
            fcntl.fcntl(self._fd, _F_OFD_SETLK, arg)
        except BlockingIOError:
            return False
        return True

    def unlock(self, offset: int) -> None:
        arg = self._unlock.get(offset)
        if arg is None:
            arg = self._unlock[offset] = _flock(fcntl.F_UNLCK, offset)
        fcntl.fcntl(self._fd, _F_OFD_SETLK, arg)

    def held_by_other(self, offset: int) -> bool:
        """True if another open file description holds any lock on ``offset``.

        Works on a read-only descriptor, so ``framebroker status`` can tell live daemons and
        readers from dead ones without write access.
        """
        result = fcntl.fcntl(self._fd, _F_OFD_GETLK, _flock(fcntl.F_WRLCK, offset))
        return _FLOCK.unpack(result)[0] != fcntl.F_UNLCK

    def exclusively_held_by_other(self, offset: int) -> bool:
        """True if another open file description holds an exclusive lock on ``offset``."""
        result = fcntl.fcntl(self._fd, _F_OFD_GETLK, _flock(fcntl.F_RDLCK, offset))
        return _FLOCK.unpack(result)[0] != fcntl.F_UNLCK
