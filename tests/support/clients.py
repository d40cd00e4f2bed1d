"""The real clients of berth's containerd API, started by tests: Docker Engine (Debian's
dockerd 20.10 with its own CLI) and containerd's `ctr`.

Everything lives in the test's temp dir: dockerd's data root, exec root, pid file and API
socket; berth's namespace (dockerd's --containerd-namespace) and cgroups (its
--cgroup-parent, under /berth/<namespace>/ so tests/helpers.Daemon finds and removes every
container process and cgroup). dockerd runs under tests/support/reaper.py like berthd; teardown
removes every container, stops dockerd by pid, and unmounts what it mounted.

dockerd 20.10 writes two paths of its own outside any flag's reach: /etc/docker/key.json
(its trust key) and /run/docker/plugins (an empty directory). Neither is berth's or any
installation's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.helpers import (
    Daemon,
    Reaped,
    is_gone,
    kill,
    process_state,
    spawn_reaped,
    wait_until,
)

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's 20.10 CLI (a newer one may come first on PATH)
CTR = "/usr/bin/ctr"


def grpc_config(base_dir: str) -> str:
    return f'[grpc]\naddress = "{os.path.join(base_dir, "state", "containerd.sock")}"\n'


def grpc_daemon() -> Daemon:
    """A berthd that serves containerd's API (berth-grpc) beside its own."""
    import tempfile

    base = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
    daemon = Daemon(base_dir=base, extra_config=grpc_config(base))
    try:
        wait_grpc(daemon)
    except BaseException:
        daemon.cleanup()
        raise
    return daemon


def grpc_command(daemon: Daemon) -> list[str]:
    """A berth-grpc for this daemon, as its supervisor starts one: a new one replaces the
    one serving (a test that starts it stops it)."""
    return [
        sys.executable,
        "-m",
        "berth.daemon.grpc.main",
        "--address",
        grpc_address(daemon),
        "--berthd",
        daemon.address,
        "--state",
        daemon.state,
        "--ttrpc-address",
        grpc_address(daemon) + ".ttrpc",
    ]


def grpc_address(daemon: Daemon) -> str:
    return os.path.join(daemon.dir, "state", "containerd.sock")


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_grpc(daemon: Daemon, timeout: float = 30) -> None:
    """Until berth-grpc accepts connections (started by this berthd: its socket is new)."""
    wait_until(lambda: _answers(grpc_address(daemon)), timeout=timeout, what="berth-grpc to listen")


def _runs(pid: int, program: bytes) -> bool:
    try:
        return pid > 0 and program in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def recorded_frontend(daemon: Daemon) -> list[int]:
    """The berth-grpc the state dir records as serving (a test may have started it)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads(Path(daemon.state, "grpc.json").read_text())
        return [int(doc["pid"])]
    return []


def frontend_pids(daemon: Daemon) -> list[int]:
    """The berth-grpc processes of this daemon (children of its berthd)."""
    found = []
    for pid in daemon.descendants():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"berth.daemon.grpc.main" in cmdline:
                found.append(pid)
    return found


def run(argv: list[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )


class Ctr:
    """containerd's own CLI pointed at berth (-a), in the daemon's namespace."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.fifo_dir = os.path.join(daemon.dir, "ctr-fifo")
        os.makedirs(self.fifo_dir, exist_ok=True)

    def cgroup(self, container_id: str) -> str:
        return f"/berth/{self.daemon.namespace}/ctr-{container_id}"

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(
            [CTR, "-a", grpc_address(self.daemon), "-n", self.daemon.namespace, *args],
            timeout=timeout,
        )


@dataclasses.dataclass(frozen=True)
class DockerBackend:
    """The containerd a dockerd drives: its socket, dockerd's namespace on it, the dir
    dockerd's own dir goes in, the cgroup parent of its containers, and a command prefix
    (e.g. nsenter into that containerd's mount namespace)."""

    address: str
    namespace: str
    base_dir: str
    cgroup_parent: str
    prefix: tuple[str, ...] = ()


