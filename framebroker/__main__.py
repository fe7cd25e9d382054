"""``python -m framebroker`` is the ``framebroker`` command."""

from .cli import entry_point

entry_point()
