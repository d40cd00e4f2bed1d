"""containerd's Events service: berthd's event stream, re-encoded as containerd's envelopes,
and a client's own events (Publish, Forward) passed to berthd as they are: an opaque Any
that every subscriber receives unchanged (daemon/events.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import (
    Call,
    Handler,
    Service,
    empty,
    event_filters,
    log,
    streaming,
    unary,
)
from berth.shim.wire.errors import BerthError, InvalidArgument, Unavailable

# what a cancelled subscription's pending step gets to end in (it ends at once unless a
# cancellation was lost below it, as 3.11's wait_for could lose one)
FOLLOW_END_TIMEOUT = 10.0


class Events(Service):
    """Serves containerd.services.events.v1.Events."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Publish": self.publish,
            "Forward": self.forward,
            "Subscribe": self.subscribe,
        }

    @unary
    async def publish(self, request: Any, call: Call) -> Any:
        """An event of the caller's namespace, stamped now (containerd's Exchange.Publish)."""
        await self._call(call, "events.publish", _published(request.topic, request))
        return empty()

    @unary
    async def forward(self, request: Any, call: Call) -> Any:
        """A whole envelope, with its own namespace and time (what containerd's shims send
        through `containerd publish`)."""
        if not request.HasField("envelope"):
            raise InvalidArgument("forward: an envelope is required")
        envelope = request.envelope
        _check_namespace(envelope.namespace)
        when = capi.from_timestamp(envelope.timestamp) if envelope.HasField("timestamp") else 0
        if not when:
            raise InvalidArgument("timestamp must be set on forwarded event")
        params = _published(envelope.topic, envelope)
        params.update(namespace=envelope.namespace, timestamp=when)
        await self.backend.call("events.publish", params, **call.meta(namespaced=False))
        return empty()

    @streaming
    async def subscribe(self, request: Any, call: Call) -> AsyncIterator[Any]:
        event_filters(request.filters)  # a bad filter fails here, with containerd's code
        handoff = self.backend.handoff
        key = handoff.key(call.namespace, list(request.filters))
        cursor = handoff.take(key)
        if cursor.since is None and cursor.seq is None:
            cursor.since = time.time_ns()  # if it is handed on before its first event
        # containerd's subscribers see what clients publish (Publish, Forward) too
        events = self.backend.events(
            {"filters": list(request.filters), "with_published": True}, cursor
        )
        closing = asyncio.ensure_future(handoff.closing.wait())
        following: asyncio.Future[Any] | None = None
        try:
            while True:
                following = asyncio.ensure_future(events.__anext__())
                await asyncio.wait({following, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():  # this front end is being replaced
                    following.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await following  # the generator stops before it is closed
                    handoff.leave(key, cursor)
                    raise Unavailable("berth-grpc is being replaced: subscribe again")
                try:
                    envelope = following.result()
                except StopAsyncIteration:
                    return
                message = self._convert(envelope)
                if message is not None:
                    yield message
        finally:
            closing.cancel()
            if following is not None and not following.done():
                # the call was cancelled while it waited: the generator's step must end
                # before the generator can be closed (and its berthd stream with it)
                following.cancel()
                await asyncio.wait({following}, timeout=FOLLOW_END_TIMEOUT)
            if following is not None and not following.done():
                # a bug below: the call ends rather than hang (the generator stays open)
                log.warning("an event subscription's step did not end when cancelled")
            else:
                if following is not None and not following.cancelled():
                    following.exception()  # retrieved: it ends with the call, unlogged
                await events.aclose()

    @staticmethod
    def _convert(envelope: Any) -> Any:
        try:
            return capi.envelope_to_message(envelope)
        except (BerthError, ValueError, TypeError) as exc:
            # one odd event must not end a subscriber's stream (dockerd learns of every
            # exit from it)
            log.warning("event %s not converted: %s", envelope.get("topic"), exc)
            return None


def _check_namespace(namespace: str) -> None:
    """A forwarded envelope's namespace, held to containerd's identifier rule: berthd's
    own rule for the names it has always taken is looser ("a..b", "a-")."""
    capi.check_identifier(namespace, "event envelope has invalid namespace")


def _published(topic: str, holder: Any) -> dict[str, Any]:
    """events.publish's parameters for `holder.event`, a protobuf Any."""
    if not holder.HasField("event"):
        raise InvalidArgument("an event is required")
    event = holder.event
    return {
        "topic": topic,
        "type_url": event.type_url,
        "value": base64.b64encode(event.value).decode("ascii"),
    }
