"""The edge: every handler bound to its declared method, its params converted to the
declared record before it runs, its reply checked against the contract in test daemons.

Binding is by the explicit tables each handler class returns; a method of the contract
without a handler, or a handler of no method, stops berthd at start-up (never a silent
"unknown method")."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from berth.daemon.api import schema
from berth.daemon.rpc import STREAM_DONE, CallContext
from berth.shim.wire.errors import Internal, InvalidArgument

TypedHandler = Callable[[CallContext, Any], Awaitable[Any]]
RawHandler = Callable[[CallContext, dict[str, Any]], Awaitable[Any]]

# Set by the test suite's daemons: a reply that does not match its declaration fails the
# call (internal error) instead of reaching the client.
CHECK_REPLIES = os.environ.get("BERTH_CHECK_REPLIES") == "1"


def bind(tables: list[dict[str, TypedHandler]], recovered: trio.Event) -> dict[str, RawHandler]:
    """The handlers of every method of the contract, wrapped by the edge."""
    handlers: dict[str, TypedHandler] = {}
    for table in tables:
        clash = handlers.keys() & table.keys()
        if clash:
            raise RuntimeError(f"methods bound twice: {sorted(clash)}")
        handlers.update(table)
    unbound = schema.METHODS.keys() - handlers.keys()
    unknown = handlers.keys() - schema.METHODS.keys()
    if unbound or unknown:
        raise RuntimeError(f"contract and handlers differ: unbound {unbound}, unknown {unknown}")
    return {name: _edge(name, schema.METHODS[name], fn, recovered) for name, fn in handlers.items()}


def _edge(name: str, method: schema.Method, fn: TypedHandler, recovered: trio.Event) -> RawHandler:
    async def handler(ctx: CallContext, params: dict[str, Any]) -> Any:
        try:
            typed = schema.convert_params(method, params)
        except schema.ValidationError as exc:
            raise InvalidArgument(f"{name}: {exc}") from None
        if method.after_recovery:
            await recovered.wait()  # the task table is complete only after recovery
        reply = await fn(ctx, typed)
        if CHECK_REPLIES and reply is not STREAM_DONE:
            try:
                schema.check_reply(name, method, reply)
            except schema.ValidationError as exc:
                raise Internal(f"{name}: the reply breaks the contract: {exc}") from None
        return reply

    return handler
