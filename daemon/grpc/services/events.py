"""containerd's Events service: berthd's event stream, re-encoded as containerd's envelopes.
Events come from berth's own objects only, so nothing can be published into it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, filters, log, streaming
from berth.shim.wire.errors import BerthError, Unavailable


class Events(Service):
    """Serves containerd.services.events.v1.Events."""

    UNIMPLEMENTED = {
        "Publish": "events come only from berthd's own objects: clients cannot post any",
        "Forward": "it relays shims' events to containerd; berth's shims report to berthd",
    }

    def methods(self) -> dict[str, Handler]:
        return {
            "Subscribe": self.subscribe,
        }

    @streaming
    async def subscribe(self, request: Any, call: Call) -> AsyncIterator[Any]:
        filters(request.filters)  # a bad filter fails here, with containerd's code
        handoff = self.backend.handoff
        key = handoff.key(call.namespace, list(request.filters))
        cursor = handoff.take(key)
        if cursor.since is None and cursor.seq is None:
            cursor.since = time.time_ns()  # if it is handed on before its first event
        events = self.backend.events({"filters": list(request.filters)}, cursor)
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
                await asyncio.wait({following})
                if not following.cancelled():
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
