"""containerd's Namespaces service, onto berthd's namespaces."""

from __future__ import annotations

from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, empty, unary
from berth.shim.wire.errors import InvalidArgument, NotFound


class Namespaces(Service):
    """Serves containerd.services.namespaces.v1.Namespaces."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Get": self.get,
            "List": self.list,
            "Create": self.create,
            "Update": self.update,
            "Delete": self.delete,
        }

    @unary
    async def get(self, request: Any, call: Call) -> Any:
        t = capi.types()
        try:
            ns = await self.backend.call("namespaces.get", {"name": request.name})
        except (NotFound, InvalidArgument):  # containerd answers for any name at all
            # containerd 1.6 answers for a namespace nobody created yet (dockerd asks for
            # `moby` before it ever creates anything in it); the first object creates it.
            ns = {"name": request.name, "labels": {}}
        return t.namespaces.GetNamespaceResponse(
            namespace=t.namespaces.Namespace(name=ns["name"], labels=ns.get("labels") or {})
        )

    @unary
    async def list(self, request: Any, call: Call) -> Any:
        # containerd 1.6 lists every namespace whatever the request's filter says
        t = capi.types()
        result = {"namespaces": await self._list(None, "namespaces.list", "namespaces", {})}
        return t.namespaces.ListNamespacesResponse(
            namespaces=[
                t.namespaces.Namespace(name=n["name"], labels=n.get("labels") or {})
                for n in result.get("namespaces", [])
            ]
        )

    @unary
    async def create(self, request: Any, call: Call) -> Any:
        t = capi.types()
        ns = await self.backend.call(
            "namespaces.create",
            {"name": request.namespace.name, "labels": dict(request.namespace.labels)},
            **call.meta(namespaced=False),  # its event carries the caller's namespace
        )
        return t.namespaces.CreateNamespaceResponse(
            namespace=t.namespaces.Namespace(name=ns["name"], labels=ns.get("labels") or {})
        )

    @unary
    async def update(self, request: Any, call: Call) -> Any:
        t = capi.types()
        paths = list(request.update_mask.paths)
        for path in paths:
            # containerd updates a namespace's labels one by one: `labels` is refused too
            if not path.startswith("labels."):
                raise InvalidArgument(f"cannot update {path!r} field")
        try:
            current = await self.backend.call("namespaces.get", {"name": request.namespace.name})
        except NotFound:
            current = {}  # berthd creates it, as containerd does
        labels = capi.apply_label_mask(
            current.get("labels") or {}, dict(request.namespace.labels), paths
        )
        ns = await self.backend.call(
            "namespaces.update",
            {
                "name": request.namespace.name,
                "labels": labels,
                "changed": dict(request.namespace.labels),  # for the event, as containerd's
            },
            **call.meta(namespaced=False),
        )
        return t.namespaces.UpdateNamespaceResponse(
            namespace=t.namespaces.Namespace(name=ns["name"], labels=ns.get("labels") or {})
        )

    @unary
    async def delete(self, request: Any, call: Call) -> Any:
        await self.backend.call(
            "namespaces.delete", {"name": request.name}, **call.meta(namespaced=False)
        )
        return empty()
