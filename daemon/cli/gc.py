"""`berth gc`: garbage-collect now (content, snapshots and expired leases nothing uses)."""

from __future__ import annotations

import sys

from berth.daemon.cli.output import human_size

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    """No options."""


def run(session: Session, args: argparse.Namespace) -> int:
    result = session.call("gc")
    removed = result["removed"]
    freed = sum((result.get("freed_bytes") or {}).values())
    print(
        f"removed {removed['content']} content record(s), {removed['blobs']} blob(s), "
        f"{removed['snapshots']} snapshot(s), {removed['leases']} expired lease(s) "
        f"in {result['seconds'] * 1000:.0f} ms; freed {human_size(freed)}"
    )
    for error in result["errors"]:
        print(f"berth: {error}", file=sys.stderr)
    return 0
