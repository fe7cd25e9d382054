"""Which frame path runs: the compiled one (``_fastpath.c``) or the pure-Python one.

Both implement the same protocol (``_ring.py``) on the same bytes, so a compiled producer serves
pure-Python readers and the reverse. The compiled path carries the per-frame steps in one call on
each side; the pure-Python path is the same steps in ``_reader.py``, ``_attachment.py`` and
``_publisher.py``, and runs wherever the extension is missing: it is built by ``pip install``
when a C compiler and the Python headers are there (on Debian: ``apt install gcc python3-dev``),
and a build without them still installs, without it.

``FRAMEBROKER_PURE=1`` in the environment chooses the pure-Python path (checked whenever a
Publisher or Reader attaches to a segment, so tests can run both paths in one session).
Without it, a missing or unusable extension is reported once, with a warning, when framebroker
is imported.

The wake word (``WAKE_OFFSET`` in the header, "Wake-ups" in ``_ring.py``) is waited on by
compiled readers only; any producer must be able to wake it, the pure-Python one through
``syscall(SYS_futex)`` from ``ctypes``. Where that system call's number is not known here,
compiled readers keep waiting on their semaphores like pure-Python ones.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import warnings
from types import ModuleType
from typing import Any, Optional

from . import _layout, _ring

PURE_VARIABLE = "FRAMEBROKER_PURE"
# SYS_futex by machine (Linux's syscall tables): x86_64; the generic table (aarch64, riscv64,
# loongarch64); 32-bit x86 and ARM EABI; POWER; s390x.
_SYS_FUTEX = {
    "x86_64": 202,
    "amd64": 202,
    "aarch64": 98,
    "arm64": 98,
    "riscv64": 98,
    "loongarch64": 98,
    "i386": 240,
    "i686": 240,
    "armv6l": 240,
    "armv7l": 240,
    "ppc64": 221,
    "ppc64le": 221,
    "s390x": 238,
}.get(platform.machine())
_FUTEX_WAKE = 1
_WAKE_ALL = 0x7FFFFFFF


def _pure_requested() -> bool:
    return os.environ.get(PURE_VARIABLE, "") not in ("", "0")


def _layout_mismatches(module: ModuleType) -> list:
    """Constants the extension was built with that differ from this framebroker's layout."""
    from ._layout import MAX_SLOTS, META, FRAME_COUNTERS, ReaderMode, StreamState

    expected = {
        "LIVE_OFFSET": _layout.LIVE_OFFSET,
        "WAKE_OFFSET": _layout.WAKE_OFFSET,
        "META_RECORD_SIZE": _layout.META_RECORD_SIZE,
        "LOCK_SLOT_BASE": _layout.LOCK_SLOT_BASE,
        "MAX_SLOTS": MAX_SLOTS,
        "NO_FRAME": _layout.NO_FRAME,
        "STREAMING": StreamState.STREAMING,
        "ENDED": StreamState.ENDED,
        "REPLACED": StreamState.REPLACED,
        "LIVE": ReaderMode.LIVE,
        "NEXT": ReaderMode.NEXT,
        "ORDERED": ReaderMode.ORDERED,
        "ENTRY_CURSOR_OFFSET": _layout.ENTRY_PROGRESS_OFFSET + 8,
        "ENTRY_PROGRESS_OFFSET": _layout.ENTRY_PROGRESS_OFFSET,
        "ENTRY_HELD_OFFSET": _layout.ENTRY_HELD_OFFSET,
        "ENTRY_RATE_OFFSET": _layout.ENTRY_RATE_OFFSET,
        "MAX_PENDING_WAKES": _ring.MAX_PENDING_WAKES,
        "PRODUCER_WAITS_OFFSET": _layout.PRODUCER_WAITS_OFFSET,
        "HEAD_SIZE": FRAME_COUNTERS.size,
        "META_SIZE": META.size,
        "PROGRESS_SIZE": _layout.ENTRY_PROGRESS_HELD.size,
        "RATE_SIZE": _layout.ENTRY_RATE.size,
    }
    built = getattr(module, "LAYOUT", {})
    return sorted(name for name, value in expected.items() if built.get(name) != value)


def _load() -> "tuple[Optional[ModuleType], str]":
    """The extension, or None and why not."""
    if importlib.util.find_spec(f"{__package__}._fastpath") is None:
        return None, "it was not built (no framebroker/_fastpath*.so beside the package)"
    try:
        from . import _fastpath
    except ImportError as exc:
        return None, f"it does not load ({exc})"
    mismatches = _layout_mismatches(_fastpath)
    if mismatches:
        return None, f"it was built for another ring layout ({', '.join(mismatches)} differ): rebuild it"
    return _fastpath, ""


if _pure_requested():
    _compiled: Optional[ModuleType] = None
    why_pure = f"{PURE_VARIABLE} is set"
else:
    _compiled, why_pure = _load()
    if _compiled is None:
        warnings.warn(
            f"framebroker runs its pure-Python frame path, which is slower: the compiled one "
            f"(framebroker._fastpath) is unavailable: {why_pure}. To build it, install a C compiler and "
            f"the Python headers (on Debian: apt install gcc python3-dev) and reinstall framebroker "
            f"(pip install --force-reinstall --no-deps framebroker, or pip install . in its source). "
            f"Set {PURE_VARIABLE}=1 to choose the pure-Python path and silence this.",
            RuntimeWarning,
            stacklevel=2,
        )


def compiled() -> Optional[ModuleType]:
    """The extension, unless it is unavailable or ``FRAMEBROKER_PURE`` asks for pure Python."""
    if _compiled is None or _pure_requested():
        return None
    return _compiled


def readers_use_futex() -> bool:
    """True where a reader attaching now waits on the wake word (compiled, and every producer
    here can wake it)."""
    return _SYS_FUTEX is not None and compiled() is not None


def broadcast(control: Any, module: Optional[ModuleType]) -> None:
    """Add 1 to the wake word of ``control`` (a segment's writable control mapping) and wake
    every reader waiting on it, with the extension ``module`` or, if None, through ctypes."""
    if module is not None:
        module.broadcast(control)
    elif _SYS_FUTEX is not None:
        _pure_broadcast(control)


_libc: Any = None


def _pure_broadcast(control: Any) -> None:
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    word = ctypes.c_uint32.from_buffer(control, _layout.WAKE_OFFSET)
    try:
        # One writer (the producer): a plain increment loses nothing. The store is one aligned
        # 4-byte write; the system call after it is what readers wait for.
        word.value = (word.value + 1) & 0xFFFFFFFF
        _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(ctypes.addressof(word)), ctypes.c_int(_FUTEX_WAKE), ctypes.c_int(_WAKE_ALL), None, None, ctypes.c_int(0))
    finally:
        del word  # it exports the mapping's buffer, and a mapping with exports cannot be closed
