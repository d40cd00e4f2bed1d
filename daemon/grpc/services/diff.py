"""containerd's Diff service: applying a layer onto mounts, and computing one between two."""

from __future__ import annotations

from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, unary
from berth.shim.wire.errors import Unimplemented

# The media types containerd 1.6's walking differ produces ("" is its default, gzip); any
# other is NotImplemented there, which clients read as "try another differ or format".
DIFF_MEDIA_TYPES = (
    "",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
)


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
        if request.media_type not in DIFF_MEDIA_TYPES:
            raise Unimplemented(
                f"unsupported diff media type: {request.media_type}: not implemented"
            )
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
        desc = capi.descriptor_from_wire(result["diff"])
        # containerd's descriptor has no annotations: the diff ID is the blob's
        # `containerd.io/uncompressed` label (content Info), where its clients read it; one
        # copied into a manifest as it is would change the manifest's digest
        desc.ClearField("annotations")
        return capi.types().diff.DiffResponse(diff=desc)
