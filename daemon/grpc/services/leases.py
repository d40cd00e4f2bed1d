"""containerd's Leases service, onto berthd's leases (which guard content and snapshots
from garbage collection the same way)."""

from __future__ import annotations

import uuid
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, empty, object_filters, unary
from berth.shim.wire.errors import BerthError, InvalidArgument, NotFound, Unimplemented


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
        if not request.id:  # containerd: no such lease
            raise NotFound(f"lease {request.id!r}: not found")
        await self._call(call, "leases.delete", {"id": request.id, "sync": request.sync})
        return empty()

    @unary
    async def list(self, request: Any, call: Call) -> Any:
        result = {"leases": await self._list(call, "leases.list", "leases", {})}
        keep = object_filters(request.filters, capi.adapt_lease)
        return capi.types().leases.ListResponse(
            leases=[capi.lease_to_message(x) for x in result.get("leases", []) if keep(x)]
        )

    async def _lease_resource(self, call: Call, method: str, request: Any) -> Any:
        try:
            kind = _resource_kind(request.resource)
        except BerthError:
            # containerd looks the lease up first: an unknown lease is NotFound whatever
            # the resource
            await self._call(call, "leases.resources", {"id": request.id})
            raise
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
            elif kind == "ingest":
                kind = "ingests"
            resources.append(t.leases.Resource(id=r["key"], type=kind))
        return t.leases.ListResourcesResponse(resources=resources)


def _resource_kind(resource: Any) -> str:
    """berth's kind for one of containerd's lease resources, checked as containerd checks
    it: `content` (its id a digest), `ingests`, `snapshots/<snapshotter>`; any other type
    is Unimplemented, as containerd answers."""
    kind = str(resource.type)
    parts = kind.split("/")
    if parts[0] in ("content", "ingests"):
        if len(parts) != 1:
            raise InvalidArgument(f"invalid resource type {kind}")
        if kind == "content" and not capi.is_digest(resource.id):
            raise InvalidArgument(f"invalid content resource id {resource.id}")
        return "ingest" if kind == "ingests" else kind  # berth's kind: one ingest
    if parts[0] == "snapshots":
        if len(parts) != 2 or not parts[1]:
            raise InvalidArgument(f"invalid snapshot resource type {kind}")
        # containerd: "snapshots/<snapshotter>"; berth: "snapshot/<snapshotter>"
        return f"snapshot/{parts[1]}"
    raise Unimplemented(f"resource type {kind} not supported yet")
