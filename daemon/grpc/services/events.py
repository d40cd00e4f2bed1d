"""containerd's Events service: berthd's event stream, re-encoded as containerd's envelopes.
Events come from berth's own objects only, so nothing can be published into it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, filters, log, streaming
from berth.shim.wire.errors import BerthError


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
        async for envelope in self.backend.events({"filters": list(request.filters)}):
            try:
                message = capi.envelope_to_message(envelope)
            except (BerthError, ValueError, TypeError) as exc:
                # one odd event must not end a subscriber's stream (dockerd learns of
                # every exit from it)
                log.warning("event %s not converted: %s", envelope.get("topic"), exc)
                continue
            if message is not None:
                yield message
