"""`berth images|content|snapshots|leases|gc`: the storage commands of the CLI.

Loaded only when one of these verbs is used (the CLI's start-up stays small). Transfers
(import, export, pull, push) run in berthd; the CLI names files and shows progress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from berth.daemon.cli.main import CliError, Session, _json, _only, _print_table, _ts
from berth.daemon.paging import all_pages
from berth.daemon.reference import normalize


def _fmt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["table", "json"], default="table")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# --- images --------------------------------------------------------------------------


def add_images(commands: Any, wanted: str | None = None) -> None:
    i = commands.add_parser("images", aliases=["i"], help="manage images")
    sub = i.add_subparsers(dest="i_cmd", required=True)
    add = _only(sub, wanted)
    _fmt(add("ls", aliases=["list"]))
    p = add("inspect")
    p.add_argument("name")
    p = add("tag")
    p.add_argument("--force", action="store_true")
    p.add_argument("source")
    p.add_argument("target")
    p = add("rm", aliases=["remove"])
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
                print(
                    f"{item.get('kind', 'blob')} {key[7:19]}: {item.get('status')} "
                    f"{_size(item.get('offset', 0))}/{_size(total)}",
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
                f"\x1b[2K{r.get('kind', 'blob'):8} {digest[7:19]} [{bar:<30}] "
                f"{_size(offset):>10}/{_size(total):<10} {r.get('status', '')}\n"
            )
        self._drawn = len(self.rows)
        sys.stderr.flush()


def cmd_images(session: Session, args: argparse.Namespace) -> int:
    sub = args.i_cmd
    if sub in ("ls", "list"):
        found = list(all_pages(session.call, "images.list", "images", {}))
        if args.format == "json":
            _json(found)
        else:
            _print_table(
                [
                    [
                        i["name"],
                        i["target"]["media_type"].rsplit(".", 2)[-2]
                        if "." in i["target"]["media_type"]
                        else "-",
                        i["target"]["digest"],
                        _size(i["target"]["size"]),
                        _ts(i["created_at"]),
                    ]
                    for i in found
                ],
                ["REF", "TYPE", "DIGEST", "SIZE", "CREATED"],
            )
        return 0
    if sub == "inspect":
        image = session.call("images.get", {"name": normalize(args.name)})
        digest = image["target"]["digest"]
        document = session.call("content.read", {"digest": digest})["data"]
        image["document"] = json.loads(document)
        _json(image)
        return 0
    if sub == "tag":
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
    if sub in ("rm", "remove"):
        for name in args.names:
            session.call("images.delete", {"name": normalize(name), "sync": args.sync})
            print(normalize(name))
        return 0
    if sub == "import":
        result = session.call(
            "images.import",
            {
                "path": os.path.abspath(args.file),
                "name": normalize(args.name) if args.name else "",
                "unpack": not args.no_unpack,
                "snapshotter": args.snapshotter,
            },
        )
        for image in result["images"]:
            print(f"{image['name']} {image['target']['digest']}")
        return 0
    if sub == "export":
        result = session.call(
            "images.export",
            {
                "path": os.path.abspath(args.file),
                "names": [normalize(n) for n in args.names],
                "platform": args.platform or "",
            },
        )
        print(f"{result['path']}: {result['images']} image(s), {result['blobs']} blob(s)")
        return 0
    if sub == "unpack":
        print(
            session.call(
                "images.unpack", {"name": normalize(args.name), "snapshotter": args.snapshotter}
            )["chain_id"]
        )
        return 0
    if sub in ("pull", "push"):
        params: dict[str, Any] = {
            "ref": normalize(args.ref),
            **_auth(args),
            "platform": args.platform or "",
        }
        if sub == "pull":
            params.update(unpack=not args.no_unpack, snapshotter=args.snapshotter)
        else:
            params["local"] = normalize(args.local) if args.local else params["ref"]
        progress = Progress()
        final: dict[str, Any] = {}
        for item in session.client().stream(f"images.{sub}", params):
            if item.get("kind") == "result":
                final = item
            else:
                progress.update(item)
        print(f"{final.get('name', params['ref'])} {final.get('digest', '')}")
        return 0
    raise CliError(f"unknown images command {sub}")


# --- content -------------------------------------------------------------------------


def add_content(commands: Any, wanted: str | None = None) -> None:
    c = commands.add_parser("content", help="the content store (blobs)")
    sub = c.add_subparsers(dest="ct_cmd", required=True)
    add = _only(sub, wanted)
    _fmt(add("ls", aliases=["list"]))
    add("get").add_argument("digest")
    p = add("ingest")
    p.add_argument("--expected", default="", help="the digest the data must have")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument("ref")
    add("rm", aliases=["delete"]).add_argument("digests", nargs="+")
    _fmt(add("ingests", help="in-progress (or abandoned) writes"))
    add("abort", help="remove in-progress writes").add_argument("refs", nargs="+")


def cmd_content(session: Session, args: argparse.Namespace) -> int:
    sub = args.ct_cmd
    if sub in ("ls", "list"):
        items = list(all_pages(session.call, "content.list", "content", {}))
        if args.format == "json":
            _json(items)
        else:
            _print_table(
                [
                    [
                        c["digest"],
                        _size(c["size"]),
                        ",".join(f"{k}={v}" for k, v in c["labels"].items())[:60],
                    ]
                    for c in items
                ],
                ["DIGEST", "SIZE", "LABELS"],
            )
        return 0
    if sub == "get":
        offset = 0
        out = sys.stdout.buffer
        while True:
            data = session.call("content.read", {"digest": args.digest, "offset": offset})["data"]
            if not data:
                return 0
            out.write(data)
            offset += len(data)
    if sub == "ingest":
        opened = session.call("content.write.open", {"ref": args.ref, "expected": args.expected})
        if opened["exists"]:
            print(args.expected)
            return 0
        offset = opened["offset"]
        if offset:
            sys.stdin.buffer.read(offset)  # resume: skip what the ingest already holds
        while chunk := sys.stdin.buffer.read(1 << 20):
            offset = session.call(
                "content.write.chunk", {"ref": args.ref, "data": chunk, "offset": offset}
            )["offset"]
        labels = dict(item.split("=", 1) for item in args.label)
        print(
            session.call(
                "content.write.commit",
                {"ref": args.ref, "expected": args.expected, "labels": labels},
            )["digest"]
        )
        return 0
    if sub in ("rm", "delete"):
        for digest in args.digests:
            session.call("content.delete", {"digest": digest})
            print(digest)
        return 0
    if sub == "ingests":
        ingests = session.call("content.ingests", {})["ingests"]
        if args.format == "json":
            _json(ingests)
        else:
            _print_table(
                [
                    [
                        i["ref"],
                        _size(i["offset"]),
                        _size(i["total"]) if i["total"] else "-",
                        _ts(i.get("updated_at", 0)),
                    ]
                    for i in ingests
                ],
                ["REF", "WRITTEN", "TOTAL", "UPDATED"],
            )
        return 0
    if sub == "abort":
        for ref in args.refs:
            session.call("content.write.abort", {"ref": ref})
            print(ref)
        return 0
    raise CliError(f"unknown content command {sub}")


# --- snapshots, leases, gc -----------------------------------------------------------


def add_snapshots(commands: Any, wanted: str | None = None) -> None:
    s = commands.add_parser("snapshots", help="snapshots and their mounts")
    s.add_argument("--snapshotter", default="")
    sub = s.add_subparsers(dest="s_cmd", required=True)
    add = _only(sub, wanted)
    _fmt(add("ls", aliases=["list"]))
    add("info").add_argument("key")
    add("mounts").add_argument("key")
    add("usage").add_argument("key")
    add("rm", aliases=["delete"]).add_argument("keys", nargs="+")
    for name in ("prepare", "view"):
        p = add(name)
        p.add_argument("key")
        p.add_argument("parent", nargs="?", default="")
    p = add("commit")
    p.add_argument("name")
    p.add_argument("key")


def cmd_snapshots(session: Session, args: argparse.Namespace) -> int:
    sub, base = args.s_cmd, {"snapshotter": args.snapshotter}
    if sub in ("ls", "list"):
        items = list(all_pages(session.call, "snapshots.list", "snapshots", base))
        if args.format == "json":
            _json(items)
        else:
            _print_table(
                [[s["name"], s["parent"] or "-", s["kind"].upper()] for s in items],
                ["KEY", "PARENT", "KIND"],
            )
        return 0
    if sub == "info":
        _json(session.call("snapshots.stat", {**base, "key": args.key}))
    elif sub == "mounts":
        _json(session.call("snapshots.mounts", {**base, "key": args.key})["mounts"])
    elif sub == "usage":
        _json(session.call("snapshots.usage", {**base, "key": args.key}))
    elif sub in ("rm", "delete"):
        for key in args.keys:
            session.call("snapshots.remove", {**base, "key": key})
            print(key)
    elif sub in ("prepare", "view"):
        _json(
            session.call(f"snapshots.{sub}", {**base, "key": args.key, "parent": args.parent})[
                "mounts"
            ]
        )
    elif sub == "commit":
        session.call("snapshots.commit", {**base, "name": args.name, "key": args.key})
    return 0


def add_leases(commands: Any, wanted: str | None = None) -> None:
    lease = commands.add_parser("leases", help="leases protect objects being built from GC")
    sub = lease.add_subparsers(dest="l_cmd", required=True)
    add = _only(sub, wanted)
    _fmt(add("ls", aliases=["list"]))
    p = add("create")
    p.add_argument("--id", default="")
    p.add_argument("--expire", type=float, default=86400, help="seconds (0: never)")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p = add("rm", aliases=["delete"])
    p.add_argument("--sync", action="store_true", help="garbage-collect right away")
    p.add_argument("ids", nargs="+")


def cmd_leases(session: Session, args: argparse.Namespace) -> int:
    sub = args.l_cmd
    if sub in ("ls", "list"):
        items = list(all_pages(session.call, "leases.list", "leases", {}))
        if args.format == "json":
            _json(items)
        else:
            _print_table(
                [
                    [
                        lease["id"],
                        _ts(lease["created_at"]),
                        _ts(lease["expires_at"]) if lease["expires_at"] else "never",
                    ]
                    for lease in items
                ],
                ["ID", "CREATED", "EXPIRES"],
            )
    elif sub == "create":
        labels = dict(item.split("=", 1) for item in args.label)
        print(
            session.call(
                "leases.create", {"id": args.id, "expire_seconds": args.expire, "labels": labels}
            )["id"]
        )
    elif sub in ("rm", "delete"):
        for lease_id in args.ids:
            session.call("leases.delete", {"id": lease_id, "sync": args.sync})
            print(lease_id)
    return 0


def add_gc(commands: Any, wanted: str | None = None) -> None:
    commands.add_parser("gc", help="remove unreferenced content and snapshots now")


def cmd_gc(session: Session, args: argparse.Namespace) -> int:
    result = session.call("gc")
    removed = result["removed"]
    print(
        f"removed {removed['content']} content record(s), {removed['blobs']} blob(s), "
        f"{removed['snapshots']} snapshot(s), {removed['leases']} expired lease(s) "
        f"in {result['seconds'] * 1000:.0f} ms"
    )
    for error in result["errors"]:
        print(f"berth: {error}", file=sys.stderr)
    return 0
