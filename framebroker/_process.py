"""Starting framebroker commands as child processes (the demo, tests, benchmarks).

A child is ``python -m framebroker ...`` run by this very interpreter: that needs no
``framebroker`` script on PATH (a venv that is not activated, a test run), and it stays in the
parent's environment. The client commands come from the separately installed
``framebroker_clients`` package, which nothing in a source checkout can hide, so the child
needs no ``sys.path`` adjustment from any working directory.
"""

from __future__ import annotations

import sys


def framebroker_command(*args: str) -> list[str]:
    """argv that runs ``framebroker ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "framebroker", *args]
