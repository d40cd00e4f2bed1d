"""`berth version`: the client's version and the server's (version, protocol, UUID)."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    """No options."""


def run(session: Session, args: argparse.Namespace) -> int:
    from berth.daemon import __version__

    print(f"Client:\n  Version: {__version__}")
    info = session.call("version")
    server = session.call("introspection.server")
    print(
        f"Server:\n  Version: {info['version']}\n  Protocol: {info['protocol']}\n"
        f"  UUID: {server['uuid']}"
    )
    return 0
