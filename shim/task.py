"""The container a shim owns: its init process, its exec processes, their lifecycles.

Rules this module keeps:
- An exit status is written to its durable exit file the moment the process is reaped,
  before anything else happens; the exit *event* (and `wait`) follow once the process's
  output is drained (bounded by IO_DRAIN_TIMEOUT), so a client that saw the exit has
  seen all the output. The init exit is further held until the exits of the task's exec
  processes are published (they die with the container's pid namespace), like containerd.
- A pid is only signalled while its process is known not to be reaped: the reaper runs
  in this same loop, so "not reaped" means the pid cannot have been reused.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from berth.shim import cgroups, events
from berth.shim.console import ConsoleSocket, resize
from berth.shim.exit import (
    ExitRecord,
    mark_deleted,
    remove_exit_file,
    reserve_exit_file,
    write_exit_file,
)
from berth.shim.io import IOConfig, ProcessIO
from berth.shim.logger import Logger
from berth.shim.loop import Future, Loop, log
from berth.shim.mount import Mount, mount_all, unmount_all
from berth.shim.reaper import Reaper
from berth.shim.runtime import Runtime, RuntimeCommandError, RuntimeConfig, Stdio
from berth.shim.wire import status
from berth.shim.wire.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from berth.shim.wire.names import validate
from berth.shim.wire.status import CREATED, PAUSED, RUNNING, STOPPED, UNKNOWN_EXIT

IO_DRAIN_TIMEOUT = 2.0
EXIT_FILE_RETRY = 1.0  # seconds between attempts to write an exit file that failed
EXEC_WAIT_TIMEOUT = 2.0
LOGGER_READY_TIMEOUT = 10.0  # seconds a binary:// logger has to report ready
MAX_SPEC_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ShimConfig:
    """Everything a shim is started with. Plain values: it crosses the zygote's socket."""

    id: str
    namespace: str
    bundle: str
    socket: str
    runtime: RuntimeConfig

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ShimConfig:
        bundle, socket = params.get("bundle"), params.get("socket")
        if not isinstance(bundle, str) or not os.path.isabs(bundle):
            raise InvalidArgument("bundle must be an absolute path")
        if not isinstance(socket, str) or not os.path.isabs(socket):
            raise InvalidArgument("socket must be an absolute path")
        runtime = params.get("runtime") or {}
        if not isinstance(runtime, dict):
            raise InvalidArgument("runtime must be a map")
        return cls(
            id=validate(params.get("id"), "container id"),
            namespace=validate(params.get("namespace", "default"), "namespace"),
            bundle=bundle,
            socket=socket,
            runtime=RuntimeConfig.from_params(runtime),
        )

    def to_params(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "bundle": self.bundle,
            "socket": self.socket,
            "runtime": self.runtime.to_params(),
        }


class Process:
    """The init process (exec_id None) or one exec process."""

    def __init__(self, exec_id: str | None, io: ProcessIO) -> None:
        self.exec_id = exec_id
        self.io = io
        self.pid = 0
        self.status = CREATED
        self.reaped = False
        self.exit: ExitRecord | None = None
        self.exited: Future[ExitRecord] = Future()  # set once the exit is published
        self.spec: dict[str, Any] | None = None
        self.started = False
        # Done once start() has finished (its event published, or failed): the exit of a
        # process that dies during its own start is published after, never before.
        self.start_done: Future[None] = Future()
        self.spawned_at = 0.0  # monotonic time the runtime was asked to create it

    @property
    def name(self) -> str:
        """Its name in the exit directory and in log file names."""
        return "init" if self.exec_id is None else f"exec-{self.exec_id}"

    def describe(self, config: ShimConfig) -> dict[str, Any]:
        return {
            "id": config.id,
            "exec_id": self.exec_id or "",
            "bundle": config.bundle,
            "pid": self.pid,
            "status": self.status,
            "exit_status": self.exit.status if self.exit else 0,
            "exited_at": self.exit.exited_at if self.exit else 0,
            # True once the exit was published (output drained): a daemon may then treat it
            # as final without waiting for the (possibly already acknowledged) event.
            "exit_published": self.exited.done(),
            **self.io.config.to_params(),
        }


