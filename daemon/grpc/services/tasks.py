"""containerd's Tasks service: processes of containers, onto berthd's task service.

Tasks/Wait may last as long as the process does, so it runs on a berthd connection of its
own rather than holding a slot of the shared one.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import (
    Call,
    Handler,
    Service,
    empty,
    object_filters,
    unary,
)
from berth.shim.wire.errors import (
    BerthError,
    FailedPrecondition,
    NotFound,
    Unimplemented,
    runtime_failure_parts,
)


def runtime_failure(exc: FailedPrecondition) -> BerthError:
    """A runc create, start or exec that failed, as containerd 1.6 answers it: UNKNOWN (its
    shim's plain error), worded as its runc shim and task service word it; dockerd shows
    the text and sets 127/126 from it. Any other refusal is kept as it is."""
    parts = runtime_failure_parts(exc.message)
    if parts is None or parts[0] not in ("create", "start", "exec"):
        return exc
    verb, reason = parts
    prefix = "failed to create shim task: " if verb == "create" else ""
    return BerthError(f"{prefix}OCI runtime {verb} failed: {reason}: unknown")


class Tasks(Service):
    """Serves containerd.services.tasks.v1.Tasks."""

    UNIMPLEMENTED = {
        "Checkpoint": "berth does not checkpoint or restore processes (no CRIU)",
    }

    def methods(self) -> dict[str, Handler]:
        return {
            "Create": self.create,
            "Start": self.start,
            "Delete": self.delete,
            "DeleteProcess": self.delete_process,
            "Get": self.get,
            "List": self.list,
            "Kill": self.kill,
            "Exec": self.exec,
            "ResizePty": self.resize_pty,
            "CloseIO": self.close_io,
            "Pause": self.pause,
            "Resume": self.resume,
            "ListPids": self.list_pids,
            "Update": self.update,
            "Metrics": self.metrics,
            "Wait": self.wait,
        }

    @unary
    async def create(self, request: Any, call: Call) -> Any:
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
        try:
            result = await self._call(call, "tasks.create", params)
        except FailedPrecondition as exc:
            raise runtime_failure(exc) from None
        return capi.types().tasks.CreateTaskResponse(
            container_id=request.container_id, pid=int(result.get("pid") or 0)
        )

    @unary
    async def start(self, request: Any, call: Call) -> Any:
        try:
            result = await self._call(
                call,
                "tasks.start",
                {"container_id": request.container_id, "exec_id": request.exec_id or None},
            )
        except FailedPrecondition as exc:
            raise runtime_failure(exc) from None
        return capi.types().tasks.StartResponse(pid=int(result.get("pid") or 0))

    @unary
    async def delete(self, request: Any, call: Call) -> Any:
        result = await self._call(call, "tasks.delete", {"container_id": request.container_id})
        return self._delete_response(request.container_id, result)

    @unary
    async def delete_process(self, request: Any, call: Call) -> Any:
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
    async def get(self, request: Any, call: Call) -> Any:
        result = await self._call(
            call,
            "tasks.get",
            {"container_id": request.container_id, "exec_id": request.exec_id or None},
        )
        status = ""
        if request.exec_id:
            # every exec of a paused task is paused too (created and exited ones included,
            # an exit still reported), as containerd's shim answers
            task = await self._call(call, "tasks.get", {"container_id": request.container_id})
            if task.get("status") in ("paused", "pausing"):
                status = str(task["status"])
        return capi.types().tasks.GetResponse(
            process=capi.process_to_message(request.container_id, result, status)
        )

    @unary
    async def list(self, request: Any, call: Call) -> Any:
        # containerd's Tasks/List ignores its filter (every task of the namespace)
        result = {"tasks": await self._list(call, "tasks.list", "tasks", {})}
        return capi.types().tasks.ListTasksResponse(
            tasks=[capi.process_to_message(t["id"], t) for t in result.get("tasks", [])]
        )

    @unary
    async def kill(self, request: Any, call: Call) -> Any:
        params = {
            "container_id": request.container_id,
            "exec_id": request.exec_id or None,
            "signal": int(request.signal),
            "all": request.all,
        }
        try:
            if request.signal == 0:
                # kill(2)'s check that the process is there: containerd passes signal 0 to
                # runc, berthd refuses it as no signal; answered from the process's state
                await self._check_signalable(call, request)
            else:
                await self._call(call, "tasks.kill", params)
        except NotFound:
            if request.exec_id:
                await self._check_exec_started(call, request)
                raise
            if not request.all or not await self._stopped(call, request):
                raise
            # containerd signals every process of the container's cgroup for `all`, which
            # succeeds once its init has exited too (the Go client's Kill(SIGKILL, all)
            # of a stopped task)
        return empty()

    async def _check_signalable(self, call: Call, request: Any) -> None:
        """What a signal to the process answers, as containerd's shim does, without
        sending one: NotFound once it has exited (or if it does not exist), and
        FailedPrecondition for an exec created but not started (berthd: NotFound)."""
        process = await self._call(
            call,
            "tasks.get",
            {"container_id": request.container_id, "exec_id": request.exec_id or None},
        )
        status = process.get("status")
        if status == "stopped":
            raise NotFound(f"process {request.exec_id or request.container_id} already finished")
        if request.exec_id and status == "created":
            raise FailedPrecondition("process not created")

    async def _check_exec_started(self, call: Call, request: Any) -> None:
        """After berthd's NotFound for an exec's signal: FailedPrecondition if the exec is
        only created (the caller raises the NotFound otherwise)."""
        with contextlib.suppress(NotFound):
            await self._check_signalable(call, request)

    async def _stopped(self, call: Call, request: Any) -> bool:
        """Whether the task exists and its init process has exited."""
        try:
            task = await self._call(call, "tasks.get", {"container_id": request.container_id})
        except NotFound:
            return False
        return bool(task.get("status") == "stopped")

    @unary
    async def exec(self, request: Any, call: Call) -> Any:
        if request.exec_id:  # none at all is berthd's to refuse, as containerd does
            capi.check_identifier(request.exec_id, f"invalid exec id {request.exec_id}")
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
        return empty()

    @unary
    async def resize_pty(self, request: Any, call: Call) -> Any:
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
        return empty()

    @unary
    async def close_io(self, request: Any, call: Call) -> Any:
        await self._call(
            call,
            "tasks.close_io",
            {
                "container_id": request.container_id,
                "exec_id": request.exec_id or None,
                "stdin": request.stdin,
            },
        )
        return empty()

    @unary
    async def pause(self, request: Any, call: Call) -> Any:
        await self._call(call, "tasks.pause", {"container_id": request.container_id})
        return empty()

    @unary
    async def resume(self, request: Any, call: Call) -> Any:
        await self._call(call, "tasks.resume", {"container_id": request.container_id})
        return empty()

    @unary
    async def list_pids(self, request: Any, call: Call) -> Any:
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
    async def update(self, request: Any, call: Call) -> Any:
        resources = capi.from_json_any(request.resources, capi.RESOURCES_TYPE, "resources")
        await self._call(
            call,
            "tasks.update",
            {"container_id": request.container_id, "resources": resources},
        )
        return empty()

    @unary
    async def metrics(self, request: Any, call: Call) -> Any:
        t = capi.types()
        keep = object_filters(request.filters, capi.adapt_task)
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
    async def wait(self, request: Any, call: Call) -> Any:
        result = await self.backend.call_alone(
            "tasks.wait",
            {"container_id": request.container_id, "exec_id": request.exec_id or None},
            **call.meta(),
        )
        return capi.types().tasks.WaitResponse(
            exit_status=int(result.get("exit_status") or 0),
            exited_at=capi.timestamp(result.get("exited_at")),
        )
