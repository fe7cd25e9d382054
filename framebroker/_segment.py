"""Creating, validating, opening and removing the shared-memory objects of one stream.

This module owns the lifecycle of ``/dev/shm/framebroker.NAME`` and its semaphores:
reserving the memory up front (no SIGBUS later), permissions (0600, or 0660 for a group),
ownership (one live daemon per stream, stale ones taken over), and refusing anything under
the stream's name that is not a ring we made.
"""

from __future__ import annotations

import difflib
import errno
import grp
import mmap
import os
import secrets
import stat
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import posix_ipc

from ._errors import AccessDenied, IncompatibleSegment, ShmSpaceError, StreamBusy, StreamNotFound
from ._layout import (
    DATA_ALIGNMENT,
    HEADER_SIZE,
    LAYOUT_VERSION,
    LOCK_OWNER,
    MAGIC,
    MAX_FRAME_BYTES,
    MAX_SLOTS,
    MIN_SLOTS,
    OBJECT_SEPARATOR,
    SEGMENT_PREFIX,
    SHM_DIR,
    STATIC,
    RingLayout,
    decode_text,
    segment_path,
    semaphore_file_prefix,
    producer_semaphore_name,
    semaphore_name,
    validate_stream_name,
)
from ._locks import ByteLocks
from ._table import remove_listener_queues


@dataclass(frozen=True)
class StaticHeader:
    """The part of the header that never changes after creation."""

    epoch: int
    owner_pid: int
    owner_uid: int
    created_wall: float
    created_mono_ns: int
    layout: RingLayout
    name: str


