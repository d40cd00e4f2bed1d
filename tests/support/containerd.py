"""A private containerd 1.6 (Debian's package) for the differential tests: its own root,
state, socket and config in a temp dir, no CRI, no snapshotter but overlayfs and native, no
/opt plugin (it would create /opt/containerd); started under tests/support/reaper.py like
berthd and stopped by pid. Nothing under /var/lib/containerd or /run/containerd is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from tests.support.helpers import Reaped, is_gone, kill, spawn_reaped, wait_until

CONTAINERD = "/usr/bin/containerd"

# Plugins every private containerd runs without: it starts fast and touches nothing
# outside its own directories.
ALWAYS_OFF = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.restart",
)
# ... and, for the metadata services alone (namespaces, containers, leases, content,
# images, snapshots, introspection, version), without its task plugins.
TASK_PLUGINS = (
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
)
# With tasks, /run is a tmpfs of containerd's own mount namespace: its shims' sockets
# (/run/containerd/s/...) and runc's default root stay out of the host's /run.
PRIVATE_RUN = 'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$0" --config "$1"'


class Containerd(Reaped):
    """One containerd in a temp dir of its own; `cleanup()` stops it and removes it."""

    what = "containerd"

    def __init__(self, *, tasks: bool = False) -> None:
        """`tasks`: with containerd-shim-runc-v2 and runc, in a mount namespace of its own
        (PRIVATE_RUN)."""
        super().__init__()
        self.tasks = tasks
        # Short paths: UNIX socket names must fit in 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="bt-ctk-" if tasks else "bt-ctd-", dir="/tmp")
        self.root = os.path.join(self.dir, "root")
        self.state = os.path.join(self.dir, "state")
        self.address = os.path.join(self.dir, "containerd.sock")
        self.config_path = os.path.join(self.dir, "config.toml")
        off = ALWAYS_OFF if tasks else ALWAYS_OFF + TASK_PLUGINS
        disabled = ", ".join(f'"{p}"' for p in off)
        with open(self.config_path, "w") as f:
            f.write(
                "version = 2\n"
                f'root = "{self.root}"\nstate = "{self.state}"\n'
                f"disabled_plugins = [{disabled}]\n"
                f'[grpc]\n  address = "{self.address}"\n'
                f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
                '[debug]\n  level = "warn"\n'
            )
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise

    def start(self) -> None:
        log_path = os.path.join(self.dir, f"containerd-{len(self.logs)}.log")
        self.logs.append(log_path)
        command = [CONTAINERD, "--config", self.config_path]
        if self.tasks:
            private = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c"]
            command = [*private, PRIVATE_RUN, CONTAINERD, self.config_path]
        reaper, pid = spawn_reaped(command, log_path)
        self.reapers.append(reaper)
        self.remember(pid)

        def ready() -> bool:
            if reaper.poll() is not None:
                raise AssertionError(f"containerd exited: {self.log_text()}")
            return self._answers()

        wait_until(ready, timeout=30, what="containerd to answer")

    def _answers(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(1)
            s.connect(self.address)
        except OSError:
            return False
        finally:
            s.close()
        with grpc.insecure_channel(f"unix:{self.address}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=5)
                return True
            except grpc.FutureTimeoutError:
                return False

    def orphans(self) -> list[int]:
        """The shims and orphaned container processes under this containerd's reapers."""
        out = []
        for reaper in self.reapers:
            if reaper.poll() is not None:
                continue
            with contextlib.suppress(OSError, ValueError):
                path = Path(f"/proc/{reaper.pid}/task/{reaper.pid}/children")
                out += [int(p) for p in path.read_text().split() if int(p) not in self.pids]
        return out

    def cleanup(self) -> None:
        """Stop every shim and container process it left, by pid; then containerd (TERM,
        then KILL); unmount what it left, remove its dir."""
        with contextlib.suppress(AssertionError):
            for _ in range(5):
                pids = self.orphans()
                if not pids:
                    break
                for pid in pids:
                    kill(pid)
                wait_until(lambda ps=pids: all(is_gone(p) for p in ps), timeout=10, what="orphans")
        for pid in self.live_pids():
            kill(pid, 15)
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: all(is_gone(p) for p in self.live_pids()),
                timeout=10,
                what="containerd to stop",
            )
        self.kill_remaining()
        prefix = self.dir.rstrip("/") + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_containerd(*, tasks: bool = False) -> Iterator[Containerd]:
    """A private containerd (with its task plugins if `tasks`), stopped by pid and removed
    afterwards, even on failure."""
    daemon = Containerd(tasks=tasks)
    try:
        yield daemon
    finally:
        daemon.cleanup()
