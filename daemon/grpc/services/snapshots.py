"""containerd's Snapshots service, onto berthd's snapshotters (overlayfs, native)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import (
    LIST_BATCH,
    Call,
    Handler,
    Service,
    empty,
    object_filters,
    streaming,
    unary,
)
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument, NotFound


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
        result = await self._create(call, "snapshots.prepare", request)
        return capi.types().snapshots.PrepareSnapshotResponse(
            mounts=capi.mounts_from_wire(result["mounts"])
        )

    @unary
    async def view(self, request: Any, call: Call) -> Any:
        result = await self._create(call, "snapshots.view", request)
        return capi.types().snapshots.ViewSnapshotResponse(
            mounts=capi.mounts_from_wire(result["mounts"])
        )

    async def _create(self, call: Call, method: str, request: Any) -> Any:
        """A Prepare or View; a parent that is not committed is InvalidArgument, as
        containerd answers (berthd: FailedPrecondition)."""
        try:
            return await self._call(call, method, _snap_params(request))
        except FailedPrecondition:
            if request.parent:
                parent = await self._call(call, "snapshots.stat", _lookup(request, request.parent))
                if parent.get("kind") != "committed":
                    raise InvalidArgument(
                        f"parent {request.parent!r} is not committed snapshot"
                    ) from None
            raise

    @unary
    async def mounts(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "snapshots.mounts", _lookup(request, request.key))
        return capi.types().snapshots.MountsResponse(mounts=capi.mounts_from_wire(result["mounts"]))

    @unary
    async def commit(self, request: Any, call: Call) -> Any:
        await self._call(
            call,
            "snapshots.commit",
            {
                "snapshotter": _snapshotter(request),
                "name": request.name,
                "key": request.key,
                "labels": dict(request.labels),
            },
        )
        return empty()

    @unary
    async def remove(self, request: Any, call: Call) -> Any:
        await self._call(call, "snapshots.remove", _lookup(request, request.key))
        return empty()

    @unary
    async def stat(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "snapshots.stat", _lookup(request, request.key))
        return capi.types().snapshots.StatSnapshotResponse(info=capi.snapshot_info_to_message(doc))

    @unary
    async def update(self, request: Any, call: Call) -> Any:
        info = request.info
        if not info.name:
            raise InvalidArgument("a snapshot update must name the snapshot")
        current = await self._call(call, "snapshots.stat", _lookup(request, info.name))
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
        keep = object_filters(request.filters, capi.adapt_snapshot)
        result = {
            "snapshots": await self._list(
                call, "snapshots.list", "snapshots", {"snapshotter": _snapshotter(request)}
            )
        }
        infos = [capi.snapshot_info_to_message(s) for s in result.get("snapshots", []) if keep(s)]
        for i in range(0, len(infos), LIST_BATCH):
            yield t.snapshots.ListSnapshotsResponse(info=infos[i : i + LIST_BATCH])

    @unary
    async def usage(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "snapshots.usage", _lookup(request, request.key))
        return capi.types().snapshots.UsageResponse(
            size=int(doc.get("size") or 0), inodes=int(doc.get("inodes") or 0)
        )

    @unary
    async def cleanup(self, request: Any, call: Call) -> Any:
        """Nothing to do (berth's snapshotters leave no orphaned directories behind), for
        a snapshotter that exists: none named, or an unknown one, is InvalidArgument, as
        containerd answers (which answers NotImplemented for the others)."""
        probe = {"snapshotter": _snapshotter(request), "key": "berth-grpc-cleanup"}
        with contextlib.suppress(NotFound):
            await self._call(call, "snapshots.stat", probe)  # the snapshotter's check
        return empty()


def _snapshotter(request: Any) -> str:
    """The snapshotter a request names: containerd requires one (no default)."""
    if not request.snapshotter:
        raise InvalidArgument("snapshotter argument missing")
    return str(request.snapshotter)


def _lookup(request: Any, key: str) -> dict[str, Any]:
    """The params naming one existing snapshot: no key names none (containerd answers
    NotFound, not InvalidArgument)."""
    snapshotter = _snapshotter(request)
    if not key:
        raise NotFound("snapshot  does not exist")
    return {"snapshotter": snapshotter, "key": key}


def _snap_params(request: Any) -> dict[str, Any]:
    return {
        "snapshotter": _snapshotter(request),
        "key": request.key,
        "parent": request.parent,
        "labels": dict(request.labels),
    }
