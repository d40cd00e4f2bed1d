"""Read a container's cgroup statistics and watch for OOM kills, on cgroup v1 and v2.

Statistics come from the cgroup files of the container's init (found through
/proc/<pid>/cgroup), not from the runtime: `crun` has no `events --stats`, and reading a
few small files is cheaper than running a Go binary.

OOM: on v1 the kernel signals an eventfd registered through `cgroup.event_control`
against `memory.oom_control`; on v2 `memory.events` changes (its `oom_kill` count grows),
which the shim checks when the container exits and on each stats call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from berth.shim.wire.errors import FailedPrecondition, InvalidArgument

USER_HZ = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CgroupPaths:
    version: int
    memory: str | None
    cpu: str | None  # cpuacct on v1
    pids: str | None
    blkio: str | None


def _mounts() -> dict[str, str]:
    """controller (or 'unified') -> mount point, from /proc/self/mountinfo."""
    result: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _, options = right.split()[:3] if len(right.split()) >= 3 else ("", "", "")
            mount_point = fields[4]
            if fstype == "cgroup2":
                result.setdefault("unified", mount_point)
            elif fstype == "cgroup":
                for opt in options.split(","):
                    result.setdefault(opt, mount_point)
    return result


def join_cgroup(pid: int, path: str) -> None:
    """Move process `pid` into cgroup `path` (absolute within each hierarchy) of every
    mounted hierarchy, creating it where missing: containerd's `ShimCgroup` option."""
    if not os.path.isabs(path) or ".." in path.split("/"):
        raise InvalidArgument(f"cgroup path {path!r} must be absolute and plain")
    hierarchies = sorted(set(_mounts().values()))
    if not hierarchies:
        raise FailedPrecondition("no cgroup hierarchy is mounted")
    for mount_point in hierarchies:
        directory = mount_point
        try:
            for part in [p for p in path.split("/") if p]:
                parent, directory = directory, os.path.join(directory, part)
                if not os.path.isdir(directory):
                    os.mkdir(directory)
                    _inherit_cpuset(parent, directory)
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot move pid {pid} into cgroup {directory}: {exc}"
            ) from None


def _inherit_cpuset(parent: str, child: str) -> None:
    """cgroup v1 fact: a new cpuset cgroup starts with no cpus and no mems, and a process
    cannot join it (ENOSPC) until they are set; take the parent's."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine = os.path.join(child, name)
        if not os.path.exists(mine):
            continue
        with open(mine) as f:
            if f.read().strip():
                continue
        with open(os.path.join(parent, name)) as f:
            value = f.read().strip()
        with open(mine, "w") as f:
            f.write(value)


def mounts() -> dict[str, str]:
    """The cgroup hierarchies' mount points, to pass to paths_for for many pids at once."""
    return _mounts()


