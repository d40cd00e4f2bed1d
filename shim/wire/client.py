"""A blocking client for berth's protocol: for the CLI, tests and scripts (no trio).

Works against berthd's socket and against a shim's socket alike.
"""

from __future__ import annotations

import time

from berth.shim.wire.errors import (
    BerthError,
    DeadlineExceeded,
    Reconnect,
    Unavailable,
    error_from_wire,
)
from berth.shim.wire.protocol import (
    DEFAULT_MAX_FRAME,
    LEAN,
    Cancel,
    Connection,
    ConnectionClosed,
    ErrorReply,
    Hello,
    LocalProtocolError,
    NeedData,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    StreamEnd,
    StreamItem,
    Welcome,
)
from berth.shim.wire.unixsock import connect_unix

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    from collections.abc import Iterator  # collections.abc imports collections: 1.3 ms
    from typing import Any

    from berth.shim.wire.protocol import ReceivedEvent


class _Default:
    """The type of the "use the client's timeout" default (None means: no deadline)."""


_DEFAULT = _Default()


DEFAULT_TIMEOUT = 30.0
"""Seconds a unary call (and the handshake) may take before the peer counts as not
answering (a stopped or wedged daemon): a client never hangs for ever."""
KEEPALIVE_IDLE = 10.0
"""Seconds of silence on a long call (wait, a stream) before the peer is pinged; it then
has `timeout` seconds to answer the ping, or the connection counts as dead."""
# Calls whose length depends on a container or on the data they move (berthd's and a
# shim's): no deadline by default, but a peer that stops answering is still detected.
LONG_CALLS = frozenset(
    {
        "tasks.wait",
        "tasks.create",
        "tasks.delete",
        "images.import",
        "images.export",
        "images.unpack",
        "snapshots.prepare",
        "snapshots.view",
        "snapshots.commit",
        "snapshots.remove",
        "snapshots.usage",
        "diff.apply",
        "diff.diff",
        "gc",
        "wait",  # a shim's
        "create",
        "delete",
    }
)
# berthd's calls that change nothing: one whose connection dropped before its answer is
# repeated on a new connection (an old release's daemon may close connections it accepted
# as it stops for its successor; for anything else, a repeat could do the work twice).
READ_ONLY_CALLS = frozenset(
    {
        "ping",
        "version",
        "introspection.server",
        "introspection.plugins",
        "namespaces.get",
        "namespaces.list",
        "containers.get",
        "containers.list",
        "tasks.get",
        "tasks.list",
        "tasks.pids",
        "tasks.metrics",
        "tasks.shim_log",
        "tasks.wait",
        "content.info",
        "content.list",
        "content.status",
        "content.ingests",
        "images.get",
        "images.list",
        "snapshots.stat",
        "snapshots.mounts",
        "snapshots.usage",
        "snapshots.list",
        "leases.list",
        "leases.resources",
        "networks.list",
        "attachments.get",
        "attachments.list",
    }
)
_PING = "ping"  # any answer proves liveness: an unknown method gets an ERROR reply too


class _ConnectionLost(Unavailable):
    """The connection closed or broke under a call (an Unavailable like any other)."""