class Dockerd(Reaped):
    """dockerd 20.10 on berth's containerd socket, private to one test module."""

    what = "dockerd"

    def __init__(
        self,
        daemon: Daemon | None,
        *,
        swarm: bool = False,
        backend: DockerBackend | None = None,
    ) -> None:
        """`swarm`: without --live-restore (dockerd refuses it in swarm mode), and in a
        network namespace of its own (swarm makes bridges and an ingress network), so
        nothing of the host's network is touched and nothing outlives dockerd.
        `backend`: another containerd than berth's (`daemon` is then None)."""
        super().__init__()
        self.daemon = daemon
        self.swarm = swarm
        if backend is None:
            assert daemon is not None
            backend = DockerBackend(
                address=grpc_address(daemon),
                namespace=daemon.namespace,
                base_dir=daemon.dir,
                cgroup_parent=f"/berth/{daemon.namespace}/docker",
            )
        self.backend = backend
        self.dir = os.path.join(backend.base_dir, "docker")
        self.data_root = os.path.join(self.dir, "data")
        self.exec_root = os.path.join(self.dir, "exec")
        self.pidfile = os.path.join(self.dir, "dockerd.pid")
        self.host = os.path.join(self.dir, "docker.sock")
        os.makedirs(self.dir, exist_ok=True)
        self.start()

    @property
    def cgroup_parent(self) -> str:
        return self.backend.cgroup_parent

    def start(self) -> None:
        log_path = os.path.join(self.dir, f"dockerd-{len(self.logs)}.log")
        self.logs.append(log_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)  # a kill -9 leaves it behind
        command = [
            *self.backend.prefix,
            DOCKERD,
            "--containerd",
            self.backend.address,
            "--containerd-namespace",
            self.backend.namespace,
            "--containerd-plugins-namespace",
            self.backend.namespace + "-plugins",
            "--data-root",
            self.data_root,
            "--exec-root",
            self.exec_root,
            "--pidfile",
            self.pidfile,
            "-H",
            f"unix://{self.host}",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver",
            "overlay2",
            "--cgroup-parent",
            self.cgroup_parent,
        ]
        if not self.swarm:
            command.append("--live-restore")
        else:  # unshare execs sh, which execs dockerd: one pid throughout
            up_lo = 'ip link set lo up && exec "$0" "$@"'
            command = ["unshare", "--net", "--", "sh", "-c", up_lo, *command]
        reaper, pid = spawn_reaped(command, log_path)
        self.reapers.append(reaper)

        def ready() -> bool:
            if reaper.poll() is not None:
                raise AssertionError(f"dockerd exited: {self.log_text()}")
            argv = [DOCKER, "-H", f"unix://{self.host}", "version"]
            try:
                env = dict(os.environ, DOCKER_CONFIG=os.path.join(self.dir, "cli"))
                return run(argv, timeout=10, env=env).returncode == 0
            except subprocess.TimeoutExpired:  # restoring its containers, it may answer late
                return False

        self.remember(pid)
        wait_until(ready, timeout=60, interval=0.2, what="dockerd to answer")

    def docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return run(
                [DOCKER, "-H", f"unix://{self.host}", *args],
                timeout=timeout,
                env=dict(os.environ, DOCKER_CONFIG=os.path.join(self.dir, "cli")),
            )
        except subprocess.TimeoutExpired:
            self.dump_stacks()
            raise

    def dump_stacks(self) -> None:
        """A docker command hung: dockerd writes its goroutines to a file and
        the berth-grpc serving its tasks to its log (both on SIGUSR1), for the report."""
        # SIGUSR1 kills a process that does not handle it: only these two programs. A
        # berth-grpc handles it before it records itself as the one serving.
        frontends = recorded_frontend(self.daemon) if self.daemon is not None else []
        pids = {pid for pid in frontends if _runs(pid, b"berth.daemon.grpc.main")}
        if _runs(self.pid, DOCKERD.encode()):
            pids.add(self.pid)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(1.0)

    def ok(self, *args: str, timeout: float = 60) -> str:
        result = self.docker(*args, timeout=timeout)
        assert result.returncode == 0, (
            f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr}"
        )
        return result.stdout

    def cleanup(self) -> None:
        """Remove every container, stop dockerd (by pid), unmount what it mounted."""
        if process_state(self.pid) not in (None, "Z"):
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", timeout=20).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout=60)
            kill(self.pid, 15)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: is_gone(self.pid), timeout=20, what="dockerd to stop")
        self.kill_remaining()
        runtime_root = Path(self.exec_root, "runtime-runc", self.backend.namespace)
        if runtime_root.is_dir():
            for cid in runtime_root.iterdir():
                run(["runc", "--root", str(runtime_root), "delete", "--force", cid.name])
        unmount_below(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def unmount_below(directory: str) -> None:
    """Unmount everything mounted at or below `directory`, deepest first (dockerd
    bind-mounts its data root onto itself and leaves it at exit)."""
    prefix = os.path.realpath(directory)
    for _ in range(3):
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        below = [p for p in points if p == prefix or p.startswith(prefix + "/")]
        if not below:
            return
        for point in sorted(set(below), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        time.sleep(0.1)


def script_tty(command: str, rows: int = 30, cols: int = 100) -> list[str]:
    """argv that runs `command` on a fresh pty of a known size (util-linux `script`)."""
    return ["script", "-qec", f"stty rows {rows} cols {cols}; {command}", "/dev/null"]


@contextlib.contextmanager
def docker_engine(image: str, *, swarm: bool = False) -> Iterator[tuple[Daemon, Dockerd]]:
    """A berthd serving containerd's API, a dockerd on it (see Dockerd for `swarm`), and
    a busybox image loaded as `image`; everything stopped and removed after, by pid."""
    from berth.daemon.tasks.rootfs import build_busybox_rootfs
    from tests.support.images import build_docker_archive

    if not (os.path.exists(DOCKERD) and os.path.exists(DOCKER)):
        raise AssertionError("dockerd is not installed (scripts/setup installs docker.io)")
    daemon = grpc_daemon()
    dockerd = None
    work = tempfile.mkdtemp(prefix="bt-img-", dir="/tmp")
    try:
        dockerd = Dockerd(daemon, swarm=swarm)
        rootfs = build_busybox_rootfs(os.path.join(work, "rootfs"))
        archive = os.path.join(work, "busybox.tar")
        build_docker_archive(rootfs, archive, tag=image)
        dockerd.ok("load", "-i", archive)
        yield daemon, dockerd
    finally:
        if dockerd is not None:
            dockerd.cleanup()
        daemon.cleanup()
        shutil.rmtree(work, ignore_errors=True)