def _describe_mode(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, group gid {st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}"


def parse_static_header(raw: bytes, st: os.stat_result, path: str) -> StaticHeader:
    """Validate a header read from ``path``; raise IncompatibleSegment if it cannot be trusted."""
    remedy = f"If no framebroker daemon of another version uses it, remove it: rm {path}"
    if raw[:8] != MAGIC[: len(raw[:8])] or not raw:
        raise IncompatibleSegment(f"{path} is not a framebroker ring (unknown magic). {remedy}")
    if st.st_size < HEADER_SIZE or len(raw) < STATIC.size:
        raise IncompatibleSegment(
            f"{path} is truncated ({st.st_size} bytes, not even a header); framebroker never leaves one like "
            f"that under a stream's name. Remove it: rm {path}"
        )
    (
        _magic,
        version,
        header_size,
        epoch,
        owner_pid,
        owner_uid,
        created_wall,
        created_mono,
        slot_count,
        table_size,
        slot_stride,
        slot_capacity,
        meta_offset,
        map_offset,
        map_size,
        _page_alignment,
        table_offset,
        data_offset,
        total_size,
        name,
    ) = STATIC.unpack_from(raw, 0)
    if version != LAYOUT_VERSION:
        raise IncompatibleSegment(
            f"{path} uses ring layout version {version}, this framebroker speaks version {LAYOUT_VERSION}: "
            f"use the same framebroker version for the daemon and its readers. {remedy}"
        )
    if header_size != HEADER_SIZE or not MIN_SLOTS <= slot_count <= MAX_SLOTS or not 0 <= slot_capacity <= MAX_FRAME_BYTES:
        raise IncompatibleSegment(f"{path} has a corrupt header (implausible sizes). {remedy}")
    layout = RingLayout.compute(slot_count, slot_capacity)
    recorded = (table_size, slot_stride, meta_offset, map_offset, map_size, table_offset, data_offset, total_size)
    expected = (
        layout.table_size,
        layout.slot_stride,
        layout.meta_offset,
        layout.map_offset,
        layout.map_size,
        layout.table_offset,
        layout.data_offset,
        layout.total_size,
    )
    if recorded != expected:
        raise IncompatibleSegment(f"{path} has a corrupt header (offsets do not match its geometry). {remedy}")
    if st.st_size < layout.total_size:
        raise IncompatibleSegment(
            f"{path} is truncated: {st.st_size} bytes where its header promises {layout.total_size}. {remedy}"
        )
    if st.st_uid != owner_uid:
        raise IncompatibleSegment(
            f"{path} claims to belong to uid {owner_uid} but the file is owned by uid {st.st_uid}; "
            f"refusing to trust it. {remedy}"
        )
    if st.st_mode & (stat.S_IWOTH | stat.S_IROTH):
        raise IncompatibleSegment(
            f"{path} is open to every user ({_describe_mode(st)}); framebroker never creates that, "
            f"so it is refused. {remedy}"
        )
    return StaticHeader(
        epoch=epoch,
        owner_pid=owner_pid,
        owner_uid=owner_uid,
        created_wall=created_wall,
        created_mono_ns=created_mono,
        layout=layout,
        name=decode_text(name),
    )


class Segment:
    """One opened instance of a stream's segment: descriptor, mappings and locks.

    ``control`` maps the header, slot metadata, the seq map and the reader table. ``data``
    maps the frames: read-write for the producer, read-only for readers (so their numpy views
    are read-only for real), absent for status. ``close()`` is safe to call twice and on a
    half-built object; it never unlinks (only the owner does, through ``unlink()``).
    """

    fd: int = -1
    control: Optional[mmap.mmap] = None
    data: Optional[mmap.mmap] = None

    def __init__(self, stream: str, path: str, fd: int, header: StaticHeader, st: os.stat_result) -> None:
        self.stream = stream
        self.path = path
        self.fd = fd
        self.header = header
        self.layout = header.layout
        self.inode = (st.st_dev, st.st_ino)
        self.gid = st.st_gid
        self.mode = stat.S_IMODE(st.st_mode)
        self.locks = ByteLocks(fd)

    def map(self, control_writable: bool, data_access: Optional[str], fd: Optional[int] = None) -> None:
        """Map the control area and, unless ``data_access`` is None, the frames ("r" or "rw").

        The mappings are made through another open file description of the same file than the
        one that holds this instance's locks: a mapping keeps the description it was made from
        alive, and OFD locks last as long as their description. Mapped through ``self.fd``, a
        frame view that outlives ``close()`` would keep the reader's entry and leases locked, a
        phantom reader nobody can remove. ``fd`` names that other description (the owner maps
        through one opened by the final name, so /proc/PID/maps and lsof show the stream's
        name); by default a fresh one is opened for the mapping and closed right after.
        """
        layout = self.layout
        writable = control_writable or data_access == "rw"
        source = self._reopen(writable) if fd is None else fd
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if control_writable else 0)
            self.control = mmap.mmap(source, layout.data_offset, mmap.MAP_SHARED, prot)
            if data_access is not None:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if data_access == "rw" else 0)
                length = layout.total_size - layout.data_offset
                self.data = mmap.mmap(source, length, mmap.MAP_SHARED, prot, offset=layout.data_offset)
        finally:
            if fd is None:
                os.close(source)

    def _reopen(self, writable: bool) -> int:
        """A new open file description of this very file (not of whatever the name holds now)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            return os.open(f"/proc/self/fd/{self.fd}", flags)
        except FileNotFoundError:
            pass  # no /proc: go by the name, and make sure it is still this file
        fd = os.open(self.path, flags)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self.inode:
            os.close(fd)
            raise StreamNotFound(f"stream {self.stream!r} was replaced while attaching; try again")
        return fd

    def owner_alive(self) -> bool:
        return self.locks.exclusively_held_by_other(LOCK_OWNER)

    def still_named(self) -> bool:
        """True while the stream's name still refers to this very segment."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.inode

    def close_descriptor(self) -> None:
        """Drop the descriptor and with it every OFD lock of this instance; the mappings stay."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Drop the descriptor (and with it every OFD lock) and the mappings.

        A mapping that numpy views still use cannot be closed; it stays alive until the last
        view is gone, which is exactly what a held frame needs.
        """
        for attr in ("control", "data"):
            mapping = getattr(self, attr)
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:
                    pass  # views exist: the mapping lives on until they are garbage-collected
                setattr(self, attr, None)
        self.close_descriptor()


