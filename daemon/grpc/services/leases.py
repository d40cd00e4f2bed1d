"""containerd's Leases service, onto berthd's leases (which guard content and snapshots
from garbage collection the same way)."""

from __future__ import annotations

import uuid
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, empty, filters, unary


class Leases(Service):
    """Serves containerd.services.leases.v1.Leases."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Create": self.create,
            "Delete": self.delete,
            "List": self.list,
            "AddResource": self.add_resource,
            "DeleteResource": self.delete_resource,
            "ListResources": self.list_resources,
        }

    @unary
    async def create(self, request: Any, call: Call) -> Any:
        lease = await self._call(
            call,
            "leases.create",
            {"id": request.id or f"lease-{uuid.uuid4().hex[:16]}", "labels": dict(request.labels)},
        )
        return capi.types().leases.CreateResponse(lease=capi.lease_to_message(lease))

    @unary
    async def delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "leases.delete", {"id": request.id, "sync": request.sync})
        return empty()

    @unary
    async def list(self, request: Any, call: Call) -> Any:
        result = {"leases": await self._list(call, "leases.list", "leases", {})}
        keep = filters(request.filters)
        return capi.types().leases.ListResponse(
            leases=[capi.lease_to_message(x) for x in result.get("leases", []) if keep(x)]
        )

    async def _lease_resource(self, call: Call, method: str, request: Any) -> Any:
        kind = request.resource.type
        # containerd: "snapshots/<snapshotter>"; berth: "snapshot/<snapshotter>"
        if kind.startswith("snapshots/"):
            kind = "snapshot/" + kind[len("snapshots/") :]
        params = {"id": request.id, "kind": kind, "key": request.resource.id}
        await self._call(call, method, params)
        return empty()

    @unary
    async def add_resource(self, request: Any, call: Call) -> Any:
        return await self._lease_resource(call, "leases.add_resource", request)

    @unary
    async def delete_resource(self, request: Any, call: Call) -> Any:
        return await self._lease_resource(call, "leases.delete_resource", request)

    @unary
    async def list_resources(self, request: Any, call: Call) -> Any:
        t = capi.types()
        result = await self._call(call, "leases.resources", {"id": request.id})
        resources = []
        for r in result.get("resources", []):
            kind = r["kind"]
            if kind.startswith("snapshot/"):
                kind = "snapshots/" + kind[len("snapshot/") :]
            resources.append(t.leases.Resource(id=r["key"], type=kind))
        return t.leases.ListResourcesResponse(resources=resources)
