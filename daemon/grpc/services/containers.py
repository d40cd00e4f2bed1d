"""containerd's Containers service: container records (id, runtime, spec, labels) onto
berthd's, the OCI spec carried as containerd's JSON Any."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import (
    Call,
    Handler,
    Service,
    empty,
    filters,
    streaming,
    unary,
)


class Containers(Service):
    """Serves containerd.services.containers.v1.Containers."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Get": self.get,
            "List": self.list,
            "ListStream": self.list_stream,
            "Create": self.create,
            "Update": self.update,
            "Delete": self.delete,
        }

    @unary
    async def get(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "containers.get", {"id": request.id})
        return capi.types().containers.GetContainerResponse(
            container=capi.container_to_message(doc)
        )

    @unary
    async def list(self, request: Any, call: Call) -> Any:
        result = {"containers": await self._list(call, "containers.list", "containers", {})}
        keep = filters(request.filters)
        return capi.types().containers.ListContainersResponse(
            containers=[
                capi.container_to_message(c) for c in result.get("containers", []) if keep(c)
            ]
        )

    @streaming
    async def list_stream(self, request: Any, call: Call) -> AsyncIterator[Any]:
        result = {"containers": await self._list(call, "containers.list", "containers", {})}
        keep = filters(request.filters)
        for c in result.get("containers", []):
            if keep(c):
                yield capi.types().containers.ListContainerMessage(
                    container=capi.container_to_message(c)
                )

    @unary
    async def create(self, request: Any, call: Call) -> Any:
        doc = capi.container_from_message(request.container)
        created = await self._call(call, "containers.create", {"container": doc})
        return capi.types().containers.CreateContainerResponse(
            container=capi.container_to_message(created)
        )

    @unary
    async def update(self, request: Any, call: Call) -> Any:
        update = request.container
        current = await self._call(call, "containers.get", {"id": update.id})
        paths = list(request.update_mask.paths)
        extension_paths = [p for p in paths if p == "extensions" or p.startswith("extensions.")]
        others = ("spec", "image", *extension_paths)
        labels = capi.label_paths(paths, "container", others)
        params: dict[str, Any] = {"id": update.id}
        if not paths or labels:
            params["labels"] = capi.apply_label_mask(
                current.get("labels") or {}, dict(update.labels), labels
            )
        if (not paths and update.HasField("spec")) or "spec" in paths:
            params["spec"] = capi.from_json_any(update.spec, capi.SPEC_TYPE, "spec")
        if "image" in paths or (not paths and update.image):
            params["image"] = update.image
        if not paths or extension_paths:
            params["extensions"] = _masked_extensions(
                current.get("extensions") or {},
                capi.extensions_to_wire(update.extensions),
                [p.removeprefix("extensions") for p in extension_paths],
            )
        updated = await self._call(call, "containers.update", params)
        return capi.types().containers.UpdateContainerResponse(
            container=capi.container_to_message(updated)
        )

    @unary
    async def delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "containers.delete", {"id": request.id})
        return empty()


def _masked_extensions(
    current: dict[str, Any], update: dict[str, Any], keys: list[str]
) -> dict[str, Any]:
    """containerd's mask for extensions: `extensions` (or no mask) replaces them all,
    `extensions.<name>` sets one (or removes it, when the update lacks it)."""
    if not keys or "" in keys:
        return update
    result = dict(current)
    for key in (k.removeprefix(".") for k in keys):
        if key in update:
            result[key] = update[key]
        else:
            result.pop(key, None)
    return result
