"""Drive an OCI runtime binary (runc, crun, or any CLI-compatible one).

Every invocation is a child of the shim, spawned and waited for through the one Reaper, so
it never races the reaping of the container's own processes. Output that berth needs
(`state`, `ps`) is captured in a memfd rather than a pipe: no read loop, no deadlock on a
full pipe, and the bytes are there once the process has exited.

Errors: runc and crun write JSON log lines to `--log`; for `create` and `exec` their stderr
*is* the container's stderr, so the log file is where the reason for a failure is found.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from berth.shim.loop import Loop
from berth.shim.reaper import Reaper, log_debug
from berth.shim.wire.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    runtime_failure_message,
)

MAX_CAPTURE = 16 * 1024 * 1024


class RuntimeCommandError(FailedPrecondition):
    """The runtime ran and failed. `message` carries the runtime's own words."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Which runtime a container uses. The same binary with a different `root` is a
    different runtime instance: state in one root is invisible from another."""

    binary: str = "runc"
    root: str = ""
    args: tuple[str, ...] = ()
    systemd_cgroup: bool = False

    @classmethod
    def from_params(cls, params: dict[str, object]) -> RuntimeConfig:
        binary = params.get("binary", "runc")
        root = params.get("root", "")
        args = params.get("args", ())
        if not isinstance(binary, str) or not binary or "\0" in binary:
            raise InvalidArgument("runtime binary must be a non-empty string")
        if not isinstance(root, str) or (root and not os.path.isabs(root)):
            raise InvalidArgument("runtime root must be an absolute path")
        if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
            raise InvalidArgument("runtime args must be a list of strings")
        return cls(
            binary=binary,
            root=root,
            args=tuple(args),
            systemd_cgroup=bool(params.get("systemd_cgroup", False)),
        )

    def to_params(self) -> dict[str, object]:
        return {
            "binary": self.binary,
            "root": self.root,
            "args": list(self.args),
            "systemd_cgroup": self.systemd_cgroup,
        }


@dataclass(slots=True)
class Stdio:
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


@dataclass(slots=True)
class RuntimeResult:
    stdout: bytes = b""
    stderr: bytes = b""
    extra: dict[str, object] = field(default_factory=dict)


def runtime_argv(config: RuntimeConfig, log_path: str, *command: str) -> list[str]:
    """The command line of one runtime call, for the shim and for berthd alike (berthd
    kills and deletes a container whose shim died): global options, then the command."""
    argv = [config.binary]
    if config.root:
        argv += ["--root", config.root]
    argv += ["--log", log_path, "--log-format", "json"]
    if config.systemd_cgroup:
        argv.append("--systemd-cgroup")
    return argv + list(config.args) + list(command)


class Runtime:
    """Builds argv for one runtime and runs it through the reaper."""

    def __init__(self, loop: Loop, reaper: Reaper, config: RuntimeConfig, log_path: str):
        self._loop = loop
        self._reaper = reaper
        self.config = config
        self.log_path = log_path

    def argv(self, *command: str) -> list[str]:
        return runtime_argv(self.config, self.log_path, *command)

    async def run(self, *command: str, stdio: Stdio | None = None) -> RuntimeResult:
        """Run one runtime command to completion; raise RuntimeCommandError on failure."""
        stdio = stdio or Stdio()
        out = err = -1
        try:
            if stdio.stdout is None:
                out = os.memfd_create("runtime-stdout", os.MFD_CLOEXEC)
            if stdio.stderr is None:
                err = os.memfd_create("runtime-stderr", os.MFD_CLOEXEC)
            log_offset = _size(self.log_path)
            argv = self.argv(*command)
            try:
                _, exited = self._reaper.spawn(
                    argv,
                    stdin=stdio.stdin,
                    stdout=stdio.stdout if stdio.stdout is not None else out,
                    stderr=stdio.stderr if stdio.stderr is not None else err,
                )
            except FileNotFoundError:
                raise NotFound(f"OCI runtime binary {self.config.binary!r} not found") from None
            except PermissionError:
                raise FailedPrecondition(
                    f"OCI runtime binary {self.config.binary!r} is not executable"
                ) from None
            started = time.perf_counter()
            code = await exited
            log_debug(f"{command[0]} took {(time.perf_counter() - started) * 1e3:.1f} ms")
            result = RuntimeResult(
                stdout=_read_memfd(out) if out >= 0 else b"",
                stderr=_read_memfd(err) if err >= 0 else b"",
            )
            if code != 0:
                reason = (
                    last_error(self.log_path, log_offset)
                    or result.stderr.decode(errors="replace").strip()
                )
                raise RuntimeCommandError(
                    runtime_failure_message(
                        os.path.basename(self.config.binary),
                        command[0],
                        code,
                        reason or "no message",
                    )
                )
            return result
        finally:
            for fd in (out, err):
                if fd >= 0:
                    os.close(fd)

    # -- the OCI runtime commands berth uses

    async def create(
        self,
        container_id: str,
        bundle: str,
        pid_file: str,
        stdio: Stdio,
        console_socket: str | None = None,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, container_id, stdio=stdio)

    async def start(self, container_id: str) -> None:
        await self.run("start", container_id)

    async def kill(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        args = ["kill"]
        if all_processes:
            args.append("--all")
        await self.run(*args, container_id, str(signal))

    async def delete(self, container_id: str, force: bool = False) -> None:
        await self.run("delete", *(["--force"] if force else []), container_id)

    async def state(self, container_id: str) -> dict[str, object]:
        result = await self.run("state", container_id)
        doc = _json(result.stdout, "state")
        if not isinstance(doc, dict):
            raise RuntimeCommandError("runtime state did not print a JSON object")
        return doc

    async def exec(
        self,
        container_id: str,
        process_file: str,
        pid_file: str,
        stdio: Stdio,
        console_socket: str | None = None,
    ) -> None:
        args = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run(*args, container_id, stdio=stdio)

    async def pause(self, container_id: str) -> None:
        await self.run("pause", container_id)

    async def resume(self, container_id: str) -> None:
        await self.run("resume", container_id)

    async def update(self, container_id: str, resources_file: str) -> None:
        await self.run("update", "--resources", resources_file, container_id)

    async def ps(self, container_id: str) -> list[int]:
        result = await self.run("ps", "--format", "json", container_id)
        pids = _json(result.stdout, "ps")
        if not isinstance(pids, list) or not all(isinstance(p, int) for p in pids):
            raise RuntimeCommandError("runtime ps did not print a JSON list of pids")
        return pids


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _read_memfd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, min(size, MAX_CAPTURE), 0)


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data or b"null")
    except ValueError:
        raise RuntimeCommandError(f"runtime {what} printed invalid JSON") from None


def last_error(log_path: str, offset: int) -> str:
    """The last error-level message the runtime logged since `offset`."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            data = f.read(MAX_CAPTURE)
    except OSError:
        return ""
    message = ""
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            text = line.decode(errors="replace").strip()
            if text:
                message = text
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message
