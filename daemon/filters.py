"""containerd's filter syntax, shared by the event exchange and the gRPC front end.

    topic=="/tasks/exit"                  equality (also !=)
    namespace==moby,topic~=|^/tasks/|     comma = AND; ~= is a regular expression
    event.container_id==c1                fields of the object, by dotted path
    labels."com.example/role"==web        a quoted part holds dots and slashes
    topic                                 the field is present

Several filter strings are ORed. Pure functions, no trio: the front end imports this too.

`~=` is matched with RE2 (google-re2), as containerd matches it with Go's regexp (RE2
syntax): linear time whatever the pattern. A backtracking engine would let one subscriber's
`(a|a)*$` run for ever inside berthd's event loop on every publish (a daemon-wide hang), and
Python's `re` parser recurses on nested groups (1,000 `(` raised RecursionError).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from berth.shim.wire.errors import InvalidArgument

MAX_FILTER_LEN = 4096
MAX_FILTERS = 64  # filter strings in one request (each `~=` is compiled on the loop)
MAX_FILTERS_TOTAL = 16 * 1024  # their bytes together
MAX_PATTERN = 1024  # characters of one `~=` pattern
REGEX_MEMORY = 1 << 20  # RE2's budget for one compiled pattern (its default is 8 MiB)

Predicate = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class _Selector:
    path: tuple[str, ...]
    op: str  # "", "==", "!=", "~="
    value: str
    regex: Any  # a compiled re2 pattern

    def matches(self, envelope: dict[str, Any]) -> bool:
        present, value = _lookup(envelope, self.path)
        if self.op == "":
            return present
        text = "" if value is None else str(value)
        if self.op == "==":
            return present and text == self.value
        if self.op == "!=":
            return not present or text != self.value
        assert self.regex is not None
        return present and self.regex.search(text) is not None


def _lookup(envelope: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = envelope
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


class _Scanner:
    """The filter's characters, consumed left to right; errors name the position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {self.text!r} at {self.pos}: {message}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_spaces(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def accept(self, token: str) -> bool:
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def field_part(self) -> str:
        """One part of a dotted field name: a word, or "a quoted part" (dots and slashes)."""
        if self.accept('"'):
            end = self.text.find('"', self.pos)
            if end < 0:
                raise self.error("unterminated quoted field name")
            part, self.pos = self.text[self.pos : end], end + 1
        else:
            start = self.pos
            while self.peek().isalnum() or self.peek() in ("_", "-"):
                self.pos += 1
            part = self.text[start : self.pos]
        if not part:
            raise self.error("expected a field name")
        return part

    def quoted_value(self, quote: str) -> str:
        r"""A value in "..." (a backslash escapes anything) or |...| (only \| is an escape,
        so \d and friends reach a regular expression intact)."""
        chars = []
        while not self.at_end() and self.peek() != quote:
            if self.peek() == "\\" and self.pos + 1 < len(self.text):
                following = self.text[self.pos + 1]
                if quote == '"' or following == "|":
                    self.pos += 1
            chars.append(self.peek())
            self.pos += 1
        if not self.accept(quote):
            raise self.error("unterminated quoted value")
        return "".join(chars)

    def bare_value(self) -> str:
        start = self.pos
        while not self.at_end() and self.peek() != "," and not self.peek().isspace():
            self.pos += 1
        return self.text[start : self.pos]


def _selector(scanner: _Scanner) -> _Selector:
    """field[.field...] [op value]"""
    path = [scanner.field_part()]
    while scanner.accept("."):
        path.append(scanner.field_part())
    scanner.skip_spaces()
    op, value, regex = "", "", None
    for candidate in ("==", "!=", "~="):
        if scanner.accept(candidate):
            op = candidate
            break
    if op:
        scanner.skip_spaces()
        quote = scanner.peek()
        if quote in ('"', "|"):
            scanner.pos += 1
            value = scanner.quoted_value(quote)
        else:
            value = scanner.bare_value()
        if op == "~=":
            regex = _compile(value, scanner.error)
    return _Selector(tuple(path), op, value, regex)


def parse_filter(text: str) -> Predicate:
    """Parse one containerd filter string (selectors joined by commas: AND) into a
    predicate on envelopes."""
    if len(text) > MAX_FILTER_LEN:
        raise InvalidArgument("filter too long")
    scanner = _Scanner(text)
    selectors: list[_Selector] = []
    scanner.skip_spaces()
    while not scanner.at_end():
        selectors.append(_selector(scanner))
        scanner.skip_spaces()
        if not scanner.at_end() and not scanner.accept(","):
            raise scanner.error("expected ','")
        scanner.skip_spaces()
    if not selectors:
        return lambda envelope: True
    return lambda envelope: all(s.matches(envelope) for s in selectors)


def _compile(pattern: str, error: Callable[[str], InvalidArgument]) -> Any:
    import re2  # lazily: only `~=` filters need it (~8 ms of import)

    if len(pattern) > MAX_PATTERN:
        raise error(f"regular expression longer than {MAX_PATTERN} characters")
    options = re2.Options()
    options.log_errors = False  # a client's typo is its error, not a line in berthd's log
    # measured: one 326-byte pattern of \p{L} classes took 200 ms and 6.5 MiB to compile;
    # past its budget RE2 refuses the pattern instead of growing
    options.max_mem = REGEX_MEMORY
    try:
        return re2.compile(pattern, options=options)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args else str(exc)
        raise error(f"bad regular expression: {detail[:200]}") from None


def parse_filters(filters: list[str]) -> Predicate:
    """OR of several filter strings; no filters match everything."""
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"more than {MAX_FILTERS} filters")
    if sum(len(f) for f in filters) > MAX_FILTERS_TOTAL:
        raise InvalidArgument(f"filters longer than {MAX_FILTERS_TOTAL} characters together")
    predicates = [parse_filter(f) for f in filters]
    if not predicates:
        return lambda envelope: True
    return lambda envelope: any(p(envelope) for p in predicates)
