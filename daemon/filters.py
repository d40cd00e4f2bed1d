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


def parse_filter(text: str) -> Predicate:
    """Parse one containerd filter string into a predicate on envelopes."""
    if len(text) > MAX_FILTER_LEN:
        raise InvalidArgument("filter too long")
    selectors: list[_Selector] = []
    i, n = 0, len(text)

    def error(msg: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {text!r} at {i}: {msg}")

    while i < n:
        while i < n and text[i].isspace():
            i += 1
        parts: list[str] = []
        while True:
            if i < n and text[i] == '"':
                end = text.find('"', i + 1)
                if end < 0:
                    raise error("unterminated quoted field name")
                parts.append(text[i + 1 : end])
                i = end + 1
            else:
                start = i
                while i < n and (text[i].isalnum() or text[i] in "_-"):
                    i += 1
                parts.append(text[start:i])
            if not parts[-1]:
                raise error("expected a field name")
            if i < n and text[i] == ".":
                i += 1
                continue
            break
        while i < n and text[i].isspace():
            i += 1
        op, value, regex = "", "", None
        if text.startswith(("==", "!=", "~="), i):
            op = text[i : i + 2]
            i += 2
            while i < n and text[i].isspace():
                i += 1
            if i < n and text[i] in '"|':
                quote = text[i]
                i += 1
                chars = []
                while i < n and text[i] != quote:
                    # In |...| (regular expressions) only \| is an escape, so \d and
                    # friends reach the regex intact; in "..." a backslash escapes anything.
                    if text[i] == "\\" and i + 1 < n and (quote == '"' or text[i + 1] == "|"):
                        i += 1
                    chars.append(text[i])
                    i += 1
                if i >= n:
                    raise error("unterminated quoted value")
                i += 1
                value = "".join(chars)
            else:
                start = i
                while i < n and text[i] != "," and not text[i].isspace():
                    i += 1
                value = text[start:i]
            if op == "~=":
                regex = _compile(value, error)
        while i < n and text[i].isspace():
            i += 1
        if i < n:
            if text[i] != ",":
                raise error("expected ','")
            i += 1
        selectors.append(_Selector(tuple(parts), op, value, regex))
    if not selectors:
        return lambda envelope: True
    return lambda envelope: all(s.matches(envelope) for s in selectors)


def _compile(pattern: str, error: Callable[[str], InvalidArgument]) -> Any:
    import re2  # lazily: only `~=` filters need it (~8 ms of import)

    options = re2.Options()
    options.log_errors = False  # a client's typo is its error, not a line in berthd's log
    try:
        return re2.compile(pattern, options=options)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args else str(exc)
        raise error(f"bad regular expression: {detail[:200]}") from None


def parse_filters(filters: list[str]) -> Predicate:
    """OR of several filter strings; no filters match everything."""
    predicates = [parse_filter(f) for f in filters]
    if not predicates:
        return lambda envelope: True
    return lambda envelope: any(p(envelope) for p in predicates)
