"""Consumer programs built only on the public ``framebroker`` API.

Installed as ``framebroker.clients`` and reached through the ``framebroker`` command: each module
provides ``add_arguments(parser)`` and ``main(args) -> exit code``.
"""
