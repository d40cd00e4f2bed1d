"""containerd's Snapshots service, onto berthd's snapshotters (overlayfs, native)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import (
    LIST_BATCH,
    Call,
    Handler,
    Service,
    empty,
    filters,
    streaming,
    unary,
)


class Snapshots(Service):
    """Serves containerd.services.snapshots.v1.Snapshots."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Prepare": self.prepare,
            "View": self.view,
            "Mounts": self.mounts,
            "Commit": self.commit,
            "Remove": self.remove,
            "Stat": self.stat,
            "Update": self.update,
            "List": self.list,
            "Usage": self.usage,
            "Cleanup": self.cleanup,
        }

    @unary
    async def prepare(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "snapshots.prepare", _snap_params(request))
        return capi.types().snapshots.PrepareSnapshotResponse(
            mounts=capi.mounts_from_wire(result["mounts"])
        )

    @unary
    async def view(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "snapshots.view", _snap_params(request))
        return capi.types().snapshots.ViewSnapshotResponse(
            mounts=capi.mounts_from_wire(result["mounts"])
        )

    @unary
    async def mounts(self, request: Any, call: Call) -> Any:
        result = await self._call(
            call, "snapshots.mounts", {"snapshotter": request.snapshotter, "key": request.key}
        )
        return capi.types().snapshots.MountsResponse(mounts=capi.mounts_from_wire(result["mounts"]))

    @unary
    async def commit(self, request: Any, call: Call) -> Any:
        await self._call(
            call,
            "snapshots.commit",
            {
                "snapshotter": request.snapshotter,
                "name": request.name,
                "key": request.key,
                "labels": dict(request.labels),
            },
        )
        return empty()

    @unary
    async def remove(self, request: Any, call: Call) -> Any:
        await self._call(
            call, "snapshots.remove", {"snapshotter": request.snapshotter, "key": request.key}
        )
        return empty()

    @unary
    async def stat(self, request: Any, call: Call) -> Any:
        doc = await self._call(
            call, "snapshots.stat", {"snapshotter": request.snapshotter, "key": request.key}
        )
        return capi.types().snapshots.StatSnapshotResponse(info=capi.snapshot_info_to_message(doc))

    @unary
    async def update(self, request: Any, call: Call) -> Any:
        info = request.info
        current = await self._call(
            call, "snapshots.stat", {"snapshotter": request.snapshotter, "key": info.name}
        )
        paths = capi.label_paths(list(request.update_mask.paths), "snapshot")
        labels = capi.apply_label_mask(current.get("labels") or {}, dict(info.labels), paths)
        doc = await self._call(
            call,
            "snapshots.update",
            {"snapshotter": request.snapshotter, "key": info.name, "labels": labels},
        )
        return capi.types().snapshots.UpdateSnapshotResponse(
            info=capi.snapshot_info_to_message(doc)
        )

    @streaming
    async def list(self, request: Any, call: Call) -> AsyncIterator[Any]:
        t = capi.types()
        keep = filters(request.filters)
        result = {
            "snapshots": await self._list(
                call, "snapshots.list", "snapshots", {"snapshotter": request.snapshotter}
            )
        }
        infos = [capi.snapshot_info_to_message(s) for s in result.get("snapshots", []) if keep(s)]
        for i in range(0, len(infos), LIST_BATCH):
            yield t.snapshots.ListSnapshotsResponse(info=infos[i : i + LIST_BATCH])

    @unary
    async def usage(self, request: Any, call: Call) -> Any:
        doc = await self._call(
            call, "snapshots.usage", {"snapshotter": request.snapshotter, "key": request.key}
        )
        return capi.types().snapshots.UsageResponse(
            size=int(doc.get("size") or 0), inodes=int(doc.get("inodes") or 0)
        )

    @unary
    async def cleanup(self, request: Any, call: Call) -> Any:
        return empty()  # berth's snapshotters leave no orphaned directories to clean up


def _snap_params(request: Any) -> dict[str, Any]:
    return {
        "snapshotter": request.snapshotter,
        "key": request.key,
        "parent": request.parent,
        "labels": dict(request.labels),
    }
