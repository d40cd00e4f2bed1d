"""The shim's one reaper: every wait in the process goes through here.

A child subreaper inherits every orphan of its container, and runs the OCI runtime as its
own child too. If two parts of the process waited for children, one would steal the other's
statuses (subprocess maps the resulting ECHILD to returncode 0, silently). So nothing else
in the shim ever waits: processes are spawned here, and statuses are dispatched by pid.

SIGCHLDs coalesce (49 exits gave 9 signalfd records, measured), so a signalfd record only
means "some children changed state": loop waitpid(-1, WNOHANG) until nothing is left.

A child can exit before anyone asked for it (a container's init exits before the shim has
read runc's pid file; an exec'd process exits before `runc exec` returns). Such statuses
are kept in a bounded early-exit cache and handed out when the pid is claimed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from berth.native import SignalFD
from berth.shim.loop import Future, Loop, log

EARLY_EXIT_CAPACITY = 4096  # orphans reaped nobody asked for; oldest dropped first
EARLY_EXIT_HARD_CAPACITY = 65536  # ... except while a spawn is held (hold()), up to this
EXTRA_FD_BASE = 64  # where a spawn's extra fds are parked before they become 3, 4, ...


def exit_code(status: int) -> int:
    """A wait status as a shell/containerd exit code: 128+N for death by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255


class Reaper:
    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._sfd = SignalFD([signal.SIGCHLD])
        self._watchers: dict[int, Future[int]] = {}
        self._early: OrderedDict[int, tuple[int, float]] = OrderedDict()  # pid -> (code, when)
        self._holds: list[float] = []  # when each spawn whose pid is not watched yet began
        loop.add_reader(self._sfd.fileno(), self._on_signal)

    def close(self) -> None:
        self._loop.forget_fd(self._sfd.fileno())
        self._sfd.close()

    def _on_signal(self) -> None:
        while self._sfd.read():
            pass
        self.reap()

    def reap(self) -> None:
        """Collect every exited child and dispatch its status."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            code = exit_code(status)
            fut = self._watchers.pop(pid, None)
            if fut is not None:
                fut.set_result(code)
            else:
                self._remember(pid, code, time.monotonic())

    def _remember(self, pid: int, code: int, when: float) -> None:
        """Keep an exit nobody asked for yet, oldest dropped first past the capacity, but
        none since a held spawn began: a short exec exits before `runc exec` returns its
        pid, and a container that orphans thousands of children a second (in the host's
        pid namespace, they all come back to the shim) would push its exit out."""
        self._early[pid] = (code, when)
        while len(self._early) > EARLY_EXIT_CAPACITY:
            oldest = next(iter(self._early.values()))[1]
            if (
                self._holds
                and oldest >= min(self._holds)
                and len(self._early) <= EARLY_EXIT_HARD_CAPACITY
            ):
                return
            self._early.popitem(last=False)

    def hold(self, since: float) -> None:
        """A spawn began at `since` (monotonic): its exit is kept until release()."""
        self._holds.append(since)

    def release(self, since: float) -> None:
        with contextlib.suppress(ValueError):
            self._holds.remove(since)

    def watch(self, pid: int, not_before: float = 0.0) -> Future[int]:
        """A future for `pid`'s exit code, which may already be known.

        `not_before` (monotonic): when the process was asked into being. A cached exit from
        earlier belongs to an older process that had the same pid, and is discarded."""
        existing = self._watchers.get(pid)
        if existing is not None:
            return existing
        fut: Future[int] = Future()
        early = self._early.pop(pid, None)
        if early is not None and early[1] >= not_before:
            fut.set_result(early[0])
        else:
            self._watchers[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        self._watchers.pop(pid, None)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: dict[str, str] | None = None,
        extra_fds: Sequence[int] = (),
    ) -> tuple[int, Future[int]]:
        """posix_spawn `argv` with an empty signal mask, the given stdio, and `extra_fds`
        as its fds 3, 4, ...; return its pid and a future for its exit code. The watch is
        registered before the loop can run the reaper again, so the status cannot be
        missed."""
        actions = []
        for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
            if fd is not None:
                if fd == target:
                    raise ValueError("stdio fds must not already be 0/1/2")
                actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        # Moved out of the way first: a source numbered 3, 4, ... would be overwritten by an
        # earlier dup2 in the child (and dup2 onto itself would keep its close-on-exec).
        high: list[int] = []
        try:
            for fd in extra_fds:
                high.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, EXTRA_FD_BASE))
            for target, fd in enumerate(high, start=3):
                actions.append((os.POSIX_SPAWN_DUP2, fd, target))
            pid = _spawn(argv, env, actions)
        finally:
            for fd in high:
                os.close(fd)
        log_debug(f"spawned {pid}: {' '.join(argv[:6])}")
        return pid, self.watch(pid, time.monotonic())


_SIGDEF = (signal.SIGPIPE, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)
_found: dict[tuple[str, str], str] = {}  # (name, PATH) -> the file posix_spawnp would run


def _spawn(argv: Sequence[str], env: dict[str, str] | None, actions: list[Any]) -> int:
    """posix_spawnp, with a bare name (`runc`) looked up in PATH once per shim rather than
    at every spawn: posix_spawnp tries an execve in each PATH directory before the one
    that holds it (7 failed execs per runtime call on the test machines' PATH, ~0.05 ms
    each, 3 runtime calls per `run --rm`). A file that went away is looked up again."""
    environ = env if env is not None else dict(os.environ)
    name = argv[0]
    key = (name, environ.get("PATH", os.defpath))
    path = _found.get(key) if "/" not in name else name
    if path is None:
        path = shutil.which(name, path=key[1])
        if path is not None:
            _found[key] = path
    options: dict[str, Any] = {"file_actions": actions, "setsigmask": (), "setsigdef": _SIGDEF}
    if path is None or path == name:
        return os.posix_spawnp(name, list(argv), environ, **options)
    try:
        return os.posix_spawn(path, list(argv), environ, **options)
    except (FileNotFoundError, PermissionError):
        _found.pop(key, None)  # moved or replaced: as posix_spawnp finds it now
        return os.posix_spawnp(name, list(argv), environ, **options)


def log_debug(message: str) -> None:
    if os.environ.get("BERTH_SHIM_DEBUG"):
        log(message)
