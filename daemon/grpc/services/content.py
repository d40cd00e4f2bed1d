"""containerd's Content service: blobs by digest, and the ingest protocol that writes them.

Reads and writes go in pieces that fit berthd's frames (4 MiB), whatever size containerd's
messages have (up to 32 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.client import AsyncClient
from berth.daemon.grpc.services.base import (
    LIST_BATCH,
    Backend,
    Call,
    Handler,
    Service,
    abort_with,
    empty,
    object_filters,
    streaming,
    unary,
)
from berth.daemon.storage import generation
from berth.daemon.storage.generation import Generation
from berth.shim.wire.errors import (
    AlreadyExists,
    BerthError,
    InvalidArgument,
    NotFound,
)

READ_CHUNK = 1 << 20  # what berthd's content.read answers at most (api/storage.MAX_READ)
WRITE_CHUNK = 1 << 20  # gRPC messages may hold 32 MiB; berthd's frames hold 4
KEPT_BLOB = 64 * 1024  # the largest blob whose bytes ContentCache keeps
KEPT_BYTES = 1 << 20  # all the bytes it keeps
KEPT_ENTRIES = 1024


class ContentCache:
    """Answers of Content/Info, and the bytes of small blobs, kept while berthd's content
    records are unchanged (storage/generation.py says how that is known: one stat).

    containerd's ctr asks Info and Read of its image's manifest and config ten times each
    for one `ctr run`; each is a round trip through berthd (~0.5 ms). An answer is kept
    with the generation read before it was asked, and given again only while the
    generation is the same: a delete or a label change anywhere drops them all. Errors
    (NotFound) are never kept. Without berthd's state dir (or its file) nothing is kept."""

    def __init__(self, state_dir: str) -> None:
        self._state_dir = state_dir
        # (namespace, digest) -> (generation, Info's document or None, bytes or None)
        self._entries: dict[tuple[str, str], tuple[Generation, Any, bytes | None]] = {}
        self._bytes = 0

    def generation(self) -> Generation | None:
        return generation.current(self._state_dir) if self._state_dir else None

    def _entry(self, key: tuple[str, str], now: Generation) -> tuple[Any, bytes | None] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] != now:
            self._drop(key)
            return None
        return entry[1], entry[2]

    def info(self, namespace: str, digest: str, now: Generation) -> Any:
        entry = self._entry((namespace, digest), now)
        return entry[0] if entry else None

    def blob(self, namespace: str, digest: str, now: Generation) -> bytes | None:
        entry = self._entry((namespace, digest), now)
        return entry[1] if entry else None

    def keep(
        self, namespace: str, digest: str, asked: Generation, *, info: Any = None, blob: Any = None
    ) -> None:
        """Keep what berthd answered when the generation was `asked`."""
        key = (namespace, digest)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == asked:
            info = info if info is not None else entry[1]
            blob = blob if blob is not None else entry[2]
        self._drop(key)
        if blob is not None and len(blob) > KEPT_BLOB:
            blob = None
        self._entries[key] = (asked, info, blob)
        self._bytes += len(blob) if blob is not None else 0
        while len(self._entries) > KEPT_ENTRIES or self._bytes > KEPT_BYTES:
            self._drop(next(iter(self._entries)))  # the oldest

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry[2] is not None:
            self._bytes -= len(entry[2])