class Task:
    def __init__(
        self, loop: Loop, reaper: Reaper, config: ShimConfig, queue: events.EventQueue
    ) -> None:
        self._loop = loop
        self._reaper = reaper
        self.config = config
        self._events = queue
        self.runtime = Runtime(loop, reaper, config.runtime, self._path("runtime.log"))
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        self.deleted = False
        self.rootfs_mounted = False
        self._console_seq = 0
        self._oom: cgroups.OOMWatch | None = None
        self._loggers: set[Logger] = set()  # every logging binary not yet exited

    # -- helpers

    def _path(self, *parts: str) -> str:
        return os.path.join(self.config.bundle, *parts)

    def _exit_dir(self) -> str:
        return self._path("exit")

    def _unmount_rootfs(self) -> None:
        if self.rootfs_mounted:
            try:
                unmount_all(self._path("rootfs"))
                self.rootfs_mounted = False
            except OSError as exc:
                log(f"unmounting the rootfs: {exc}")

    def _console_path(self) -> str:
        self._console_seq += 1
        return f"{self.config.socket}.c{self._console_seq}"

    def process(self, exec_id: str | None) -> Process:
        if not exec_id:
            if self.init is None:
                raise NotFound(f"task {self.config.id} not created")
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"exec {exec_id} not found in task {self.config.id}")
        return proc

    def _require_init(self) -> Process:
        if self.init is None or self.deleted:
            raise NotFound(f"task {self.config.id} not found")
        return self.init

    def _publish(self, topic: str, **payload: Any) -> None:
        payload.setdefault("id", self.config.id)
        self._events.publish(topic, payload)

    # -- lifecycle

    async def create(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.init is not None:
            raise AlreadyExists(f"task {self.config.id} already exists")
        if not os.path.isfile(self._path("config.json")):
            raise InvalidArgument(f"bundle {self.config.bundle} has no config.json")
        io_config = IOConfig.from_params(params)
        rootfs = params.get("rootfs") or []
        if not isinstance(rootfs, list):
            raise InvalidArgument("rootfs must be a list of mounts")
        mounts = [Mount.from_wire(m) for m in rootfs]
        os.makedirs(self._path("log"), mode=0o700, exist_ok=True)
        # The exit status must be durable even if the disk fills up while the task runs:
        # its file's space is taken now (a full disk fails the create instead).
        reserve_exit_file(self._exit_dir(), "init")
        # The runtime creates its log 0644; everything in a bundle is private.
        os.close(os.open(self.runtime.log_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        io = self._process_io(io_config, "", hold_stdin=True)
        proc = Process(None, io)
        self.init = proc
        console: ConsoleSocket | None = None
        pid_file = self._path("init.pid")
        created = False
        try:
            await self._logger_ready(io)
            if mounts:
                # The snapshotter's mount list becomes the bundle's rootfs (containerd's
                # model: the shim mounts it, and unmounts it when the task is deleted).
                os.makedirs(self._path("rootfs"), mode=0o755, exist_ok=True)
                mount_all(mounts, self._path("rootfs"))
                self.rootfs_mounted = True
            if io_config.terminal:
                console = ConsoleSocket(self._console_path())
            stdin, stdout, stderr = io.stdio
            proc.spawned_at = time.monotonic()
            self._reaper.hold(proc.spawned_at)  # released once its pid is watched
            try:
                await self.runtime.create(
                    self.config.id,
                    self.config.bundle,
                    pid_file,
                    Stdio(stdin, stdout, stderr),
                    console.path if console else None,
                )
                created = True
            finally:
                io.runtime_spawned(ran=created)
            if console is not None:
                io.attach_console(console.receive_master())
                width, height = params.get("width"), params.get("height")
                if isinstance(width, int) and isinstance(height, int) and width and height:
                    resize(io.console, width, height)  # type: ignore[arg-type]
            proc.pid = _read_pid(pid_file)
        except BaseException:
            self.init = None
            io.close()
            if created:  # the runtime made a container this task will never own: remove it
                try:
                    await self.runtime.delete(self.config.id, force=True)
                except Exception as exc:
                    log(f"cleanup after a failed create: {exc}")
            self._unmount_rootfs()
            raise
        finally:
            self._reaper.release(proc.spawned_at)  # no await before its watch
            if console is not None:
                console.close()
        self._watch_exit(proc)
        self._oom = cgroups.OOMWatch(proc.pid)
        if self._oom.fd >= 0:
            self._loop.add_reader(self._oom.fd, self._check_oom)
        self._publish(
            status.TASK_CREATE,
            bundle=self.config.bundle,
            pid=proc.pid,
            **io_config.to_params(),
        )
        return {"pid": proc.pid}

    async def start(self, exec_id: str | None) -> dict[str, Any]:
        proc = self.process(exec_id)
        if proc.started:
            raise FailedPrecondition(f"process {proc.exec_id or self.config.id} already started")
        if exec_id is None:
            if proc.reaped:
                raise FailedPrecondition(f"task {self.config.id} has already exited")
            proc.started = True
            try:
                await self.runtime.start(self.config.id)
                if not proc.reaped:
                    proc.status = RUNNING
                self._publish(status.TASK_START, pid=proc.pid)
            finally:
                proc.start_done.set_result(None)
            return {"pid": proc.pid}
        init = self._require_init()
        if init.status not in (RUNNING, CREATED):
            raise FailedPrecondition(f"cannot start an exec in a {init.status} task")
        proc.started = True
        try:
            await self._run_exec(proc)
        finally:
            proc.start_done.set_result(None)
        return {"pid": proc.pid}

    async def _run_exec(self, proc: Process) -> None:
        assert proc.exec_id is not None and proc.spec is not None
        spec_file = self._path(f"{proc.name}.process.json")
        pid_file = self._path(f"{proc.name}.pid")
        console: ConsoleSocket | None = None
        try:
            # In here: on a full state dir (ENOSPC) the exec is final as well, not left
            # "started" for ever with nothing that could end it (no wait, no delete).
            with open(spec_file, "w") as f:
                json.dump(proc.spec, f)
            if proc.io.config.terminal:
                console = ConsoleSocket(self._console_path())
            stdin, stdout, stderr = proc.io.stdio
            proc.spawned_at = time.monotonic()
            self._reaper.hold(proc.spawned_at)  # released once its pid is watched
            ran = False
            try:
                await self.runtime.exec(
                    self.config.id,
                    spec_file,
                    pid_file,
                    Stdio(stdin, stdout, stderr),
                    console.path if console else None,
                )
                ran = True
            finally:
                proc.io.runtime_spawned(ran=ran)
            if console is not None:
                proc.io.attach_console(console.receive_master())
            proc.pid = _read_pid(pid_file)
        except BaseException:
            # It never ran (or cannot be supervised): final, so that wait and delete work.
            proc.io.close()
            proc.reaped = True
            proc.status = STOPPED
            proc.exit = ExitRecord(pid=proc.pid, status=UNKNOWN_EXIT, exited_at=time.time_ns())
            proc.exited.set_result(proc.exit)
            raise
        finally:
            self._reaper.release(proc.spawned_at)  # no await before its watch
            if console is not None:
                console.close()
            for path in (spec_file, pid_file):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self._watch_exit(proc)
        if not proc.reaped:
            proc.status = RUNNING
        self._publish(status.EXEC_STARTED, exec_id=proc.exec_id, pid=proc.pid)

    def _process_io(self, config: IOConfig, log_prefix: str, *, hold_stdin: bool) -> ProcessIO:
        return ProcessIO(
            self._loop,
            config,
            self._path("log", log_prefix),
            hold_stdin=hold_stdin,
            reaper=self._reaper,
            logger_env={
                "CONTAINER_ID": self.config.id,
                "CONTAINER_NAMESPACE": self.config.namespace,
            },
            on_logger=self._track_logger,
        )

    def _track_logger(self, logger: Logger) -> None:
        """Until it exits, whatever becomes of its process (a failed create included)."""
        self._loggers.add(logger)
        logger.exited.add_done_callback(lambda _: self._loggers.discard(logger))

    async def _logger_ready(self, io: ProcessIO) -> None:
        """A binary:// logger is ready before its process starts (containerd waits too)."""
        try:
            await self._loop.timeout(io.ready(), LOGGER_READY_TIMEOUT)
        except TimeoutError:
            io.kill_logger()
            assert io.logger is not None
            raise FailedPrecondition(
                f"logging binary {io.logger.command.path} did not get ready (close fd 5) "
                f"within {LOGGER_READY_TIMEOUT:g}s"
            ) from None

    def _watch_exit(self, proc: Process) -> None:
        self._reaper.watch(proc.pid, not_before=proc.spawned_at).add_done_callback(
            lambda fut: self._on_reaped(proc, fut.result())
        )

    def _on_reaped(self, proc: Process, code: int) -> None:
        """Durable first: the exit file is on disk before anything else happens."""
        record = ExitRecord(pid=proc.pid, status=code, exited_at=time.time_ns())
        self._write_exit(proc, record)
        proc.reaped = True
        proc.exit = record
        proc.status = STOPPED
        proc.io.process_exited()
        self._loop.create_task(self._finish_exit(proc), name=f"exit {proc.name}")

    def _write_exit(self, proc: Process, record: ExitRecord, attempt: int = 1) -> None:
        """Write the exit file; should that fail even with its space reserved (EIO, a
        state dir replaced meanwhile), the status stays in memory, is reported as usual,
        and the write is retried until it succeeds or the process is deleted."""
        if self.deleted or (proc.exec_id is not None and self.execs.get(proc.exec_id) is not proc):
            return
        try:
            write_exit_file(self._exit_dir(), proc.name, record)
            if attempt > 1:
                log(f"exit file of {proc.name} written at attempt {attempt}")
        except OSError as exc:
            if attempt == 1:
                log(f"could not write exit file for {proc.name}: {exc}; retrying")
            self._loop.call_later(EXIT_FILE_RETRY, self._write_exit, proc, record, attempt + 1)

    async def _finish_exit(self, proc: Process) -> None:
        assert proc.exit is not None
        try:
            if proc.started and not proc.start_done.done():
                await proc.start_done  # the start event goes first
            try:
                await self._loop.timeout(proc.io.drained(), IO_DRAIN_TIMEOUT)
            except TimeoutError:
                log(f"output of {proc.name} not drained after {IO_DRAIN_TIMEOUT}s; closing it")
            proc.io.close()
            if proc.exec_id is None:
                if self._oom is not None:
                    self._check_oom()
                    self._oom_close()
                await self._execs_published()
        except Exception as exc:  # whatever went wrong, the exit is still reported
            log(f"finishing the exit of {proc.name}: {exc!r}")
        finally:
            if proc.exec_id is None:
                self._publish(
                    status.TASK_EXIT,
                    pid=proc.pid,
                    exit_status=proc.exit.status,
                    exited_at=proc.exit.exited_at,
                )
            else:
                self._publish(
                    status.EXEC_EXIT,
                    exec_id=proc.exec_id,
                    pid=proc.pid,
                    exit_status=proc.exit.status,
                    exited_at=proc.exit.exited_at,
                )
            proc.exited.set_result(proc.exit)

    async def _execs_published(self) -> None:
        """Until every started exec's exit is published (not merely reaped: an exec reaped
        with the init still drains its output), so that the init's exit, after which
        clients delete the task, comes last, as containerd's shim orders them; bounded:
        an exec outside the container's pid namespace may live on."""
        deadline = time.monotonic() + EXEC_WAIT_TIMEOUT + IO_DRAIN_TIMEOUT
        for other in list(self.execs.values()):
            if not other.started or other.exited.done():
                continue
            try:
                await self._loop.timeout(other.exited, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return

    def _check_oom(self) -> None:
        if self._oom is not None and self._oom.consume():
            self._publish(status.TASK_OOM)

    def _oom_close(self) -> None:
        if self._oom is not None:
            if self._oom.fd >= 0:
                self._loop.forget_fd(self._oom.fd)
            self._oom.close()
            self._oom = None

    async def exec(self, params: dict[str, Any]) -> dict[str, Any]:
        exec_id = validate(params.get("exec_id"), "exec id")
        init = self._require_init()
        if exec_id in self.execs:
            raise AlreadyExists(f"exec {exec_id} already exists in task {self.config.id}")
        if init.status not in (RUNNING, CREATED):  # a created task takes execs, as runc does
            raise FailedPrecondition(f"cannot exec in a {init.status} task")
        spec = params.get("spec")
        if not isinstance(spec, dict):
            raise InvalidArgument("exec spec must be an OCI process (a map)")
        args = spec.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise InvalidArgument("exec spec args must be a non-empty list of strings")
        if len(json.dumps(spec)) > MAX_SPEC_BYTES:
            raise InvalidArgument("exec spec is too large")
        io_config = IOConfig.from_params(params)
        spec = dict(spec)
        spec["terminal"] = io_config.terminal
        width, height = params.get("width"), params.get("height")
        if io_config.terminal and isinstance(width, int) and isinstance(height, int):
            spec["consoleSize"] = {"width": width, "height": height}
        reserve_exit_file(self._exit_dir(), f"exec-{exec_id}")  # as for init: see create()
        io = self._process_io(io_config, f"exec-{exec_id}.", hold_stdin=False)
        try:
            await self._logger_ready(io)
        except BaseException:
            io.close()
            remove_exit_file(self._exit_dir(), f"exec-{exec_id}")
            raise
        proc = Process(exec_id, io)
        proc.spec = spec
        self.execs[exec_id] = proc
        self._publish(status.EXEC_ADDED, exec_id=exec_id)
        return {}

    async def kill(self, signo: int, all_processes: bool, exec_id: str | None) -> None:
        if not 0 < signo < signal.NSIG:
            raise InvalidArgument(f"invalid signal {signo}")
        proc = self.process(exec_id)
        if proc.reaped or proc.pid == 0:
            raise NotFound(f"process {exec_id or self.config.id} already finished")
        if exec_id is None:
            await self.runtime.kill(self.config.id, signo, all_processes)
        else:
            try:
                os.kill(proc.pid, signo)
            except ProcessLookupError:
                raise NotFound(f"process {exec_id} already finished") from None

    async def delete(self, exec_id: str | None, force: bool) -> dict[str, Any]:
        proc = self.process(exec_id)
        if exec_id is not None:
            if proc.started and not proc.reaped:
                raise FailedPrecondition(f"exec {exec_id} is still running")
            if proc.started and not proc.exited.done():
                await proc.exited
            del self.execs[exec_id]
            proc.io.close()
            await proc.io.logger_stopped()
            remove_exit_file(self._exit_dir(), proc.name)
            return _exit_result(proc)
        if self.deleted:
            raise NotFound(f"task {self.config.id} not found")
        # A task never started that this delete kills answers no exit of its own, as
        # containerd 1.6's shim answers it: status 0, Go's zero time (its init never ran).
        never_ran = not proc.reaped and not proc.started
        if not proc.reaped:
            if not force and proc.started:
                raise FailedPrecondition(f"task {self.config.id} is {proc.status}; kill it first")
            try:
                await self.runtime.kill(self.config.id, signal.SIGKILL, True)
            except RuntimeCommandError as exc:
                log(f"kill before delete: {exc}")
            try:
                await self._loop.timeout(proc.exited, 10.0)
            except TimeoutError:
                raise FailedPrecondition(
                    f"task {self.config.id} did not exit after SIGKILL"
                ) from None
        elif not proc.exited.done():
            await proc.exited
        try:
            await self.runtime.delete(self.config.id, force=True)
        except RuntimeCommandError as exc:
            # Already gone from the runtime (e.g. deleted by hand): nothing left to do.
            log(f"runtime delete: {exc}")
        for other in list(self.execs.values()):
            other.io.close()
        proc.io.close()
        for other in [proc, *self.execs.values()]:  # containerd: up to 12 s for a logger
            await other.io.logger_stopped()
        self.execs.clear()
        self._oom_close()
        self._unmount_rootfs()
        # The marker first, durably: a daemon that recovers from here on must know the task
        # was deleted, not that it lost its exit status.
        mark_deleted(self.config.bundle)
        remove_exit_file(self._exit_dir(), proc.name)
        self.deleted = True
        result = _exit_result(proc)
        if never_ran:
            result.update(exit_status=0, exited_at=0)
        self._publish(status.TASK_DELETE, **result)
        return result

    async def wait(self, exec_id: str | None) -> dict[str, Any]:
        proc = self.process(exec_id)
        record = await proc.exited
        return {"pid": record.pid, "exit_status": record.status, "exited_at": record.exited_at}

    async def pause(self) -> None:
        init = self._require_init()
        if init.status != RUNNING:
            raise FailedPrecondition(f"cannot pause a {init.status} task")
        await self.runtime.pause(self.config.id)
        if not init.reaped:
            init.status = PAUSED
        self._publish(status.TASK_PAUSED)

    async def resume(self) -> None:
        init = self._require_init()
        if init.status != PAUSED:
            raise FailedPrecondition(f"cannot resume a {init.status} task")
        await self.runtime.resume(self.config.id)
        if not init.reaped:
            init.status = RUNNING
        self._publish(status.TASK_RESUMED)

    async def update(self, resources: dict[str, Any]) -> None:
        init = self._require_init()
        if init.reaped:
            raise FailedPrecondition("cannot update a stopped task")
        if len(json.dumps(resources)) > MAX_SPEC_BYTES:
            raise InvalidArgument("resources document is too large")
        path = self._path("update-resources.json")
        with open(path, "w") as f:
            json.dump(resources, f)
        try:
            await self.runtime.update(self.config.id, path)
        finally:
            os.unlink(path)

    async def pids(self) -> tuple[list[int], dict[str, int]]:
        """The container's processes (the runtime's `ps`), and the pid of each exec still
        running among them."""
        init = self._require_init()
        if init.reaped:
            return [], {}
        pids = await self.runtime.ps(self.config.id)
        listed = set(pids)
        execs = {
            exec_id: p.pid
            for exec_id, p in self.execs.items()
            if p.pid and not p.reaped and p.pid in listed
        }
        return pids, execs

    def stats(self) -> dict[str, Any]:
        init = self._require_init()
        if init.reaped:
            raise FailedPrecondition("task has exited: no statistics")
        record = cgroups.stats(init.pid)
        self._check_oom()
        record["io"] = {
            "init": init.io.stats(),
            **{f"exec-{k}": p.io.stats() for k, p in self.execs.items()},
        }
        return record

    def resize_pty(self, exec_id: str | None, width: int, height: int) -> None:
        proc = self.process(exec_id)
        if proc.io.console is None:
            return  # nothing to resize: a no-op, as containerd's runc shim answers
        if proc.reaped:
            raise FailedPrecondition("cannot resize a stopped process")
        resize(proc.io.console, width, height)

    def close_io(self, exec_id: str | None) -> None:
        self.process(exec_id).io.close_stdin()

    def state(self, exec_id: str | None) -> dict[str, Any]:
        return self.process(exec_id).describe(self.config)

    def list_processes(self) -> list[dict[str, Any]]:
        """Every process of the task; none once it has been deleted."""
        if self.deleted:
            return []
        procs = ([self.init] if self.init else []) + list(self.execs.values())
        return [p.describe(self.config) for p in procs]

    def kill_loggers(self) -> None:
        """The shim goes away: no logging binary outlives it, not even a failed create's."""
        for logger in list(self._loggers):
            logger.kill()

    def has_live_processes(self) -> bool:
        procs = ([self.init] if self.init else []) + list(self.execs.values())
        return any(p.pid and not p.reaped for p in procs)


def _read_pid(path: str) -> int:
    """The pid the runtime wrote (it writes the file 0644: made private here, like every
    file in a bundle)."""
    try:
        with open(path) as f:
            os.fchmod(f.fileno(), 0o600)
            text = f.read(64).strip()
    except FileNotFoundError:
        raise FailedPrecondition("the runtime did not write its pid file") from None
    if not text.isdigit() or int(text) <= 1:
        raise FailedPrecondition(f"the runtime wrote an invalid pid {text!r}")
    return int(text)


def _exit_result(proc: Process) -> dict[str, Any]:
    return {
        "pid": proc.pid,
        "exit_status": proc.exit.status if proc.exit else 0,
        "exited_at": proc.exit.exited_at if proc.exit else 0,
        "exec_id": proc.exec_id or "",
    }
