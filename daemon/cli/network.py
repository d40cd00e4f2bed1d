"""`berth network`: the CNI networks berthd knows (its conf dir's, and `bridge`, its own
default), made and removed (`create`/`rm`: a network is a config list in the conf dir),
and containers' attachments to them (`berth run --net NAME -p HOST:CONTAINER`)."""

from __future__ import annotations

from berth.daemon.cli.output import add_listing, print_json, print_listing
from berth.daemon.cli.session import CliError, labels
from berth.daemon.cli.subverbs import SubVerbs
from berth.daemon.paging import all_pages

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session

NETWORK = SubVerbs("net_cmd")


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    add = NETWORK.parsers(parser, wanted)
    add_listing(add("ls"))
    add("inspect").add_argument("name")
    create = add("create", help="a bridge network (NAT out, published ports), or --config")
    create.add_argument("name")
    create.add_argument("--subnet", default="", help="CIDR (default: a free /24 of 10.78/16)")
    create.add_argument("--gateway", default="", help="the bridge's address in the subnet")
    create.add_argument("--label", action="append", default=[], metavar="K=V")
    create.add_argument("--config", default="", metavar="FILE", help="a whole .conflist")
    add("rm", help="remove networks berth created (not while attached)").add_argument(
        "names", nargs="+", metavar="name"
    )
    add_listing(add("attachments"))


def run(session: Session, args: argparse.Namespace) -> int:
    return NETWORK.run(session, args)


@NETWORK("ls", "list")
def ls(session: Session, args: argparse.Namespace) -> int:
    networks = session.call("networks.list")["networks"]
    print_listing(
        args,
        networks,
        "name",
        ["NAME", "PLUGINS", "SUBNETS", "SOURCE"],
        lambda n: [
            n["name"],
            ",".join(p["type"] for p in n["plugins"]),
            ",".join(n.get("subnets") or []),
            n["source"],
        ],
    )
    return 0


@NETWORK("inspect")
def inspect(session: Session, args: argparse.Namespace) -> int:
    for network in session.call("networks.list")["networks"]:
        if network["name"] == args.name:
            print_json(network)
            return 0
    raise CliError(f"no network {args.name!r}")


@NETWORK("create")
def create(session: Session, args: argparse.Namespace) -> int:
    params: dict[str, object] = {"name": args.name}
    for option in ("subnet", "gateway"):
        if getattr(args, option):
            params[option] = getattr(args, option)
    if args.label:
        params["labels"] = labels(args.label)
    if args.config:
        import json

        try:
            with open(args.config, "rb") as f:
                params["config"] = json.loads(f.read(1 << 20))
        except (OSError, ValueError) as exc:
            raise CliError(f"--config {args.config}: {exc}") from None
    made = session.call("networks.create", params)
    print(f"{made['name']}\t{','.join(made['subnets'])}\t{made['source']}")
    return 0


@NETWORK("rm", "remove")
def rm(session: Session, args: argparse.Namespace) -> int:
    for name in args.names:
        session.call("networks.delete", {"name": name})
        print(name)
    return 0


@NETWORK("attachments")
def attachments(session: Session, args: argparse.Namespace) -> int:
    items = list(all_pages(session.call, "attachments.list", "attachments", {}))
    print_listing(
        args,
        items,
        "container_id",
        ["CONTAINER", "NETWORK", "INTERFACE", "ADDRESSES", "PORTS"],
        lambda a: _row(a),
    )
    return 0


def _row(attached: dict[str, object]) -> list[str]:
    networks = attached.get("networks") or []
    assert isinstance(networks, list)
    return [
        str(attached["container_id"]),
        ",".join(n["network"] for n in networks),
        ",".join(n["interface"] for n in networks),
        ",".join(a for n in networks for a in n["addresses"]),
        ",".join(
            f"{p['hostPort']}->{p['containerPort']}/{p['protocol']}"
            for n in networks[:1]
            for p in n["ports"]
        ),
    ]
