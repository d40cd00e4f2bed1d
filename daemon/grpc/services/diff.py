"""containerd's Diff service: applying a layer onto mounts, and computing one between two."""

from __future__ import annotations

from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, unary


class Diff(Service):
    """Serves containerd.services.diff.v1.Diff."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Apply": self.apply,
            "Diff": self.diff,
        }

    @unary
    async def apply(self, request: Any, call: Call) -> Any:
        result = await self._call(
            call,
            "diff.apply",
            {
                "layer": capi.descriptor_to_wire(request.diff),
                "mounts": capi.mounts_to_wire(request.mounts),
            },
        )
        return capi.types().diff.ApplyResponse(applied=capi.descriptor_from_wire(result["applied"]))

    @unary
    async def diff(self, request: Any, call: Call) -> Any:
        result = await self._call(
            call,
            "diff.diff",
            {
                "lower": capi.mounts_to_wire(request.left),
                "upper": capi.mounts_to_wire(request.right),
                "media_type": request.media_type or None,
                "labels": dict(request.labels),
            },
        )
        return capi.types().diff.DiffResponse(diff=capi.descriptor_from_wire(result["diff"]))
