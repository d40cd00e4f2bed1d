"""The task service: one shim per task, supervised; the daemon's view rebuilt on restart.

Where the truth lives: a task's processes, exit statuses and output belong to its shim and
to its state directory (`<state>/tasks/<ns>/<id>/`: config.json, shim.json, exit/, log/).
The daemon keeps a cache (for list/wait) fed by the shim's acknowledged event stream, and
can rebuild it at any time from the shims and those files. That is what makes a daemon
restart lose nothing:
- a live shim is reconnected; it replays every event the daemon never acknowledged
  (an exit that happened while the daemon was down arrives as a normal /tasks/exit);
- a dead shim's exit statuses are read from its exit files; a process without one is
  reported exited with status 255 (containerd's "unknown") and its container is killed
  through the runtime, so nothing keeps running unsupervised.
A live shim that stops answering (SIGSTOPped, stuck in the kernel) cannot keep its container
alive either: a SIGKILL then goes through the runtime, and a forced delete kills the shim,
removes the container through the runtime and reports its exit (137 without an exit file).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from berth.daemon import logs
from berth.daemon.api import schema
from berth.daemon.config import Config
from berth.daemon.events import Exchange
from berth.daemon.metadata import Container, Store
from berth.daemon.rpc import NoAnswer, RpcClient, guarded
from berth.daemon.storage.service import Storage
from berth.daemon.tasks import shims
from berth.daemon.tasks.rootfs import build_busybox_rootfs
from berth.shim.cgroups import join_cgroup
from berth.shim.exit import (
    CorruptExitFile,
    ExitRecord,
    is_deleted,
    mark_deleted,
    read_exit_file,
    write_exit_file,
)
from berth.shim.fs import atomic_write, remove_tree
from berth.shim.loop import SHIM_LOG_MAX
from berth.shim.mount import Mount, unmount_all
from berth.shim.runtime import RuntimeConfig, last_error, runtime_argv
from berth.shim.state import (
    STATE_VERSION,
    CorruptState,
    ShimRecord,
    process_start_time,
    read_state,
    write_state,
)
from berth.shim.task import ShimConfig
from berth.shim.wire import status as shim_topics
from berth.shim.wire.errors import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from berth.shim.wire.names import is_valid
from berth.shim.wire.status import (
    CREATED,
    DAEMON_TOPICS,
    PAUSED,
    RUNNING,
    STOPPED,
    UNKNOWN_EXIT,
    unpack_pids,
)
from berth.shim.wire.unixsock import is_served

log = logging.getLogger("berthd.tasks")

SHIM_CALL_TIMEOUT = 30.0
# A kill is one runtime call in the shim. Giving up on it well within a client's own 30 s
# leaves the time to deliver a SIGKILL through the runtime instead (kill).
SHIM_SIGNAL_TIMEOUT = 10.0
SEND_GRACE = 5.0  # past a call's timeout, for a request the shim does not even read
RUNTIME_CALL_TIMEOUT = 10.0  # one runtime command run by berthd itself
SHIM_DEATH_TIMEOUT = 5.0  # a SIGKILLed shim stuck in the kernel dies only when it leaves
KILLED_STATUS = 128 + signal.SIGKILL  # what berthd reports for a process it killed
SHIM_LOG_READ = 2 * SHIM_LOG_MAX + 64 * 1024  # a reply of what a shim keeps (one frame)
CONNECT_TIMEOUT = 5.0
RECOVERY_SHORTAGE_TRIES = 30  # a second apart: a restart short of descriptors waits this long
LOG_LINK = "log"  # in a bundle: the shim's log directory, a link to the root dir's
STDIO_KEYS = ("stdin", "stdout", "stderr", "terminal")  # of a process, as its client set them


@dataclass
class ProcessView:
    exec_id: str = ""
    pid: int = 0
    status: str = CREATED
    exit_status: int = 0
    exited_at: int = 0
    exited: trio.Event = field(default_factory=trio.Event)
    # The client's stdio (FIFO paths, terminal), as it asked at create or exec: a client
    # attaches to a running process by them (containerd's Task.Get, `ctr tasks attach`).
    stdio: dict[str, Any] = field(default_factory=dict)

    def set_stdio(self, params: dict[str, Any]) -> None:
        self.stdio = {key: params.get(key) for key in STDIO_KEYS if params.get(key)}

    def set_status(self, status: str) -> None:
        if self.status != STOPPED:  # an exit is final, whatever order news arrives in
            self.status = status

    def set_exit(self, record: ExitRecord) -> bool:
        """Record the exit; False if it was already known."""
        if self.exited.is_set():
            return False
        if record.pid:
            self.pid = record.pid
        self.status = STOPPED
        self.exit_status = record.status
        self.exited_at = record.exited_at
        self.exited.set()
        return True

    def exit_record(self) -> ExitRecord:
        return ExitRecord(self.pid, self.exit_status, self.exited_at)

    def unknown_exit(self) -> bool:
        """Final with containerd's "unknown" status (its shim is gone, it never ran...)."""
        return self.set_exit(ExitRecord(self.pid, UNKNOWN_EXIT, time.time_ns()))

    def to_wire(self) -> dict[str, Any]:
        return {
            "exec_id": self.exec_id,
            "pid": self.pid,
            "status": self.status,
            "exit_status": self.exit_status,
            "exited_at": self.exited_at,
            **self.stdio,
        }


@dataclass
class TaskHandle:
    namespace: str
    id: str
    bundle: str
    address: str
    runtime: RuntimeConfig
    shim_pid: int = 0
    shim_start_time: int = 0
    client: RpcClient | None = None
    init: ProcessView = field(default_factory=ProcessView)
    execs: dict[str, ProcessView] = field(default_factory=dict)
    shim_dead: bool = False
    deleting: bool = False
    processed_seq: int = 0
    progress: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    supervised: trio.Event = field(default_factory=trio.Event)
    pump_idle: trio.Event = field(default_factory=trio.Event)
    # the rootfs mounts it was created with, for its /tasks/create event (containerd's
    # TaskCreate names them); not kept across a restart, as that event is published once
    rootfs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.id)

    def process(self, exec_id: str | None) -> ProcessView:
        if not exec_id:
            return self.init
        view = self.execs.get(exec_id)
        if view is None:
            raise NotFound(f"exec {exec_id} not found in task {self.id}")
        return view

    def mark_progress(self, seq: int) -> None:
        self.processed_seq = max(self.processed_seq, seq)
        self.progress.set()
        self.progress = trio.Event()

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "pid": self.init.pid,
            "status": self.init.status,
            "exit_status": self.init.exit_status,
            "exited_at": self.init.exited_at,
            "shim_pid": self.shim_pid,
            "shim_dead": self.shim_dead,
        }


