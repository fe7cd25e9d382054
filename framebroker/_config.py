"""The config file of ``framebroker up``: one TOML file that mirrors the command line.

    [streams.front]          # framebroker serve csi://0 --name front --fps 30
    source = "csi://0"
    fps = 30

    [streams.front.record]   # framebroker record front --segment 60 --dir /var/lib/fb/front
    segment = 60
    dir = "/var/lib/fb/front"

Each ``[streams.NAME]`` table becomes the arguments of ``framebroker serve`` (its long options as
keys, ``-`` written ``_``, the SOURCE as ``source``), and each of its sub-tables named after a
command that reads a stream (``record``, ``view``, ``bridge``, ...) the arguments of that command
for stream NAME. ``[[streams.NAME.record]]`` (an array of tables) runs several of one kind.

How it stays a mirror: nothing here knows any command's options. The command's own argparse
parser (``cli.build_parser``) lists them and judges the values: one key at a time, so that an
error names its key and line, then all of a table together (options that exclude each other);
then whatever the command checks beyond its parser without starting anything (``cli.build_daemon``
for serve, a client module's ``check_arguments(args)``). An option added to a command is a key
here the day it exists; a command or option the product documents but this version lacks is
named as such (``LATER``). Relative paths in the file are relative to the file's directory: the
checks and the supervised children run there.

Line numbers come from ``KeyLines`` (``_toml_lines.py``): tomllib gives none.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ._errors import FrameBrokerError
from ._layout import validate_stream_name
from ._redact import redact
from ._toml_lines import BARE_KEY, KeyLines, Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, published as a package before it joined the standard library
    import tomli as tomllib

# The commands a stream's sub-table may name: they read one stream (their NAME) until stopped.
SECTION_COMMANDS = ("record", "view", "bridge", "read", "faces", "motion")

# What the product documents but a version may not have yet, so that --check says "not in this
# version" instead of "unknown": commands, and serve's options (as keys).
LATER = {
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the file: where (line 0: the file as a whole) and what to do."""

    line: int
    where: str
    message: str


