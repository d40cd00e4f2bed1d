"""`berth snapshots`: a snapshotter's snapshots (list, inspect, usage, remove) and the
mounts of new ones (prepare, view, commit)."""

from __future__ import annotations

from berth.daemon.cli.output import add_listing, print_json, print_listing
from berth.daemon.cli.subverbs import SubVerbs
from berth.daemon.paging import all_pages

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session

SNAPSHOTS = SubVerbs("s_cmd")


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    parser.add_argument("--snapshotter", default="")
    add = SNAPSHOTS.parsers(parser, wanted)
    add_listing(add("ls"))
    add("info").add_argument("key")
    add("mounts").add_argument("key")
    add("usage").add_argument("key")
    add("rm").add_argument("keys", nargs="+")
    for name in ("prepare", "view"):
        p = add(name)
        p.add_argument("key")
        p.add_argument("parent", nargs="?", default="")
    p = add("commit")
    p.add_argument("name")
    p.add_argument("key")


def run(session: Session, args: argparse.Namespace) -> int:
    return SNAPSHOTS.run(session, args)


@SNAPSHOTS("ls", "list")
def ls(session: Session, args: argparse.Namespace) -> int:
    items = list(all_pages(session.call, "snapshots.list", "snapshots", _base(args)))
    print_listing(
        args,
        items,
        "name",
        ["KEY", "PARENT", "KIND"],
        lambda s: [s["name"], s["parent"] or "-", s["kind"].upper()],
    )
    return 0


@SNAPSHOTS("info")
def info(session: Session, args: argparse.Namespace) -> int:
    print_json(session.call("snapshots.stat", {**_base(args), "key": args.key}))
    return 0


@SNAPSHOTS("mounts")
def mounts(session: Session, args: argparse.Namespace) -> int:
    print_json(session.call("snapshots.mounts", {**_base(args), "key": args.key})["mounts"])
    return 0


@SNAPSHOTS("usage")
def usage(session: Session, args: argparse.Namespace) -> int:
    print_json(session.call("snapshots.usage", {**_base(args), "key": args.key}))
    return 0


@SNAPSHOTS("rm", "delete")
def rm(session: Session, args: argparse.Namespace) -> int:
    for key in args.keys:
        session.call("snapshots.remove", {**_base(args), "key": key})
        print(key)
    return 0


@SNAPSHOTS("prepare")
@SNAPSHOTS("view")
def prepare_or_view(session: Session, args: argparse.Namespace) -> int:
    params = {**_base(args), "key": args.key, "parent": args.parent}
    print_json(session.call(f"snapshots.{args.s_cmd}", params)["mounts"])
    return 0


@SNAPSHOTS("commit")
def commit(session: Session, args: argparse.Namespace) -> int:
    session.call("snapshots.commit", {**_base(args), "name": args.name, "key": args.key})
    return 0


def _base(args: argparse.Namespace) -> dict[str, str]:
    """Every call names the snapshotter (empty: berthd's default)."""
    return {"snapshotter": args.snapshotter}
