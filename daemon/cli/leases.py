"""`berth leases`: the leases that protect objects being built from garbage collection
(list, create, remove)."""

from __future__ import annotations

from berth.daemon.cli.fastargs import lease_seconds
from berth.daemon.cli.output import add_listing, print_listing, timestamp
from berth.daemon.cli.subverbs import SubVerbs
from berth.daemon.paging import all_pages

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session

LEASES = SubVerbs("l_cmd")


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    add = LEASES.parsers(parser, wanted)
    add_listing(add("ls"))
    p = add("create")
    p.add_argument("--id", default="")
    p.add_argument("--expire", type=lease_seconds, default=86400, help="seconds (0: never)")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p = add("rm")
    p.add_argument("--sync", action="store_true", help="garbage-collect right away")
    p.add_argument("ids", nargs="+")


def run(session: Session, args: argparse.Namespace) -> int:
    return LEASES.run(session, args)


@LEASES("ls", "list")
def ls(session: Session, args: argparse.Namespace) -> int:
    items = list(all_pages(session.call, "leases.list", "leases", {}))
    print_listing(
        args,
        items,
        "id",
        ["ID", "CREATED", "EXPIRES"],
        lambda lease: [
            lease["id"],
            timestamp(lease["created_at"]),
            timestamp(lease["expires_at"]) if lease["expires_at"] else "never",
        ],
    )
    return 0


@LEASES("create")
def create(session: Session, args: argparse.Namespace) -> int:
    from berth.daemon.cli.session import labels

    params = {"id": args.id, "expire_seconds": args.expire, "labels": labels(args.label)}
    print(session.call("leases.create", params)["id"])
    return 0


@LEASES("rm", "delete")
def rm(session: Session, args: argparse.Namespace) -> int:
    for lease_id in args.ids:
        session.call("leases.delete", {"id": lease_id, "sync": args.sync})
        print(lease_id)
    return 0
