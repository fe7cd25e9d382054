"""Consumer programs built only on the public ``framebroker`` API.

Reached through the ``framebroker`` command (``framebroker record``, ``view``, ``snapshot``,
``read``, ``faces``, ``motion``): each module provides ``add_arguments(parser)`` and
``main(args) -> exit code``, and the command imports a module only when its command runs.

Packaging: the repository keeps this folder at the top, beside ``framebroker/``, to show that
the clients are users of the library, not part of it; it is installed as its own top-level
package, ``framebroker_clients`` (``pyproject.toml`` maps the name to ``clients/``). A separate
name is what keeps imports plain: were it installed inside the library (as
``framebroker_clients``), a source checkout's ``framebroker/`` folder in the current directory
would hide the installed one and its clients with it, and every child process would have to
edit ``sys.path`` to find them. ``framebroker_clients`` exists only where pip put it (a normal
install, or an editable one pointing at this folder), so ``python -m framebroker`` finds it from
any directory. Entry points per client were the other choice; they would add a plug-in mechanism
for six modules that ship with the library and are listed in one table (``CLIENT_COMMANDS`` in
``framebroker/cli.py``).

Clients import ``framebroker`` (the API in its ``__all__``), ``framebroker.arguments`` (argparse
types) and ``framebroker.testpattern``, and nothing private.
"""