class ConfigError(ValueError):
    """The file cannot be run as it is; ``problems`` says each thing wrong, with its line."""

    def __init__(self, path: str, problems: List[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(self.describe())

    def describe(self) -> str:
        shown = os.path.relpath(self.path) if not os.path.relpath(self.path).startswith("..") else self.path
        lines = [f"{len(self.problems)} problems in the config file:"] if len(self.problems) > 1 else []
        for problem in self.problems:
            where = f"{problem.where}: " if problem.where else ""
            lines.append(f"{shown}:{problem.line}: {where}{problem.message}" if problem.line else f"{shown}: {where}{problem.message}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ChildSpec:
    """One process ``framebroker up`` runs: ``framebroker ARGV...`` in the file's directory.

    Two specs are equal when they would run the same command: where it is written (``line``)
    does not count, so a comment added above it changes nothing on a reload.
    """

    name: str  # "front/serve", "front/record", "front/record#2" (array of tables)
    stream: str
    command: str
    argv: Tuple[str, ...]
    line: int = field(default=0, compare=False)

    @property
    def is_daemon(self) -> bool:
        return self.command == "serve"

    def display(self) -> str:
        """The command line with credentials hidden: the only form that may be shown."""
        return " ".join(shlex.quote(redact(argument)) for argument in ("framebroker",) + self.argv)


@dataclass
class Config:
    """A checked config file: what to run, in order (each stream's daemon, then its readers)."""

    path: str
    directory: str
    children: List[ChildSpec]
    groups: List[str]  # the --group of the streams: the service's user must be in them

    @property
    def streams(self) -> List[str]:
        return [child.stream for child in self.children if child.is_daemon]


def load_config(path: str) -> Config:
    """Read and check the file at ``path``; ConfigError lists every problem with its line."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise ConfigError(path, [Problem(0, "", "no such file: give the path of a TOML config file (see docs/)")]) from None
    except IsADirectoryError:
        raise ConfigError(path, [Problem(0, "", "is a directory: give the path of a TOML config file")]) from None
    except OSError as exc:
        raise ConfigError(path, [Problem(0, "", f"cannot read it: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [Problem(0, "", f"not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8")]) from None
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        message = f"not valid TOML: {exc} (strings need quotes, tables are [streams.NAME]; see the examples in docs/)"
        raise ConfigError(path, [Problem(int(found.group(1)) if found else 0, "", message)]) from None
    return _Checker(path, KeyLines(text)).check(data)


# --- checking ---------------------------------------------------------------------------------------


class _ParseFailed(Exception):
    """What a command's parser would have printed before exiting with code 2."""


@contextlib.contextmanager
def _working_directory(directory: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


def _toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else json.dumps(key)


def _dotted(path: Path) -> str:
    return ".".join(f"[{part}]" if isinstance(part, int) else _toml_key(part) for part in path).replace(".[", "[")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(redact(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{...}"
    return str(value)


def _closest(word: str, choices: List[str]) -> str:
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {found[0]}?)" if found else ""


def _is_section(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value))


def _command_parsers() -> Dict[str, argparse.ArgumentParser]:
    """Every command's parser, from the real ``framebroker`` parser."""
    from .cli import build_parser

    for action in build_parser()._actions:  # argparse offers no public way to list sub-commands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the framebroker parser has no commands")


class _CommandOptions:
    """What one command's parser accepts, by config key."""

    def __init__(self, command: str, parser: argparse.ArgumentParser) -> None:
        self.command = command
        complete = getattr(parser, "complete", None)
        self.parser = complete() if complete is not None else parser

        def refuse(message: str) -> None:
            raise _ParseFailed(message)

        # The instance attribute wins over the method, which would print usage and exit.
        self.parser.error = refuse  # type: ignore[method-assign]
        self.by_key: Dict[str, argparse.Action] = {}
        self.positionals: List[argparse.Action] = []
        self.flags: Dict[str, argparse.Action] = {}  # "-o", "--output" -> action
        for action in self.parser._actions:  # the parser's own list; argparse has no public one
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if not action.option_strings:
                self.positionals.append(action)
                continue
            for flag in action.option_strings:
                self.flags[flag] = action
                if flag.startswith("--"):
                    self.by_key.setdefault(flag[2:].replace("-", "_"), action)

    def key_of(self, action: argparse.Action) -> str:
        return next(flag[2:].replace("-", "_") for flag in action.option_strings if flag.startswith("--"))

    def keys(self) -> List[str]:
        shown = [action.dest if action.dest != "name" else "" for action in self.positionals]
        shown += [key for key, action in self.by_key.items() if action.help != argparse.SUPPRESS and key != "name"]
        return [key for key in dict.fromkeys(shown) if key]

    def parse(self, argv: List[str]) -> argparse.Namespace:
        return self.parser.parse_args(argv)


class _BadValue(Exception):
    pass


def _words(value: Any, flag: str) -> str:
    if isinstance(value, bool):
        raise _BadValue(f"{flag} takes a value, not {'true' if value else 'false'}")
    if isinstance(value, (dict, list)):
        raise _BadValue(f"{flag} takes a single value here, not {'a table' if isinstance(value, dict) else 'a list'}")
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    raise _BadValue(f"{flag} takes a string or a number, not a {type(value).__name__} (quote it)")


def _option_words(key: str, action: argparse.Action, value: Any) -> List[str]:
    """The argv words for one key = value, as the command line would have them."""
    flag = next(f for f in action.option_strings if f.startswith("--"))
    if action.nargs == 0:  # a switch: store_true and friends
        if value is True:
            return [flag]
        if value is False:
            return []
        raise _BadValue(f"{flag} is a switch: write {key} = true (or leave the key out)")
    if value is True and action.nargs == "?":
        return [flag]
    if isinstance(value, bool):
        meaning = f" ({action.help})" if action.help and action.help != argparse.SUPPRESS else ""
        raise _BadValue(f"{flag} takes a value{meaning}, not {'true' if value else 'false'}")
    if isinstance(value, list):
        words = [_words(item, flag) for item in value]
        if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):  # repeatable
            return [f"{flag}={word}" for word in words]
        if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
            return [flag, *words]
        if len(words) == 1:
            return [f"{flag}={words[0]}"]
        raise _BadValue(
            f"{flag} takes one value in this version of framebroker, not a list of {len(words)}: "
            f"write {key} = {_toml_value(value[0])}"
        )
    # "--fps=-5", not "--fps -5": a value that starts with "-" must not pass for an option.
    return [f"{flag}={_words(value, flag)}"]


_OPTION_MENTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


class _Checker:
    """Turns parsed TOML into ChildSpecs, collecting every problem instead of stopping at one."""

    def __init__(self, path: str, lines: KeyLines) -> None:
        self.path = path
        self.directory = os.path.dirname(path)
        self.lines = lines
        self.problems: List[Problem] = []
        self._parsers: Optional[Dict[str, argparse.ArgumentParser]] = None
        self._options: Dict[str, _CommandOptions] = {}

    def problem(self, path: Path, message: str, where: str = "") -> None:
        self.problems.append(Problem(self.lines.line_of(path), where or _dotted(path), message))

    def options(self, command: str) -> Optional[_CommandOptions]:
        if self._parsers is None:
            self._parsers = _command_parsers()
        if command not in self._options:
            parser = self._parsers.get(command)
            if parser is None:
                return None
            self._options[command] = _CommandOptions(command, parser)
        return self._options[command]

    def check(self, data: Dict[str, Any]) -> Config:
        children: List[ChildSpec] = []
        groups: List[str] = []
        for key in data:
            if key != "streams":
                self.problem((key,), f"unknown key: a config file holds [streams.NAME] tables only{_closest(key, ['streams'])}")
        streams = data.get("streams")
        example = 'declare one: [streams.cam0] with source = "test://" under it'
        if streams is None or streams == {}:
            self.problems.append(Problem(0, "", f"no streams, nothing to run: {example}"))
        elif not isinstance(streams, dict):
            self.problem(("streams",), f"must be tables, one per stream: {example}")
        else:
            for name, table in streams.items():
                if not isinstance(table, dict):
                    self.problem(("streams", name), f"a stream is a table: write [streams.{_toml_key(name)}] and its keys (source = ...) under it")
                    continue
                self._stream(name, table, children, groups)
        if self.problems:
            raise ConfigError(self.path, sorted(self.problems, key=lambda problem: problem.line))
        return Config(self.path, self.directory, children, groups)

    def _stream(self, name: str, table: Dict[str, Any], children: List[ChildSpec], groups: List[str]) -> None:
        path: Path = ("streams", name)
        header = f"[{_dotted(path)}]"
        try:
            validate_stream_name(name)
        except ValueError as exc:
            self.problem(path, str(exc), header)
            return
        options = {key: value for key, value in table.items() if not _is_section(value)}
        serve = self._command(path, "serve", name, options)
        if serve is not None:
            spec, args = serve
            children.append(spec)
            group = getattr(args, "group", None)
            if group and group not in groups:
                groups.append(group)
        for key, value in table.items():
            if not _is_section(value):
                continue
            entries = [value] if isinstance(value, dict) else list(value)
            for index, entry in enumerate(entries):
                section: Path = path + (key,) + (() if isinstance(value, dict) else (index,))
                if not self._section_known(section, key):
                    continue
                suffix = "" if isinstance(value, dict) else f"#{index + 1}"
                reader = self._command(section, key, name, entry, child_name=f"{name}/{key}{suffix}")
                if reader is not None:
                    children.append(reader[0])

    def _section_known(self, path: Path, command: str) -> bool:
        header = f"[{_dotted(path)}]"
        stream_header = f"[{_dotted(path[:2])}]"
        if command == "serve":
            self.problem(path, f"serve's options go in {stream_header} itself: move these keys there", header)
            return False
        if command not in SECTION_COMMANDS:
            known = [name for name in SECTION_COMMANDS if self.options(name) is not None]
            self.problem(
                path,
                f"unknown section: a stream's sub-tables name a command that reads it ({', '.join(known)})"
                f"{_closest(command, list(SECTION_COMMANDS))}",
                header,
            )
            return False
        if self.options(command) is None:
            self.problem(path, f"{self._lacks(f'the {command} command', command)}: remove the section or upgrade framebroker", header)
            return False
        return True

    @staticmethod
    def _lacks(what: str, name: str) -> str:
        from . import __version__

        later = f", which a later version adds ({LATER[name]})" if name in LATER else ""
        return f"framebroker {__version__} lacks {what}{later}"

    def _command(
        self, path: Path, command: str, stream: str, table: Dict[str, Any], child_name: str = ""
    ) -> Optional[Tuple[ChildSpec, argparse.Namespace]]:
        """Check one table against ``command``'s parser; the child it declares, or None."""
        options = self.options(command)
        assert options is not None
        header = f"[{_dotted(path)}]"
        before = len(self.problems)
        # The stream's name comes from the table: NAME for a reader, --name for serve.
        positional_words: List[str] = []
        used = {"name"}
        for action in options.positionals:
            if action.dest == "name":
                positional_words.append(stream)
            elif action.dest in table:
                used.add(action.dest)
                try:
                    positional_words.append(_words(table[action.dest], action.dest))
                except _BadValue as exc:
                    self.problem(path + (action.dest,), str(exc))
            elif action.nargs not in ("?", "*"):
                metavar = action.metavar or action.dest.upper()
                hint = ' (for example source = "test://", "/dev/video0" or "csi://0")' if action.dest == "source" else ""
                self.problem(path, f"no {action.dest}: {command} needs its {metavar}: add {action.dest} = ...{hint}", header)
        complete = len(self.problems) == before  # without its positionals, no key can be parsed
        fixed = ["--name=" + stream] if "--name" in options.flags else []
        base = [*positional_words, *fixed]
        if "name" in table:
            self.problem(path + ("name",), f"the stream's name is its table's: [streams.{_toml_key(stream)}]; remove name")
        words: List[str] = []
        for key, value in table.items():
            if key in used:
                continue
            action = options.by_key.get(key)
            if action is None:
                self._unknown_key(path + (key,), key, options)
                continue
            try:
                key_words = _option_words(key, action, value)
            except _BadValue as exc:
                self.problem(path + (key,), str(exc), f"{_dotted(path + (key,))} = {_toml_value(value)}")
                continue
            if not complete:
                continue
            try:
                options.parse(base + key_words)
            except _ParseFailed as exc:
                self.problem(path + (key,), _without_argument_prefix(str(exc)), f"{_dotted(path + (key,))} = {_toml_value(value)}")
                continue
            words += key_words
        if len(self.problems) > before:
            return None
        try:
            args = options.parse(base + words)
        except _ParseFailed as exc:  # options that exclude each other, a missing required one
            self._blame(path, table, options, str(exc))
            return None
        if not self._meaning_checked(path, table, options, args):
            return None
        argv = (command, *base, *words)
        return ChildSpec(child_name or f"{stream}/{command}", stream, command, argv, self.lines.line_of(path)), args

    def _unknown_key(self, path: Path, key: str, options: _CommandOptions) -> None:
        command, flag = options.command, f"--{key.replace('_', '-')}"
        if command == "serve" and key in LATER:
            self.problem(path, f"{self._lacks(f'serve {flag}', key)}: remove the key or upgrade framebroker")
            return
        elsewhere = ""
        if command == "serve":
            readers = [name for name in SECTION_COMMANDS if self.options(name) is not None and key in self.options(name).by_key]  # type: ignore[union-attr]
            if readers:
                elsewhere = f" ({flag} is {readers[0]}'s: put it under [{_dotted(path[:-1] + (readers[0],))}])"
        keys = options.keys()
        self.problem(
            path,
            f"unknown key: {command} has no {flag}{elsewhere}{_closest(key, keys)}. "
            f"The keys of this table are {command}'s options: {', '.join(keys)}",
        )

    def _meaning_checked(self, path: Path, table: Dict[str, Any], options: _CommandOptions, args: argparse.Namespace) -> bool:
        """What the command checks beyond its parser (a missing file, a bad source URI)."""
        from .cli import UsageError, build_daemon, load_client

        try:
            with _working_directory(self.directory):
                if options.command == "serve":
                    build_daemon(args)
                elif getattr(args, "client_module", None):
                    check = getattr(load_client(args.client_module), "check_arguments", None)
                    if check is not None:
                        check(args)
        except (UsageError, ValueError, TypeError, FrameBrokerError) as exc:
            self._blame(path, table, options, str(exc))
            return False
        return True

    def _blame(self, path: Path, table: Dict[str, Any], options: _CommandOptions, message: str) -> None:
        """Report ``message`` at the key it is about: the first option it names that the table
        sets, else the first key whose value it quotes, else the table itself."""
        message = _without_argument_prefix(message)
        for flag in _OPTION_MENTION.findall(message):
            action = options.flags.get(flag)
            key = options.key_of(action) if action is not None and action.option_strings else ""
            if key in table:
                self.problem(path + (key,), message, f"{_dotted(path + (key,))} = {_toml_value(table[key])}")
                return
        for key, value in table.items():
            # The message may show the value (or one of a list's) with its credentials hidden, as
            # everything shown does.
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and len(item) > 1 and (item in message or redact(item) in message):
                    self.problem(path + (key,), message, f"{_dotted(path + (key,))} = {_toml_value(value)}")
                    return
        self.problem(path, message, f"[{_dotted(path)}]")


def _without_argument_prefix(message: str) -> str:
    """argparse's "argument --fps: --fps must be ..." without the first, repeated, part."""
    found = re.match(r"argument (\S+?): (.*)", message, re.DOTALL)
    if found is None:
        return message
    flag, rest = found.groups()
    return rest if any(part in rest for part in flag.split("/")) else f"{flag}: {rest}"


__all__ = ["ChildSpec", "Config", "ConfigError", "Problem", "load_config"]
