"""`berth content`: the content store's blobs (list, read, ingest from stdin, remove) and
its in-progress writes (list, abort)."""

from __future__ import annotations

import sys

from berth.daemon.cli.output import add_listing, human_size, print_listing, timestamp
from berth.daemon.cli.subverbs import SubVerbs
from berth.daemon.paging import all_pages

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session

CONTENT = SubVerbs("ct_cmd")


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    add = CONTENT.parsers(parser, wanted)
    add_listing(add("ls"))
    add("get").add_argument("digest")
    p = add("ingest")
    p.add_argument("--expected", default="", help="the digest the data must have")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument("ref")
    add("rm").add_argument("digests", nargs="+")
    add_listing(add("ingests", help="in-progress (or abandoned) writes"))
    add("abort", help="remove in-progress writes").add_argument("refs", nargs="+")


def run(session: Session, args: argparse.Namespace) -> int:
    return CONTENT.run(session, args)


@CONTENT("ls", "list")
def ls(session: Session, args: argparse.Namespace) -> int:
    items = list(all_pages(session.call, "content.list", "content", {}))
    print_listing(
        args,
        items,
        "digest",
        ["DIGEST", "SIZE", "LABELS"],
        lambda c: [
            c["digest"],
            human_size(c["size"]),
            ",".join(f"{k}={v}" for k, v in c["labels"].items())[:60],
        ],
    )
    return 0


@CONTENT("get")
def get(session: Session, args: argparse.Namespace) -> int:
    offset = 0
    out = sys.stdout.buffer
    while True:
        data = session.call("content.read", {"digest": args.digest, "offset": offset})["data"]
        if not data:
            return 0
        out.write(data)
        offset += len(data)


@CONTENT("ingest")
def ingest(session: Session, args: argparse.Namespace) -> int:
    from berth.daemon.cli.session import labels as parse_labels

    labels = parse_labels(args.label)  # before anything is sent
    opened = session.call("content.write.open", {"ref": args.ref, "expected": args.expected})
    if opened["exists"]:
        print(args.expected)
        return 0
    import hashlib

    from berth.shim.wire.errors import AlreadyExists

    hashed = hashlib.sha256()
    offset = opened["offset"]
    if offset:
        hashed.update(sys.stdin.buffer.read(offset))  # resume: skip what the ingest holds
    while chunk := sys.stdin.buffer.read(1 << 20):
        hashed.update(chunk)
        offset = session.call(
            "content.write.chunk", {"ref": args.ref, "data": chunk, "offset": offset}
        )["offset"]
    try:
        digest = session.call(
            "content.write.commit",
            {"ref": args.ref, "expected": args.expected, "labels": labels},
        )["digest"]
    except AlreadyExists:  # stored already: what the ingest was for (as ctr's WriteBlob)
        digest = "sha256:" + hashed.hexdigest()
    print(digest)
    return 0


@CONTENT("rm", "delete")
def rm(session: Session, args: argparse.Namespace) -> int:
    for digest in args.digests:
        session.call("content.delete", {"digest": digest})
        print(digest)
    return 0


@CONTENT("ingests")
def ingests(session: Session, args: argparse.Namespace) -> int:
    writes = session.call("content.ingests", {})["ingests"]
    print_listing(
        args,
        writes,
        "ref",
        ["REF", "WRITTEN", "TOTAL", "UPDATED"],
        lambda i: [
            i["ref"],
            human_size(i["offset"]),
            human_size(i["total"]) if i["total"] else "-",
            timestamp(i.get("updated_at", 0)),
        ],
    )
    return 0


@CONTENT("abort")
def abort(session: Session, args: argparse.Namespace) -> int:
    for ref in args.refs:
        session.call("content.write.abort", {"ref": ref})
        print(ref)
    return 0
