"""The CLI's connection to berthd (Session) and its one error type (CliError).

Imported after the arguments are parsed, so `berth --help` and usage errors never load the
wire client.
"""

from __future__ import annotations

import sys
import time

from berth.shim.wire.client import Client
from berth.shim.wire.errors import Reconnect, Unavailable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    from typing import Any

RECONNECT_INTERVAL = 0.1
CONNECT_GRACE = 1.0  # seconds a missing or refusing socket is tried again
HANDOVER_RETRY = 0.02  # seconds between repeats of a call a handing-over daemon refused


class suppress:
    """contextlib.suppress, without importing contextlib: it brings functools, ~1 ms of
    every start of `run` and `exec` (the verbs the benchmark times)."""

    def __init__(self, *exceptions: type[BaseException]) -> None:
        self.exceptions = exceptions

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, self.exceptions)


class CliError(Exception):
    """A failure the CLI reports as `berth: MESSAGE` with exit code 1."""


def labels(items: list[str], option: str = "--label") -> dict[str, str]:
    """K=V words as a map; a word without `=` is a CliError (dict() raised a ValueError:
    a traceback)."""
    for item in items:
        if "=" not in item:
            raise CliError(f"{option} takes K=V, not {item!r}")
    return dict(item.split("=", 1) for item in items)


class Session:
    """Connection settings; opens clients on demand (a signal handler needs its own)."""

    def __init__(self, address: str, namespace: str, timeout: float) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            self._client = self.connect()
        return self._client

    def connect(self) -> Client:
        """A connection; a socket that is missing or refuses (a berthd restarting: an old
        release removes its socket as it stops, before its successor binds one) is tried
        again for up to CONNECT_GRACE, as containerd's client dials again."""
        deadline = time.monotonic() + min(CONNECT_GRACE, self.timeout)
        while True:
            try:
                return Client(
                    self.address, namespace=self.namespace, timeout=self.timeout, peer_name="berth"
                )
            except Unavailable as exc:
                absent = str(exc).startswith("cannot connect")
                if absent and time.monotonic() < deadline:
                    time.sleep(RECONNECT_INTERVAL / 5)
                    continue
                hint = " (is berthd running?)" if absent else ""
                raise CliError(f"cannot reach berthd at {self.address}: {exc}{hint}") from None

    def call(self, method: str, params: dict[str, Any] | None = None, **meta: Any) -> Any:
        """One call. A call the daemon answered Reconnect was not carried out (it is
        handing over to its successor: an upgrade): it is repeated on a new connection,
        which the listening socket queues until the successor serves."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.client().call(method, params or {}, **meta)
            except Reconnect:
                self.reset()
                if time.monotonic() > deadline:
                    raise
                time.sleep(HANDOVER_RETRY)

    def reset(self) -> None:
        """Drop the connection (the next call opens a new one)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def call_retrying(self, method: str, params: dict[str, Any]) -> Any:
        """Call, reconnecting while the daemon is down (it is restarted, say): the
        container is unaffected, so waiting for it must be too."""
        noted = False
        while True:
            try:
                return self.call(method, params)
            except Reconnect:
                self.reset()  # a handover: the successor answers at once, no message
                time.sleep(HANDOVER_RETRY)
                continue
            except (Unavailable, CliError):
                self.reset()
                if not noted and sys.stderr.isatty():
                    print("berth: lost berthd; reconnecting...", file=sys.stderr)
                    noted = True
                time.sleep(RECONNECT_INTERVAL)

    def close(self) -> None:
        self.reset()
