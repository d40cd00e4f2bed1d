"""Security properties that are checked, not assumed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.support.helpers import Daemon


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def test_no_abstract_socket_anywhere(daemon: Daemon) -> None:
    """CVE-2020-15257: an abstract socket is reachable from any process in the host network
    namespace. berthd, its zygote and every shim use path-based sockets only."""
    daemon.cli("run", "--busybox", "-d", "s1", "sleep", "300", check=True)
    daemon.cli("run", "--busybox", "-d", "-t", "s2", "sleep", "300", check=True)
    pids = [daemon.pid, *daemon.shim_pids().values(), *daemon.descendants()]
    ours: set[str] = set()
    for pid in pids:
        try:
            ours |= _socket_inodes(pid)
        except OSError:
            continue
    assert ours
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] in ours and len(fields) > 7:
            assert not fields[7].startswith("@"), line
    for shim_socket in Path(daemon.state, "s").iterdir():
        assert stat.S_IMODE(shim_socket.stat().st_mode) == 0o600
    daemon.cli("tasks", "rm", "-f", "s1", "s2", check=True)


AUDIT = """#!/bin/sh
# Record the flags of every descriptor this runtime invocation inherited, then become the
# real runtime (exec keeps exactly the ones without close-on-exec). The listing is made by
# a child (grep), so the shell itself holds nothing extra when it is read.
grep -H '^flags' /proc/$$/fdinfo/* > "{dir}/fds.$$"
echo "ARGS $*" >> "{dir}/fds.$$"
exec runc "$@"
"""


def test_the_runtime_and_the_container_get_only_their_stdio(tmp_path: Path) -> None:
    """CVE-2024-21626 class: no descriptor of berth's leaks into runc (and so into runc
    init, where a leaked directory fd becomes a way out of the container)."""
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    wrapper = tmp_path / "audited-runc"
    wrapper.write_text(AUDIT.format(dir=audit_dir))
    wrapper.chmod(0o755)
    d = Daemon(extra_config=f'[runtimes.audited]\nbinary = "{wrapper}"\n')
    try:
        d.cli("run", "--busybox", "-d", "--runtime", "audited", "a1", "sleep", "300", check=True)
        d.cli(
            "run", "--busybox", "-d", "-t", "--runtime", "audited", "a2", "sleep", "300", check=True
        )
        r = d.cli("tasks", "exec", "--exec-id", "e", "a1", "sh", "-c", "ls /proc/self/fd")
        assert r.stdout.split() == [b"0", b"1", b"2", b"3"]  # 3: ls's own directory fd
        init = d.call("tasks.get", {"container_id": "a1"})["pid"]
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{init}/fd")) == [0, 1, 2]
        records = list(audit_dir.iterdir())
        assert len(records) >= 5  # create, start, create, start, exec
        for record in records:
            lines = record.read_text().splitlines()
            inherited = []
            for line in lines[:-1]:  # /proc/PID/fdinfo/N:flags:<tab>0100002
                path, _, flags = line.partition(":flags:")
                if int(flags.strip(), 8) & 0o2000000:  # O_CLOEXEC: gone at exec
                    continue
                inherited.append(int(path.rsplit("/", 1)[1]))
            assert sorted(inherited) == [0, 1, 2], (lines[-1], lines)
        d.cli("tasks", "rm", "-f", "a1", "a2", check=True)
    finally:
        d.cleanup()


def test_a_working_directory_through_a_leaked_fd_fails(daemon: Daemon) -> None:
    r = daemon.cli("run", "--busybox", "--rm", "--cwd", "/proc/self/fd/7", "leak", "ls", "..")
    assert r.returncode != 0
    assert b"bin" not in r.stdout  # it never listed a host directory
