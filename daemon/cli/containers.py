"""`berth containers` (alias c): create, list, inspect and remove container records;
also how a container is created from the command line, which `berth run` shares."""

from __future__ import annotations

import os

from berth.daemon.cli.fastargs import REMAINDER
from berth.daemon.cli.output import add_listing, print_json, print_listing
from berth.daemon.cli.session import CliError, suppress
from berth.daemon.cli.session import labels as parse_labels
from berth.daemon.cli.subverbs import SubVerbs
from berth.daemon.paging import all_pages
from berth.shim.wire.errors import BerthError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from berth.daemon.cli.session import Session
    from berth.daemon.cli.subverbs import Arguments

CONTAINERS = SubVerbs("c_cmd")
MAX_ID = 2**32 - 2  # a uid or gid ((uid_t)-1 means none)


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    add = CONTAINERS.parsers(parser, wanted)
    p = add("create")
    container_options(p)
    p.add_argument(
        "args",
        nargs=REMAINDER,
        help="IMAGE ID [CMD...] (ID [CMD...] with --rootfs or --busybox)",
    )
    add_listing(add("ls"))
    add("info").add_argument("id")
    add("rm").add_argument("ids", nargs="+")


def run(session: Session, args: argparse.Namespace) -> int:
    return CONTAINERS.run(session, args)


@CONTAINERS("create")
def create(session: Session, args: argparse.Namespace) -> int:
    positionals(args)
    create_container(session, args, args.id)
    return 0


@CONTAINERS("ls", "list")
def ls(session: Session, args: argparse.Namespace) -> int:
    items = list(all_pages(session.call, "containers.list", "containers", {}))
    print_listing(
        args,
        items,
        "id",
        ["CONTAINER", "IMAGE", "RUNTIME"],
        lambda c: [c["id"], c["image"] or "-", c["runtime"]["name"]],
    )
    return 0


@CONTAINERS("info")
def info(session: Session, args: argparse.Namespace) -> int:
    print_json(session.call("containers.get", {"id": args.id}))
    return 0


@CONTAINERS("rm", "delete")
def rm(session: Session, args: argparse.Namespace) -> int:
    for cid in args.ids:
        session.call("containers.delete", {"id": cid})
    return 0


# --- creating a container (also `berth run`) --------------------------------------------


def container_options(p: Arguments) -> None:
    """The options of a new container (`containers create` and `run`)."""
    p.add_argument("--runtime", help="runtime name from berthd's config (default: its default)")
    p.add_argument(
        "--rootfs", help="a root filesystem directory instead of an image (then: ID CMD)"
    )
    p.add_argument(
        "--busybox",
        action="store_true",
        help="the embedded busybox rootfs instead of an image (then: ID CMD)",
    )
    p.add_argument("--snapshotter", default="", help="overlayfs (default) or native")
    p.add_argument("--read-only", action="store_true", help="mount the rootfs read-only")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--cwd", default=None)
    p.add_argument("--user", "-u", default=None, help="user[:group] (names from the image)")
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="type=bind,src=/host,dst=/path,options=rbind:ro",
    )
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="NAME",
        help="a CNI network to attach (repeat for eth1, ...; `berth network ls`), or host, "
        "or none (default: an empty network namespace)",
    )
    p.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[IP:]HOST:CONTAINER[/udp]",
        help="publish a container port on the host (with --net NAME)",
    )
    p.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR/LEN",
        help="the address on the first --net network (its plugins must take `ips`)",
    )


def _parse_publish(text: str) -> dict[str, Any]:
    spec, _, protocol = text.partition("/")
    parts = spec.rsplit(":", 2)
    if len(parts) < 2 or not all(p.isdigit() and 0 < int(p) < 65536 for p in parts[-2:]):
        raise CliError(f"--publish {text!r}: expected [IP:]HOST:CONTAINER[/tcp|udp], ports 1-65535")
    mapping: dict[str, Any] = {
        "host_port": int(parts[-2]),
        "container_port": int(parts[-1]),
        "protocol": protocol or "tcp",
    }
    if len(parts) == 3:
        mapping["host_ip"] = parts[0]
    return mapping


def _network(session: Session, args: argparse.Namespace, doc: dict[str, Any]) -> bool:
    """--net: CNI networks (an attachment made now, its network namespace put in the
    spec), host (no namespace of its own), or none (an empty one, the default). True if
    an attachment was made (the caller removes it if the container is not created)."""
    container_id, spec = doc["id"], doc["spec"]
    nets: list[str] = args.net
    if (args.publish or args.ip) and not [n for n in nets if n not in ("host", "none")]:
        raise CliError("--publish and --ip need --net NAME (a CNI network)")
    if not nets or nets == ["none"]:
        return False
    linux = spec.setdefault("linux", {})
    others = [n for n in linux.get("namespaces") or [] if n.get("type") != "network"]
    if "host" in nets or "none" in nets:
        if len(nets) > 1:
            raise CliError("--net host or none cannot be combined with other networks")
        linux["namespaces"] = others  # host: the host's network namespace
        return False
    params = {
        "container_id": container_id,
        "networks": nets,
        "ports": [_parse_publish(p) for p in args.publish],
        "ips": args.ip,
    }
    attached = session.call("attachments.create", params)
    # What was asked is kept on the container: its later tasks are attached again.
    import json  # lazily: only a networked container needs it

    request = {k: params[k] for k in ("networks", "ports", "ips")}
    labels = doc.setdefault("labels", {})
    labels["berth.network/request"] = json.dumps(request, separators=(",", ":"))
    linux["namespaces"] = [*others, {"type": "network", "path": attached["netns"]}]
    taken = {m.get("destination") for m in spec.get("mounts") or []}
    spec["mounts"] = [
        *(spec.get("mounts") or []),
        *(
            {"destination": target, "type": "bind", "source": source, "options": ["rbind", "rw"]}
            for target, source in sorted(attached.get("files", {}).items())
            if target not in taken  # a --mount of the user's own wins
        ),
    ]
    return True


