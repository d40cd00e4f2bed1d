"""`berth events`: stream berthd's events (optionally filtered, and replayed from a time)
until interrupted."""

from __future__ import annotations

import json

from berth.daemon.cli.fastargs import count
from berth.daemon.cli.output import timestamp
from berth.daemon.cli.session import CliError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from berth.daemon.cli.session import Session


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    parser.add_argument("--filter", action="append", help='e.g. topic=="/tasks/exit"')
    parser.add_argument("--since", type=count, help="first replay what was published after this ns")


def run(session: Session, args: argparse.Namespace) -> int:
    """Print events as they come. A daemon restart or upgrade does not end the stream: it
    resubscribes after the last event it printed (`after_seq`: numbers survive a
    handover, so nothing is missed or printed twice)."""
    import time

    from berth.shim.wire.errors import Unavailable

    params: dict[str, Any] = {"filters": args.filter or [], "with_published": True}
    if args.since is not None:
        params["since"] = args.since
    last: tuple[str, int] | None = None  # (epoch, seq) of the last event printed
    try:
        while True:
            try:
                for envelope in session.client().stream("events.subscribe", params):
                    epoch, seq = envelope.get("epoch"), envelope.get("seq")
                    if isinstance(epoch, str) and isinstance(seq, int):
                        if last is not None and epoch == last[0] and seq <= last[1]:
                            continue
                        last = (epoch, seq)
                    print(
                        f"{timestamp(envelope['timestamp'])} {envelope['namespace']} "
                        f"{envelope['topic']} {json.dumps(envelope['event'], sort_keys=True)}",
                        flush=True,
                    )
                return 0
            except (Unavailable, CliError):
                session.reset()
                if last is not None:
                    params = {**params, "epoch": last[0], "after_seq": last[1]}
                    params.pop("since", None)
                time.sleep(0.02)
    except KeyboardInterrupt:
        return 0
