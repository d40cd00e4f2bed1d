"""containerd's Version service: a containerd 1.6 version, since engines parse it to decide
what the daemon can do, with berth's own as build metadata."""

from __future__ import annotations

from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, unary


class Version(Service):
    """Serves containerd.services.version.v1.Version."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Version": self.version,
        }

    @unary
    async def version(self, request: Any, call: Call) -> Any:
        info = await self.backend.call("version", {})
        # A containerd version first (engines parse it), berth's own as build metadata.
        return capi.types().version.VersionResponse(
            version=f"1.6.20+berth.{info.get('version', '')}", revision=info.get("version", "")
        )
