"""Where each key of a TOML text is: the line numbers that config errors name.

tomllib (and tomli before Python 3.11) return plain values with no positions, so ``KeyLines``
scans the text once more, after tomllib accepted it, for the table headers and the ``key =``
lines at the start of a statement. It skips strings (multi-line ones too), comments and the
insides of arrays and inline tables, so a line *inside* a value never passes for a key; a key it
cannot place (one inside an inline table) gets the line of the nearest enclosing key or table.
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Tuple, Union

# A path as in the parsed data: ("streams", "front", "fps"); an element of an array of tables is
# its index: ("streams", "front", "record", 0, "segment").
Path = Tuple[Union[str, int], ...]

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class KeyLines:
    """Line (1-based) of every table header and ``key =`` of a TOML text tomllib accepted.

    Paths are tuples as in the parsed data: ``("streams", "front", "fps")``; an element of an
    array of tables is its index: ``("streams", "front", "record", 0, "segment")``.
    """

    def __init__(self, text: str) -> None:
        self.lines: Dict[Path, int] = {}
        self._text = text
        self._scan()

    def line_of(self, path: Path) -> int:
        """The line of ``path``; for a table only deeper headers created (``[a.b]`` makes ``a``),
        the first of those; else the line of the nearest enclosing table or key."""
        if path in self.lines:
            return self.lines[path]
        inside = [line for known, line in self.lines.items() if known[: len(path)] == path]
        if inside:
            return min(inside)
        while path:
            path = path[:-1]
            if path in self.lines:
                return self.lines[path]
        return 0

    def _scan(self) -> None:
        text, pos, line = self._text, 0, 1
        table: Path = ()
        array_sizes: Dict[Path, int] = {}
        while pos < len(text):
            char = text[pos]
            if char == "\n":
                line += 1
                pos += 1
            elif char in " \t\r":
                pos += 1
            elif char == "#":
                pos = self._line_end(pos)
            elif char == "[":  # [table] or [[array.of.tables]]
                double = text.startswith("[[", pos)
                keys, pos = self._keys(pos + (2 if double else 1))
                if double:
                    index = array_sizes.get(keys, 0)
                    array_sizes[keys] = index + 1
                    self.lines.setdefault(keys, line)
                    table = keys + (index,)
                else:
                    table = keys
                self.lines[table] = line
                pos = self._line_end(pos)
            else:  # key = value
                keys, pos = self._keys(pos)
                self.lines.setdefault(table + keys, line)
                pos, line = self._skip_value(pos, line)

    def _line_end(self, pos: int) -> int:
        end = self._text.find("\n", pos)
        return len(self._text) if end < 0 else end

    def _keys(self, pos: int) -> Tuple[Path, int]:
        """A dotted key starting at ``pos``: its parts and the position after it."""
        text = self._text
        keys: List[str] = []
        while True:
            while pos < len(text) and text[pos] in " \t":
                pos += 1
            if text.startswith('"', pos):
                end = self._string_end(pos, '"')
                keys.append(json.loads(text[pos:end]))  # TOML's basic-string escapes are JSON's
                pos = end
            elif text.startswith("'", pos):
                end = self._string_end(pos, "'")
                keys.append(text[pos + 1 : end - 1])
                pos = end
            else:
                match = BARE_KEY.match(text, pos)
                if match is None:
                    break
                keys.append(match.group())
                pos = match.end()
            while pos < len(text) and text[pos] in " \t":
                pos += 1
            if not text.startswith(".", pos):
                break
            pos += 1
        return tuple(keys), pos

    def _string_end(self, pos: int, quote: str) -> int:
        """Position after the string that opens at ``pos`` with ``quote`` (1 or 3 characters)."""
        text = self._text
        search = pos + len(quote)
        while True:
            end = text.index(quote, search)
            if quote[0] == '"':  # a quote after an odd number of backslashes is escaped
                slashes = 0
                while text[end - 1 - slashes] == "\\":
                    slashes += 1
                if slashes % 2:
                    search = end + 1
                    continue
            if len(quote) == 1:
                return end + 1
            # Up to two quotes may end the content just before the closing three ("""say "hi"""""):
            # the delimiter is the last three of the run.
            run = 3
            while run < 5 and text.startswith(quote[0], end + run):
                run += 1
            return end + run

    def _skip_value(self, pos: int, line: int) -> Tuple[int, int]:
        """Past the value after ``=``: to the end of its (last) line, counting the lines it spans."""
        text, depth = self._text, 0
        while pos < len(text):
            char = text[pos]
            if char in "\"'":
                quote = char * 3 if text.startswith(char * 3, pos) else char
                end = self._string_end(pos, quote)
                line += text.count("\n", pos, end)
                pos = end
                continue
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
            elif char == "#":
                pos = self._line_end(pos)
                continue
            elif char == "\n":
                if depth <= 0:
                    return pos, line
                line += 1
            pos += 1
        return pos, line


__all__ = ["BARE_KEY", "KeyLines", "Path"]
