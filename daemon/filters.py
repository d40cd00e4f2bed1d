"""containerd's filter syntax, shared by the event exchange and the gRPC front end.

    topic=="/tasks/exit"                  equality (also !=)
    namespace==moby,topic~=|^/tasks/|     comma = AND; ~= is a regular expression
    event.container_id==c1                fields of the object, by dotted path
    labels."com.example/role"==web        a quoted part holds dots and slashes
    topic                                 the field is present

Several filter strings are ORed. Pure functions, no trio: the front end imports this too.
One grammar and one matching, containerd's (its `filters` package), for every service:
event subscriptions (parse_event_filters) as the metadata services (parse_object_filters).

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


def _lookup(envelope: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    """A field as containerd's events answer for it (their generated Field methods): only
    a non-empty string is present; a number, a time, a flag or a whole map is not (so
    `event.pid` or `event.exit_status==3` match nothing, as on containerd)."""
    node: Any = envelope
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    if not isinstance(node, str) or not node:
        return False, None
    return True, node


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


# -- containerd's own grammar, for its gRPC services -------------------------------------
#
# berth-grpc's metadata services (containers, images, content, leases, snapshots) filter as
# containerd's do: its scanner and parser (a field is [A-Za-z0-9_]+ or a "quoted" name;
# blanks are skipped only before a token, so "a==b ,c" is refused; a value starting with
# `"`, `/` or `|` is quoted, the last two only after ~=; Go's escapes), and its matching:
# each object answers for the fields it has through an adaptor ((value, present) for a
# field path), `!=` compares the value an absent field reads as (""), `~=` matches that
# value too, and a regular expression that does not compile matches nothing (containerd
# compiles it lazily, at the first match, and logs the error).

Adaptor = Callable[[Any, tuple[str, ...]], tuple[str, bool]]
ObjectPredicate = Callable[[Any], bool]

_SEPARATORS = ",."
_OPERATORS = "=!~"
_QUOTES = '"/|'
_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def map_field(mapping: dict[str, str] | None, rest: tuple[str, ...]) -> tuple[str, bool]:
    """A field path into a map of strings (labels, annotations): its remaining parts
    joined by dots name one key (`labels.a.b` is the label "a.b"); an empty map has none."""
    if not mapping:
        return "", False
    key = ".".join(rest)
    return (mapping[key], True) if key in mapping else ("", False)


def _is_field_char(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


class _GoScanner:
    """containerd's filter scanner: tokens of kind "field", "value", "quoted", "sep",
    "op", "eof" or "other" (any other character)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.value_next = False  # an operator was just read: a value comes

    def error(self, message: str, pos: int | None = None) -> InvalidArgument:
        at = self.pos if pos is None else pos
        return InvalidArgument(f"filters: parse error: [{self.text}] at {at}: {message}")

    def peek(self) -> str:
        """The next character as it is, blanks included ("" at the end)."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _run(self, start: int, accept: Callable[[str], bool]) -> int:
        end = start
        while end < len(self.text) and accept(self.text[end]):
            end += 1
        return end

    def scan(self) -> tuple[str, str, int]:
        """(kind, text, position) of the next token, blanks before it skipped."""
        self.pos = self._run(self.pos, str.isspace)
        start = self.pos
        if start >= len(self.text):
            return "eof", "", start
        ch = self.text[start]
        if ch == "\0":
            raise self.error("unexpected null", start)
        if ch in _QUOTES:
            end = start + 1
            while end < len(self.text) and self.text[end] != ch:
                if self.text[end] == "\n":
                    break
                end += 2 if self.text[end] == "\\" else 1
            if end >= len(self.text) or self.text[end] != ch:
                raise self.error("quoted literal not terminated", start)
            self.pos = end + 1
            return "quoted", self.text[start : self.pos], start
        if ch in _SEPARATORS:
            self.value_next = False
            self.pos = start + 1
            return "sep", ch, start
        if ch in _OPERATORS:
            self.pos = self._run(start, lambda c: c in _OPERATORS)
            self.value_next = True
            return "op", self.text[start : self.pos], start
        if self.value_next:
            self.pos = self._run(start, lambda c: c != "," and not c.isspace() and c.isprintable())
            self.value_next = False
            return "value", self.text[start : self.pos], start
        if _is_field_char(ch):
            self.pos = self._run(start, _is_field_char)
            return "field", self.text[start : self.pos], start
        self.pos = start + 1
        return "other", ch, start


def _go_unquote(token: str, alternatives: bool, error: Callable[[str], InvalidArgument]) -> str:
    """A quoted token's text, as containerd unquotes it (Go's escapes; `/` and `|` quote
    only where `alternatives` allows, after ~=)."""
    quote = token[0]
    if not alternatives and quote != '"':
        raise error("invalid quote encountered")
    body = token[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == quote:
            raise error("unquoting failed: quote syntax error")
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        escaped, i = _go_escape(body, i + 1, quote)
        if escaped is None:
            raise error("unquoting failed: quote syntax error")
        out.append(escaped)
    return "".join(out)


_HEX = frozenset("0123456789abcdefABCDEF")
_OCTAL = frozenset("01234567")


def _go_escape(body: str, i: int, quote: str) -> tuple[str | None, int]:
    """The character an escape at body[i] (after its backslash) stands for, and where the
    text goes on; None for an escape Go refuses."""
    esc = body[i] if i < len(body) else ""
    i += 1
    if esc in _GO_ESCAPES:
        return _GO_ESCAPES[esc], i
    if esc and esc in ("\\", quote):
        return esc, i
    if esc in _HEX_DIGITS:
        digits = body[i : i + _HEX_DIGITS[esc]]
        if len(digits) < _HEX_DIGITS[esc] or not set(digits) <= _HEX:
            return None, i
        value = int(digits, 16)
        return (chr(value) if value <= 0x10FFFF else None), i + len(digits)
    if esc and esc in _OCTAL:
        digits = esc + body[i : i + 2]
        if len(digits) < 3 or not set(digits) <= _OCTAL or int(digits, 8) > 255:
            return None, i
        return chr(int(digits, 8)), i + 2
    return None, i


@dataclass(frozen=True)
class _GoSelector:
    path: tuple[str, ...]
    op: str
    value: str
    regex: Any  # a compiled pattern; None for a pattern that did not compile

    def matches(self, obj: Any, adapt: Adaptor) -> bool:
        value, present = adapt(obj, self.path)
        if self.op == "":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return value != self.value
        return self.regex is not None and self.regex.search(value) is not None


class _GoParser:
    def __init__(self, text: str, *, refuse_bad_regex: bool = False) -> None:
        self.scanner = _GoScanner(text)
        self.refuse_bad_regex = refuse_bad_regex

    def selectors(self) -> list[_GoSelector]:
        found = [self.selector()]
        while True:
            ch = self.scanner.peek()
            if ch == "":
                return found
            if ch != ",":
                raise self.scanner.error(f"unexpected input: {ch}")
            self.scanner.scan()
            found.append(self.selector())

    def selector(self) -> _GoSelector:
        path = self.fieldpath()
        if self.scanner.peek() in (",", ""):
            return _GoSelector(path, "", "", None)
        kind, op, pos = self.scanner.scan()
        if kind != "op":
            raise self.scanner.error('expected an operator ("=="|"!="|"~=")', pos)
        if op not in ("==", "!=", "~="):
            raise self.scanner.error(f"unsupported operator {op!r}", pos)
        kind, text, pos = self.scanner.scan()
        if kind in ("value", "field"):
            value = text
        elif kind == "quoted":
            value = _go_unquote(text, op == "~=", lambda m: self.scanner.error(m, pos))
        else:
            raise self.scanner.error("expected value or quoted", pos)
        regex = None
        if op == "~=":
            if self.refuse_bad_regex:
                regex = _compile(value, lambda m: self.scanner.error(m, pos))
            else:
                regex = _compile_or_none(value)
        return _GoSelector(path, op, value, regex)

    def fieldpath(self) -> tuple[str, ...]:
        path = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            path.append(self.field())
        return tuple(path)

    def field(self) -> str:
        kind, text, pos = self.scanner.scan()
        if kind == "field":
            return text
        if kind == "quoted":
            return _go_unquote(text, False, lambda m: self.scanner.error(m, pos))
        raise self.scanner.error("expected field or quoted", pos)


def _compile_or_none(pattern: str) -> Any:
    """A `~=` pattern compiled, or None where containerd's would not compile (it then
    matches nothing). Bounded as _compile's are."""
    if len(pattern) > MAX_PATTERN:
        raise InvalidArgument(f"regular expression longer than {MAX_PATTERN} characters")
    try:
        return _compile(pattern, InvalidArgument)
    except InvalidArgument:
        return None


