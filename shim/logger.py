"""A logging binary for one process's output (`binary://` stdio, containerd's shim logging).

The protocol, as containerd's shims speak it and loggers such as nerdctl's expect it:
- the binary is the URI's path; the query becomes its arguments, `key value` for each key;
- its environment is CONTAINER_ID and CONTAINER_NAMESPACE, nothing else;
- the process's stdout arrives on fd 3, its stderr on fd 4 (with a terminal, whose one
  stream is stdout, fd 4 carries nothing and ends with the output, as containerd's does),
  and fd 5 is a pipe it closes (or writes to) once it is ready; the process is not started
  before that;
- at the end its input reaches EOF, and it is expected to exit by itself.

Unlike containerd's shim, which hands the logger's pipes to the container, the shim pumps
the output into them (as into a FIFO: a bounded buffer, and output dropped past it once
the logger stalls). A logger that dies or hangs therefore never blocks the container or
kills it with SIGPIPE, and the exit is published once the logger has read everything.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from berth.shim.loop import Future, Loop, TimerHandle, log
from berth.shim.pipes import make_pipe
from berth.shim.reaper import Reaper
from berth.shim.wire.errors import InvalidArgument

EOF_GRACE = 2.0  # seconds a logger whose input ended has to exit before SIGTERM
TERM_TIMEOUT = 10.0  # then seconds until SIGKILL (containerd: 12 s in all)


@dataclass(frozen=True, slots=True)
class LoggerCommand:
    """What a `binary://` URI asks for."""

    path: str
    args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [self.path, *self.args]


class Logger:
    """One running logging binary. The shim writes into `stdout_w` and `stderr_w`, which its
    sinks take over (`take_write_ends`), and holds the read ends until the logger exits, as
    it holds a FIFO open for reading: a logger that is slow or hung costs buffered, then
    dropped output; one that died, EPIPE on the shim's side (dropped, counted)."""

    def __init__(
        self,
        loop: Loop,
        reaper: Reaper,
        command: LoggerCommand,
        env: dict[str, str],
    ) -> None:
        self._loop = loop
        self.command = command
        self._fds: list[int] = []  # ours to close: read ends, write ends not yet taken
        self.ready: Future[None] = Future()
        self.exited: Future[None] = Future()
        self._stopping = False
        self._timer: TimerHandle | None = None
        self.exit_code: int | None = None
        self.pid = 0
        self._ready_r = -1
        self.stdout_r = self.stdout_w = self.stderr_r = self.stderr_w = -1
        try:
            # The shim's loop writes these: never blocking, whatever the logger does.
            self.stdout_r, self.stdout_w = self._own(*make_pipe(nonblocking_write=True))
            self.stderr_r, self.stderr_w = self._own(*make_pipe(nonblocking_write=True))
            self._ready_r, ready_w = self._own(*os.pipe2(os.O_CLOEXEC))
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                self.pid, exited = reaper.spawn(
                    command.argv(),
                    stdin=devnull,
                    stdout=devnull,
                    stderr=devnull,
                    env=env,
                    extra_fds=(self.stdout_r, self.stderr_r, ready_w),
                )
            except OSError as exc:
                raise InvalidArgument(
                    f"cannot start logging binary {command.path}: {exc.strerror or exc}"
                ) from None
            finally:
                os.close(devnull)
            self._close(ready_w)  # the logger holds the only write end now: EOF = ready
        except BaseException:
            self.kill()
            raise
        exited.add_done_callback(self._on_exit)
        loop.add_reader(self._ready_r, self._on_ready)

    def _own(self, *fds: int) -> tuple[int, ...]:
        self._fds.extend(fds)
        return fds

    def _close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            os.close(fd)

    def take_write_ends(self) -> tuple[int, int]:
        """stdout's and stderr's write ends, now the caller's to close. Closing both is
        the logger's EOF."""
        for fd in (self.stdout_w, self.stderr_w):
            if fd in self._fds:
                self._fds.remove(fd)
        return self.stdout_w, self.stderr_w

    def _on_ready(self) -> None:
        """fd 5 was closed (EOF) or written to: either way the logger is ready."""
        try:
            os.read(self._ready_r, 1)
        except BlockingIOError:
            return
        except OSError:
            pass
        self._set_ready()

    def _set_ready(self) -> None:
        if self._ready_r >= 0:
            self._loop.forget_fd(self._ready_r)
            self._close(self._ready_r)
            self._ready_r = -1
        if not self.ready.done():
            self.ready.set_result(None)

    def _on_exit(self, fut: Future[int]) -> None:
        self.exit_code = fut.result()
        if not self._stopping:
            log(
                f"logging binary {self.command.path} (pid {self.pid}) exited with "
                f"{self.exit_code} before its input ended; its output is dropped"
            )
        elif self.exit_code:
            log(f"logging binary {self.command.path} exited with {self.exit_code}")
        self._set_ready()  # died before it was ready: the start goes on, output is dropped
        self._release_read_ends()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.exited.set_result(None)

    def _release_read_ends(self) -> None:
        """Nobody reads any more: writes fail with EPIPE, and the sinks drop from there."""
        self._close(self.stdout_r)
        self._close(self.stderr_r)
        self.stdout_r = self.stderr_r = -1

    def stop(self) -> None:
        """Its input has ended (the write ends are closed): it should exit by itself; after
        EOF_GRACE it gets SIGTERM, TERM_TIMEOUT later SIGKILL. `exited` tells when."""
        if not self._stopping:
            self._stopping = True
            if self.exit_code is None:
                self._timer = self._loop.call_later(EOF_GRACE, self._signal, signal.SIGTERM)

    def _signal(self, signo: int) -> None:
        self._timer = None
        if self.exit_code is not None:
            return
        log(
            f"logging binary {self.command.path} (pid {self.pid}) did not exit: "
            f"{signal.Signals(signo).name}"
        )
        os.kill(self.pid, signo)  # not reaped yet (the reaper runs in this loop): still its pid
        if signo == signal.SIGTERM:
            self._timer = self._loop.call_later(TERM_TIMEOUT, self._signal, signal.SIGKILL)

    def kill(self) -> None:
        """Now (a failed start, the shim going away): no logger outlives its shim."""
        self._stopping = True
        if self.exit_code is None and self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._ready_r >= 0:
            self._loop.forget_fd(self._ready_r)
            self._ready_r = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