def _create(session: Session, args: argparse.Namespace, doc: dict[str, Any]) -> None:
    """containers.create with --net's attachment: made first, gone again on a failure."""
    attached = _network(session, args, doc)
    try:
        session.call("containers.create", doc)
    except BaseException:
        if attached:
            with suppress(BerthError):
                session.call("attachments.delete", {"container_id": doc["id"]})
        raise


def positionals(args: argparse.Namespace) -> None:
    """ctr's grammar: `IMAGE ID [CMD...]`, or `ID [CMD...]` with --rootfs or --busybox."""
    words = list(args.args)
    if words and words[0] == "--":
        words = words[1:]
    if args.rootfs or args.busybox:
        if not words:
            raise CliError("a container ID is required")
        args.image, args.id, args.command = None, words[0], words[1:]
    else:
        if len(words) < 2:
            raise CliError("IMAGE and ID are required (or --rootfs DIR / --busybox, then ID)")
        args.image, args.id, args.command = words[0], words[1], words[2:]


def _parse_mount(text: str) -> dict[str, Any]:
    """ctr's --mount: type=bind,src=/host,dst=/path,options=rbind:ro"""
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    dst = fields.get("dst") or fields.get("destination") or fields.get("target")
    src = fields.get("src") or fields.get("source", "")
    if not dst or not dst.startswith("/"):
        raise CliError(f"--mount {text!r}: needs dst=/absolute/path")
    kind = fields.get("type", "bind")
    options = [o for o in fields.get("options", "rbind" if kind == "bind" else "").split(":") if o]
    return {
        "destination": dst,
        "type": kind,
        "source": os.path.abspath(src) if src else kind,
        "options": options,
    }


def _spec_for(args: argparse.Namespace, container_id: str, namespace: str) -> dict[str, Any]:
    """The default spec for --rootfs/--busybox: there is no image config to start from."""
    from berth.daemon.oci import default_spec

    rootfs = os.path.abspath(args.rootfs) if args.rootfs else ""
    if rootfs and not os.path.isdir(rootfs):
        raise CliError(f"rootfs {rootfs} is not a directory")
    command = args.command or ["sh"]
    spec = default_spec(
        container_id,
        namespace,
        command,
        root=rootfs,
        readonly_root=not rootfs or args.read_only,
        terminal=args.tty,
        env=args.env,
        cwd=args.cwd or "/",
    )
    return spec


def create_container(session: Session, args: argparse.Namespace, container_id: str) -> None:
    """The container record: from an image (unpacked; its config makes the spec, and a
    snapshot of it the rootfs), or from --rootfs/--busybox (a default spec)."""
    labels = parse_labels(args.label)
    doc: dict[str, Any] = {"id": container_id, "runtime": args.runtime or "", "labels": labels}
    if args.image:
        from berth.daemon.reference import normalize

        image = normalize(args.image)
        snapshotter = args.snapshotter or ""
        session.call("images.unpack", {"name": image, "snapshotter": snapshotter})
        generated = session.call(
            "images.spec",
            {
                "image": image,
                "id": container_id,
                "args": args.command or None,
                "env": args.env,
                "cwd": args.cwd,
                "user": args.user,
                "terminal": args.tty,
                "snapshotter": snapshotter,
            },
        )
        spec = generated["spec"]
        # A lease holds the new snapshot until the container record references it.
        lease = session.call("leases.create", {"expire_seconds": 60})["id"]
        try:
            session.call(
                "snapshots.prepare",
                {"key": container_id, "parent": generated["chain_id"], "snapshotter": snapshotter},
                lease=lease,
            )
            doc.update(image=image, snapshotter=snapshotter, snapshot_key=container_id)
            spec["mounts"] += [_parse_mount(m) for m in args.mount]
            doc["spec"] = spec
            _create(session, args, doc)
        finally:
            with suppress(BerthError):
                session.call("leases.delete", {"id": lease})
        return
    spec = _spec_for(args, container_id, session.namespace)
    if args.user:
        uid, _, gid = args.user.partition(":")
        if not all(n.isdigit() and int(n) <= MAX_ID for n in (uid, gid or uid)):
            raise CliError(
                f"--user with --rootfs/--busybox takes numeric uid[:gid] (at most {MAX_ID})"
            )
        spec["process"]["user"] = {"uid": int(uid), "gid": int(gid or uid)}
    spec["mounts"] += [_parse_mount(m) for m in args.mount]
    doc["spec"] = spec
    _create(session, args, doc)
