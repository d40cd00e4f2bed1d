"""Sub-verb tables: a verb's sub-verbs by name and alias, each run by its own small function
(a table, where an if-chain grows with every sub-verb), and their parsers built lazily."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any

    from berth.daemon.cli.session import Session

    Command = Callable[[Session, argparse.Namespace], int]

    from typing import Protocol

    class Arguments(Protocol):
        """A sub-verb's parser as the code that fills it sees it: an ArgumentParser, or
        the stand-in for a sub-verb this start does not run."""

        def add_argument(self, *args: Any, **kwargs: Any) -> Any: ...


class _Unused:
    """Stands in for a sub-parser this invocation does not need."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        return None


_UNUSED = _Unused()


class SubVerbs:
    """One verb's table: sub-verb name and aliases -> the function that runs it.

    `dest` is the attribute of the parsed arguments that names the sub-verb (argparse
    shows it in "the following arguments are required: DEST")."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self._commands: dict[str, Command] = {}
        self._aliases: dict[str, list[str]] = {}

    def __call__(self, name: str, *aliases: str) -> Callable[[Command], Command]:
        """A decorator: the function runs sub-verb `name`, also called by `aliases`."""

        def register(command: Command) -> Command:
            self._aliases[name] = list(aliases)
            for word in (name, *aliases):
                self._commands[word] = command
            return command

        return register

    def parsers(
        self, parser: argparse.ArgumentParser, wanted: str | None
    ) -> Callable[..., Arguments]:
        """Add the sub-verbs to `parser`; returns `add(name, **kwargs)`, which builds the
        parser of sub-verb `name` (with its aliases from the table) only if it is the one
        `wanted`, or all of them when `wanted` is None or no sub-verb (every choice, for
        the help or the error): building all of them costs milliseconds of every start,
        their gettext lookups."""
        sub = parser.add_subparsers(dest=self.dest, required=True)
        every = wanted not in self._commands

        def add(name: str, **kwargs: Any) -> Arguments:
            aliases = self._aliases[name]
            if every or wanted == name or wanted in aliases:
                kwargs.setdefault("formatter_class", parser.formatter_class)
                return sub.add_parser(name, aliases=aliases, **kwargs)
            return _UNUSED

        return add

    def run(self, session: Session, args: argparse.Namespace) -> int:
        return self._commands[getattr(args, self.dest)](session, args)
