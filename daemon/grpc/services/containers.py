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
    object_filters,
    streaming,
    unary,
)
from berth.shim.wire.errors import InvalidArgument, NotFound
from berth.shim.wire.names import is_valid


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
        doc = await self._call(call, "containers.get", {"id": _lookup_id(request.id)})
        return capi.types().containers.GetContainerResponse(
            container=capi.container_to_message(doc)
        )

    @unary
    async def list(self, request: Any, call: Call) -> Any:
        result = {"containers": await self._list(call, "containers.list", "containers", {})}
        keep = object_filters(request.filters, capi.adapt_container)
        return capi.types().containers.ListContainersResponse(
            containers=[
                capi.container_to_message(c) for c in result.get("containers", []) if keep(c)
            ]
        )

    @streaming
    async def list_stream(self, request: Any, call: Call) -> AsyncIterator[Any]:
        result = {"containers": await self._list(call, "containers.list", "containers", {})}
        keep = object_filters(request.filters, capi.adapt_container)
        for c in result.get("containers", []):
            if keep(c):
                yield capi.types().containers.ListContainerMessage(
                    container=capi.container_to_message(c)
                )

    @unary
    async def create(self, request: Any, call: Call) -> Any:
        _validate(request.container)
        doc = capi.container_from_message(request.container)
        created = await self._call(call, "containers.create", {"container": doc})
        return capi.types().containers.CreateContainerResponse(
            container=capi.container_to_message(created)
        )

    @unary
    async def update(self, request: Any, call: Call) -> Any:
        """containerd's update: no mask replaces labels, spec, extensions, image and
        snapshot key (and refuses another runtime or snapshotter: they are immutable); a
        mask names `labels`, `labels.<key>`, `spec`, `extensions`, `extensions.<name>`,
        `image` or `snapshotkey`, any other path is refused. An `extensions.<name>` the
        update lacks is set to an empty Any, as containerd sets it."""
        update = request.container
        if not update.id:
            raise InvalidArgument("must specify a container id")
        current = await self._call(call, "containers.get", {"id": _lookup_id(update.id)})
        paths = list(request.update_mask.paths)
        if not paths:
            runtime = (current.get("runtime") or {}).get("name") or ""
            if (current.get("snapshotter") or "") != update.snapshotter:
                raise InvalidArgument("container.Snapshotter field is immutable")
            if runtime != update.runtime.name:
                raise InvalidArgument("container.Runtime.Name field is immutable")
            paths = ["labels", "spec", "extensions", "image", "snapshotkey"]
        labels = dict(current.get("labels") or {})
        extensions = dict(current.get("extensions") or {})
        given = capi.extensions_to_wire(update.extensions)
        params: dict[str, Any] = {"id": update.id}
        for path in paths:
            if path.startswith("labels."):
                key = path.removeprefix("labels.")
                labels[key] = update.labels.get(key, "")
            elif path.startswith("extensions."):
                key = path.removeprefix("extensions.")
                extensions[key] = given.get(key, {"type_url": "", "value": ""})
            elif path == "labels":
                labels = dict(update.labels)
            elif path == "extensions":
                extensions = given
            elif path == "spec":
                params["spec"] = capi.from_json_any(update.spec, capi.SPEC_TYPE, "spec")
            elif path == "image":
                params["image"] = update.image
            elif path == "snapshotkey":
                params["snapshot_key"] = update.snapshot_key
            else:
                raise InvalidArgument(f"cannot update {path!r} field on {update.id!r}")
        if any(not key for key in extensions):
            raise InvalidArgument("container.Extension keys must not be zero-length")
        params["labels"] = labels
        params["extensions"] = extensions
        updated = await self._call(call, "containers.update", params)
        return capi.types().containers.UpdateContainerResponse(
            container=capi.container_to_message(updated)
        )

    @unary
    async def delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "containers.delete", {"id": _lookup_id(request.id)})
        return empty()


def _validate(container: Any) -> None:
    """What containerd requires of a new container beyond berthd's own checks."""
    if not container.runtime.name:
        raise InvalidArgument("container.Runtime.Name must be set")
    if container.snapshot_key and not container.snapshotter:
        raise InvalidArgument("container.Snapshotter must be set if container.SnapshotKey is set")
    if any(not key for key in container.extensions):
        raise InvalidArgument("container.Extension keys must not be zero-length")


def _lookup_id(container_id: str) -> str:
    """An id to look up: one that is no identifier names no container (containerd answers
    NotFound, not InvalidArgument, for it)."""
    if not is_valid(container_id):
        raise NotFound(f"container {container_id!r}: not found")
    return container_id