def free_shm_bytes() -> Optional[int]:
    """Bytes free in /dev/shm (None if it cannot be told)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _reserve(fd: int, layout: RingLayout, stream: str, what: str) -> None:
    """Back every byte with memory now, so a full /dev/shm fails here and never as SIGBUS later."""
    try:
        os.ftruncate(fd, layout.total_size)
        os.posix_fallocate(fd, 0, layout.total_size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise
        free = free_shm_bytes()
        free_text = f"only {_mib(free)} is free" if free is not None else "it is full"
        raise ShmSpaceError(
            f"cannot reserve {_mib(layout.total_size)} in {SHM_DIR} for stream {stream!r} "
            f"({layout.slot_count} slots of {what}): {free_text}. Enlarge {SHM_DIR} "
            f"(docker: --shm-size; otherwise: mount -o remount,size=... {SHM_DIR}) "
            f"or use fewer --slots or a smaller frame.",
            needed_bytes=layout.total_size,
        ) from None


def resolve_group(group: Optional[str]) -> Optional[int]:
    """gid for ``--group NAME`` (or a numeric gid); None for private (0600) objects."""
    if group is None:
        return None
    if not isinstance(group, str) or not group:
        raise ValueError("group must be a non-empty group name")
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ValueError(f"unknown group {group!r}: create it (groupadd {group}) or pick an existing one") from None


def _apply_permissions(path_or_fd: "int | str", gid: Optional[int]) -> None:
    mode = 0o600 if gid is None else 0o660
    # Explicit chmod: the mode passed to open()/sem_open() is reduced by the umask, and a
    # common umask of 022 would turn the group's 0660 into 0640.
    if isinstance(path_or_fd, int):
        if gid is not None:
            os.fchown(path_or_fd, -1, gid)
        os.fchmod(path_or_fd, mode)
    else:
        if gid is not None:
            os.chown(path_or_fd, -1, gid)
        os.chmod(path_or_fd, mode)


def _probe_existing(stream: str, path: str) -> Optional[StaticHeader]:
    """Raise if a live or untrusted object holds the name; remove it if it is a stale ring of ours
    (and return its header)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        st = os.stat(path)
        raise IncompatibleSegment(
            f"{path} exists and belongs to someone else ({_describe_mode(st)}); "
            f"framebroker will not touch it. Pick another --name, or remove it as its owner or root."
        ) from None
    try:
        st = os.fstat(fd)
        locks = ByteLocks(fd)
        if st.st_uid != os.geteuid():
            raise IncompatibleSegment(
                f"{path} exists and belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}); "
                f"framebroker will not take it over. Pick another --name, or remove it as its owner or root."
            )
        raw = os.pread(fd, HEADER_SIZE, 0)
        header = parse_static_header(raw, st, path)
        # Take the owner lock of the old segment: if that works its daemon is dead, and holding
        # it keeps a second daemon that starts at this very moment from judging it stale too.
        if not locks.try_exclusive(LOCK_OWNER):
            raise StreamBusy(
                f"stream {stream!r} is already served by a live daemon (pid {header.owner_pid}). "
                f"Stop it first (kill {header.owner_pid}) or choose another --name.",
                pid=header.owner_pid,
            )
        if os.path.exists(path):
            cur = os.stat(path)
            if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
        # Only the dead daemon's own semaphores: a new daemon starting at this moment may have
        # made its own already (they carry its epoch), and they are not ours to remove.
        remove_semaphores(stream, header.epoch)
        _remove_listener_queues_of(fd, header, stream)
        return header
    finally:
        os.close(fd)


def _remove_listener_queues_of(fd: int, header: StaticHeader, stream: str) -> None:
    """The trigger queues a dead daemon's listeners left (named after its table's entries)."""
    layout = header.layout
    control = mmap.mmap(fd, layout.data_offset, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        remove_listener_queues(control, layout, stream, header.epoch)
    finally:
        control.close()


def remove_stale(stream: str) -> Optional[StaticHeader]:
    """Remove the segment and semaphores a dead daemon left under ``stream``.

    Returns the removed segment's header, or None if there was nothing. Raises StreamBusy if a
    live daemon serves the stream and IncompatibleSegment for anything framebroker did not make:
    neither is ever touched.
    """
    validate_stream_name(stream)
    removed = _probe_existing(stream, segment_path(stream))
    _remove_dead_drafts(stream)
    return removed


def remove_semaphores(stream: str, epoch: int) -> None:
    """Unlink the wake-up semaphores of the segment of ``stream`` with this epoch."""
    prefix = f"{semaphore_file_prefix(stream)}{epoch:016x}."
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for entry in names:
        if entry.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, entry))
            except OSError:
                pass


