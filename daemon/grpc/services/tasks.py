"""containerd's v1 gRPC services, served on top of berthd's own API.

Every method is a translation: containerd's message in, one or a few calls to berthd, the
answer back as containerd encodes it. Nothing here keeps state of its own beyond open
streams, so containers, tasks, images and events are the same objects on both sockets.

The namespace is the `containerd-namespace` header and the lease `containerd-lease`, as
containerd reads them; errors keep their kind across the translation (NotFound is gRPC 5,
and so on), since clients act on the code: dockerd, for one, takes NotFound from Tasks/Get
to mean "already deleted".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import platform
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory

from berth.daemon.filters import parse_filters
from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.client import AsyncClient
from berth.daemon.paging import all_pages_async
from berth.shim.wire.errors import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unimplemented,
)

log = logging.getLogger("berth.grpc")

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
MAX_SHARED_IN_FLIGHT = 100  # berthd serves 128 per connection
LIST_BATCH = 100
READ_CHUNK = 1 << 20
WRITE_CHUNK = 1 << 20  # gRPC messages may hold 32 MiB; berthd's frames hold 4

CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "canceled": grpc.StatusCode.CANCELLED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "internal": grpc.StatusCode.INTERNAL,
}


def grpc_code(exc: BerthError) -> Any:
    return CODES.get(exc.code, grpc.StatusCode.UNKNOWN)


class Backend:
    """berthd as the front end reaches it: one shared connection for short calls (opened
    again after a loss), and a connection of its own for every long call or stream."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._shared: AsyncClient | None = None
        self._connecting = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_SHARED_IN_FLIGHT)

    async def _client(self) -> AsyncClient:
        async with self._connecting:
            if self._shared is None or self._shared.closed:
                self._shared = await AsyncClient.connect(self.address)
            return self._shared

    async def call(self, method: str, params: dict[str, Any], **meta: Any) -> Any:
        async with self._slots:
            client = await self._client()
            return await client.call(method, params, **meta)

    async def call_alone(self, method: str, params: dict[str, Any], **meta: Any) -> Any:
        """A call that may wait a long time (Tasks/Wait): on its own connection."""
        client = await AsyncClient.connect(self.address)
        try:
            return await client.call(method, params, **meta)
        finally:
            await client.aclose()

    async def stream(self, method: str, params: dict[str, Any], **meta: Any) -> AsyncIterator[Any]:
        client = await AsyncClient.connect(self.address)
        try:
            async for item in client.stream(method, params, **meta):
                yield item
        finally:
            await client.aclose()

    async def session(self) -> AsyncClient:
        """A connection for a stateful exchange (an ingest lives as long as it)."""
        return await AsyncClient.connect(self.address)

    async def healthy(self) -> bool:
        try:
            await asyncio.wait_for(self.call("version", {}), 2.0)
            return True
        except (TimeoutError, BerthError):
            return False

    async def aclose(self) -> None:
        if self._shared is not None:
            await self._shared.aclose()


class Call:
    """What one RPC knows of its caller: the namespace and lease headers."""

    def __init__(self, context: Any) -> None:
        self.context = context
        headers = dict(context.invocation_metadata() or ())
        self.namespace: str | None = headers.get(NAMESPACE_HEADER) or None
        self.lease: str | None = headers.get(LEASE_HEADER) or None

    def meta(self, *, namespaced: bool = True) -> dict[str, Any]:
        if namespaced and not self.namespace:
            raise FailedPrecondition("namespace is required: set the containerd-namespace header")
        return {"namespace": self.namespace, "lease": self.lease}


async def _abort(context: Any, exc: BerthError) -> None:
    await context.abort(grpc_code(exc), exc.message)


def _unexpected(name: str, exc: Exception) -> BerthError:
    """A bug of this front end, not of the caller: logged, and answered INTERNAL."""
    log.exception("%s failed", name)
    return Internal(f"{name}: {type(exc).__name__}: {exc}")


