"""Test helpers: a real berthd in a private temp dir, and cleanup of everything it made.

Every daemon lives entirely under its own temp dir (root, state, socket, runtime roots),
runs under tests/support/reaper.py (see there), uses its own berth namespace (so cgroup paths are
unique too), and on teardown every process it produced is stopped by pid: container
inits (identified by their cgroup path), shims (from their shim.json, checked against
their start time), the daemon and the reaper.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from berth.daemon.tasks.shims import shim_alive
from berth.shim.fs import remove_tree
from berth.shim.state import process_start_time
from berth.shim.wire.client import Client

HERE = Path(__file__).resolve().parent
REAPER = HERE / "reaper.py"
BIN = Path(sys.executable).parent
BERTHD = str(BIN / "berthd")
BERTH = str(BIN / "berth")


def shim_python() -> str:
    """The interpreter berthd runs shims on (the installation's record, BERTH_SHIM_PYTHON):
    standalone shims in the tests use the same one."""
    from berth.daemon.config import Config

    return Config().shim_python


def wait_until(
    predicate: Any, timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` (R, S, Z, ...), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


def is_gone(pid: int) -> bool:
    """Dead and reaped: no zombie left behind."""
    return process_state(pid) is None


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal one process. pid <= 0 would mean a process group or every process (kill(2)):
    refused, since pids here may come from state files a test corrupted on purpose."""
    if not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"refusing to signal pid {pid!r}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def hybrid_crun_fix_needed() -> bool:
    """Debian's crun 1.8.1 refuses a hybrid cgroup layout whose cgroup2 mount still holds a
    controller (here hugetlb). Binding hugetlb to a v1 hierarchy fixes it."""
    try:
        with open("/sys/fs/cgroup/unified/cgroup.controllers") as f:
            return bool(f.read().split())
    except OSError:
        return False


CRUN_WRAPPER = (
    "mkdir -p /sys/fs/cgroup/hugetlb && "
    "(mountpoint -q /sys/fs/cgroup/hugetlb || "
    'mount -t cgroup -o hugetlb hugetlb /sys/fs/cgroup/hugetlb) && exec "$@"'
)


def remove_namespace_cgroups(namespace: str) -> None:
    """runc removes a container's own cgroup, not the empty parents it created
    (berth/<namespace>): remove this test's, which are unique to it."""
    tmpfs = os.stat("/sys/fs/cgroup").st_dev
    for base in Path("/sys/fs/cgroup").glob(f"*/berth/{namespace}"):
        if os.stat(base).st_dev == tmpfs:
            # Not a cgroup at all: a runtime wrote "cgroup files" into a plain directory
            # of the /sys/fs/cgroup tmpfs (where a controller, here hugetlb, is not mounted).
            shutil.rmtree(base, ignore_errors=True)
            continue
        for sub in sorted(base.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()


def spawn_reaped(command: list[str], log_path: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start `command` under tests/support/reaper.py in a session of its own, output to
    `log_path`; returns the reaper and the command's pid."""
    with open(log_path, "wb") as log:
        reaper = subprocess.Popen(
            [sys.executable, str(REAPER), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def child() -> int | None:
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{reaper.pid}/task/{reaper.pid}/children").read_text().split()
            if children:
                return int(children[0])
        return None

    return reaper, wait_until(child, what=f"{command[0]} to start")


class Reaped:
    """A daemon a test runs (again and again) under tests/support/reaper.py: its pids and logs."""

    what = "daemon"

    def __init__(self) -> None:
        self.reapers: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []  # every pid of this daemon the test started
        self._start_times: dict[int, int | None] = {}
        self.logs: list[str] = []

    def remember(self, pid: int) -> None:
        """Record a started pid with its start time, so that it is never confused with a
        later process that reuses the number."""
        self.pids.append(pid)
        self._start_times[pid] = process_start_time(pid)

    def live_pids(self) -> list[int]:
        """The pids this test started that are still those processes and still running."""
        return [
            pid
            for pid in self.pids
            if process_state(pid) not in (None, "Z")
            and process_start_time(pid) == self._start_times.get(pid)
        ]

    @property
    def pid(self) -> int:
        return self.pids[-1]

    def kill9(self) -> None:
        kill(self.pid)
        wait_until(lambda: is_gone(self.pid), what=f"{self.what} to die")

    def kill_remaining(self) -> None:
        """SIGKILL whatever of this daemon still runs, then collect its reapers."""
        for pid in self.live_pids():
            kill(pid)
        self.wait_reapers()

    def wait_reapers(self) -> None:
        for reaper in self.reapers:
            try:
                reaper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                reaper.kill()
                reaper.wait()

    def log_text(self) -> str:
        out = []
        for path in self.logs:
            with contextlib.suppress(OSError):
                out.append(Path(path).read_text(errors="replace"))
        return "\n".join(out)


class Daemon(Reaped):
    """A berthd started by a test; see the module docstring."""

    what = "berthd"

    def __init__(
        self,
        *,
        private_mount_ns: bool = False,
        extra_config: str = "",
        base_dir: str | None = None,
        top_config: str = "",
        berthd: str = BERTHD,
    ) -> None:
        self.berthd = berthd  # another release's, in the compatibility tests
        # Short paths: UNIX socket names must fit in 107 bytes.
        self.dir = base_dir or tempfile.mkdtemp(prefix="bt-", dir="/tmp")
        self.root = os.path.join(self.dir, "root")
        self.state = os.path.join(self.dir, "state")
        self.address = os.path.join(self.state, "berthd.sock")
        self.namespace = "t" + uuid.uuid4().hex[:10]
        self.config_path = os.path.join(self.dir, "berthd.toml")
        self.private_mount_ns = private_mount_ns
        self.command_prefix: list[str] = []  # run berthd through this (one that execs it)
        with open(self.config_path, "w") as f:
            f.write(
                f'root = "{self.root}"\nstate = "{self.state}"\nlog_level = "debug"\n'
                + top_config  # top-level keys: before the first table
                + '[runtimes.runc]\nbinary = "runc"\n[runtimes.crun]\nbinary = "crun"\n'
                '[runtimes.missing]\nbinary = "/nonexistent/runtime"\n' + extra_config
            )
        super().__init__()
        self.start()

    # -- lifecycle

    def start(self) -> None:
        self.start_with()

    def start_with(self, *flags: str) -> None:
        """Start berthd with extra command-line flags."""
        log_path = os.path.join(self.dir, f"berthd-{len(self.logs)}.log")
        self.logs.append(log_path)
        command = [*self.command_prefix, self.berthd, "--config", self.config_path, *flags]
        if self.private_mount_ns:
            command = [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                CRUN_WRAPPER,
                "sh",
                *command,
            ]
        reaper, pid = spawn_reaped(command, log_path)
        self.reapers.append(reaper)

        def ready() -> bool:
            if reaper.poll() is not None:
                raise AssertionError(f"berthd exited: {self.log_text()}")
            try:
                with Client(self.address) as c:
                    c.call("version")
                return True
            except Exception:
                return False

        self.remember(pid)
        wait_until(ready, timeout=15, what="berthd to answer")

    def active_pid(self) -> int:
        """The pid of the berthd holding the state dir's lock (the active one)."""
        try:
            doc = json.loads(Path(self.state, "berthd.lock").read_text() or "{}")
            return int(doc.get("pid", 0))
        except (OSError, ValueError):
            return 0

    def take_over(self, *flags: str, wait: bool = True, berthd: str = BERTHD) -> int:
        """Start `berthd --takeover` (an upgrade in place; the tree's berthd unless told);
        with `wait`, until it is the active daemon and its predecessor has exited."""
        old = self.active_pid()
        log_path = os.path.join(self.dir, f"berthd-{len(self.logs)}.log")
        self.logs.append(log_path)
        reaper, pid = spawn_reaped(
            [berthd, "--config", self.config_path, "--takeover", *flags], log_path
        )
        self.reapers.append(reaper)
        self.remember(pid)
        self.berthd = berthd
        if wait:
            wait_until(
                lambda: is_gone(old) and self.active_pid() == pid and self._answers(),
                timeout=30,
                what=f"berthd {pid} to take over from {old} and serve",
            )
        return pid

    def _answers(self) -> bool:
        try:
            with Client(self.address, timeout=5) as c:
                c.call("version")
            return True
        except Exception:
            return False

    def adopt_active(self) -> int:
        """Remember the active daemon's pid (a standby that took over, say)."""
        pid = self.active_pid()
        if pid and pid not in self.pids:
            self.remember(pid)
        return pid

    def terminate(self) -> None:
        kill(self.pid, signal.SIGTERM)
        wait_until(lambda: is_gone(self.pid), what="berthd to stop")

    def restart(self) -> None:
        self.kill9()
        self.start()

    # -- clients

    def client(self, namespace: str | None = None) -> Client:
        return Client(self.address, namespace=namespace or self.namespace)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with self.client() as c:
            return c.call(method, params or {})

    def cli(
        self,
        *args: str,
        input: bytes | None = None,
        timeout: float = 60,
        check: bool = False,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        env = dict(
            os.environ, BERTH_ADDRESS=self.address, BERTH_NAMESPACE=namespace or self.namespace
        )
        return subprocess.run(
            [BERTH, *args],
            input=input if input is not None else b"",
            capture_output=True,
            env=env,
            timeout=timeout,
            check=check,
        )

    # -- what the daemon made

    def task_dirs(self) -> Iterator[Path]:
        tasks = Path(self.state, "tasks")
        if tasks.is_dir():
            for ns in tasks.iterdir():
                yield from (p for p in ns.iterdir() if p.is_dir())

    def shim_pids(self) -> dict[str, int]:
        """container id -> live shim pid, from shim.json (checked against start time)."""
        out = {}
        for bundle in self.task_dirs():
            with contextlib.suppress(OSError, ValueError, LookupError, TypeError):
                record = json.loads((bundle / "shim.json").read_text())  # may be corrupt
                pid, start = record["pid"], record["start_time"]
                if type(pid) is int and type(start) is int and shim_alive(pid, start):
                    out[bundle.name] = pid
        return out

    def container_pids(self) -> list[int]:
        """Live processes in any of this daemon's container cgroups."""
        tag = f"/berth/{self.namespace}/"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (
                    tag in Path(f"/proc/{entry}/cgroup").read_text()
                    and process_state(int(entry)) != "Z"
                ):
                    found.append(int(entry))
        return found

    def descendants(self) -> list[int]:
        """Every live process below this daemon's reapers (the shims end up there)."""
        found: list[int] = []
        stack = [r.pid for r in self.reapers if r.poll() is None]
        while stack:
            pid = stack.pop()
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    for child in (task / "children").read_text().split():
                        found.append(int(child))
                        stack.append(int(child))
        return found

    def cleanup(self) -> None:
        """Stop everything, by pid, and remove every trace. Every step runs even if an
        earlier one fails (a test may have corrupted the state on purpose); the first
        failure is raised at the end."""
        errors: list[Exception] = []
        for step in (
            self._kill_containers,
            self._kill_shims,
            self._kill_daemons,
            self._kill_descendants,
            self._delete_runtime_state,
            self.wait_reapers,
            lambda: remove_namespace_cgroups(self.namespace),
            self._unmount_leftovers,
        ):
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        try:  # a container may have left a tree of any depth
            if os.path.ismount(self.dir):  # a test's own tmpfs: the test unmounts it
                for name in os.listdir(self.dir):
                    remove_tree(os.path.join(self.dir, name))
            else:
                remove_tree(self.dir)
        except OSError as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def _unmount_leftovers(self) -> None:
        """Whatever is still mounted under this daemon's dir (a test that failed half-way,
        a daemon killed inside an import), deepest first, so nothing is deleted through a
        mount and nothing stays mounted."""
        prefix = self.dir.rstrip("/") + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)

    def _kill_containers(self) -> None:
        for pid in self.container_pids():
            kill(pid)

    def _kill_shims(self) -> None:
        for pid in self.shim_pids().values():
            kill(pid)

    def _kill_daemons(self) -> None:
        for pid in self.live_pids():
            kill(pid)

    def _kill_descendants(self) -> None:
        """Whatever the state files could not name, until a walk finds nobody: a warm
        standby takes over when its active daemon is killed here and starts a standby of
        its own, and a dying parent's children move to the reaper only as it exits (a
        walk that read the parent first and its children after finds neither)."""
        for _ in range(50):
            found = self.descendants()
            if not found:
                return
            for pid in found:
                kill(pid)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not all(is_gone(p) for p in found):
                time.sleep(0.01)
        raise AssertionError(f"{self.what}: processes left below the reapers: {found}")

    def _delete_runtime_state(self) -> None:
        runtime_dir = Path(self.state, "runtime")
        if runtime_dir.is_dir():
            for runtime in runtime_dir.iterdir():
                binary = {"runc": "runc", "crun": "crun"}.get(runtime.name)
                if binary is None:
                    continue
                for ns_root in runtime.iterdir():
                    for cid in ns_root.iterdir():
                        if cid.is_dir():
                            subprocess.run(
                                [binary, "--root", str(ns_root), "delete", "--force", cid.name],
                                capture_output=True,
                                timeout=30,
                            )


def stop_child(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """Stop a process this test started: SIGTERM, then SIGKILL after `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def container_log_lines(state: str, namespace: str, cid: str) -> list[str]:
    """A container's shim log, oldest rotated file first (stdout.log.N ... .1, stdout.log),
    split into lines (words, for the numbered-line writers of the tests)."""
    log_dir = Path(state, "tasks", namespace, cid, "log")

    def age(path: Path) -> int:
        suffix = path.name.rpartition(".")[2]
        return int(suffix) if suffix.isdigit() else 0

    files = sorted(log_dir.glob("stdout.log*"), key=age, reverse=True)
    return b"".join(p.read_bytes() for p in files).decode(errors="replace").split()


def handover_windows(log_texts: list[str]) -> list[tuple[float, float]]:
    """(began, ended) of each handover, wall clock, from berthd logs: from the old
    daemon's "handing over" (it stops accepting) to its "the successor serves"."""
    import datetime

    windows, began = [], None
    for text in log_texts:
        for line in text.splitlines():
            if "handing over to" in line or "the successor serves" in line:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if "handing over to" in line:
                    began = stamp
                elif began is not None:
                    windows.append((began, stamp))
                    began = None
    return windows


@contextlib.contextmanager
def daemon_on_tmpfs(size: str, **kw: Any) -> Iterator[Daemon]:
    """A daemon whose whole base dir (root, state, socket) is a tmpfs of `size`: a disk a
    test can fill (fill_disk); stopped, unmounted and removed afterwards."""
    small = tempfile.mkdtemp(prefix="bt-full-", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", small], check=True)
    d: Daemon | None = None
    try:
        d = Daemon(base_dir=small, **kw)
        yield d
    finally:
        if d is not None:
            d.cleanup()
        subprocess.run(["umount", "-l", small], check=False)
        os.rmdir(small)


def fill_disk(path: Path, byte: bytes = b"\0") -> None:
    """Write `path` until its file system is full (close() flushes what is buffered and
    fails too: inside the suppress)."""
    with contextlib.suppress(OSError), open(path, "wb") as f:
        while True:
            f.write(byte * (1 << 16))