class Client:
    """A blocking connection. Unary calls have a deadline (`timeout`); long calls
    (`call(..., timeout=None)` and streams) have none but check that the peer is alive.
    A peer that does not answer raises Unavailable (handshake, liveness) or
    DeadlineExceeded (a unary call)."""

    def __init__(
        self,
        path: str,
        *,
        namespace: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        keepalive: float | None = None,
        peer_name: str = "berth-client",
        max_frame_size: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.path = path
        self.namespace = namespace
        self.timeout = timeout
        self.keepalive = keepalive if keepalive is not None else min(KEEPALIVE_IDLE, timeout)
        self._ping_id: int | None = None
        self._ping_deadline = 0.0
        try:
            self._sock = connect_unix(path, timeout=timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unavailable(f"cannot connect to {path}: {exc.strerror}") from None
        except OSError as exc:
            raise Unavailable(f"cannot connect to {path}: {exc}") from None
        self._conn = Connection(
            Role.CLIENT, peer_name=peer_name, max_frame_size=max_frame_size, codec=LEAN
        )
        try:
            self._send(Hello())
            event = self._next(time.monotonic() + timeout, "the handshake")
        except DeadlineExceeded:
            self._sock.close()
            raise Unavailable(
                f"{path} does not answer: no handshake within {timeout:g}s "
                "(is the daemon stopped or overloaded?)"
            ) from None
        except _ConnectionLost as exc:
            # Nothing was asked yet, so asking again is safe: the daemon that accepted
            # (or queued) this connection stopped before its handshake, as an old daemon
            # does when its successor takes over without a handover (0.1.0).
            self._sock.close()
            raise Reconnect(f"{exc} during the handshake") from None
        except BaseException:
            self._sock.close()
            raise
        if not isinstance(event, Welcome):
            self._sock.close()
            raise Unavailable(f"unexpected handshake answer {event!r}")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, event: Any) -> None:
        try:
            self._sock.sendall(self._conn.send(event))
        except OSError as exc:
            raise _ConnectionLost(f"connection to {self.path} lost: {exc}") from None
        except LocalProtocolError as exc:  # the connection failed earlier
            raise Unavailable(f"connection to {self.path} unusable: {exc}") from None

    def _next(self, deadline: float | None, what: str) -> ReceivedEvent:
        """The next event. With a `deadline`, DeadlineExceeded once it passes; without one
        (a long call), the peer is pinged after `keepalive` seconds of silence and must
        answer within `timeout`, else Unavailable."""
        while True:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                if Reconnect.PREFIX in str(exc):  # refused in its handshake: a handover
                    raise Reconnect(str(exc)) from None
                if exc.code is not None:  # refused, and told why
                    raise error_from_wire(exc.code, str(exc)) from None
                raise Unavailable(f"{self.path}: protocol error: {exc}") from None
            if not isinstance(event, NeedData):
                if isinstance(event, ConnectionClosed):
                    raise _ConnectionLost(f"{self.path} closed the connection")
                if self._ping_id is not None and getattr(event, "id", None) == self._ping_id:
                    self._ping_id = None  # the peer is alive; its answer means nothing else
                    continue
                return event
            now = time.monotonic()
            if deadline is not None:
                wait = deadline - now
                if wait <= 0:
                    raise DeadlineExceeded(
                        f"{self.path} did not answer {what} within {self.timeout:g}s "
                        "(is the daemon stopped or overloaded?)"
                    )
            elif self._ping_id is not None:
                wait = self._ping_deadline - now
                if wait <= 0:
                    raise Unavailable(
                        f"{self.path} does not answer: no reply to a liveness check within "
                        f"{self.timeout:g}s (is the daemon stopped?)"
                    )
            else:
                wait = self.keepalive
            self._sock.settimeout(max(wait, 0.001))
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                if deadline is None and self._ping_id is None:
                    self._ping_id = self._conn.next_request_id()
                    self._ping_deadline = time.monotonic() + self.timeout
                    self._send(Request(self._ping_id, _PING, {}, {}))
                continue
            except OSError as exc:
                raise _ConnectionLost(f"connection to {self.path} lost: {exc}") from None
            if data and self._ping_id is not None:
                self._ping_deadline = time.monotonic() + self.timeout  # it is talking
            self._conn.receive_data(data)

    def _meta(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        out = dict(meta or {})
        if self.namespace is not None:
            out.setdefault("namespace", self.namespace)
        return out

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | _Default | None = _DEFAULT,
        **meta: Any,
    ) -> Any:
        """One request and its reply. `timeout`: seconds, or None for no deadline (a peer
        that stops answering is still detected); by default the client's, and None for
        the LONG_CALLS (their length depends on a container or on data)."""
        if isinstance(timeout, _Default):
            seconds = None if method in LONG_CALLS else self.timeout
        else:
            seconds = timeout
        deadline = None if seconds is None else time.monotonic() + seconds
        rid = self._conn.next_request_id()
        try:
            self._send(Request(rid, method, params or {}, self._meta(meta)))
            while True:
                event = self._next(deadline, method)
                if isinstance(event, Response) and event.id == rid:
                    return event.result
                if isinstance(event, ErrorReply) and event.id in (rid, None):
                    raise event.to_exception()
        except _ConnectionLost as exc:
            if method in READ_ONLY_CALLS:  # changes nothing: asking again is safe
                raise Reconnect(f"{exc} before answering {method}") from None
            raise

    def stream(
        self, method: str, params: dict[str, Any] | None = None, **meta: Any
    ) -> Iterator[Any]:
        """Yield a server stream's items; closing the generator cancels the stream. No
        deadline (a stream lasts as long as it lasts), but a dead peer is detected."""
        rid = self._conn.next_request_id()
        self._send(Request(rid, method, params or {}, self._meta(meta)))
        finished = False
        try:
            while True:
                event = self._next(None, method)
                if isinstance(event, StreamItem) and event.id == rid:
                    yield event.item
                elif isinstance(event, StreamEnd) and event.id == rid:
                    finished = True
                    return
                elif isinstance(event, ErrorReply) and event.id in (rid, None):
                    finished = True
                    raise event.to_exception()
                elif isinstance(event, Response) and event.id == rid:
                    finished = True
                    return
        finally:
            if not finished and rid in self._conn.open_requests:
                try:
                    self._send(Cancel(rid))
                except BerthError:
                    pass