def paths_for(pid: int, mounted: dict[str, str] | None = None) -> CgroupPaths | None:
    """The cgroup directories of process `pid`, or None if it is gone. `mounted`: the
    result of mounts(), when the caller looks up many pids (berthd's metrics)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mounts = mounted if mounted is not None else _mounts()
    v1: dict[str, str] = {}
    unified: str | None = None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            unified = path
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path

    def v1_path(controller: str) -> str | None:
        if controller in v1 and controller in mounts:
            return mounts[controller] + v1[controller]
        return None

    if "memory" in v1 or "cpuacct" in v1:
        return CgroupPaths(
            version=1,
            memory=v1_path("memory"),
            cpu=v1_path("cpuacct"),
            pids=v1_path("pids"),
            blkio=v1_path("blkio"),
        )
    if unified is not None and "unified" in mounts:
        base = mounts["unified"] + unified
        return CgroupPaths(version=2, memory=base, cpu=base, pids=base, blkio=base)
    return None


def _read(path: str | None, name: str) -> str | None:
    if path is None:
        return None
    try:
        with open(os.path.join(path, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    if value == "max":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _kv(text: str | None) -> dict[str, int]:
    result: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            result[key] = int(value)
        except ValueError:
            continue
    return result


def stats(pid: int) -> dict[str, object]:
    """A runtime-neutral statistics record for the cgroup of `pid`."""
    paths = paths_for(pid)
    if paths is None:
        return {}
    if paths.version == 1:
        cpu_stat = _kv(_read(paths.cpu, "cpuacct.stat"))
        percpu = [int(x) for x in (_read(paths.cpu, "cpuacct.usage_percpu") or "").split()]
        throttling = _kv(
            _read(paths.cpu.replace("cpuacct", "cpu") if paths.cpu else None, "cpu.stat")
        )
        memory_stat = _kv(_read(paths.memory, "memory.stat"))
        return {
            "cgroup_version": 1,
            "cpu": {
                "usage_ns": _int(_read(paths.cpu, "cpuacct.usage")) or 0,
                "user_ns": cpu_stat.get("user", 0) * 1_000_000_000 // USER_HZ,
                "system_ns": cpu_stat.get("system", 0) * 1_000_000_000 // USER_HZ,
                "percpu_ns": percpu,
                "throttling": throttling,
            },
            "memory": {
                "usage": _int(_read(paths.memory, "memory.usage_in_bytes")) or 0,
                "max_usage": _int(_read(paths.memory, "memory.max_usage_in_bytes")) or 0,
                "limit": _int(_read(paths.memory, "memory.limit_in_bytes")) or 0,
                "failcnt": _int(_read(paths.memory, "memory.failcnt")) or 0,
                "stat": memory_stat,
            },
            "pids": {
                "current": _int(_read(paths.pids, "pids.current")) or 0,
                "limit": _int(_read(paths.pids, "pids.max")) or 0,
            },
        }
    cpu_stat = _kv(_read(paths.cpu, "cpu.stat"))
    return {
        "cgroup_version": 2,
        "cpu": {
            "usage_ns": cpu_stat.get("usage_usec", 0) * 1000,
            "user_ns": cpu_stat.get("user_usec", 0) * 1000,
            "system_ns": cpu_stat.get("system_usec", 0) * 1000,
            "percpu_ns": [],
            "throttling": {k: v for k, v in cpu_stat.items() if k.startswith(("nr_", "throttled"))},
        },
        "memory": {
            "usage": _int(_read(paths.memory, "memory.current")) or 0,
            "max_usage": _int(_read(paths.memory, "memory.peak")) or 0,
            "limit": _int(_read(paths.memory, "memory.max")) or 0,
            "failcnt": _kv(_read(paths.memory, "memory.events")).get("oom", 0),
            "stat": _kv(_read(paths.memory, "memory.stat")),
        },
        "pids": {
            "current": _int(_read(paths.pids, "pids.current")) or 0,
            "limit": _int(_read(paths.pids, "pids.max")) or 0,
        },
    }


class OOMWatch:
    """Notices OOM kills in a container's memory cgroup.

    v1: an eventfd the kernel signals on every OOM (registered via cgroup.event_control);
    `fd` is then readable. The kernel also signals it when the cgroup is removed, so the
    `oom_kill` counter in memory.oom_control decides. v2: no fd; `consume()` compares the
    `oom_kill` counter of memory.events."""

    def __init__(self, pid: int) -> None:
        self.fd = -1
        self._counter_file: str | None = None
        self._seen = 0
        paths = paths_for(pid)
        if paths is None or paths.memory is None:
            return
        if paths.version == 1:
            control = os.path.join(paths.memory, "memory.oom_control")
            event_control = os.path.join(paths.memory, "cgroup.event_control")
            try:
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                cfd = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    with open(event_control, "w") as f:
                        f.write(f"{efd} {cfd}")
                finally:
                    os.close(cfd)
                self.fd = efd
            except OSError:
                if self.fd < 0 and "efd" in locals():
                    os.close(efd)
            self._counter_file = control
        else:
            self._counter_file = os.path.join(paths.memory, "memory.events")
        self._seen = self._count()

    def _count(self) -> int:
        if self._counter_file is None:
            return 0
        try:
            with open(self._counter_file) as f:
                return _kv(f.read()).get("oom_kill", 0)
        except OSError:
            return 0

    def consume(self) -> bool:
        """True if an OOM kill happened since the last call."""
        if self.fd >= 0:
            try:
                os.eventfd_read(self.fd)
            except OSError:
                pass
        count = self._count()
        if count > self._seen:
            self._seen = count
            return True
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