def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def handler(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, Call(context))
        except BerthError as exc:
            await _abort(context, exc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            await _abort(context, _unexpected(fn.__name__, exc))

    return handler


def streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def handler(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, Call(context)):
                yield item
        except BerthError as exc:
            await _abort(context, exc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            await _abort(context, _unexpected(fn.__name__, exc))

    return handler


def _filters(values: Any) -> Callable[[dict[str, Any]], bool]:
    return parse_filters([f for f in values if f])


def _empty() -> Any:
    return capi.types().Empty()


class Services:
    """The implementations; `handlers()` binds them to containerd's service descriptors."""

    def __init__(self, backend: Backend, server_uuid: str = "") -> None:
        self.backend = backend
        self.server_uuid = server_uuid

    async def _call(self, call: Call, method: str, params: dict[str, Any], **kw: Any) -> Any:
        return await self.backend.call(method, params, **call.meta(**kw))

    async def _list(
        self, call: Call | None, method: str, field: str, params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Every item of one of berthd's lists, page by page (one reply frame is bounded)."""
        meta = call.meta() if call is not None else {}

        async def one(m: str, p: dict[str, Any]) -> Any:
            return await self.backend.call(m, p, **meta)

        return await all_pages_async(one, method, field, params)

    # -- version, introspection, health --------------------------------------------------

    @unary
    async def Version_Version(self, request: Any, call: Call) -> Any:
        info = await self.backend.call("version", {})
        # A containerd version first (engines parse it), berth's own as build metadata.
        return capi.types().version.VersionResponse(
            version=f"1.6.20+berth.{info.get('version', '')}", revision=info.get("version", "")
        )

    @unary
    async def Introspection_Server(self, request: Any, call: Call) -> Any:
        info = await self.backend.call("introspection.server", {})
        return capi.types().introspection.ServerResponse(uuid=info.get("uuid", ""))

    @unary
    async def Introspection_Plugins(self, request: Any, call: Call) -> Any:
        t = capi.types()
        info = await self.backend.call("introspection.plugins", {})
        platform = t.platform.Platform(os="linux", architecture=_arch())
        plugins = [
            ("io.containerd.content.v1", "content"),
            ("io.containerd.snapshotter.v1", "overlayfs"),
            ("io.containerd.snapshotter.v1", "native"),
            ("io.containerd.differ.v1", "walking"),
            ("io.containerd.metadata.v1", "bolt"),
            ("io.containerd.runtime.v2", "task"),
            ("io.containerd.grpc.v1", "containers"),
            ("io.containerd.grpc.v1", "content"),
            ("io.containerd.grpc.v1", "diff"),
            ("io.containerd.grpc.v1", "events"),
            ("io.containerd.grpc.v1", "images"),
            ("io.containerd.grpc.v1", "leases"),
            ("io.containerd.grpc.v1", "namespaces"),
            ("io.containerd.grpc.v1", "snapshots"),
            ("io.containerd.grpc.v1", "tasks"),
            ("io.containerd.grpc.v1", "version"),
            ("io.containerd.grpc.v1", "introspection"),
        ]
        docs = [{"type": kind, "id": pid, "platforms": [platform]} for kind, pid in plugins] + [
            {"type": "io.containerd.runc.v1", "id": p["id"]}
            for p in info.get("plugins", [])
            if p.get("type") == "runtime"
        ]
        keep = _filters(request.filters)
        out = [
            t.introspection.Plugin(type=d["type"], id=d["id"], platforms=d.get("platforms", []))
            for d in docs
            if keep({"type": d["type"], "id": d["id"]})
        ]
        return t.introspection.PluginsResponse(plugins=out)

    async def Health_Check(self, request: Any, context: Any) -> Any:
        from grpc_health.v1 import health_pb2

        serving = await self.backend.healthy()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)

    # -- namespaces -----------------------------------------------------------------------

    @unary
    async def Namespaces_Get(self, request: Any, call: Call) -> Any:
        t = capi.types()
        try:
            ns = await self.backend.call("namespaces.get", {"name": request.name})
        except NotFound:
            # containerd 1.6 answers for a namespace nobody created yet (dockerd asks for
            # `moby` before it ever creates anything in it); the first object creates it.
            ns = {"name": request.name, "labels": {}}
        return t.namespaces.GetNamespaceResponse(
            namespace=t.namespaces.Namespace(name=ns["name"], labels=ns.get("labels") or {})
        )

    @unary
    async def Namespaces_List(self, request: Any, call: Call) -> Any:
        t = capi.types()
        result = {"namespaces": await self._list(None, "namespaces.list", "namespaces", {})}
        keep = _filters([request.filter])
        return t.namespaces.ListNamespacesResponse(
            namespaces=[
                t.namespaces.Namespace(name=n["name"], labels=n.get("labels") or {})
                for n in result.get("namespaces", [])
                if keep(n)
            ]
        )

    @unary
    async def Namespaces_Create(self, request: Any, call: Call) -> Any:
        t = capi.types()
        ns = await self.backend.call(
            "namespaces.create",
            {"name": request.namespace.name, "labels": dict(request.namespace.labels)},
        )
        return t.namespaces.CreateNamespaceResponse(
            namespace=t.namespaces.Namespace(name=ns["name"], labels=ns.get("labels") or {})
        )

    @unary
    async def Namespaces_Update(self, request: Any, call: Call) -> Any:
        t = capi.types()
        current = await self.backend.call("namespaces.get", {"name": request.namespace.name})
        labels = capi.apply_label_mask(
            current.get("labels") or {},
            dict(request.namespace.labels),
            list(request.update_mask.paths),
        )
        ns = await self.backend.call(
            "namespaces.update", {"name": request.namespace.name, "labels": labels}
        )
        return t.namespaces.UpdateNamespaceResponse(
            namespace=t.namespaces.Namespace(name=ns["name"], labels=ns.get("labels") or {})
        )

    @unary
    async def Namespaces_Delete(self, request: Any, call: Call) -> Any:
        await self.backend.call("namespaces.delete", {"name": request.name})
        return _empty()

    # -- events ---------------------------------------------------------------------------

    @streaming
    async def Events_Subscribe(self, request: Any, call: Call) -> AsyncIterator[Any]:
        _filters(request.filters)  # a bad filter fails here, with containerd's code
        async for envelope in self.backend.stream(
            "events.subscribe", {"filters": list(request.filters)}
        ):
            try:
                message = capi.envelope_to_message(envelope)
            except (BerthError, ValueError, TypeError) as exc:
                # one odd event must not end a subscriber's stream (dockerd learns of
                # every exit from it)
                log.warning("event %s not converted: %s", envelope.get("topic"), exc)
                continue
            if message is not None:
                yield message

    # -- leases ---------------------------------------------------------------------------

    @unary
    async def Leases_Create(self, request: Any, call: Call) -> Any:
        lease = await self._call(
            call,
            "leases.create",
            {"id": request.id or f"lease-{uuid.uuid4().hex[:16]}", "labels": dict(request.labels)},
        )
        return capi.types().leases.CreateResponse(lease=capi.lease_to_message(lease))

    @unary
    async def Leases_Delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "leases.delete", {"id": request.id, "sync": request.sync})
        return _empty()

    @unary
    async def Leases_List(self, request: Any, call: Call) -> Any:
        result = {"leases": await self._list(call, "leases.list", "leases", {})}
        keep = _filters(request.filters)
        return capi.types().leases.ListResponse(
            leases=[capi.lease_to_message(x) for x in result.get("leases", []) if keep(x)]
        )

    @staticmethod
    def _resource_kind(kind: str) -> str:
        # containerd: "snapshots/<snapshotter>"; berth: "snapshot/<snapshotter>"
        return "snapshot/" + kind[len("snapshots/") :] if kind.startswith("snapshots/") else kind

    async def _lease_resource(self, call: Call, method: str, request: Any) -> Any:
        kind = request.resource.type
        # containerd: "snapshots/<snapshotter>"; berth: "snapshot/<snapshotter>"
        if kind.startswith("snapshots/"):
            kind = "snapshot/" + kind[len("snapshots/") :]
        params = {"id": request.id, "kind": kind, "key": request.resource.id}
        await self._call(call, method, params)
        return _empty()

    @unary
    async def Leases_AddResource(self, request: Any, call: Call) -> Any:
        return await self._lease_resource(call, "leases.add_resource", request)

    @unary
    async def Leases_DeleteResource(self, request: Any, call: Call) -> Any:
        return await self._lease_resource(call, "leases.delete_resource", request)

    @unary
    async def Leases_ListResources(self, request: Any, call: Call) -> Any:
        t = capi.types()
        result = await self._call(call, "leases.resources", {"id": request.id})
        resources = []
        for r in result.get("resources", []):
            kind = r["kind"]
            if kind.startswith("snapshot/"):
                kind = "snapshots/" + kind[len("snapshot/") :]
            resources.append(t.leases.Resource(id=r["key"], type=kind))
        return t.leases.ListResourcesResponse(resources=resources)

    # -- containers -----------------------------------------------------------------------

    @unary
    async def Containers_Get(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "containers.get", {"id": request.id})
        return capi.types().containers.GetContainerResponse(
            container=capi.container_to_message(doc)
        )

    @unary
    async def Containers_List(self, request: Any, call: Call) -> Any:
        result = {"containers": await self._list(call, "containers.list", "containers", {})}
        keep = _filters(request.filters)
        return capi.types().containers.ListContainersResponse(
            containers=[
                capi.container_to_message(c) for c in result.get("containers", []) if keep(c)
            ]
        )

    @streaming
    async def Containers_ListStream(self, request: Any, call: Call) -> AsyncIterator[Any]:
        result = {"containers": await self._list(call, "containers.list", "containers", {})}
        keep = _filters(request.filters)
        for c in result.get("containers", []):
            if keep(c):
                yield capi.types().containers.ListContainerMessage(
                    container=capi.container_to_message(c)
                )

    @unary
    async def Containers_Create(self, request: Any, call: Call) -> Any:
        doc = capi.container_from_message(request.container)
        created = await self._call(call, "containers.create", {"container": doc})
        return capi.types().containers.CreateContainerResponse(
            container=capi.container_to_message(created)
        )

    @unary
    async def Containers_Update(self, request: Any, call: Call) -> Any:
        update = request.container
        current = await self._call(call, "containers.get", {"id": update.id})
        paths = list(request.update_mask.paths)
        labels = capi.label_paths(paths, "container", ("spec",))
        params: dict[str, Any] = {"id": update.id}
        if not paths or labels:
            params["labels"] = capi.apply_label_mask(
                current.get("labels") or {}, dict(update.labels), labels
            )
        if (not paths and update.HasField("spec")) or "spec" in paths:
            params["spec"] = capi.from_json_any(update.spec, capi.SPEC_TYPE, "spec")
        updated = await self._call(call, "containers.update", params)
        return capi.types().containers.UpdateContainerResponse(
            container=capi.container_to_message(updated)
        )

    @unary
    async def Containers_Delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "containers.delete", {"id": request.id})
        return _empty()

    # -- tasks ----------------------------------------------------------------------------

    @unary
    async def Tasks_Create(self, request: Any, call: Call) -> Any:
        if request.HasField("checkpoint") and request.checkpoint.digest:
            raise Unimplemented("restoring a checkpoint is not supported by berth")
        params: dict[str, Any] = {
            "container_id": request.container_id,
            "stdin": request.stdin or None,
            "stdout": request.stdout or None,
            "stderr": request.stderr or None,
            "terminal": request.terminal,
        }
        if request.rootfs:
            params["rootfs"] = capi.mounts_to_wire(request.rootfs)
        result = await self._call(call, "tasks.create", params)
        return capi.types().tasks.CreateTaskResponse(
            container_id=request.container_id, pid=int(result.get("pid") or 0)
        )

    @unary
    async def Tasks_Start(self, request: Any, call: Call) -> Any:
        result = await self._call(
            call,
            "tasks.start",
            {"container_id": request.container_id, "exec_id": request.exec_id or None},
        )
        return capi.types().tasks.StartResponse(pid=int(result.get("pid") or 0))

    @unary
    async def Tasks_Delete(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "tasks.delete", {"container_id": request.container_id})
        return self._delete_response(request.container_id, result)

    @unary
    async def Tasks_DeleteProcess(self, request: Any, call: Call) -> Any:
        result = await self._call(
            call,
            "tasks.delete_process",
            {"container_id": request.container_id, "exec_id": request.exec_id},
        )
        return self._delete_response(request.exec_id, result)

    @staticmethod
    def _delete_response(process_id: str, result: dict[str, Any]) -> Any:
        return capi.types().tasks.DeleteResponse(
            id=process_id,
            pid=int(result.get("pid") or 0),
            exit_status=int(result.get("exit_status") or 0),
            exited_at=capi.timestamp(result.get("exited_at")),
        )

    @unary
    async def Tasks_Get(self, request: Any, call: Call) -> Any:
        result = await self._call(
            call,
            "tasks.get",
            {"container_id": request.container_id, "exec_id": request.exec_id or None},
        )
        return capi.types().tasks.GetResponse(
            process=capi.process_to_message(request.container_id, result)
        )

    @unary
    async def Tasks_List(self, request: Any, call: Call) -> Any:
        result = {"tasks": await self._list(call, "tasks.list", "tasks", {})}
        keep = _filters([request.filter])
        return capi.types().tasks.ListTasksResponse(
            tasks=[
                capi.process_to_message(t["id"], t)
                for t in result.get("tasks", [])
                if keep({"id": t["id"], "namespace": call.namespace, "status": t.get("status")})
            ]
        )

    @unary
    async def Tasks_Kill(self, request: Any, call: Call) -> Any:
        await self._call(
            call,
            "tasks.kill",
            {
                "container_id": request.container_id,
                "exec_id": request.exec_id or None,
                "signal": int(request.signal),
                "all": request.all,
            },
        )
        return _empty()

    @unary
    async def Tasks_Exec(self, request: Any, call: Call) -> Any:
        spec = capi.from_json_any(request.spec, capi.PROCESS_TYPE, "process spec")
        await self._call(
            call,
            "tasks.exec",
            {
                "container_id": request.container_id,
                "exec_id": request.exec_id,
                "spec": spec,
                "stdin": request.stdin or None,
                "stdout": request.stdout or None,
                "stderr": request.stderr or None,
                "terminal": request.terminal,
            },
        )
        return _empty()

    @unary
    async def Tasks_ResizePty(self, request: Any, call: Call) -> Any:
        await self._call(
            call,
            "tasks.resize",
            {
                "container_id": request.container_id,
                "exec_id": request.exec_id or None,
                "width": int(request.width),
                "height": int(request.height),
            },
        )
        return _empty()

    @unary
    async def Tasks_CloseIO(self, request: Any, call: Call) -> Any:
        await self._call(
            call,
            "tasks.close_io",
            {
                "container_id": request.container_id,
                "exec_id": request.exec_id or None,
                "stdin": request.stdin,
            },
        )
        return _empty()

    @unary
    async def Tasks_Pause(self, request: Any, call: Call) -> Any:
        await self._call(call, "tasks.pause", {"container_id": request.container_id})
        return _empty()

    @unary
    async def Tasks_Resume(self, request: Any, call: Call) -> Any:
        await self._call(call, "tasks.resume", {"container_id": request.container_id})
        return _empty()

    @unary
    async def Tasks_ListPids(self, request: Any, call: Call) -> Any:
        t = capi.types()
        result = await self._call(call, "tasks.pids", {"container_id": request.container_id})
        processes = []
        for p in result.get("processes", []):
            info = t.task.ProcessInfo(pid=int(p.get("pid") or 0))
            if p.get("exec_id"):
                details = t.runc.ProcessDetails(exec_id=p["exec_id"])
                info.info.CopyFrom(
                    t.Any(type_url=capi.PROCESS_DETAILS_TYPE, value=details.SerializeToString())
                )
            processes.append(info)
        return t.tasks.ListPidsResponse(processes=processes)

    @unary
    async def Tasks_Update(self, request: Any, call: Call) -> Any:
        resources = capi.from_json_any(request.resources, capi.RESOURCES_TYPE, "resources")
        await self._call(
            call,
            "tasks.update",
            {"container_id": request.container_id, "resources": resources},
        )
        return _empty()

    @unary
    async def Tasks_Metrics(self, request: Any, call: Call) -> Any:
        t = capi.types()
        keep = _filters(request.filters)
        result = {"tasks": await self._list(call, "tasks.list", "tasks", {})}
        metrics = []
        for task in result.get("tasks", []):
            if not keep({"id": task["id"], "namespace": call.namespace}):
                continue
            if task.get("status") not in ("running", "paused", "created"):
                continue
            try:
                stats = await self._call(call, "tasks.metrics", {"container_id": task["id"]})
            except (NotFound, FailedPrecondition):
                continue  # it exited meanwhile
            metrics.append(
                t.metrics.Metric(
                    timestamp=capi.timestamp(time.time_ns()),
                    id=task["id"],
                    data=capi.metrics_any(stats),
                )
            )
        return t.tasks.MetricsResponse(metrics=metrics)

    @unary
    async def Tasks_Wait(self, request: Any, call: Call) -> Any:
        result = await self.backend.call_alone(
            "tasks.wait",
            {"container_id": request.container_id, "exec_id": request.exec_id or None},
            **call.meta(),
        )
        return capi.types().tasks.WaitResponse(
            exit_status=int(result.get("exit_status") or 0),
            exited_at=capi.timestamp(result.get("exited_at")),
        )

    # -- content --------------------------------------------------------------------------

    @unary
    async def Content_Info(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "content.info", {"digest": request.digest})
        return capi.types().content.InfoResponse(info=capi.content_info_to_message(doc))

    @unary
    async def Content_Update(self, request: Any, call: Call) -> Any:
        info = request.info
        current = await self._call(call, "content.info", {"digest": info.digest})
        paths = capi.label_paths(list(request.update_mask.paths), "content")
        labels = capi.apply_label_mask(current.get("labels") or {}, dict(info.labels), paths)
        doc = await self._call(call, "content.update", {"digest": info.digest, "labels": labels})
        return capi.types().content.UpdateResponse(info=capi.content_info_to_message(doc))

    @streaming
    async def Content_List(self, request: Any, call: Call) -> AsyncIterator[Any]:
        t = capi.types()
        keep = _filters(request.filters)
        result = {"content": await self._list(call, "content.list", "content", {})}
        batch = [capi.content_info_to_message(c) for c in result.get("content", []) if keep(c)]
        for i in range(0, len(batch), LIST_BATCH):
            yield t.content.ListContentResponse(info=batch[i : i + LIST_BATCH])

    @unary
    async def Content_Delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "content.delete", {"digest": request.digest})
        return _empty()

    @streaming
    async def Content_Read(self, request: Any, call: Call) -> AsyncIterator[Any]:
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
    async def Content_Status(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "content.status", {"ref": request.ref})
        return capi.types().content.StatusResponse(status=_ingest_status(doc))

    @unary
    async def Content_ListStatuses(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "content.ingests", {})
        keep = _filters(request.filters)
        return capi.types().content.ListStatusesResponse(
            statuses=[_ingest_status(s) for s in result.get("ingests", []) if keep(s)]
        )

    @unary
    async def Content_Abort(self, request: Any, call: Call) -> Any:
        await self._call(call, "content.write.abort", {"ref": request.ref})
        return _empty()

    async def Content_Write(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
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
            await _abort(context, exc)
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

    # -- images ---------------------------------------------------------------------------

    @unary
    async def Images_Get(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "images.get", {"name": request.name})
        return capi.types().images.GetImageResponse(image=capi.image_to_message(doc))

    @unary
    async def Images_List(self, request: Any, call: Call) -> Any:
        result = {"images": await self._list(call, "images.list", "images", {})}
        keep = _filters(request.filters)
        return capi.types().images.ListImagesResponse(
            images=[capi.image_to_message(i) for i in result.get("images", []) if keep(i)]
        )

    @unary
    async def Images_Create(self, request: Any, call: Call) -> Any:
        doc = await self._call(call, "images.create", capi.image_from_message(request.image))
        return capi.types().images.CreateImageResponse(image=capi.image_to_message(doc))

    @unary
    async def Images_Update(self, request: Any, call: Call) -> Any:
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
    async def Images_Delete(self, request: Any, call: Call) -> Any:
        await self._call(call, "images.delete", {"name": request.name, "sync": request.sync})
        return _empty()

    # -- snapshots ------------------------------------------------------------------------

    @unary
    async def Snapshots_Prepare(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "snapshots.prepare", _snap_params(request))
        return capi.types().snapshots.PrepareSnapshotResponse(
            mounts=capi.mounts_from_wire(result["mounts"])
        )

    @unary
    async def Snapshots_View(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "snapshots.view", _snap_params(request))
        return capi.types().snapshots.ViewSnapshotResponse(
            mounts=capi.mounts_from_wire(result["mounts"])
        )

    @unary
    async def Snapshots_Mounts(self, request: Any, call: Call) -> Any:
        result = await self._call(
            call, "snapshots.mounts", {"snapshotter": request.snapshotter, "key": request.key}
        )
        return capi.types().snapshots.MountsResponse(mounts=capi.mounts_from_wire(result["mounts"]))

    @unary
    async def Snapshots_Commit(self, request: Any, call: Call) -> Any:
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
        return _empty()

    @unary
    async def Snapshots_Remove(self, request: Any, call: Call) -> Any:
        await self._call(
            call, "snapshots.remove", {"snapshotter": request.snapshotter, "key": request.key}
        )
        return _empty()

    @unary
    async def Snapshots_Stat(self, request: Any, call: Call) -> Any:
        doc = await self._call(
            call, "snapshots.stat", {"snapshotter": request.snapshotter, "key": request.key}
        )
        return capi.types().snapshots.StatSnapshotResponse(info=capi.snapshot_info_to_message(doc))

    @unary
    async def Snapshots_Update(self, request: Any, call: Call) -> Any:
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
    async def Snapshots_List(self, request: Any, call: Call) -> AsyncIterator[Any]:
        t = capi.types()
        keep = _filters(request.filters)
        result = {
            "snapshots": await self._list(
                call, "snapshots.list", "snapshots", {"snapshotter": request.snapshotter}
            )
        }
        infos = [capi.snapshot_info_to_message(s) for s in result.get("snapshots", []) if keep(s)]
        for i in range(0, len(infos), LIST_BATCH):
            yield t.snapshots.ListSnapshotsResponse(info=infos[i : i + LIST_BATCH])

    @unary
    async def Snapshots_Usage(self, request: Any, call: Call) -> Any:
        doc = await self._call(
            call, "snapshots.usage", {"snapshotter": request.snapshotter, "key": request.key}
        )
        return capi.types().snapshots.UsageResponse(
            size=int(doc.get("size") or 0), inodes=int(doc.get("inodes") or 0)
        )

    @unary
    async def Snapshots_Cleanup(self, request: Any, call: Call) -> Any:
        return _empty()  # berth's snapshotters leave no orphaned directories to clean up

    # -- diff -----------------------------------------------------------------------------

    @unary
    async def Diff_Apply(self, request: Any, call: Call) -> Any:
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
    async def Diff_Diff(self, request: Any, call: Call) -> Any:
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
        return capi.types().diff.DiffResponse(diff=capi.descriptor_from_wire(result["diff"]))


def _snap_params(request: Any) -> dict[str, Any]:
    return {
        "snapshotter": request.snapshotter,
        "key": request.key,
        "parent": request.parent,
        "labels": dict(request.labels),
    }


def _ingest_status(doc: dict[str, Any]) -> Any:
    return capi.types().content.Status(
        ref=doc["ref"],
        offset=int(doc.get("offset") or 0),
        total=int(doc.get("total") or 0),
        expected=doc.get("expected") or "",
        started_at=capi.timestamp(doc.get("started_at")),
        updated_at=capi.timestamp(doc.get("updated_at")),
    )


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# -- binding to the service descriptors ---------------------------------------------------

SERVICES = {
    # service full name -> (module attribute on capi.types(), service short name)
    "containerd.services.version.v1.Version": ("version", "Version"),
    "containerd.services.introspection.v1.Introspection": ("introspection", "Introspection"),
    "containerd.services.namespaces.v1.Namespaces": ("namespaces", "Namespaces"),
    "containerd.services.events.v1.Events": ("events", "Events"),
    "containerd.services.leases.v1.Leases": ("leases", "Leases"),
    "containerd.services.containers.v1.Containers": ("containers", "Containers"),
    "containerd.services.tasks.v1.Tasks": ("tasks", "Tasks"),
    "containerd.services.content.v1.Content": ("content", "Content"),
    "containerd.services.images.v1.Images": ("images", "Images"),
    "containerd.services.snapshots.v1.Snapshots": ("snapshots", "Snapshots"),
    "containerd.services.diff.v1.Diff": ("diff", "Diff"),
}


def _unimplemented(service: str, method: str, streaming_response: bool) -> Any:
    message = f"{service}/{method} is not implemented by berth"

    if streaming_response:

        async def stream_handler(request: Any, context: Any) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            yield None  # pragma: no cover - abort raises

        return stream_handler

    async def handler(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return handler


def _method_handler(method: Any, fn: Any) -> Any:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    kwargs = {
        "request_deserializer": request_cls.FromString,
        "response_serializer": response_cls.SerializeToString,
    }
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(fn, **kwargs)
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(fn, **kwargs)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(fn, **kwargs)
    return grpc.unary_unary_rpc_method_handler(fn, **kwargs)


def generic_handlers(services: Services) -> list[Any]:
    """One generic handler per containerd service (and grpc.health.v1.Health): every
    method of the descriptor is bound, the ones berth lacks answer UNIMPLEMENTED."""
    from grpc_health.v1 import health_pb2

    t = capi.types()
    handlers = []
    bindings = [
        (getattr(t, module).DESCRIPTOR.services_by_name[short], short)
        for module, short in SERVICES.values()
    ]
    bindings.append((health_pb2.DESCRIPTOR.services_by_name["Health"], "Health"))
    for service, short in bindings:
        table = {}
        for method in service.methods:
            fn = getattr(services, f"{short}_{method.name}", None)
            if fn is None:
                fn = _unimplemented(service.full_name, method.name, method.server_streaming)
            table[method.name] = _method_handler(method, fn)
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, table))
    return handlers