def discard_semaphores(semaphores: "list[posix_ipc.Semaphore] | tuple", unlink: bool) -> None:
    """Close (and optionally unlink) a stream's semaphores; already-removed ones are fine."""
    for sem in semaphores:
        if unlink:
            try:
                sem.unlink()
            except posix_ipc.ExistentialError:
                pass
        try:
            sem.close()
        except posix_ipc.Error:
            pass


def _remove_dead_drafts(stream: str) -> None:
    """Remove half-built segments (and their semaphores) left by a daemon that died while
    creating one. A draft's name carries its epoch: ``framebroker.NAME@new.PID.EPOCH``."""
    prefix = f"{SEGMENT_PREFIX}{stream}{OBJECT_SEPARATOR}new."
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for entry in names:
        if not entry.startswith(prefix):
            continue
        path = os.path.join(SHM_DIR, entry)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not ByteLocks(fd).held_by_other(LOCK_OWNER):
                os.unlink(path)
                epoch = entry.rsplit(".", 1)[-1]
                if all(c in "0123456789abcdef" for c in epoch):
                    remove_semaphores(stream, int(epoch, 16))
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)


def create_segment(
    stream: str,
    slot_count: int,
    slot_capacity: int,
    *,
    gid: Optional[int],
    describe_frame: str,
    replace: Optional[Segment] = None,
) -> Tuple[Segment, List[posix_ipc.Semaphore]]:
    """Create, reserve and publish a new segment for ``stream``; return it with its semaphores.

    The new segment is built under a draft name, fully initialised and owner-locked, and only
    then linked under the stream's name, so nobody ever sees a half-written header. With
    ``replace`` (the owner moving its own stream to a new segment) the draft atomically
    replaces the old one.
    """
    draft = DraftSegment(stream, slot_count, slot_capacity, gid=gid, describe_frame=describe_frame, probe=replace is None)
    return draft.publish(replace)


class DraftSegment:
    """A new segment, reserved and initialised under a draft name, not yet under the stream's.

    Making one may take a while (reserving hundreds of MiB), so a producer that grows its ring
    makes it off its frame path and publishes it between two frames; ``publish`` is quick.
    ``discard()`` removes what was made; both are safe to call on a half-built draft.
    """

    path = ""
    segment: Optional[Segment] = None

    def __init__(self, stream: str, slot_count: int, slot_capacity: int, *, gid: Optional[int], describe_frame: str, probe: bool) -> None:
        layout = RingLayout.compute(slot_count, slot_capacity)
        self.stream = stream
        self.final_path = segment_path(stream)
        self.semaphores: List[posix_ipc.Semaphore] = []
        if probe:
            _probe_existing(stream, self.final_path)
        _remove_dead_drafts(stream)
        epoch = secrets.randbits(63) | 1  # never 0, so "no epoch" can be told apart
        self.path = f"{SHM_DIR}/{SEGMENT_PREFIX}{stream}{OBJECT_SEPARATOR}new.{os.getpid()}.{epoch:x}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            locks = ByteLocks(fd)
            locks.try_exclusive(LOCK_OWNER)  # a brand-new file: nobody else can hold it
            _apply_permissions(fd, gid)
            _reserve(fd, layout, stream, describe_frame)
            static = STATIC.pack(
                MAGIC,
                LAYOUT_VERSION,
                HEADER_SIZE,
                epoch,
                os.getpid(),
                os.geteuid(),
                time.time(),
                time.monotonic_ns(),
                layout.slot_count,
                layout.table_size,
                layout.slot_stride,
                layout.slot_capacity,
                layout.meta_offset,
                layout.map_offset,
                layout.map_size,
                DATA_ALIGNMENT,
                layout.table_offset,
                layout.data_offset,
                layout.total_size,
                stream.encode("ascii"),
            )
            os.pwrite(fd, static, 0)
            st = os.fstat(fd)
            header = parse_static_header(os.pread(fd, HEADER_SIZE, 0), st, self.path)
            self.segment = Segment(stream, self.final_path, fd, header, st)
        except BaseException:
            os.close(fd)
            self.discard()
            raise
        try:
            # One wake-up semaphore per reader-table entry, then the producer's own (the last).
            names = [semaphore_name(stream, epoch, index) for index in range(layout.table_size)]
            for name in names + [producer_semaphore_name(stream, epoch)]:
                self.semaphores.append(posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0))
                _apply_permissions(f"{SHM_DIR}/sem.{name.lstrip('/')}", gid)
        except BaseException:
            self.discard()
            raise

    def publish(self, replace: Optional[Segment] = None) -> Tuple[Segment, List[posix_ipc.Semaphore]]:
        """Link the draft under the stream's name (or atomically over ``replace``) and map it."""
        segment = self.segment
        assert segment is not None
        path = self.final_path
        try:
            if replace is None:
                try:
                    os.link(self.path, path)
                except FileExistsError:
                    # Another daemon won the race between our probe and now: report it like any
                    # live owner. Our draft goes away below.
                    _probe_existing(self.stream, path)
                    os.link(self.path, path)
                os.unlink(self.path)
            else:
                os.rename(self.path, path)
            self.path = ""
            named = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                if segment.inode != (os.fstat(named).st_dev, os.fstat(named).st_ino):
                    raise IncompatibleSegment(f"{path} was replaced while it was being created; try again")
                segment.map(control_writable=True, data_access="rw", fd=named)
            finally:
                os.close(named)
        except BaseException:
            self.discard()
            raise
        self.segment = None
        return segment, self.semaphores

    def discard(self) -> None:
        discard_semaphores(self.semaphores, unlink=True)
        self.semaphores = []
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = ""


