"""argparse types for command-line programs built on framebroker.

The ``framebroker`` command and the client programs (``framebroker_clients``) check their
arguments with these, and so can any other program: each turns bad input into an
``argparse.ArgumentTypeError`` that names the option and the accepted range, so argparse exits
with code 2 and a message that says what to do::

    parser.add_argument("name", type=stream_name)
    parser.add_argument("--port", type=int_in(0, 65535, "--port"), default=8080)
    parser.add_argument("--wait", type=float_in(0, 3600, "--wait", low_inclusive=True), default=10.0)
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from ._layout import MAX_SLOTS, MIN_SLOTS, validate_model_name, validate_stream_name


def stream_name(text: str) -> str:
    """A valid stream name (``[A-Za-z0-9_.-]``, 1-64 characters)."""
    try:
        return validate_stream_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def model_name(text: str) -> str:
    """A valid model name (results of ``fb.ResultWriter``: the rules of stream names)."""
    try:
        return validate_model_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high`` (both included); ``what`` names it in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}, got {value}")
        return value

    return parse


def float_in(low: float, high: float, what: str, *, low_inclusive: bool = False) -> Callable[[str], float]:
    """A finite number above ``low`` (or equal to it with ``low_inclusive``) and at most ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        too_low = value < low if low_inclusive else value <= low
        if not math.isfinite(value) or too_low or value > high:
            bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"{what} must be {bound} and <= {high:g}, got {text}")
        return value

    return parse


__all__ = ["float_in", "int_in", "model_name", "size_bytes", "slots", "stream_name"]


def slots(text: str) -> "int | str":
    """``--slots``: "auto" (a ring that grows when readers need it) or a fixed number of frames."""
    if text.strip().lower() == "auto":
        return "auto"
    return int_in(MIN_SLOTS, MAX_SLOTS, "--slots")(text)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_bytes(what: str) -> Callable[[str], int]:
    """A size such as 512M, 2G or 1048576 (bytes; K, M, G, T are powers of 1024)."""

    def parse(text: str) -> int:
        raw = text.strip().upper()
        if raw.endswith("IB"):
            raw = raw[:-2]
        elif raw.endswith("B"):
            raw = raw[:-1]
        number, unit = raw, ""
        if raw and raw[-1] in "KMGT":
            number, unit = raw[:-1], raw[-1]
        try:
            value = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a size such as 512M or 2G, got {text!r}") from None
        if not value > 0 or value * _SIZE_UNITS[unit] > 1 << 50:
            raise argparse.ArgumentTypeError(f"{what} must be a size above 0 such as 512M or 2G, got {text!r}")
        return int(value * _SIZE_UNITS[unit])

    return parse