class TaskService:
    def __init__(
        self,
        config: Config,
        store: Store,
        exchange: Exchange,
        nursery: trio.Nursery,
        zygote: shims.Zygote,
        storage: Storage,
    ) -> None:
        self._config = config
        self._store = store
        self._storage = storage
        self._exchange = exchange
        self._nursery = nursery
        self._zygote = zygote
        self._tasks: dict[tuple[str, str], TaskHandle] = {}
        self._reserved: set[tuple[str, str]] = set()
        self._rootfs_lock = trio.Lock()
        self._recovery_scope = trio.CancelScope()
        self._inherited_seqs: dict[str, int] = {}
        self.closing = False
        # Counters for berthd's metrics (plain ints: free when metrics are off).
        self.shim_deaths = 0  # shims that died under supervision (their tasks reported exited)
        self.shim_reconnects = 0  # connections to a live shim made again
        self.recovered: dict[str, int] = {"reattached": 0, "unusable": 0, "exited": 0}
        self.recovery_seconds = 0.0  # how long the last recovery took

    # -- paths

    def _bundle(self, namespace: str, container_id: str) -> str:
        return os.path.join(self._config.tasks_dir, namespace, container_id)

    def _socket(self, namespace: str, container_id: str) -> str:
        digest = hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:24]
        return os.path.join(self._config.sockets_dir, f"{digest}.sock")

    def get_handle(self, namespace: str, container_id: str) -> TaskHandle:
        handle = self._tasks.get((namespace, container_id))
        if handle is None:
            raise NotFound(f"task {container_id} not found")
        return handle

    def has_task(self, namespace: str, container_id: str) -> bool:
        return (namespace, container_id) in self._tasks or (
            namespace,
            container_id,
        ) in self._reserved

    def task_stopped(self, namespace: str, container_id: str) -> bool:
        """Whether the container's task has one and its init has exited."""
        handle = self._tasks.get((namespace, container_id))
        return handle is not None and handle.init.exited.is_set()

    def namespace_in_use(self, namespace: str) -> bool:
        return any(key[0] == namespace for key in (*self._tasks, *self._reserved))

    # -- creation

    async def create(
        self, namespace: str, container_id: str, params: schema.TasksCreate
    ) -> dict[str, Any]:
        """Prepare the bundle, spawn and attach a shim, and have it create the container."""
        began = time.perf_counter()
        key = (namespace, container_id)
        container = self._store.get_container(namespace, container_id)
        if key in self._tasks or key in self._reserved:
            raise AlreadyExists(f"task {container_id} already exists")
        runtime = self._runtime_config(container, namespace)
        self._reserved.add(key)
        handle: TaskHandle | None = None
        bundle = self._bundle(namespace, container_id)
        lost_shim = False
        try:
            mounts = self._rootfs_mounts(container, params)
            if os.path.lexists(bundle) and is_served(self._socket(namespace, container_id)):
                # A task berthd does not know (its record unreadable, say) still has a
                # shim: its bundle is no leftover, and removing it would strand them.
                lost_shim = True
                raise AlreadyExists(
                    f"task {container_id} already exists: its shim still runs, though "
                    "berthd lost track of it (see berthd's log)"
                )
            await self._write_bundle(bundle, container.spec, bool(mounts))
            handle = TaskHandle(
                namespace, container_id, bundle, self._socket(namespace, container_id), runtime
            )
            handle.rootfs = [m.to_wire() for m in mounts]
            t0 = time.perf_counter()
            await self._spawn_shim(handle)
            shim_cgroup = container.runtime_options.get("shim_cgroup")
            if isinstance(shim_cgroup, str) and shim_cgroup:
                await trio.to_thread.run_sync(join_cgroup, handle.shim_pid, shim_cgroup)
            t1 = time.perf_counter()
            await self._attach(handle)
            t2 = time.perf_counter()
            self._tasks[key] = handle
            create_params = self._create_params(params, mounts)
            result = await self._call(handle, "create", create_params)
            handle.init.pid = int(result["pid"])
            handle.init.set_stdio(create_params)
            log.debug(
                "task %s/%s created: bundle %.1f ms, shim spawn %.1f ms, attach %.1f ms, "
                "runtime create %.1f ms",
                namespace,
                container_id,
                (t0 - began) * 1e3,
                (t1 - t0) * 1e3,
                (t2 - t1) * 1e3,
                (time.perf_counter() - t2) * 1e3,
            )
            log.info("task created: pid %d, shim pid %d", handle.init.pid, handle.shim_pid)
            return {"pid": handle.init.pid}
        except BaseException:
            self._tasks.pop(key, None)
            if handle is not None:
                with trio.CancelScope(shield=True):
                    await self._discard(handle)
            elif not lost_shim:
                remove_bundle(bundle)
            raise
        finally:
            self._reserved.discard(key)

    def _runtime_config(self, container: Container, namespace: str) -> RuntimeConfig:
        """The OCI runtime of `container`: its configured entry, overridden by the
        container's runtime options (containerd.runc.v1.Options' binary_name, root,
        systemd_cgroup)."""
        entry = self._config.runtime_entry(container.runtime)
        if entry is None:
            raise InvalidArgument(
                f"unknown runtime {container.runtime!r}; configured: "
                f"{sorted(self._config.runtimes)}"
            )
        options = container.runtime_options
        binary = options.get("binary_name") or entry.binary
        if not shutil.which(binary):
            # In the words of Go's os/exec, which containerd's clients match on.
            if "/" in binary:
                raise NotFound(
                    f"runtime {entry.name}: OCI runtime binary not found: "
                    f"fork/exec {binary}: no such file or directory"
                )
            raise NotFound(
                f"runtime {entry.name}: OCI runtime binary not found: "
                f'exec: "{binary}": executable file not found in $PATH'
            )
        root_option = options.get("root")
        if isinstance(root_option, str) and root_option:
            root = os.path.join(root_option, namespace)  # as containerd's shim
        else:
            root = self._config.runtime_root(entry, namespace)
        return RuntimeConfig(
            binary=binary,
            root=root,
            args=entry.args,
            systemd_cgroup=entry.systemd_cgroup or options.get("systemd_cgroup") is True,
        )

    def _rootfs_mounts(self, container: Container, params: schema.TasksCreate) -> list[Mount]:
        """The mounts of the task's rootfs: given with the create (ctr), or the
        container's snapshot; none when the spec names a directory."""
        if params.rootfs:
            return [Mount.from_wire(m) for m in params.rootfs]
        if container.snapshot_key:
            return self._storage.snapshot_mounts(
                container.namespace, container.snapshotter or None, container.snapshot_key
            )
        return []

    async def _write_bundle(self, bundle: str, spec: dict[str, Any], has_mounts: bool) -> None:
        prepared = await self._prepare_spec(spec, bundle, has_mounts)
        if os.path.lexists(bundle):
            await trio.to_thread.run_sync(remove_bundle, bundle)
        namespace_dir = os.path.dirname(bundle)
        if not os.path.isdir(namespace_dir):
            os.makedirs(namespace_dir, mode=0o711, exist_ok=True)
            os.chmod(namespace_dir, 0o711)  # traversable, not listable (umask aside)
        os.mkdir(bundle, mode=0o700)
        await self._link_log_dir(bundle)
        remapped_root_gid = _host_gid_of_root(prepared)
        if remapped_root_gid is not None:
            # runc mounts the rootfs from inside the user namespace, as the remapped root:
            # it must traverse the bundle (containerd: mode 0710, that root's group).
            os.chown(bundle, -1, remapped_root_gid)
            os.chmod(bundle, 0o710)
        _write_json(os.path.join(bundle, "config.json"), prepared)

    async def _link_log_dir(self, bundle: str) -> None:
        """The shim writes log files (`run -d`) to `<bundle>/log`: made a link to the
        root dir's `logs/<namespace>/<id>`, so they fill the disk as docker's json-file
        logs do, not /run's tmpfs (RAM, up to 128 MiB a process, charged to berthd's
        service). Made after the bundle and removed before it (startup.py counts on it);
        whatever an earlier task of this id left there goes first."""
        namespace, container_id = bundle.split(os.sep)[-2:]
        log_dir = os.path.join(self._config.logs_dir, namespace, container_id)
        await trio.to_thread.run_sync(remove_tree, log_dir)
        os.makedirs(os.path.dirname(log_dir), mode=0o700, exist_ok=True)
        os.mkdir(log_dir, mode=0o700)
        os.symlink(log_dir, os.path.join(bundle, LOG_LINK))

    async def _spawn_shim(self, handle: TaskHandle) -> None:
        config = ShimConfig(
            handle.id, handle.namespace, handle.bundle, handle.address, handle.runtime
        )
        with trio.CancelScope(shield=True):  # a cancelled create must know its shim
            handle.shim_pid = await self._zygote.spawn(
                config, os.path.join(handle.bundle, "shim.log")
            )
        handle.shim_start_time = process_start_time(handle.shim_pid) or 0

    def _create_params(self, params: schema.TasksCreate, mounts: list[Mount]) -> dict[str, Any]:
        """What the shim's create takes: the stdio, the rootfs mounts, the log bounds."""
        io: dict[str, Any] = {
            "stdin": params.stdin,
            "stdout": params.stdout,
            "stderr": params.stderr,
            "terminal": params.terminal,
            "width": params.width,
            "height": params.height,
            "rootfs": [m.to_wire() for m in mounts],
        }
        if params.log:
            log_config: dict[str, Any] = {
                "max_size": self._config.log_max_size,
                "max_files": self._config.log_max_files,
            }
            if isinstance(params.log, schema.LogOptions):
                log_config.update(
                    {k: v for k, v in msgspec.structs.asdict(params.log).items() if v is not None}
                )
            io["log"] = log_config
        return io

    async def _prepare_spec(
        self, spec: dict[str, Any], bundle: str, has_mounts: bool
    ) -> dict[str, Any]:
        spec = dict(spec)
        root = dict(spec.get("root") or {})
        path = root.get("path") or ""
        if not isinstance(path, str):
            raise InvalidArgument("spec root.path must be a string")
        if not path:
            async with self._rootfs_lock:
                path = await trio.to_thread.run_sync(
                    build_busybox_rootfs, self._config.default_rootfs
                )
            root["readonly"] = True  # shared by every container that uses it
        elif not os.path.isabs(path):
            path = os.path.join(bundle, path)
        if has_mounts:
            if path != os.path.join(bundle, "rootfs"):
                raise InvalidArgument("with rootfs mounts, the spec's root.path must be 'rootfs'")
        elif not os.path.isdir(path):
            raise InvalidArgument(f"rootfs {path} does not exist or is not a directory")
        root["path"] = path
        spec["root"] = root
        if not isinstance(spec.get("process"), dict):
            raise InvalidArgument("spec has no process")
        return spec

    async def _attach(self, handle: TaskHandle) -> None:
        """Connect to a live shim and start supervising it."""
        with trio.fail_after(CONNECT_TIMEOUT):
            client = await shims.connect_shim(
                handle.address, f"shim {handle.namespace}/{handle.id}"
            )
            handle.client = client
            try:
                await client.handshake()
            except BaseException:
                await client.aclose()
                raise
            self._nursery.start_soon(guarded, f"connection to {client.label}", client.run)
        await self._nursery.start(self._supervise_guarded, handle)

    async def _supervise_guarded(
        self, handle: TaskHandle, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self._supervise(handle, task_status)
        except Exception:
            log.exception("supervision of %s/%s failed", handle.namespace, handle.id)
            handle.supervised.set()

    async def _supervise(
        self, handle: TaskHandle, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Relay the shim's events until the shim dies or the task is deleted; reconnect if
        the connection ends while the shim lives."""
        assert handle.client is not None
        logs.set_about(handle.namespace, handle.id)  # this task's lines, and its pumps'
        with handle.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay, handle)
                task_status.started()
                await shims.wait_for_death(handle.shim_pid)
                # Events the shim sent before it died are still in the socket: drain them.
                with trio.move_on_after(2):
                    await handle.pump_idle.wait()
                nursery.cancel_scope.cancel()
        handle.supervised.set()
        if not handle.scope.cancelled_caught and not self.closing and not handle.deleting:
            log.warning(
                "shim of %s/%s (pid %d) died",
                handle.namespace,
                handle.id,
                handle.shim_pid,
                extra=logs.about(handle.namespace, handle.id),
            )
            self.shim_deaths += 1
            await self._shim_died(handle)

    async def _relay(self, handle: TaskHandle) -> None:
        """Pump events over the current connection; when it ends with the shim still alive
        (a protocol error, a full buffer), connect again: the shim replays what is unacked."""
        while True:
            client = handle.client
            assert client is not None
            handle.pump_idle = trio.Event()
            await self._pump_events(handle, client, handle.pump_idle)
            await client.aclose()
            while True:
                await trio.sleep(0.1)
                try:
                    alive = shims.shim_alive(handle.shim_pid, handle.shim_start_time)
                except OSError as exc:  # cannot tell (out of descriptors): keep trying
                    log.warning("cannot check shim %s: %s", client.label, exc)
                    await trio.sleep(shims.SHORTAGE_RETRY)
                    continue
                if handle.deleting or not alive:
                    return  # death (or deletion) is handled by the supervisor
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        new = await shims.connect_shim(handle.address, client.label)
                        await new.handshake()
                except (BerthError, OSError, trio.TooSlowError) as exc:
                    log.warning("reconnecting to %s failed: %s", client.label, exc)
                    continue
                log.info("reconnected to %s", client.label)
                self.shim_reconnects += 1
                handle.client = new
                self._nursery.start_soon(guarded, f"connection to {new.label}", new.run)
                break

    async def _pump_events(self, handle: TaskHandle, client: RpcClient, done: trio.Event) -> None:
        try:
            async for item in client.stream("events"):
                try:
                    self._apply_event(handle, item)
                except Exception:
                    log.exception(
                        "bad event from shim %s/%s: %r", handle.namespace, handle.id, item
                    )
                seq = item.get("seq") if isinstance(item, dict) else None
                if isinstance(seq, int):
                    handle.mark_progress(seq)
                    await client.notify("ack", {"seq": seq})
        except Unavailable:
            pass
        finally:
            done.set()

    def _apply_event(self, handle: TaskHandle, item: dict[str, Any]) -> None:
        seq, topic, payload = item.get("seq", 0), item.get("topic"), item.get("payload") or {}
        if not isinstance(payload, dict) or not isinstance(topic, str):
            return
        if isinstance(seq, int) and seq <= handle.processed_seq:
            return  # a replay this daemon has already handled
        timestamp = item.get("timestamp") or time.time_ns()
        exec_id = payload.get("exec_id") or ""
        event: dict[str, Any] = {"container_id": handle.id}
        if topic == shim_topics.TASK_CREATE:
            handle.init.pid = payload.get("pid", 0)
            event.update(
                bundle=handle.bundle,
                rootfs=handle.rootfs,
                pid=handle.init.pid,
                io={k: payload.get(k) for k in ("stdin", "stdout", "stderr", "terminal")},
            )
        elif topic == shim_topics.TASK_START:
            handle.init.set_status(RUNNING)
            event.update(pid=payload.get("pid", 0))
        elif topic in (shim_topics.TASK_EXIT, shim_topics.EXEC_EXIT):
            view = handle.init if topic == shim_topics.TASK_EXIT else handle.execs.get(exec_id)
            pid, status, at = (
                payload.get("pid", 0),
                payload.get("exit_status", 0),
                payload.get("exited_at", 0),
            )
            if view is not None:
                view.set_exit(ExitRecord(pid, status, at))
            log.info(
                "%s exited with status %s",
                f"exec {exec_id}" if exec_id else "task",
                status,
                extra=logs.about(handle.namespace, handle.id, exec_id),
            )
            event.update(id=exec_id or handle.id, pid=pid, exit_status=status, exited_at=at)
        elif topic == shim_topics.EXEC_ADDED:
            handle.execs.setdefault(exec_id, ProcessView(exec_id=exec_id))
            event.update(exec_id=exec_id)
        elif topic == shim_topics.EXEC_STARTED:
            view = handle.execs.setdefault(exec_id, ProcessView(exec_id=exec_id))
            view.pid = payload.get("pid", 0)
            view.set_status(RUNNING)
            event.update(exec_id=exec_id, pid=view.pid)
        elif topic == shim_topics.TASK_PAUSED:
            handle.init.set_status(PAUSED)
        elif topic == shim_topics.TASK_RESUMED:
            handle.init.set_status(RUNNING)
        elif topic == shim_topics.TASK_DELETE:
            event.update(  # containerd's TaskDelete of a task names no process: no `id`
                pid=payload.get("pid", 0),
                exit_status=payload.get("exit_status", 0),
                exited_at=payload.get("exited_at", 0),
            )
        daemon_topic = DAEMON_TOPICS.get(topic)
        if daemon_topic is not None:
            self._exchange.publish(handle.namespace, daemon_topic, event, timestamp)

    async def _shim_died(self, handle: TaskHandle) -> None:
        """Report every unfinished process exited: with its exit file's status if the shim
        wrote one, else 255; kill whatever of the container is still running."""
        handle.shim_dead = True
        if handle.client is not None:
            await handle.client.aclose()
        init_record = _safe_exit_record(os.path.join(handle.bundle, "exit"), "init")
        if init_record is None and handle.init.pid and not handle.init.exited.is_set():
            await self._runtime_cleanup(handle)
        self._report_exits(handle, UNKNOWN_EXIT)

    def _report_exits(self, handle: TaskHandle, status_without_file: int) -> None:
        """Without a shim to report them, make the exits of the task's unfinished processes
        final and publish them: the status the shim wrote to an exit file where there is
        one (never replaced by a guess), else `status_without_file`."""
        exit_dir = os.path.join(handle.bundle, "exit")
        now = time.time_ns()
        views = [("init", handle.init)] + [(f"exec-{k}", v) for k, v in handle.execs.items()]
        for name, view in views:
            if view.exited.is_set() or (view.pid == 0 and view is not handle.init):
                continue
            written = _safe_exit_record(exit_dir, name)
            record = written or ExitRecord(view.pid, status_without_file, now)
            if view is handle.init and written is None:
                try:  # the daemon's own record, so that a later restart reports the same
                    write_exit_file(exit_dir, "init", record)
                except OSError as exc:
                    log.error("cannot write exit file for %s: %s", handle.id, exc)
            if view.set_exit(record):
                log.info(
                    "%s reported exited with status %d: its shim is gone",
                    f"exec {view.exec_id}" if view.exec_id else "task",
                    record.status,
                    extra=logs.about(handle.namespace, handle.id, view.exec_id),
                )
                self._exchange.publish(
                    handle.namespace,
                    "/tasks/exit",
                    {
                        "container_id": handle.id,
                        "id": view.exec_id or handle.id,
                        "pid": record.pid,
                        "exit_status": record.status,
                        "exited_at": record.exited_at,
                    },
                )

    async def _runtime_cleanup(self, handle: TaskHandle) -> None:
        """Without a shim, the container must not run on: kill and delete it by runtime,
        and unmount the rootfs the shim had mounted. Each step is bounded."""
        for args in (["kill", "--all", handle.id, "KILL"], ["delete", "--force", handle.id]):
            failure = await self._run_runtime(handle, *args)
            if failure is not None:  # a kill of a container already stopped fails, say
                log.debug("runtime cleanup of %s: %s", handle.id, failure)
        rootfs = os.path.join(handle.bundle, "rootfs")
        with trio.move_on_after(RUNTIME_CALL_TIMEOUT) as unmounting:
            if os.path.ismount(rootfs):
                try:
                    await trio.to_thread.run_sync(unmount_all, rootfs, abandon_on_cancel=True)
                except OSError as exc:
                    log.error("cannot unmount %s: %s", rootfs, exc)
        if unmounting.cancelled_caught:
            log.error("unmounting %s did not finish within %gs", rootfs, RUNTIME_CALL_TIMEOUT)

    async def _run_runtime(self, handle: TaskHandle, *command: str) -> str | None:
        """Run one command of the task's OCI runtime from berthd itself (its shim is gone or
        not answering), as the shim would (runtime_argv): None if it succeeded, else why
        not. Bounded: a runtime still running after RUNTIME_CALL_TIMEOUT is killed and
        reaped in the background, since trio.run_process would wait for one stuck in the
        kernel for ever."""
        log_path = os.path.join(handle.bundle, "runtime.log")
        name = f"{os.path.basename(handle.runtime.binary)} {command[0]}"
        offset = _file_size(log_path)
        try:
            process = await trio.lowlevel.open_process(
                runtime_argv(handle.runtime, log_path, *command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # runc and crun say why in the log
            )
        except OSError as exc:
            return f"cannot run {name}: {exc}"
        with trio.move_on_after(RUNTIME_CALL_TIMEOUT):
            code = await process.wait()
            if code == 0:
                return None
            reason = await trio.to_thread.run_sync(last_error, log_path, offset)
            return f"{name} failed (exit {code}): {reason or 'no message'}"
        process.kill()
        self._nursery.start_soon(guarded, f"reaping {name}", _reap, process)
        return f"{name} did not finish within {RUNTIME_CALL_TIMEOUT:g}s"

    async def _kill_by_runtime(
        self, handle: TaskHandle, all_processes: bool, no_answer: NoAnswer
    ) -> None:
        """A SIGKILL for a shim that does not answer, delivered by the runtime instead: the
        container dies though its shim is stuck (the shim reports the exit once it answers
        again, or a forced delete does)."""
        log.warning(
            "%s; sending SIGKILL through the runtime",
            no_answer,
            extra=logs.about(handle.namespace, handle.id),
        )
        args = ["kill", *(["--all"] if all_processes else []), handle.id, "KILL"]
        failure = await self._run_runtime(handle, *args)
        if failure is not None:
            raise NoAnswer(f"{no_answer}; and {failure}")

    async def _abandon_shim(self, handle: TaskHandle) -> None:
        """The forced delete of a task whose shim does not answer (containerd's cleanup
        after a dead shim): SIGKILL the shim, kill and delete the container through its
        runtime, and make every exit final: its real status where the shim wrote one down,
        else 137, for berthd killed it. Marked deleted, so that a restart finishes it."""
        log.warning(
            "shim pid %d does not answer; killing it, and its container through the runtime",
            handle.shim_pid,
            extra=logs.about(handle.namespace, handle.id),
        )
        handle.shim_dead = True  # other calls fail at once from here on
        if shims.shim_alive(handle.shim_pid, handle.shim_start_time):
            _kill(handle.shim_pid)
            # Dead, it writes no exit file after the ones read below.
            with trio.move_on_after(SHIM_DEATH_TIMEOUT):
                await shims.wait_for_death(handle.shim_pid)
        if handle.client is not None:
            await handle.client.aclose()
        await self._runtime_cleanup(handle)
        self._report_exits(handle, KILLED_STATUS)
        try:
            await trio.to_thread.run_sync(mark_deleted, handle.bundle)
        except OSError as exc:
            log.error("cannot mark %s deleted: %s", handle.bundle, exc)

    async def _discard(self, handle: TaskHandle) -> None:
        """Undo a failed or cancelled create: delete whatever the shim created (it
        serialises this behind a create still running), stop the shim, remove the bundle;
        without a usable shim, remove the container through the runtime."""
        handle.deleting = True
        cleaned = False
        client = handle.client
        if client is not None and not client.closed.is_set():
            try:
                with trio.move_on_after(20):
                    try:
                        await client.call("delete", {"force": True}, timeout=15)
                    except NotFound:
                        pass  # nothing was created
                    cleaned = True
                    await client.call("shutdown", {"now": True}, timeout=5)
            except BerthError as exc:
                log.warning("discarding %s: %s", handle.id, exc)
        if not cleaned:
            await self._runtime_cleanup(handle)
        if handle.shim_pid and shims.shim_alive(handle.shim_pid, handle.shim_start_time):
            with trio.move_on_after(3):
                await shims.wait_for_death(handle.shim_pid)
            if shims.shim_alive(handle.shim_pid, handle.shim_start_time):
                _kill(handle.shim_pid)
        handle.scope.cancel()
        if client is not None:
            await client.aclose()
        await trio.to_thread.run_sync(remove_bundle, handle.bundle)

    # -- calls into a shim

    async def _call(
        self,
        handle: TaskHandle,
        method: str,
        params: dict[str, Any] | None = None,
        timeout: float = SHIM_CALL_TIMEOUT,
    ) -> Any:
        client = handle.client
        if handle.shim_dead or client is None:
            raise FailedPrecondition(f"task {handle.id}: its shim is gone; the task has exited")
        with trio.move_on_after(timeout + SEND_GRACE):
            try:
                return await client.call(method, params or {}, timeout=timeout)
            except NoAnswer:
                raise NoAnswer(_not_answering(handle, method, timeout)) from None
        # Not even the request went out (a shim that reads nothing fills its socket): the
        # connection may end in half a frame now, so it goes, and the relay connects again
        # if the shim comes back.
        await client.aclose()
        raise NoAnswer(_not_answering(handle, method, timeout))

    async def start(self, namespace: str, container_id: str, exec_id: str | None) -> dict[str, Any]:
        handle = self.get_handle(namespace, container_id)
        view = handle.process(exec_id)
        try:
            result = await self._call(handle, "start", {"exec_id": exec_id or ""})
        except BerthError:
            if exec_id:
                await self._mirror_failed_start(handle, view, exec_id)
            raise
        if exec_id:
            view.pid = int(result["pid"])
        view.set_status(RUNNING)
        log.info("%s started: pid %d", f"exec {exec_id}" if exec_id else "task", result["pid"])
        return {"pid": int(result["pid"])}

    async def _mirror_failed_start(
        self, handle: TaskHandle, view: ProcessView, exec_id: str
    ) -> None:
        """An exec whose start failed is final here only if its shim made it final (it
        never ran). Marked final whatever the error, a refused or unanswered start (the
        shim short of descriptors, busy, stopped) left the daemon saying `exited 255` of
        an exec its shim still held as created, and could start later."""
        with contextlib.suppress(BerthError):
            state = await self._call(handle, "state", {"exec_id": exec_id}, timeout=5.0)
            if state.get("status") == STOPPED:
                view.set_exit(
                    ExitRecord(
                        int(state.get("pid") or 0),
                        int(state.get("exit_status", UNKNOWN_EXIT)),
                        int(state.get("exited_at") or time.time_ns()),
                    )
                )

    async def kill(
        self,
        namespace: str,
        container_id: str,
        signo: int,
        all_processes: bool,
        exec_id: str | None,
    ) -> None:
        handle = self.get_handle(namespace, container_id)
        view = handle.process(exec_id)
        if view.exited.is_set():
            raise NotFound(f"process {exec_id or container_id} already finished")
        params = {"signal": signo, "all": all_processes, "exec_id": exec_id or ""}
        try:
            await self._call(handle, "kill", params, timeout=SHIM_SIGNAL_TIMEOUT)
        except NoAnswer as exc:
            # Only the container's SIGKILL has another way in: the runtime addresses the
            # container, not an exec's process, and other signals stay the shim's business.
            if signo != signal.SIGKILL or exec_id:
                raise
            with trio.CancelScope(shield=True):  # bounded; the client may be leaving
                await self._kill_by_runtime(handle, all_processes, exc)

    async def exec(
        self, namespace: str, container_id: str, exec_id: str, params: schema.TasksExec
    ) -> None:
        handle = self.get_handle(namespace, container_id)
        if exec_id in handle.execs:
            raise AlreadyExists(f"exec {exec_id} already exists")
        shim_params = {
            "exec_id": exec_id,
            "stdin": params.stdin,
            "stdout": params.stdout,
            "stderr": params.stderr,
            "terminal": params.terminal,
            "spec": params.spec,
            "width": params.width,
            "height": params.height,
            "log": msgspec.to_builtins(params.log) if params.log is not None else None,
        }
        await self._call(handle, "exec", shim_params)
        handle.execs.setdefault(exec_id, ProcessView(exec_id=exec_id)).set_stdio(shim_params)

    async def delete_process(
        self, namespace: str, container_id: str, exec_id: str
    ) -> dict[str, Any]:
        handle = self.get_handle(namespace, container_id)
        view = handle.process(exec_id)
        if handle.shim_dead:
            handle.execs.pop(exec_id, None)
            view.unknown_exit()
            return view.to_wire()
        result = await self._call(handle, "delete", {"exec_id": exec_id})
        handle.execs.pop(exec_id, None)
        view.set_exit(ExitRecord.from_wire(result))
        return dict(result)

    async def delete(
        self, namespace: str, container_id: str, force: bool = False
    ) -> dict[str, Any]:
        handle = self.get_handle(namespace, container_id)
        if handle.deleting:
            raise FailedPrecondition(f"task {container_id} is being deleted")
        handle.deleting = True
        try:
            if handle.shim_dead:
                await self._runtime_cleanup(handle)
                result = self._publish_delete(handle)
            else:
                try:
                    result = await self._delete_by_shim(handle, force)
                except NoAnswer as exc:
                    if not force:
                        raise NoAnswer(
                            f"{exc}; a forced delete removes the task without its shim"
                        ) from None
                    with trio.CancelScope(shield=True):  # every step bounded
                        await self._abandon_shim(handle)
                    result = self._publish_delete(handle)
        except BaseException:
            handle.deleting = False
            if handle.supervised.is_set() and not handle.shim_dead and not self.closing:
                # The shim died during the delete; its supervisor stood back for the delete.
                with trio.CancelScope(shield=True):
                    await self._shim_died(handle)
            raise
        for view in handle.execs.values():  # nobody waits on a deleted task for ever
            view.unknown_exit()
        handle.scope.cancel()
        if handle.client is not None:
            await handle.client.aclose()
        self._tasks.pop(handle.key, None)
        await trio.to_thread.run_sync(remove_bundle, handle.bundle)
        log.info("task deleted: exit status %d", result["exit_status"])
        return result

    async def _delete_by_shim(self, handle: TaskHandle, force: bool) -> dict[str, Any]:
        """Have the shim delete the container (it removes it from the runtime, unmounts the
        rootfs and publishes the delete), then stop the shim."""
        try:
            reply = await self._call(handle, "delete", {"force": force})
        except NotFound:
            # Deleted by an earlier call that was cut short (or by hand): finish up.
            reply = {**handle.init.exit_record().to_wire(), "seq": 0}
        record = ExitRecord.from_wire(reply)
        # Let the event pump publish what the shim sent before this reply.
        last = reply.get("seq", 0)
        with trio.move_on_after(2):
            while handle.processed_seq < last and not handle.supervised.is_set():
                await handle.progress.wait()
        handle.init.set_exit(record)
        try:
            await self._call(handle, "shutdown", {}, timeout=5)
        except BerthError as exc:
            log.warning("shim shutdown for %s: %s", handle.id, exc)
        # The shim exits on its own right after that answer; nobody needs to wait for it,
        # but no shim may outlive its task, so make sure in the background.
        self._nursery.start_soon(guarded, "shim exit", self._ensure_exit, handle)
        return record.to_wire()

    def _publish_delete(self, handle: TaskHandle) -> dict[str, Any]:
        """The delete of a task without a shim (which would have published it)."""
        result = handle.init.exit_record().to_wire()
        self._exchange.publish(
            handle.namespace,
            "/tasks/delete",
            {"container_id": handle.id, **result},  # no `id`: see _apply_event
        )
        return result

    async def _ensure_exit(self, handle: TaskHandle) -> None:
        with trio.move_on_after(5):
            await shims.wait_for_death(handle.shim_pid)
        if shims.shim_alive(handle.shim_pid, handle.shim_start_time):
            log.warning("shim of %s did not exit after shutdown; killing it", handle.id)
            _kill(handle.shim_pid)

    async def wait(self, namespace: str, container_id: str, exec_id: str | None) -> dict[str, Any]:
        handle = self.get_handle(namespace, container_id)
        view = handle.process(exec_id)
        await view.exited.wait()
        return view.exit_record().to_wire()

    async def get(self, namespace: str, container_id: str, exec_id: str | None) -> dict[str, Any]:
        handle = self.get_handle(namespace, container_id)
        view = handle.process(exec_id)
        if not handle.shim_dead and handle.client is not None and not view.exited.is_set():
            try:
                state = await self._call(handle, "state", {"exec_id": exec_id or ""}, timeout=10)
            except Unavailable:
                state = None
            if isinstance(state, dict):
                self._apply_state(view, state)
        out = {**view.to_wire(), "id": container_id, "namespace": namespace}
        if not exec_id:
            out["execs"] = [v.to_wire() for v in handle.execs.values()]
            out["shim_pid"] = handle.shim_pid
        return out

    @staticmethod
    def _apply_state(view: ProcessView, state: dict[str, Any]) -> None:
        """Take a shim's report of a process into the cache. An exit counts as final (and
        wakes waiters) only once the shim has published it, i.e. drained its output; it
        is not published here: a replayed event does that, or did before a restart."""
        view.pid = state.get("pid", view.pid)
        if any(state.get(key) for key in STDIO_KEYS):  # a shim's own record (recovery)
            view.set_stdio(state)
        status = state.get("status", view.status)
        if status != STOPPED:
            view.set_status(status)
        elif state.get("exit_published"):
            view.set_exit(
                ExitRecord(view.pid, state.get("exit_status", 0), state.get("exited_at", 0))
            )
        else:
            view.status = STOPPED
            view.exit_status = state.get("exit_status", 0)
            view.exited_at = state.get("exited_at", 0)

    def rootfs_snapshots(self) -> set[tuple[str, str]]:
        """(snapshotter, scoped key) of every container that has a task: GC keeps them."""
        out = set()
        for namespace, container_id in list(self._tasks):
            try:
                c = self._store.get_container(namespace, container_id)
            except BerthError:
                continue
            if c.snapshot_key:
                out.add(
                    (
                        c.snapshotter or self._storage.default_snapshotter,
                        f"{namespace}/{c.snapshot_key}",
                    )
                )
        return out

    def list(self, namespace: str) -> list[dict[str, Any]]:
        return [h.summary() for (ns, _), h in sorted(self._tasks.items()) if ns == namespace]

    def handles(self) -> tuple[TaskHandle, ...]:
        """Every task of every namespace (berthd's metrics)."""
        return tuple(self._tasks.values())

    async def passthrough(
        self, namespace: str, container_id: str, method: str, params: dict[str, Any] | None = None
    ) -> Any:
        """Calls passed through to the shim as they are."""
        handle = self.get_handle(namespace, container_id)
        result = await self._call(handle, method, params or {})
        if method == "pause":
            handle.init.set_status(PAUSED)
        elif method == "resume":
            handle.init.set_status(RUNNING)
        return result

    async def pids(self, namespace: str, container_id: str) -> dict[str, Any]:
        """The task's processes, each with the exec it is ("" for the others). Asked of the
        shim packed (4 bytes a pid); a shim from before that answers with the list itself."""
        handle = self.get_handle(namespace, container_id)
        reply = await self._call(handle, "pids", {"packed": True})
        if "processes" in reply:  # a shim of an older berth
            return {"processes": reply["processes"]}
        try:
            pids = unpack_pids(reply["pids"])
            by_pid = {pid: exec_id for exec_id, pid in dict(reply.get("execs") or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise Internal(f"the shim's process list is malformed: {exc}") from exc
        return {"processes": [{"pid": pid, "exec_id": by_pid.get(pid, "")} for pid in pids]}

    async def shim_log(self, namespace: str, container_id: str, tail: int) -> dict[str, Any]:
        """The task's shim's own log (its lines and errors, not the container's output):
        its last `tail` lines, or all the shim keeps (it bounds the file itself)."""
        handle = self.get_handle(namespace, container_id)
        path = os.path.join(handle.bundle, "shim.log")
        return {"data": await trio.to_thread.run_sync(_read_log_tail, path, tail)}

    # -- recovery

    async def recover(self) -> int:
        """Find every task in the state dir and reattach to it; return how many."""
        tasks_dir = self._config.tasks_dir
        if not os.path.isdir(tasks_dir):
            return 0
        found = 0
        began = time.monotonic()
        # close() cancels this before it closes any shim connection: a shutdown that comes
        # during recovery must stop it, not look to it like shims that broke (found by the
        # soak: SIGTERM right after a restart killed healthy shims, exits became 255).
        with self._recovery_scope:
            async with trio.open_nursery() as nursery:
                for namespace in sorted(os.listdir(tasks_dir)):
                    ns_dir = os.path.join(tasks_dir, namespace)
                    if not is_valid(namespace) or not os.path.isdir(ns_dir):
                        log.error("recovery: ignoring unexpected entry %s", ns_dir)
                        continue
                    for container_id in sorted(os.listdir(ns_dir)):
                        bundle = os.path.join(ns_dir, container_id)
                        if not is_valid(container_id) or not os.path.isdir(bundle):
                            log.error("recovery: ignoring unexpected entry %s", bundle)
                            continue
                        try:
                            record = read_state(bundle)
                        except CorruptState as exc:
                            record = await self._record_from_live_shim(
                                namespace, container_id, bundle, exc
                            )
                            if record is None:
                                continue
                        if record is None:
                            # The daemon died before this task's shim ever ran: nothing to keep.
                            log.info("recovery: removing never-started bundle %s", bundle)
                            remove_bundle(bundle)
                            continue
                        found += 1
                        nursery.start_soon(
                            guarded,
                            f"recovery of {namespace}/{container_id}",
                            self._recover_patiently,
                            namespace,
                            container_id,
                            bundle,
                            record,
                        )
        self.recovery_seconds = time.monotonic() - began
        return found

    async def _record_from_live_shim(
        self, namespace: str, container_id: str, bundle: str, problem: CorruptState
    ) -> ShimRecord | None:
        """A task whose shim.json cannot be read: its shim, if one still answers at the
        task's socket (named after its ids), says who it is, and the record is written
        again. Skipped otherwise, its bundle left as it is for an operator; before, a live
        shim went unsupervised and its container invisible, for ever."""
        address = self._socket(namespace, container_id)
        label = f"shim {namespace}/{container_id}"
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                client = await shims.connect_shim(address, label)
                try:
                    await client.handshake()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client.run)
                        info = await client.call("info", {}, timeout=CONNECT_TIMEOUT)
                        nursery.cancel_scope.cancel()
                finally:
                    await client.aclose()
            pid = int(info["pid"])
            start_time = process_start_time(pid)
            if (info.get("id"), info.get("namespace"), info.get("bundle")) != (
                container_id,
                namespace,
                bundle,
            ) or start_time is None:
                raise ValueError(f"the shim at {address} is not this task's")
            record = ShimRecord(
                version=STATE_VERSION,
                pid=pid,
                start_time=start_time,
                address=address,
                protocol=int(info["protocol"]),
                id=container_id,
                namespace=namespace,
                bundle=bundle,
                runtime=dict(info.get("runtime") or {}),
            )
            await trio.to_thread.run_sync(write_state, bundle, record)
        except (BerthError, OSError, trio.TooSlowError, KeyError, TypeError, ValueError) as exc:
            log.error(
                "recovery: skipping %s: %s; and no shim of it answers (%s)", bundle, problem, exc
            )
            return None
        log.warning(
            "recovery: %s: %s; its shim (pid %d) answers: record written again",
            bundle,
            problem,
            pid,
        )
        return record

    async def _recover_patiently(
        self, namespace: str, container_id: str, bundle: str, record: ShimRecord
    ) -> None:
        """_recover_one, tried again each second while berthd is short of descriptors,
        for up to RECOVERY_SHORTAGE_TRIES tries: a task skipped is a task nobody
        supervises, and one taken for dead would have its container cleaned up."""
        tries = 0
        while True:
            tries += 1
            try:
                await self._recover_one(namespace, container_id, bundle, record)
                return
            except Exception as exc:
                if not shims.is_shortage(exc) or tries >= RECOVERY_SHORTAGE_TRIES:
                    raise
                if tries == 1:
                    log.error("recovery of %s/%s: %s; trying again", namespace, container_id, exc)
            await trio.sleep(shims.SHORTAGE_RETRY)

    async def _recover_one(
        self, namespace: str, container_id: str, bundle: str, record: ShimRecord
    ) -> None:
        logs.set_about(namespace, container_id)  # a task of its own (recover's nursery)
        try:
            runtime = RuntimeConfig.from_params(record.runtime)
        except BerthError:
            runtime = RuntimeConfig()
        handle = TaskHandle(
            namespace,
            container_id,
            bundle,
            record.address,
            runtime,
            shim_pid=record.pid,
            shim_start_time=record.start_time,
            processed_seq=self._inherited_seqs.get(f"{namespace}/{container_id}", 0),
        )
        alive = shims.shim_alive(record.pid, record.start_time)
        if is_deleted(bundle):
            # The daemon died inside tasks.delete: finish it, report nothing.
            log.info("recovery: finishing the deletion of %s/%s", namespace, container_id)
            if alive:
                _kill(record.pid)
            await trio.to_thread.run_sync(remove_bundle, bundle)
            return
        self._tasks[handle.key] = handle
        if alive:
            try:
                await self._attach(handle)
                processes = await self._call(handle, "list", {}, timeout=10)
                if not processes:
                    # The daemon died between starting this shim and creating its task.
                    log.info(
                        "recovery: discarding the unused shim of %s/%s", namespace, container_id
                    )
                    self._tasks.pop(handle.key, None)
                    await self._discard(handle)
                    return
                for state in processes:
                    exec_id = state.get("exec_id") or ""
                    view = (
                        handle.execs.setdefault(exec_id, ProcessView(exec_id))
                        if exec_id
                        else handle.init
                    )
                    self._apply_state(view, state)
                log.info("recovery: reattached to shim pid %d", record.pid)
                self.recovered["reattached"] += 1
                return
            except (BerthError, OSError, trio.TooSlowError) as exc:
                if shims.is_shortage(exc):
                    # berthd is short of descriptors, not the shim broken: killing it would
                    # end a healthy container. Left as it is, to a restart with more.
                    self._tasks.pop(handle.key, None)
                    handle.scope.cancel()
                    raise
                log.error(
                    "recovery: shim %d of %s/%s is alive but unusable (%s); killing it",
                    record.pid,
                    namespace,
                    container_id,
                    exc,
                )
                if shims.shim_alive(record.pid, record.start_time):
                    _kill(record.pid)
                handle.scope.cancel()
                self.recovered["unusable"] += 1
        handle.init.pid = _init_pid(bundle)
        if not handle.init.pid and _safe_exit_record(os.path.join(bundle, "exit"), "init") is None:
            # The shim died before it ever created the task: nothing ran, nothing to report.
            self._tasks.pop(handle.key, None)
            await trio.to_thread.run_sync(remove_bundle, bundle)
            return
        self.recovered["exited"] += 1
        await self._shim_died(handle)

    def inherit_seqs(self, seqs: dict[str, int]) -> None:
        """The number of the last event a predecessor processed, per task ("ns/id"): a
        shim replays what was not acknowledged, and what was processed is not published
        twice."""
        self._inherited_seqs = dict(seqs)

    async def release(self) -> dict[str, int]:
        """A handover: stop supervising, leave every shim running (their unacknowledged
        events wait for the successor); the last event seq processed, per task."""
        await self.close()
        for handle in self._tasks.values():
            log.debug(
                "handover: shim pid %d left to the successor (events up to seq %d processed)",
                handle.shim_pid,
                handle.processed_seq,
                extra=logs.about(handle.namespace, handle.id),
            )
        return {f"{ns}/{cid}": h.processed_seq for (ns, cid), h in self._tasks.items()}

    async def close(self) -> None:
        """Daemon shutdown: stop supervising; the shims and containers live on."""
        self.closing = True
        self._recovery_scope.cancel()
        for handle in self._tasks.values():
            handle.scope.cancel()
            if handle.client is not None:
                await handle.client.aclose()


def remove_bundle(bundle: str) -> None:
    """Remove a task's directory, unmounting its rootfs first. rmtree descends into mount
    points: with the rootfs still mounted it would delete the snapshot's (or a bind
    mount's) files. A rootfs that cannot be unmounted keeps the bundle in place."""
    rootfs = os.path.join(bundle, "rootfs")
    if os.path.isdir(rootfs) and os.path.ismount(rootfs):
        try:
            unmount_all(rootfs)
        except OSError as exc:
            log.error("cannot unmount %s (%s); leaving %s in place", rootfs, exc, bundle)
            return
        if os.path.ismount(rootfs):
            log.error("%s is still mounted; leaving %s in place", rootfs, bundle)
            return
    try:
        _remove_linked_logs(bundle)
        remove_tree(bundle)
    except OSError as exc:
        log.error("cannot remove %s: %s", bundle, exc)


def _remove_linked_logs(bundle: str) -> None:
    """The log files `<bundle>/log` links to (TaskService._link_log_dir). A plain
    directory there (a standalone shim's bundle, an older berthd's) goes with the bundle;
    a link that does not name `logs/<namespace>/<id>` of this bundle is left alone."""
    try:
        target = os.readlink(os.path.join(bundle, LOG_LINK))
    except OSError:
        return
    parts = os.path.normpath(target).split(os.sep)
    if len(parts) < 4 or parts[-3] != "logs" or parts[-2:] != bundle.split(os.sep)[-2:]:
        log.error("%s/%s links to %s, not to its logs; left alone", bundle, LOG_LINK, target)
        return
    remove_tree(target)


def _safe_exit_record(exit_dir: str, name: str) -> ExitRecord | None:
    try:
        return read_exit_file(exit_dir, name)
    except CorruptExitFile as exc:
        log.error("corrupt exit file %s/%s: %s", exit_dir, name, exc)
        return None


def _read_log_tail(path: str, tail: int) -> bytes:
    """The end of a log rotated as shim/loop.py does (`path.1`, then `path`): at most
    SHIM_LOG_READ bytes of it, and of those only the last `tail` lines (0: all)."""
    chunks = []
    for name in (f"{path}.1", path):
        try:
            with open(name, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - SHIM_LOG_READ))
                chunks.append(f.read(SHIM_LOG_READ))
        except FileNotFoundError:
            continue
    data = b"".join(chunks)[-SHIM_LOG_READ:]
    if tail > 0:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail:])
    return data