def parse_object_filters(
    filters: list[str], adapt: Adaptor, *, refuse_bad_regex: bool = False
) -> ObjectPredicate:
    """containerd's filters for one kind of object (its `adapt`or): the OR of the filter
    strings, each an AND of selectors; an empty string, or none at all, matches all.
    `refuse_bad_regex`: a `~=` pattern that does not compile is InvalidArgument (event
    subscriptions: a subscriber's typo is told, not a stream that never matches)."""
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"more than {MAX_FILTERS} filters")
    if sum(len(f) for f in filters) > MAX_FILTERS_TOTAL:
        raise InvalidArgument(f"filters longer than {MAX_FILTERS_TOTAL} characters together")
    if not filters or any(f == "" for f in filters):
        return lambda obj: True
    alternatives = []
    for text in filters:
        if len(text) > MAX_FILTER_LEN:
            raise InvalidArgument("filter too long")
        alternatives.append(_GoParser(text, refuse_bad_regex=refuse_bad_regex).selectors())
    return lambda obj: any(all(s.matches(obj, adapt) for s in sel) for sel in alternatives)


def adapt_envelope(envelope: Any, path: tuple[str, ...]) -> tuple[str, bool]:
    """containerd's Envelope.Field: `namespace`, `topic`, `event.<field>` (see _lookup)."""
    present, value = _lookup(envelope, path)
    return (value, True) if present else ("", False)


def parse_event_filters(filters: list[str]) -> Predicate:
    """Event subscriptions' filters, in containerd's grammar and with its matching (as
    its other services' filters: `topic==/tasks/exit` unquoted is refused, `!=` and `~=`
    read an absent field as ""); a bad regular expression is refused here."""
    return parse_object_filters(filters, adapt_envelope, refuse_bad_regex=True)


def adapt_mapping(obj: Any, path: tuple[str, ...]) -> tuple[str, bool]:
    """A plain map's string fields (introspection's plugin type and id)."""
    value = obj.get(path[0]) if len(path) == 1 and isinstance(obj, dict) else None
    return (value, True) if isinstance(value, str) and value else ("", False)
