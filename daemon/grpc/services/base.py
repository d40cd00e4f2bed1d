"""What every service shares: berthd as the services reach it (`Backend`), what a call knows
of its caller (`Call`), and the wrappers that turn berth's errors into gRPC status codes.

Errors keep their kind across the translation (NotFound is gRPC 5, and so on), since
clients act on the code: dockerd, for one, takes NotFound from Tasks/Get to mean "already
deleted".
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar

from berth.daemon import logs
from berth.daemon.filters import Adaptor, ObjectPredicate, parse_event_filters, parse_object_filters
from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.calls import StatusCode
from berth.daemon.grpc.client import AsyncClient
from berth.daemon.grpc.handoff import Cursor, Handoff
from berth.daemon.paging import all_pages_async
from berth.shim.wire.errors import (
    BerthError,
    FailedPrecondition,
    Internal,
    Reconnect,
    Unavailable,
)

log = logging.getLogger("berth.grpc")

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
MAX_SHARED_IN_FLIGHT = 100  # berthd serves 128 per connection
LIST_BATCH = 100

CODES = {
    "not_found": StatusCode.NOT_FOUND,
    "already_exists": StatusCode.ALREADY_EXISTS,
    "invalid_argument": StatusCode.INVALID_ARGUMENT,
    "out_of_range": StatusCode.OUT_OF_RANGE,  # the content service's own (services.content)
    "failed_precondition": StatusCode.FAILED_PRECONDITION,
    "unavailable": StatusCode.UNAVAILABLE,
    "unimplemented": StatusCode.UNIMPLEMENTED,
    "canceled": StatusCode.CANCELLED,
    "deadline_exceeded": StatusCode.DEADLINE_EXCEEDED,
    "permission_denied": StatusCode.PERMISSION_DENIED,
    "internal": StatusCode.INTERNAL,
}

# What a transport calls (calls.Route): (request, or the iterator of requests; its
# calls.Context) -> a coroutine, or an async iterator of responses.
Handler = Callable[[Any, Any], Any]

S = TypeVar("S", bound="Service")


def grpc_code(exc: BerthError) -> StatusCode:
    return CODES.get(exc.code, StatusCode.UNKNOWN)


class Backend:
    """berthd as the front end reaches it: one shared connection for short calls (opened
    again after a loss), and a connection of its own for every long call or stream.

    It rides over berthd's restarts and upgrades, so that gRPC clients do not see them:
    connecting is retried while berthd is away (up to PATIENCE seconds; its listening
    socket queues connections during a handover, a restart refuses them briefly); a call
    berthd answered Reconnect was not carried out and is repeated; Tasks/Wait is repeated
    on any loss (it is idempotent); and an event subscription resumes after the last
    event it delivered."""

    PATIENCE = 15.0
    RETRY = 0.02

    def __init__(self, address: str, state_dir: str = "") -> None:
        self.address = address
        self.state_dir = state_dir  # berthd's: the record of this process, content.generation
        self.handoff = Handoff(state_dir)  # subscriptions passed on when replaced
        self._shared: AsyncClient | None = None
        self._connecting = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_SHARED_IN_FLIGHT)

    async def connect(self) -> AsyncClient:
        """A new connection, waiting (bounded) for a berthd that is away."""
        deadline = asyncio.get_running_loop().time() + self.PATIENCE
        while True:
            try:
                return await AsyncClient.connect(self.address)
            except Unavailable:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(self.RETRY)

    async def _client(self) -> AsyncClient:
        async with self._connecting:
            if self._shared is None or self._shared.closed:
                self._shared = await self.connect()
            return self._shared

    async def call(self, method: str, params: dict[str, Any], **meta: Any) -> Any:
        deadline = asyncio.get_running_loop().time() + self.PATIENCE
        while True:
            async with self._slots:
                client = await self._client()
                try:
                    return await client.call(method, params, **meta)
                except Reconnect:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
            await asyncio.sleep(self.RETRY)

    async def call_alone(self, method: str, params: dict[str, Any], **meta: Any) -> Any:
        """An idempotent call that may wait a long time (Tasks/Wait): on its own
        connection, and repeated across any loss of berthd."""
        while True:
            client = await self.connect()
            try:
                return await client.call(method, params, **meta)
            except Unavailable:
                await asyncio.sleep(self.RETRY)
            finally:
                await client.aclose()

    async def stream(self, method: str, params: dict[str, Any], **meta: Any) -> AsyncIterator[Any]:
        client = await self.connect()
        try:
            async for item in client.stream(method, params, **meta):
                yield item
        finally:
            await client.aclose()

    async def events(
        self, params: dict[str, Any], cursor: Cursor | None = None, **meta: Any
    ) -> AsyncGenerator[Any, None]:
        """berthd's event stream, resumed after the last event across any loss of berthd
        (`after_seq` of its `epoch`: the numbering survives a handover, so nothing is lost
        or repeated; a daemon with another numbering replays all it has). It starts where
        `cursor` says (a subscription handed over by a previous berth-grpc) and keeps
        `cursor` at the last event it gave."""
        cursor = cursor if cursor is not None else Cursor()
        while True:
            asked = {**params, **cursor.params()}
            try:
                async for envelope in self.stream("events.subscribe", asked, **meta):
                    mark = _mark(envelope)
                    if mark is not None:
                        if cursor.epoch == mark[0] and (cursor.seq or 0) >= mark[1]:
                            continue
                        cursor.epoch, cursor.seq = mark
                    yield envelope
                return
            except Unavailable:
                await asyncio.sleep(self.RETRY)

    async def session(self) -> AsyncClient:
        """A connection for a stateful exchange (an ingest lives as long as it)."""
        return await self.connect()

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(2.0):  # not wait_for: see client.connect
                await self.call("version", {})
            return True
        except (TimeoutError, BerthError):
            return False

    async def aclose(self) -> None:
        if self._shared is not None:
            await self._shared.aclose()


def _mark(envelope: Any) -> tuple[str, int] | None:
    """(epoch, seq) of an envelope, if it carries them."""
    if isinstance(envelope, dict):
        epoch, seq = envelope.get("epoch"), envelope.get("seq")
        if isinstance(epoch, str) and isinstance(seq, int):
            return epoch, seq
    return None


class Call:
    """What one RPC knows of its caller: the namespace and lease headers."""

    def __init__(self, context: Any) -> None:
        self.context = context
        headers: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            # The first value of a repeated header wins, as containerd reads it: its Go
            # client nests contexts (namespaces.WithNamespace on a context that has one)
            # by putting the newest value first, the older ones after it.
            headers.setdefault(key, value)
        self.namespace: str | None = headers.get(NAMESPACE_HEADER) or None
        self.lease: str | None = headers.get(LEASE_HEADER) or None

    def meta(self, *, namespaced: bool = True) -> dict[str, Any]:
        if namespaced and not self.namespace:
            raise FailedPrecondition("namespace is required: set the containerd-namespace header")
        return {"namespace": self.namespace, "lease": self.lease}


async def abort_with(context: Any, exc: BerthError) -> None:
    await context.abort(grpc_code(exc), exc.message)


def _unexpected(name: str, exc: Exception) -> BerthError:
    """A bug of this front end, not of the caller: logged, and answered INTERNAL."""
    log.exception("%s failed", name)
    return Internal(f"{name}: {type(exc).__name__}: {exc}")


def unary(
    fn: Callable[[S, Any, Call], Awaitable[Any]],
) -> Callable[[S, Any, Any], Awaitable[Any]]:
    """One request, one response; berth's errors answered with their gRPC code."""

    @functools.wraps(fn)
    async def handler(self: S, request: Any, context: Any) -> Any:
        call = Call(context)
        try:
            # what the call's log lines are about: a task's calls name its container
            with logs.scope(
                call.namespace or "",
                getattr(request, "container_id", ""),
                getattr(request, "exec_id", ""),
            ):
                return await fn(self, request, call)
        except BerthError as exc:
            await abort_with(context, exc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            await abort_with(context, _unexpected(fn.__qualname__, exc))

    return handler


def streaming(
    fn: Callable[[S, Any, Call], AsyncIterator[Any]],
) -> Callable[[S, Any, Any], AsyncIterator[Any]]:
    """One request, a stream of responses; an error ends the stream with its gRPC code."""

    @functools.wraps(fn)
    async def handler(self: S, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, Call(context)):
                yield item
        except BerthError as exc:
            await abort_with(context, exc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            await abort_with(context, _unexpected(fn.__qualname__, exc))

    return handler


def event_filters(values: Any) -> Callable[[dict[str, Any]], bool]:
    return parse_event_filters(list(values))


def object_filters(values: Any, adapt: Adaptor) -> ObjectPredicate:
    """containerd's filters on one kind of its objects, with its grammar and matching
    (filters.parse_object_filters); `adapt` says which fields the object has."""
    return parse_object_filters(list(values), adapt)


def empty() -> Any:
    return capi.types().Empty()


class Service:
    """One containerd service. A subclass names, as literal tables, the methods it serves
    (`methods()`: containerd's method name -> its handler) and the ones it deliberately
    does not (`UNIMPLEMENTED`: name -> why); the binding refuses to start on anything else."""

    UNIMPLEMENTED: ClassVar[Mapping[str, str]] = {}

    def __init__(self, backend: Backend, server_uuid: str = "") -> None:
        self.backend = backend
        self.server_uuid = server_uuid

    def methods(self) -> dict[str, Handler]:
        raise NotImplementedError

    async def _call(self, call: Call, method: str, params: dict[str, Any], **kw: Any) -> Any:
        return await self.backend.call(method, params, **call.meta(**kw))

    async def _list(
        self, call: Call | None, method: str, field: str, params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Every item of one of berthd's lists, page by page (one reply frame is bounded)."""
        meta = call.meta() if call is not None else {}

        async def one(m: str, p: dict[str, Any]) -> Any:
            return await self.backend.call(m, p, **meta)

        return await all_pages_async(one, method, field, params)
