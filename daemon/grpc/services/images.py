"""containerd's Images service: image records (name, target descriptor, labels) onto
berthd's."""

from __future__ import annotations

from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, empty, object_filters, unary
from berth.shim.wire.errors import InvalidArgument, NotFound


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
        doc = await self._call(call, "images.get", {"name": _lookup_name(request.name)})
        return capi.types().images.GetImageResponse(image=capi.image_to_message(doc))

    @unary
    async def list(self, request: Any, call: Call) -> Any:
        result = {"images": await self._list(call, "images.list", "images", {})}
        keep = object_filters(request.filters, capi.adapt_image)
        return capi.types().images.ListImagesResponse(
            images=[capi.image_to_message(i) for i in result.get("images", []) if keep(i)]
        )

    @unary
    async def create(self, request: Any, call: Call) -> Any:
        if not request.image.name:
            raise InvalidArgument("image name must not be empty")
        capi.check_target(request.image.target)
        doc = await self._call(call, "images.create", capi.image_from_message(request.image))
        return capi.types().images.CreateImageResponse(image=capi.image_to_message(doc))

    @unary
    async def update(self, request: Any, call: Call) -> Any:
        """containerd's mask: `labels`, `labels.<key>`, `target` (as a unit),
        `annotations` and `annotations.<key>` (the target's); no mask replaces the
        image; any other path is refused."""
        update = capi.image_from_message(request.image)
        if not update["name"]:
            raise InvalidArgument("image name is required for update")
        paths = list(request.update_mask.paths)
        if paths:
            current = await self._call(call, "images.get", {"name": update["name"]})
            labels = dict(current.get("labels") or {})
            target = dict(current["target"])
            annotations = dict(target.get("annotations") or {})
            for path in paths:
                if path.startswith("labels."):
                    key = path.removeprefix("labels.")
                    labels[key] = update["labels"].get(key, "")
                elif path.startswith("annotations."):
                    key = path.removeprefix("annotations.")
                    annotations[key] = update["target"]["annotations"].get(key, "")
                elif path == "labels":
                    labels = update["labels"]
                elif path == "target":
                    target = dict(update["target"])
                    annotations = dict(target.get("annotations") or {})
                elif path == "annotations":
                    annotations = dict(update["target"]["annotations"])
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on image")
            target["annotations"] = {k: v for k, v in annotations.items() if v}
            update = {"name": update["name"], "labels": labels, "target": target}
        capi.check_target(capi.descriptor_from_wire(update["target"]))
        doc = await self._call(call, "images.update", update)
        return capi.types().images.UpdateImageResponse(image=capi.image_to_message(doc))

    @unary
    async def delete(self, request: Any, call: Call) -> Any:
        await self._call(
            call, "images.delete", {"name": _lookup_name(request.name), "sync": request.sync}
        )
        return empty()


def _lookup_name(name: str) -> str:
    """An image name to look up: no name names no image (containerd: NotFound)."""
    if not name:
        raise NotFound('image "": not found')
    return name
