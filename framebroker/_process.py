"""Starting framebroker commands as child processes (the demo, the recorder's helpers, tests)."""

from __future__ import annotations

import sys

# ``python -m framebroker`` run from a source checkout would import the checkout's
# ``framebroker/``, which lacks ``framebroker.clients`` (installed from ``clients/``). Dropping the
# current directory from sys.path first makes children always run the installed package.
_BOOTSTRAP = "import sys; sys.path.pop(0); from framebroker.cli import entry_point; sys.argv[0] = 'framebroker'; entry_point()"


def framebroker_command(*args: str) -> list[str]:
    """argv that runs ``framebroker ARGS...`` with this interpreter."""
    return [sys.executable, "-c", _BOOTSTRAP, *args]
