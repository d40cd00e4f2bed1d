"""Starting shims (through the zygote) and watching them from the daemon.

The zygote is started once, as a fresh interpreter that has imported only the shim (not
trio, not the daemon), and is asked to fork each shim. It is the daemon's child and dies
with it; the shims it forked are detached and do not.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys

import trio

from berth.daemon.rpc import RpcClient, guarded
from berth.shim.state import process_start_time
from berth.shim.task import ShimConfig
from berth.shim.wire.errors import BerthError, Unavailable

log = logging.getLogger("berthd.shims")


class Zygote:
    """Owns the zygote process and its control connection; restarts it if it dies."""

    def __init__(self, nursery: trio.Nursery, work_dir: str, python: str = sys.executable) -> None:
        self._nursery = nursery
        self._python = python  # the shims' interpreter: may differ from berthd's
        self._work_dir = work_dir  # the zygote's scratch space; cleared at every start
        self._client: RpcClient | None = None
        self._process: trio.Process | None = None
        self._lock = trio.Lock()

    async def _start(self) -> RpcClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            theirs.set_inheritable(True)
            self._process = await trio.lowlevel.open_process(
                [
                    self._python,
                    "-m",
                    "berth.shim.main",
                    "--zygote",
                    "--ctl-fd",
                    str(theirs.fileno()),
                    "--work-dir",
                    self._work_dir,
                ],
                pass_fds=(theirs.fileno(),),
                # NOTIFY_SOCKET is berthd's line to systemd, not the shims': a runtime that
                # sees it makes a container's start wait for the container to notify.
                env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
            )
        finally:
            theirs.close()
        self._nursery.start_soon(guarded, "zygote watch", self._watch, self._process)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        client = RpcClient(stream, label="zygote", max_frame_size=256 * 1024)
        try:
            await client.handshake()
        except BaseException:
            await client.aclose()
            raise
        self._nursery.start_soon(guarded, "zygote connection", client.run)
        log.debug("zygote started, pid %d (%s)", self._process.pid, self._python)
        return client

    async def _ensure(self) -> RpcClient:
        async with self._lock:
            if self._client is None or self._client.closed.is_set():
                if self._process is not None:
                    await self._reap()
                self._client = await self._start()
            return self._client

    async def warm(self) -> None:
        """Start the zygote ahead of the first container (its interpreter start-up is the
        one cold start berth pays)."""
        try:
            await self._ensure()
        except (OSError, BerthError) as exc:
            log.error("cannot start the zygote: %s", exc)

    async def spawn(self, config: ShimConfig, log_path: str) -> int:
        client = await self._ensure()
        pid = await client.call(
            "spawn", {"config": config.to_params(), "log_path": log_path}, timeout=30
        )
        return int(pid["pid"])

    async def _watch(self, process: trio.Process) -> None:
        """Reap the zygote when it dies (it is berthd's own child); the next spawn starts
        a new one."""
        code = await process.wait()
        if self._process is process:
            log.warning("the zygote (pid %d) exited with %s", process.pid, code)

    async def _reap(self) -> None:
        process = self._process
        self._process = None
        if process is not None:
            with trio.move_on_after(2):
                process.kill()
                await process.wait()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self._reap()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None


def shim_alive(pid: int, start_time: int) -> bool:
    """True if `pid` is the same process that recorded `start_time` (not a reused pid).
    Without a known start time the identity is unknown: False, so that a corrupt record can
    never make berthd signal an unrelated process (or init, or itself)."""
    if pid <= 1 or start_time <= 0 or pid == os.getpid():
        return False
    current = process_start_time(pid)
    if current is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    if state == b"Z":
        return False
    return current == start_time


# Errors that say berthd is short of something (descriptors, memory), not that a shim is.
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
SHORTAGE_RETRY = 1.0  # seconds between tries of what a shortage made fail


def is_shortage(exc: BaseException | None) -> bool:
    """Whether `exc`, or what caused it, is berthd running short of descriptors or
    memory: nothing to conclude about the shim from it."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in SHORTAGE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


async def wait_for_death(pid: int) -> None:
    """Return when process `pid` has died (a pidfd becomes readable on exit, also for a
    process that is not our child). Short of descriptors, it tries again every second
    rather than give up watching (a watch that ends is a task nobody supervises)."""
    warned = False
    while True:
        try:
            fd = os.pidfd_open(pid)
            break
        except ProcessLookupError:
            return
        except OSError as exc:
            if exc.errno not in SHORTAGE_ERRNOS:
                raise
            if not warned:
                log.error("cannot watch pid %d (%s); trying again every second", pid, exc)
                warned = True
            await trio.sleep(SHORTAGE_RETRY)
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def connect_shim(address: str, label: str) -> RpcClient:
    try:
        client = await RpcClient.connect(address, label=label, max_frame_size=1024 * 1024)
    except OSError as exc:
        raise Unavailable(f"cannot connect to shim {label}: {exc}") from exc
    return client
