"""How the CLI shows results: aligned tables, JSON, times and sizes, and the options of
every listing: --format (a table or JSON) and -q (the IDs alone)."""

from __future__ import annotations

import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any

    from berth.daemon.cli.subverbs import Arguments


def add_format(p: Arguments) -> None:
    """The --format option of a listing (table for people, json for scripts)."""
    p.add_argument("--format", choices=["table", "json"], default="table")


def add_listing(p: Arguments) -> None:
    """A listing's options: --format, and -q for scripts (and shell completion)."""
    add_format(p)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="only the IDs (one a line; a list in JSON)"
    )


def print_listing(
    args: argparse.Namespace,
    items: list[Any],
    key: str,
    headers: list[str],
    row: Callable[[Any], list[str]],
) -> None:
    """Show a listing as its options ask: a table of `row(item)` under `headers`, JSON,
    or with -q only each item's `key`."""
    if args.quiet:
        ids = [item[key] for item in items]
        if args.format == "json":
            print_json(ids)
        else:
            for value in ids:
                print(value)
    elif args.format == "json":
        print_json(items)
    else:
        print_table([row(item) for item in items], headers)


def print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip())
    for row in rows:
        print(fmt.format(*row).rstrip())


def print_json(doc: Any) -> None:
    import json  # lazily: most commands never print JSON, and every import costs start-up

    print(json.dumps(doc, indent=2, sort_keys=True))


def timestamp(ns: int) -> str:
    """Nanoseconds since the epoch as UTC RFC 3339 (to the second); "-" for none."""
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)
