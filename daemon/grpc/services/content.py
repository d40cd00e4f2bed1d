"""containerd's Content service: blobs by digest, and the ingest protocol that writes them.

Reads and writes go in pieces that fit berthd's frames (4 MiB), whatever size containerd's
messages have (up to 32 MiB).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.client import AsyncClient
from berth.daemon.grpc.services.base import (
    LIST_BATCH,
    Call,
    Handler,
    Service,
    abort_with,
    empty,
    filters,
    streaming,
    unary,
)
from berth.shim.wire.errors import AlreadyExists, BerthError, InvalidArgument

READ_CHUNK = 1 << 20
WRITE_CHUNK = 1 << 20  # gRPC messages may hold 32 MiB; berthd's frames hold 4


class Content(Service):
    """Serves containerd.services.content.v1.Content."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Info": self.info,
            "Update": self.update,
            "List": self.list,
            "Delete": self.delete,
            "Read": self.read,
            "Status": self.status,
            "ListStatuses": self.list_statuses,
            "Abort": self.abort,
            "Write": self.write,
        }

    @unary
    async def info(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "content.info", {"digest": request.digest})
        return capi.types().content.InfoResponse(info=capi.content_info_to_message(doc))

    @unary
    async def update(self, request: Any, call: Call) -> Any:
        info = request.info
        current = await self._call(call, "content.info", {"digest": info.digest})
        paths = capi.label_paths(list(request.update_mask.paths), "content")
        labels = capi.apply_label_mask(current.get("labels") or {}, dict(info.labels), paths)
        doc = await self._call(call, "content.update", {"digest": info.digest, "labels": labels})
        return capi.types().content.UpdateResponse(info=capi.content_info_to_message(doc))

    @streaming
    async def list(self, request: Any, call: Call) -> AsyncIterator[Any]:
        t = capi.types()
        keep = filters(request.filters)
        result = {"content": await self._list(call, "content.list", "content", {})}
        batch = [capi.content_info_to_message(c) for c in result.get("content", []) if keep(c)]
        for i in range(0, len(batch), LIST_BATCH):
            yield t.content.ListContentResponse(info=batch[i : i + LIST_BATCH])

    @unary
    async def delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "content.delete", {"digest": request.digest})
        return empty()

    @streaming
    async def read(self, request: Any, call: Call) -> AsyncIterator[Any]:
        t = capi.types()
        info = await self._call(call, "content.info", {"digest": request.digest})
        size = int(info.get("size") or 0)
        offset = int(request.offset)
        if offset < 0 or offset > size:
            raise InvalidArgument(f"offset {offset} outside the blob's {size} bytes")
        end = size if request.size <= 0 else min(size, offset + int(request.size))
        while offset < end:
            piece = await self._call(
                call,
                "content.read",
                {"digest": request.digest, "offset": offset, "size": min(READ_CHUNK, end - offset)},
            )
            data = piece.get("data") or b""
            if not data:
                break
            yield t.content.ReadContentResponse(offset=offset, data=data)
            offset += len(data)

    @unary
    async def status(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "content.status", {"ref": request.ref})
        return capi.types().content.StatusResponse(status=_ingest_status(doc))

    @unary
    async def list_statuses(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "content.ingests", {})
        keep = filters(request.filters)
        return capi.types().content.ListStatusesResponse(
            statuses=[_ingest_status(s) for s in result.get("ingests", []) if keep(s)]
        )

    @unary
    async def abort(self, request: Any, call: Call) -> Any:
        await self._call(call, "content.write.abort", {"ref": request.ref})
        return empty()

    async def write(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """containerd's ingest protocol: the first message names the ref; STAT reports,
        WRITE appends at the current offset, COMMIT (with optional data) seals it. The
        ingest lives on a berthd connection of its own, released when the stream ends."""
        call = Call(context)
        session: AsyncClient | None = None
        try:
            meta = call.meta()
            session = await self.backend.session()
            async for item in self._write_session(requests, session, meta):
                yield item
        except BerthError as exc:
            await abort_with(context, exc)
        finally:
            if session is not None:
                await session.aclose()

    async def _write_session(
        self, requests: AsyncIterator[Any], session: AsyncClient, meta: dict[str, Any]
    ) -> AsyncIterator[Any]:
        t = capi.types()
        ref = ""
        total, expected = 0, ""
        labels: dict[str, str] = {}
        offset = 0
        started_at = time.time_ns()
        async for req in requests:
            if not ref:
                if not req.ref:
                    raise InvalidArgument("the first write request must name a ref")
                ref = req.ref
                total, expected = int(req.total), req.expected
                opened = await session.call(
                    "content.write.open", {"ref": ref, "total": total, "expected": expected}, **meta
                )
                if opened.get("exists"):
                    raise AlreadyExists(f"content {expected}: already exists")
                offset = int(opened.get("offset") or 0)
            elif req.ref and req.ref != ref:
                raise InvalidArgument(f"ref changed from {ref!r} to {req.ref!r} within a write")
            if req.total:
                total = int(req.total)
            if req.expected:
                expected = req.expected
            if req.labels:
                labels = dict(req.labels)
            action = int(req.action)
            response = t.content.WriteContentResponse(
                action=action,
                started_at=capi.timestamp(started_at),
                updated_at=capi.timestamp(time.time_ns()),
                total=total,
            )
            if action in (1, 2):  # WRITE, COMMIT
                if req.offset == 0 and offset > 0:
                    # containerd truncates an ingest written again from the start
                    await session.call("content.write.abort", {"ref": ref}, **meta)
                    reopened = await session.call(
                        "content.write.open",
                        {"ref": ref, "total": total, "expected": expected},
                        **meta,
                    )
                    if reopened.get("exists"):
                        raise AlreadyExists(f"content {expected}: already exists")
                    offset = int(reopened.get("offset") or 0)
                elif req.offset and req.offset != offset:
                    raise InvalidArgument(
                        f"write at {req.offset} must occur at the current offset {offset}"
                    )
                data = bytes(req.data)
                for start in range(0, len(data), WRITE_CHUNK):  # berthd's frames are bounded
                    written = await session.call(
                        "content.write.chunk",
                        {"ref": ref, "data": data[start : start + WRITE_CHUNK], "offset": offset},
                        **meta,
                    )
                    offset = int(written["offset"])
                if action == 2:
                    committed = await session.call(
                        "content.write.commit",
                        {"ref": ref, "size": total, "expected": expected, "labels": labels},
                        **meta,
                    )
                    response.digest = committed["digest"]
            elif action != 0:
                raise InvalidArgument(f"unknown write action {action}")
            elif expected:
                response.digest = expected
            response.offset = offset
            yield response


def _ingest_status(doc: dict[str, Any]) -> Any:
    return capi.types().content.Status(
        ref=doc["ref"],
        offset=int(doc.get("offset") or 0),
        total=int(doc.get("total") or 0),
        expected=doc.get("expected") or "",
        started_at=capi.timestamp(doc.get("started_at")),
        updated_at=capi.timestamp(doc.get("updated_at")),
    )