class Content(Service):
    """Serves containerd.services.content.v1.Content."""

    def __init__(self, backend: Backend, server_uuid: str = "") -> None:
        super().__init__(backend, server_uuid)
        self.cache = ContentCache(backend.state_dir)

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
        doc = await self._info(call, request.digest)
        return capi.types().content.InfoResponse(info=capi.content_info_to_message(doc))

    async def _info(self, call: Call, digest: str) -> Any:
        now = self.cache.generation() if call.namespace else None
        if now is not None:
            doc = self.cache.info(call.namespace or "", digest, now)
            if doc is not None:
                return doc
        doc = await self._call(call, "content.info", {"digest": digest})
        if now is not None:
            self.cache.keep(call.namespace or "", digest, now, info=doc)
        return doc

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
        keep = object_filters(request.filters, capi.adapt_content)
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
        """The blob in pieces, read straight away: a short piece is its end, so the blob's
        size is asked for only when the offset may lie past it (ctr reads ~10 blobs a
        run; an info call before each was a third of their cost). As containerd: a
        negative offset reads from 0, one past the end is OutOfRange."""
        t = capi.types()
        offset = start = max(0, int(request.offset))
        end = None if request.size <= 0 else offset + int(request.size)
        now = self.cache.generation() if call.namespace else None
        if now is not None:
            blob = self.cache.blob(call.namespace or "", request.digest, now)
            if blob is not None:
                if offset > len(blob):
                    raise _OutOfRange(f"read past object length {len(blob)} bytes")
                if offset < len(blob):
                    yield t.content.ReadContentResponse(offset=0, data=blob[offset:end])
                return
        first = True
        while end is None or offset < end:
            want = READ_CHUNK if end is None else min(READ_CHUNK, end - offset)
            piece = await self._call(
                call, "content.read", {"digest": request.digest, "offset": offset, "size": want}
            )
            data = piece.get("data") or b""
            if not data:
                if first and offset > 0:  # at the blob's end, or past it: an error
                    info = await self._call(call, "content.info", {"digest": request.digest})
                    size = int(info.get("size") or 0)
                    if offset > size:
                        raise _OutOfRange(f"read past object length {size} bytes")
                return
            if now is not None and first and start == 0:
                # the whole blob (a short piece, or as long as Info said), as it was when
                # `now` was read: kept for the next reads
                info = self.cache.info(call.namespace or "", request.digest, now)
                if len(data) < want or (info is not None and info.get("size") == len(data)):
                    self.cache.keep(call.namespace or "", request.digest, now, blob=data)
            # containerd's offsets count from where the read began
            yield t.content.ReadContentResponse(offset=offset - start, data=data)
            offset += len(data)
            first = False
            if len(data) < want:  # berthd answers up to READ_CHUNK: shorter is the end
                return

    @unary
    async def status(self, request: Any, call: Call) -> Any:
        if not request.ref:  # containerd: no ingest has that ref
            raise NotFound('could not get status for ref "": not found')
        doc = await self._call(call, "content.status", {"ref": request.ref})
        return capi.types().content.StatusResponse(status=_ingest_status(doc))

    @unary
    async def list_statuses(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "content.ingests", {})
        keep = object_filters(request.filters, capi.adapt_ingest)
        return capi.types().content.ListStatusesResponse(
            statuses=[_ingest_status(s) for s in result.get("ingests", []) if keep(s)]
        )

    @unary
    async def abort(self, request: Any, call: Call) -> Any:
        if not request.ref:  # containerd: no ingest has that ref
            raise NotFound("reference : not found")
        await self._call(call, "content.write.abort", {"ref": request.ref})
        return empty()

    async def write(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """containerd's ingest protocol: the first message names the ref; STAT reports,
        WRITE appends at the current offset, COMMIT (with optional data) seals it and ends
        the stream. The ingest lives on a berthd connection of its own; a stream that ends
        without a commit releases it (keeping its bytes for a resume) before it ends, so
        the next writer of the ref finds it free."""
        call = Call(context)
        ingest: _Ingest | None = None
        try:
            meta = call.meta()
            ingest = _Ingest(await self.backend.session(), meta)
            async for req in requests:
                yield await ingest.handle(req)
                if int(req.action) == COMMIT:
                    return
        except BerthError as exc:
            await abort_with(context, exc)
        finally:
            if ingest is not None:
                await ingest.release()


STAT, WRITE, COMMIT = 0, 1, 2
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
RELEASE_TIMEOUT = 5.0


class _OutOfRange(BerthError):
    """containerd answers a write away from the current offset, and a read past a blob's
    end, OutOfRange, which berth's own error set lacks; it stays within this front end."""

    code = "out_of_range"


class _Ingest:
    """One Write stream's ingest, as containerd's content service keeps it: the offset
    and the digest of the bytes received so far, the total and expected digest the
    messages declared."""

    def __init__(self, session: AsyncClient, meta: dict[str, Any]) -> None:
        self.session = session
        self.meta = meta
        self.ref = ""
        self.total = 0
        self.expected = ""
        self.labels: dict[str, str] = {}
        self.offset = 0
        self.digest = EMPTY_DIGEST
        self.open = False  # berthd holds the ingest's lock for this stream
        self.started_at = time.time_ns()
        self.updated_at = self.started_at

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        return await self.session.call(method, {"ref": self.ref, **params}, **self.meta)

    async def _open(self, *, share: bool = True) -> None:
        """`share`: a blob already stored may stand for the ingest (containerd's shared
        writer); not when the ingest is started again from 0 (a truncate)."""
        expected = self.expected if share else ""
        opened = await self._call("content.write.open", {"total": self.total, "expected": expected})
        if opened.get("exists"):
            raise AlreadyExists(f"content {self.expected}: already exists")
        self.open = True
        self.offset = int(opened.get("offset") or 0)
        self.digest = opened.get("digest") or (EMPTY_DIGEST if not self.offset else "")
        # the ingest's own times: a resumed ingest keeps those of its first writer
        self.started_at = int(opened.get("started_at") or self.started_at)
        self.updated_at = int(opened.get("updated_at") or self.started_at)

    async def _first(self, req: Any) -> None:
        if not req.ref:
            raise InvalidArgument("the first write request must name a ref")
        self.ref = req.ref
        self.total, self.expected = int(req.total), req.expected
        await self._open()

    async def _expect(self, expected: str) -> None:
        """A digest declared after the first message: if it is stored already, the
        ingest is dropped and the writer told so (containerd checks at every message)."""
        self.expected = expected
        try:
            await self.session.call("content.info", {"digest": expected}, **self.meta)
        except NotFound:
            return
        await self._call("content.write.abort", {})
        self.open = False
        raise AlreadyExists(f"blob with expected digest {expected} exists")

    async def handle(self, req: Any) -> Any:
        """Apply one request; the response to send."""
        if not self.ref:
            await self._first(req)
        else:
            if req.ref and req.ref != self.ref:
                raise InvalidArgument(
                    f"ref changed from {self.ref!r} to {req.ref!r} within a write"
                )
            if req.expected and req.expected != self.expected:
                await self._expect(req.expected)
        if req.total:
            self.total = int(req.total)
        if req.labels:
            self.labels = dict(req.labels)
        action = int(req.action)
        if action in (WRITE, COMMIT):
            await self._write(req)
            if action == COMMIT:
                await self._commit()
        elif action != STAT:
            raise InvalidArgument(f"unknown write action {action}")
        return capi.types().content.WriteContentResponse(
            action=action,
            started_at=capi.timestamp(self.started_at),
            updated_at=capi.timestamp(self.updated_at),
            offset=self.offset,
            total=self.total,
            digest=self.digest,
        )

    async def _write(self, req: Any) -> None:
        if req.offset > 0 and req.offset != self.offset:
            raise _OutOfRange(f"write @{req.offset} must occur at current offset {self.offset}")
        if req.offset == 0 and self.offset > 0:
            # containerd truncates an ingest written again from the start
            await self._call("content.write.abort", {})
            self.open = False
            await self._open(share=False)
        data = bytes(req.data)
        # Bytes past the declared total are taken, as containerd takes them: the commit
        # checks the size it is given (a shared blob may be appended to, say).
        for start in range(0, len(data), WRITE_CHUNK):  # berthd's frames are bounded
            written = await self._call(
                "content.write.chunk",
                {"data": data[start : start + WRITE_CHUNK], "offset": self.offset},
            )
            self.offset = int(written["offset"])
            self.digest = written.get("digest") or ""
            self.updated_at = int(written.get("updated_at") or time.time_ns())

    async def _commit(self) -> None:
        self.open = False  # committed or failed, berthd has let the ingest go
        committed = await self._call(
            "content.write.commit",
            {"size": self.total, "expected": self.expected, "labels": self.labels},
        )
        self.digest = committed["digest"]

    async def release(self) -> None:
        """Let the ingest go (its bytes stay for a resume) before the stream ends, then
        close the connection. Bounded: a berthd that does not answer drops the lock
        itself when the connection closes."""
        try:
            if self.open:
                with contextlib.suppress(BerthError, TimeoutError):
                    async with asyncio.timeout(RELEASE_TIMEOUT):  # not wait_for (client.py)
                        await self._call("content.write.close", {})
        finally:
            await self.session.aclose()


def _ingest_status(doc: dict[str, Any]) -> Any:
    """An ingest's status as containerd's Status/ListStatuses answer it: with no
    `expected` digest (its content store keeps none for an ingest)."""
    return capi.types().content.Status(
        ref=doc["ref"],
        offset=int(doc.get("offset") or 0),
        total=int(doc.get("total") or 0),
        started_at=capi.timestamp(doc.get("started_at")),
        updated_at=capi.timestamp(doc.get("updated_at")),
    )
