"""`berth images` (alias i): list, inspect, tag, remove, import, export, pull, push and
unpack images. Transfers (import, export, pull, push) run in berthd; the CLI names files
and shows progress.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from berth.daemon.cli.output import add_listing, human_size, print_json, print_listing, timestamp
from berth.daemon.cli.subverbs import SubVerbs
from berth.daemon.paging import all_pages
from berth.daemon.reference import normalize

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    from typing import Any

    from berth.daemon.cli.session import Session

IMAGES = SubVerbs("i_cmd")


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    add = IMAGES.parsers(parser, wanted)
    add_listing(add("ls"))
    p = add("inspect")
    p.add_argument("name")
    p = add("tag")
    p.add_argument("--force", action="store_true")
    p.add_argument("source")
    p.add_argument("target")
    p = add("rm")
    p.add_argument("--sync", action="store_true", help="garbage-collect right away")
    p.add_argument("names", nargs="+")
    p = add("import")
    p.add_argument("--name", help="name for a single-image archive")
    p.add_argument("--no-unpack", action="store_true")
    p.add_argument("--snapshotter", default="")
    p.add_argument("file")
    p = add("export")
    p.add_argument("--platform", help="only this platform (default: all)")
    p.add_argument("file")
    p.add_argument("names", nargs="+")
    for name in ("pull", "push"):
        p = add(name)
        p.add_argument("--plain-http", action="store_true", help="http, not https")
        p.add_argument("--user", help="user:password for the registry")
        p.add_argument("--tls-ca", help="a CA certificate (PEM) to trust for this registry")
        p.add_argument("--tls-skip-verify", action="store_true")
        if name == "pull":
            p.add_argument("--platform", help="os/arch[/variant] (default: this host)")
            p.add_argument("--no-unpack", action="store_true")
            p.add_argument("--snapshotter", default="")
            p.add_argument("ref")
        else:
            p.add_argument("--platform", help="push only this platform's manifest")
            p.add_argument("ref", help="where to push")
            p.add_argument("local", nargs="?", help="local image (default: same as ref)")
    p = add("unpack")
    p.add_argument("--snapshotter", default="")
    p.add_argument("name")


def _auth(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"plain_http": args.plain_http, "tls_skip_verify": args.tls_skip_verify}
    if args.user:
        user, _, password = args.user.partition(":")
        out.update(username=user, password=password)
    if args.tls_ca:
        with open(args.tls_ca) as f:
            out["tls_ca"] = f.read()
    return out


class Progress:
    """One line per layer: redrawn bars on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.rows: dict[str, dict[str, Any]] = {}
        self._drawn = 0
        self._last = 0.0

    def update(self, item: dict[str, Any]) -> None:
        key = item.get("digest", "?")
        row = self.rows.setdefault(key, {})
        previous = row.get("status")
        row.update(item)
        if not self.tty:
            if item.get("status") != previous:
                total = item.get("total") or 0
                sizes = f" {human_size(item.get('offset', 0))}/{human_size(total)}" if total else ""
                print(
                    f"{item.get('kind', 'blob')} {_short(key)}: {item.get('status')}{sizes}",
                    file=sys.stderr,
                    flush=True,
                )
            return
        now = time.monotonic()
        if now - self._last < 0.1 and item.get("status") not in ("done", "exists"):
            return
        self._last = now
        if self._drawn:
            sys.stderr.write(f"\x1b[{self._drawn}A")
        for digest, r in self.rows.items():
            total, offset = r.get("total") or 0, r.get("offset", 0)
            frac = (
                offset / total if total else (1.0 if r.get("status") in ("done", "exists") else 0.0)
            )
            bar = "#" * int(frac * 30)
            sys.stderr.write(
                f"\x1b[2K{r.get('kind', 'blob'):8} {_short(digest):12} [{bar:<30}] "
                f"{human_size(offset):>10}/{human_size(total):<10} {r.get('status', '')}\n"
            )
        self._drawn = len(self.rows)
        sys.stderr.flush()


