"""The hot commands (`run`, `tasks exec`) read without argparse: importing it (and the
`re` and `gettext` it brings) and building a parser are ~6 ms of a ~15 ms CLI start.

A verb fills a `Recorder` with the same `add_argument` calls it makes on an argparse
parser, and `parse` reads the command line against what was recorded, for the plain
grammar those commands use: exact option names, each value as the next word, flags,
repeated options, a `type`, one-word positionals and a trailing REMAINDER. Anything else
(an abbreviated or bundled option, `--opt=value`, `--`, `-h`, a missing value or a
missing required option, a bad number) gives None, and argparse parses the line then,
with its own messages. tests/test_cli_args.py holds the two to the same result.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

REMAINDER = "..."  # argparse.REMAINDER's value: the verbs use this name, argparse or not


# -- argument types, which argparse and this reader both apply -------------------------
# A number the wire cannot carry (msgpack's int64), or a float socket timeouts refuse (nan,
# inf, negative, 1e300), passed argparse and failed later with a traceback or a misleading
# "connection unusable". Each type refuses it where it is parsed: argparse says why (exit 2,
# a usage error), and this reader, on any error of a type, leaves the line to argparse.

MAX_INT64 = 2**63 - 1
MAX_TIMEOUT = 86400.0  # seconds: a call that may wait longer than a day is a mistake
MAX_LEASE_SECONDS = 100 * 365 * 86400.0  # berthd keeps an expiry in int64 nanoseconds


def _refuse(message: str) -> Exception:
    """argparse's error for a bad value, which it prints as is (imported only here: the
    hot path never fails a type)."""
    import argparse

    return argparse.ArgumentTypeError(message)


def _number(text: str, kind: type[float] | type[int], low: float, high: float, what: str) -> Any:
    """`text` as a `kind` within [low, high] (nan is in no range), else argparse's error
    saying it is not `what`."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise _refuse(f"{text!r} is not {what}")
    return value


def timeout_seconds(text: str) -> float:
    """--timeout (and BERTH_TIMEOUT): a finite number of seconds > 0, at most a day."""
    what = f"a number of seconds > 0 and at most {MAX_TIMEOUT:g}"
    value: float = _number(text, float, 0.0, MAX_TIMEOUT, what)
    if value <= 0:
        raise _refuse(f"{text!r} is not {what}")
    return value


def lease_seconds(text: str) -> float:
    """A lease's lifetime: finite seconds >= 0 (0: it never expires), at most a century."""
    what = f"a number of seconds from 0 (never) to {MAX_LEASE_SECONDS:.0f}"
    value: float = _number(text, float, 0.0, MAX_LEASE_SECONDS, what)
    return value


def count(text: str) -> int:
    """A count, a size or a position: an integer >= 0 that the wire carries (int64)."""
    value: int = _number(text, int, 0, MAX_INT64, "a whole number >= 0 (at most 2^63-1)")
    return value


class Unsupported(Exception):
    """The verb declares something this reader does not do: argparse it is."""


class Argument:
    __slots__ = ("action", "default", "dest", "kind", "nargs", "required")

    def __init__(
        self,
        dest: str,
        action: str,
        default: Any,
        kind: Callable[[str], Any] | None,
        nargs: Any,
        required: bool,
    ) -> None:
        self.dest = dest
        self.action = action
        self.default = default
        self.kind = kind
        self.nargs = nargs
        self.required = required


class Recorder:
    """Takes the add_argument calls of an argparse parser (the subset the hot verbs use)."""

    formatter_class = None  # read by SubVerbs.parsers, passed back to add_parser

    def __init__(self) -> None:
        self.options: dict[str, Argument] = {}
        self.positionals: list[Argument] = []
        self.arguments: list[Argument] = []
        self.sub_dest: str | None = None
        self.subs: dict[str, Recorder] = {}

    def add_argument(self, *names: str, **options: Any) -> None:
        action = options.pop("action", "store")
        default = options.pop("default", None)
        kind = options.pop("type", None)
        nargs = options.pop("nargs", None)
        required = options.pop("required", False)
        dest = options.pop("dest", None)
        options.pop("metavar", None)
        options.pop("help", None)
        if options or action not in ("store", "store_true", "append"):
            raise Unsupported(f"{names}: {action} {sorted(options)}")
        if nargs not in (None, REMAINDER):
            raise Unsupported(f"{names}: nargs {nargs!r}")
        if names[0].startswith("-"):
            long = [n for n in names if n.startswith("--")]
            name = dest or (long[0] if long else names[0]).lstrip("-").replace("-", "_")
            if action == "store_true":
                default = False if default is None else default
            argument = Argument(name, action, default, kind, None, required)
            for option in names:
                self.options[option] = argument
        else:
            if action != "store" or kind is not None or dest is not None:
                raise Unsupported(f"positional {names}")
            argument = Argument(names[0], action, default, None, nargs, nargs != REMAINDER)
            self.positionals.append(argument)
        self.arguments.append(argument)

    def add_subparsers(self, dest: str, required: bool = False) -> Recorder:
        del required
        self.sub_dest = dest
        return self

    def add_parser(self, name: str, aliases: list[str] | None = None, **kwargs: Any) -> Recorder:
        del kwargs
        child = Recorder()
        for word in (name, *(aliases or [])):
            self.subs[word] = child
        return child


def parse(recorder: Recorder, words: list[str], into: dict[str, Any]) -> bool:
    """Fill `into` as argparse would fill its Namespace from `words`; False where this
    reader does not follow the line (argparse then parses it)."""
    if "--" in words:  # (argparse drops it, where it stands, from a REMAINDER too)
        return False
    given: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-") or word == "-":
            break
        argument = recorder.options.get(word)
        if argument is None:  # -h, --, --opt=value, -dt, an abbreviation, a typo
            return False
        if argument.action == "store_true":
            given[argument.dest] = True
            i += 1
            continue
        if i + 1 >= len(words) or words[i + 1].startswith("-"):
            return False  # (argparse: a missing value, or a negative number)
        value: Any = words[i + 1]
        if argument.kind is not None:
            try:
                value = argument.kind(value)
            except Exception:  # (argparse.ArgumentTypeError too) argparse says why
                return False
        if argument.action == "append":  # (onto a copy of the default, as argparse)
            given.setdefault(argument.dest, list(argument.default or [])).append(value)
        else:
            given[argument.dest] = value
        i += 2
    rest = words[i:]
    if recorder.sub_dest is not None:
        sub = recorder.subs.get(rest[0]) if rest else None
        if sub is None:
            return False
        into[recorder.sub_dest] = rest[0]
        return _settle(recorder, given, into) and parse(sub, rest[1:], into)
    for argument in recorder.positionals:
        if argument.nargs == REMAINDER:
            given[argument.dest] = rest
            rest = []
        elif not rest:
            return False  # a positional missing: argparse says so
        else:
            given[argument.dest] = rest.pop(0)
    if rest:
        return False
    return _settle(recorder, given, into)


def _settle(recorder: Recorder, given: dict[str, Any], into: dict[str, Any]) -> bool:
    """What was given, and the defaults of the rest (a fresh list for a repeated option,
    as argparse copies its default); False if a required option is missing."""
    for argument in recorder.arguments:
        if argument.dest in given:
            into[argument.dest] = given[argument.dest]
        elif argument.required:
            return False  # (a positional is always given here: parse checked it)
        elif argument.action == "append" and isinstance(argument.default, list):
            into[argument.dest] = list(argument.default)
        else:
            into[argument.dest] = argument.default
    return True


class Namespace:
    """What argparse.Namespace is to a verb: the parsed values as attributes."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