def open_segment(stream: str, *, for_status: bool = False) -> Segment:
    """Open and validate a stream's segment (not yet mapped).

    Readers open it read-write (they write their own reader-table entry); ``status`` opens it
    read-only.
    """
    path = segment_path(stream)
    flags = (os.O_RDONLY if for_status else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise StreamNotFound(
            f"no stream {stream!r}: nothing serves it ({path} does not exist).{served_streams_hint(stream)} "
            f"Start one with: framebroker serve SOURCE --name {stream}"
        ) from None
    except PermissionError:
        try:
            st = os.stat(path)
            detail = f" ({_describe_mode(st)})"
        except OSError:
            detail = ""
        raise AccessDenied(
            f"permission denied opening stream {stream!r}{detail}: it is private to the daemon's user. "
            f"Run this as that user, or start the daemon with --group GROUP and add your user to that group."
        ) from None
    try:
        st = os.fstat(fd)
        header = parse_static_header(os.pread(fd, HEADER_SIZE, 0), st, path)
        if header.name != stream:
            raise IncompatibleSegment(f"{path} names stream {header.name!r}, not {stream!r}; refusing it.")
        return Segment(stream, path, fd, header, st)
    except BaseException:
        os.close(fd)
        raise


def list_stream_names() -> list[str]:
    """Names of every stream that has a segment in /dev/shm (live or stale), sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    names = []
    for entry in entries:
        if entry.startswith(SEGMENT_PREFIX) and OBJECT_SEPARATOR not in entry:
            names.append(entry[len(SEGMENT_PREFIX) :])
    return sorted(names)


def served_streams_hint(missing: str, shown: int = 10) -> str:
    """For "no stream" messages: the streams a live daemon serves, and the closest to ``missing``
    (" Served now: cam0, door. Did you mean 'cam0'?"), or "" when none is served."""
    served = []
    for name in list_stream_names():
        try:
            fd = os.open(segment_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # gone meanwhile, or another user's private stream: nothing to offer
            continue
        try:
            if ByteLocks(fd).held_by_other(LOCK_OWNER):
                served.append(name)
        finally:
            os.close(fd)
    if not served:
        return ""
    listed = ", ".join(served[:shown]) + (f" and {len(served) - shown} more" if len(served) > shown else "")
    closest = difflib.get_close_matches(missing, served, n=1)
    return f" Served now: {listed}." + (f" Did you mean {closest[0]!r}?" if closest else "")