def _not_answering(handle: TaskHandle, method: str, timeout: float) -> str:
    return (
        f"task {handle.id}: its shim (pid {handle.shim_pid}) is not answering: no reply to "
        f"{method} within {timeout:g}s (stopped, or stuck in the kernel?)"
    )


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


async def _reap(process: trio.Process) -> None:
    """Wait for a runtime process berthd gave up on (killed), so it leaves no zombie."""
    await process.wait()


def _init_pid(bundle: str) -> int:
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            return int(f.read(32).strip() or 0)
    except (OSError, ValueError):
        return 0


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _host_gid_of_root(spec: dict[str, Any]) -> int | None:
    """The host gid that a user-namespaced container's gid 0 maps to (None without one)."""
    linux = spec.get("linux")
    if not isinstance(linux, dict):
        return None
    namespaces = linux.get("namespaces") or []
    if not any(isinstance(n, dict) and n.get("type") == "user" for n in namespaces):
        return None
    for mapping in linux.get("gidMappings") or []:
        try:
            inside, host, size = (int(mapping[k]) for k in ("containerID", "hostID", "size"))
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"bad gidMappings entry {mapping!r}") from None
        if inside <= 0 < inside + size:
            return host - inside
    return None


def _write_json(path: str, doc: dict[str, Any]) -> None:
    """The bundle's config.json: atomic, not fsynced (as containerd writes it). It is
    made again from the metadata store for every create, and a machine crash that could
    lose it also ends its container; the fsync and the directory's fsync were ~1 ms of
    every create on berthd's loop (far more on a busy disk), blocking every other call."""
    import json

    atomic_write(path, json.dumps(doc).encode(), durable=False)
