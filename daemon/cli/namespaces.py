"""`berth namespaces` (alias ns): list, create and remove namespaces."""

from __future__ import annotations

from berth.daemon.cli.output import add_listing, print_listing
from berth.daemon.cli.subverbs import SubVerbs
from berth.daemon.paging import all_pages

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session

NAMESPACES = SubVerbs("ns_cmd")


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    add = NAMESPACES.parsers(parser, wanted)
    add_listing(add("ls"))
    add("create").add_argument("name")
    add("rm").add_argument("names", nargs="+")


def run(session: Session, args: argparse.Namespace) -> int:
    return NAMESPACES.run(session, args)


@NAMESPACES("ls", "list")
def ls(session: Session, args: argparse.Namespace) -> int:
    spaces = list(all_pages(session.call, "namespaces.list", "namespaces", {}))
    print_listing(
        args,
        spaces,
        "name",
        ["NAME", "LABELS"],
        lambda n: [n["name"], ",".join(f"{k}={v}" for k, v in n["labels"].items())],
    )
    return 0


@NAMESPACES("create")
def create(session: Session, args: argparse.Namespace) -> int:
    session.call("namespaces.create", {"name": args.name})
    return 0


@NAMESPACES("rm", "remove")
def rm(session: Session, args: argparse.Namespace) -> int:
    for name in args.names:
        session.call("namespaces.delete", {"name": name})
        print(name)
    return 0