def _short(key: str) -> str:
    """A blob as the progress lines show it: 12 hex digits of its digest (or, for a blob
    whose digest is not known yet, of the archive member it comes from: `<hex>/layer.tar`
    or `blobs/sha256/<hex>` in a `docker save` archive)."""
    if key.startswith("sha256:"):
        return key[7:19]
    return max(key.split("/"), key=len)[:12]


def _streamed(session: Session, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run a transfer that streams progress items, showing them; its {kind: result}."""
    progress = Progress()
    final: dict[str, Any] = {}
    for item in session.client().stream(method, params):
        if item.get("kind") == "result":
            final = item
        else:
            progress.update(item)
    return final


def run(session: Session, args: argparse.Namespace) -> int:
    return IMAGES.run(session, args)


@IMAGES("ls", "list")
def ls(session: Session, args: argparse.Namespace) -> int:
    found = list(all_pages(session.call, "images.list", "images", {"usage": True}))
    print_listing(
        args,
        found,
        "name",
        ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "CREATED"],
        lambda i: [
            i["name"],
            i["target"]["media_type"].rsplit(".", 2)[-2]
            if "." in i["target"]["media_type"]
            else "-",
            i["target"]["digest"],
            human_size(i.get("content_size", i["target"]["size"])),
            ",".join(i.get("platforms") or []) or "-",
            timestamp(i["created_at"]),
        ],
    )
    return 0


@IMAGES("inspect")
def inspect(session: Session, args: argparse.Namespace) -> int:
    import json

    image = session.call("images.get", {"name": normalize(args.name)})
    digest = image["target"]["digest"]
    document = session.call("content.read", {"digest": digest})["data"]
    image["document"] = json.loads(document)
    print_json(image)
    return 0


@IMAGES("tag")
def tag(session: Session, args: argparse.Namespace) -> int:
    session.call(
        "images.tag",
        {
            "source": normalize(args.source),
            "target": normalize(args.target),
            "force": args.force,
        },
    )
    print(normalize(args.target))
    return 0


@IMAGES("rm", "remove")
def rm(session: Session, args: argparse.Namespace) -> int:
    for name in args.names:
        session.call("images.delete", {"name": normalize(name), "sync": args.sync})
        print(normalize(name))
    return 0


@IMAGES("import")
def import_(session: Session, args: argparse.Namespace) -> int:
    result = _streamed(
        session,
        "images.import",
        {
            "path": os.path.abspath(args.file),
            "name": normalize(args.name) if args.name else "",
            "unpack": not args.no_unpack,
            "snapshotter": args.snapshotter,
            "progress": True,
        },
    )
    for image in result.get("images", []):
        print(f"{image['name']} {image['target']['digest']}")
    for absent in result.get("absent", []):
        print(f"{absent['name']}: {absent['platform']} not in the archive ({absent['digest']})")
    return 0


@IMAGES("export")
def export(session: Session, args: argparse.Namespace) -> int:
    result = _streamed(
        session,
        "images.export",
        {
            "path": os.path.abspath(args.file),
            "names": [normalize(n) for n in args.names],
            "platform": args.platform or "",
            "progress": True,
        },
    )
    print(f"{result['path']}: {result['images']} image(s), {result['blobs']} blob(s)")
    return 0


@IMAGES("unpack")
def unpack(session: Session, args: argparse.Namespace) -> int:
    print(
        session.call(
            "images.unpack", {"name": normalize(args.name), "snapshotter": args.snapshotter}
        )["chain_id"]
    )
    return 0


@IMAGES("pull")
@IMAGES("push")
def transfer(session: Session, args: argparse.Namespace) -> int:
    """pull or push, with a progress line per layer; berthd does the transfer."""
    sub = args.i_cmd
    params: dict[str, Any] = {
        "ref": normalize(args.ref),
        **_auth(args),
        "platform": args.platform or "",
    }
    if sub == "pull":
        params.update(unpack=not args.no_unpack, snapshotter=args.snapshotter)
    else:
        params["local"] = normalize(args.local) if args.local else params["ref"]
    final = _streamed(session, f"images.{sub}", params)
    print(f"{final.get('name', params['ref'])} {final.get('digest', '')}")
    return 0
