"""Bad input gets a clear typed error, changes nothing, and the daemon stays up."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import msgpack
import pytest

from berth.shim.wire.client import Client
from berth.shim.wire.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from berth.shim.wire.protocol import HEADER, Connection, Hello, Role
from berth.shim.wire.unixsock import connect_unix
from tests.support.helpers import BERTH, Daemon


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _greeted() -> tuple[Connection, bytes]:
    conn = Connection(Role.CLIENT)
    return conn, conn.send(Hello())


def _recv_error(sock: socket.socket) -> list[object]:
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        assert chunk, "daemon closed the connection instead of answering"
        header += chunk
    (length,) = HEADER.unpack(header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return msgpack.unpackb(body)  # type: ignore[no-any-return]


def _still_up(daemon: Daemon) -> None:
    assert daemon.call("version")["protocol"] == 1


def test_malformed_and_oversize_frames(daemon: Daemon) -> None:
    sock = connect_unix(daemon.address, timeout=5.0)
    _, hello = _greeted()
    sock.sendall(hello)
    assert _recv_error(sock)[0] == 1  # WELCOME
    # Not msgpack, then a frame claiming 3 GiB, then a valid request on the same connection.
    sock.sendall(HEADER.pack(4) + b"\xc1\xc1\xc1\xc1")
    assert _recv_error(sock)[:3] == [4, None, "invalid_argument"]
    sock.sendall(HEADER.pack(3 << 30) + b"x" * 1000)
    reply = _recv_error(sock)
    assert reply[:3] == [4, None, "invalid_argument"] and "exceeds" in str(reply[3])
    sock.close()
    _still_up(daemon)
    # Garbage before any handshake: refused, connection closed, daemon unaffected.
    sock = connect_unix(daemon.address, timeout=5.0)
    sock.sendall(_frame(["not", "hello"]))
    assert _recv_error(sock)[0] == 4
    assert sock.recv(100) == b""
    sock.close()
    _still_up(daemon)


def test_request_level_errors_are_typed(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(Unimplemented):
            c.call("no.such.method")
        with pytest.raises(InvalidArgument):
            c.call("containers.create", {"id": "../x", "spec": {"process": {}}})
        with pytest.raises(InvalidArgument):
            c.call("containers.create", {"id": "ok", "spec": "not a spec"})
        # an unknown runtime is recorded, as containerd records it; the task's create says no
        c.call("containers.create", {"id": "rt", "spec": {"process": {}}, "runtime": "nope"})
        with pytest.raises(InvalidArgument, match="unknown runtime 'nope'"):
            c.call("tasks.create", {"container_id": "rt"})
        c.call("containers.delete", {"id": "rt"})
        with pytest.raises(NotFound):
            c.call("tasks.create", {"container_id": "ghost"})
        with pytest.raises(InvalidArgument):
            c.call("tasks.get", {"container_id": "a/b"})
        with pytest.raises(InvalidArgument):
            c.call("tasks.kill", {"container_id": "x", "signal": "SIGNOPE"})
        with pytest.raises(InvalidArgument):
            c.call("events.subscribe", {"filters": ["topic~=|[|"]})
    with pytest.raises(InvalidArgument):
        Client(daemon.address, namespace="../etc").call("containers.list")
    assert daemon.call("containers.list")["containers"] == []
    _still_up(daemon)


def _spec(daemon: Daemon, root: str, args: list[str]) -> dict[str, object]:
    from berth.daemon.oci import default_spec

    return default_spec("x", daemon.namespace, args, root=root, readonly_root=True)


def test_missing_rootfs_and_missing_runtime_binary(daemon: Daemon) -> None:
    with daemon.client() as c:
        c.call(
            "containers.create",
            {"id": "no-root", "spec": _spec(daemon, "/nonexistent/rootfs", ["true"])},
        )
        with pytest.raises(InvalidArgument, match="rootfs"):
            c.call("tasks.create", {"container_id": "no-root"})
        c.call(
            "containers.create",
            {"id": "no-rt", "spec": _spec(daemon, "", ["true"]), "runtime": "missing"},
        )
        with pytest.raises(NotFound, match="runtime binary"):
            c.call("tasks.create", {"container_id": "no-rt"})
        assert c.call("tasks.list")["tasks"] == []
        c.call("containers.delete", {"id": "no-root"})
        c.call("containers.delete", {"id": "no-rt"})
    assert daemon.shim_pids() == {}
    _still_up(daemon)


def test_a_spec_the_runtime_rejects_leaves_nothing_behind(daemon: Daemon) -> None:
    spec = _spec(daemon, "", ["true"])
    spec["linux"]["namespaces"].append({"type": "no-such-namespace"})  # type: ignore[index]
    with daemon.client() as c:
        c.call("containers.create", {"id": "bad-spec", "spec": spec})
        with pytest.raises(FailedPrecondition, match="runc create failed"):
            c.call("tasks.create", {"container_id": "bad-spec"})
        with pytest.raises(NotFound):
            c.call("tasks.get", {"container_id": "bad-spec"})
        # The failed create may be retried once fixed.
        c.call("containers.delete", {"id": "bad-spec"})
        c.call("containers.create", {"id": "bad-spec", "spec": _spec(daemon, "", ["true"])})
        c.call("tasks.create", {"container_id": "bad-spec"})
        c.call("tasks.start", {"container_id": "bad-spec"})
        assert c.call("tasks.wait", {"container_id": "bad-spec"})["exit_status"] == 0
        c.call("tasks.delete", {"container_id": "bad-spec"})
    assert daemon.shim_pids() == {}
    assert not os.path.exists(os.path.join(daemon.state, "tasks", daemon.namespace, "bad-spec"))


def test_container_with_task_cannot_be_deleted(daemon: Daemon) -> None:
    daemon.cli("run", "--busybox", "-d", "busy", "sleep", "600", check=True)
    with pytest.raises(FailedPrecondition):
        daemon.call("containers.delete", {"id": "busy"})
    with pytest.raises(FailedPrecondition):
        daemon.call("tasks.delete", {"container_id": "busy"})  # still running
    daemon.cli("tasks", "rm", "-f", "busy", check=True)
    daemon.call("containers.delete", {"id": "busy"})


def test_socket_permissions_and_non_root_refusal(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.address).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(os.path.join(daemon.state, "s")).st_mode) == 0o700
    os.chmod(daemon.dir, 0o711)  # a temp dir is 0700: uid 65534 would not reach the socket
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_fd)
            os.setgid(0)  # the socket's group may connect; the uid check still refuses
            os.setuid(65534)
            try:
                Client(daemon.address).call("version")
                os.write(write_fd, b"served")
            except Exception as exc:
                os.write(write_fd, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    os.waitpid(child, 0)
    refusal = os.read(read_fd, 1000).decode()
    # told why, not cut off (a cut handshake is retried as a daemon going away)
    assert refusal.startswith("PermissionDenied") and "uid 65534 may not use berthd" in refusal
    os.close(read_fd)
    _still_up(daemon)


def test_cli_reports_a_missing_daemon_in_one_line(tmp_path: object) -> None:
    address = os.path.join(str(tmp_path), "nothing.sock")
    r = subprocess.run([BERTH, "--address", address, "tasks", "ls"], capture_output=True)
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot reach berthd" in lines[0] and "is berthd running" in lines[0]


def test_cli_errors_are_one_line(daemon: Daemon) -> None:
    r = daemon.cli("tasks", "kill", "ghost")
    assert (
        r.returncode == 1 and r.stderr.decode().strip() == "berth: not found: task ghost not found"
    )


def test_a_create_failing_after_the_runtime_created_leaves_no_container(tmp_path: object) -> None:
    # A runtime that creates the container and then reports a bogus pid: the shim must
    # remove the container it will never own (the runc state dir ends up empty).
    wrapper = os.path.join(str(tmp_path), "bad-runtime")
    with open(wrapper, "w") as f:
        f.write(
            "#!/bin/sh\n"
            'runc "$@"; rc=$?\n'
            'for a in "$@"; do [ "$prev" = --pid-file ] && echo junk > "$a"; prev=$a; done\n'
            "exit $rc\n"
        )
    os.chmod(wrapper, 0o755)
    d = Daemon(extra_config=f'[runtimes.bad]\nbinary = "{wrapper}"\n')
    try:
        spec = _spec(d, "", ["sleep", "300"])
        with d.client() as c:
            c.call("containers.create", {"id": "half", "spec": spec, "runtime": "bad"})
            with pytest.raises(FailedPrecondition, match="invalid pid"):
                c.call("tasks.create", {"container_id": "half"})
        root = os.path.join(d.state, "runtime", "bad", d.namespace)
        listed = subprocess.run(["runc", "--root", root, "list", "-q"], capture_output=True)
        assert listed.stdout.split() == []
        assert d.container_pids() == []
        assert d.shim_pids() == {}
    finally:
        d.cleanup()
