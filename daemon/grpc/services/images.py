"""containerd's Images service: image records (name, target descriptor, labels) onto
berthd's."""

from __future__ import annotations

from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, empty, filters, unary


class Images(Service):
    """Serves containerd.services.images.v1.Images."""

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
        doc = await self._call(call, "images.get", {"name": request.name})
        return capi.types().images.GetImageResponse(image=capi.image_to_message(doc))

    @unary
    async def list(self, request: Any, call: Call) -> Any:
        result = {"images": await self._list(call, "images.list", "images", {})}
        keep = filters(request.filters)
        return capi.types().images.ListImagesResponse(
            images=[capi.image_to_message(i) for i in result.get("images", []) if keep(i)]
        )

    @unary
    async def create(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "images.create", capi.image_from_message(request.image))
        return capi.types().images.CreateImageResponse(image=capi.image_to_message(doc))

    @unary
    async def update(self, request: Any, call: Call) -> Any:
        update = capi.image_from_message(request.image)
        paths = list(request.update_mask.paths)
        if paths:
            labels = capi.label_paths(paths, "image", ("target",))
            current = await self._call(call, "images.get", {"name": update["name"]})
            if labels:
                current["labels"] = capi.apply_label_mask(
                    current.get("labels") or {}, update["labels"], labels
                )
            if "target" in paths:
                current["target"] = update["target"]
            update = {k: current[k] for k in ("name", "labels", "target")}
        doc = await self._call(call, "images.update", update)
        return capi.types().images.UpdateImageResponse(image=capi.image_to_message(doc))

    @unary
    async def delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "images.delete", {"name": request.name, "sync": request.sync})
        return empty()
