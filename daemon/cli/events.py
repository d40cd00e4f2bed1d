"""`berth events`: stream berthd's events (optionally filtered, and replayed from a time)
until interrupted."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from berth.daemon.cli.output import timestamp

if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    parser.add_argument("--filter", action="append", help='e.g. topic=="/tasks/exit"')
    parser.add_argument("--since", type=int, help="first replay what was published after this ns")


def run(session: Session, args: argparse.Namespace) -> int:
    client = session.client()
    try:
        params: dict[str, Any] = {"filters": args.filter or []}
        if args.since is not None:
            params["since"] = args.since
        for envelope in client.stream("events.subscribe", params):
            print(
                f"{timestamp(envelope['timestamp'])} {envelope['namespace']} "
                f"{envelope['topic']} {json.dumps(envelope['event'], sort_keys=True)}",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    return 0
