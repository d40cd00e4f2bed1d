"""The shim on its own, without berthd: it is a usable component by itself."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.daemon.oci import default_spec
from berth.shim.wire.client import Client
from berth.shim.wire.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from tests.support.helpers import (
    REAPER,
    is_gone,
    kill,
    process_state,
    remove_namespace_cgroups,
    shim_python,
    wait_until,
)


class StandaloneShim:
    """A bundle plus a detached berth-shim serving it, under a test reaper."""

    def __init__(self, rootfs: str, args: list[str], container_id: str = "c1") -> None:
        if os.geteuid() != 0 or shutil.which("runc") is None:
            pytest.fail("needs root and runc")
        self.dir = tempfile.mkdtemp(prefix="bs-", dir="/tmp")
        self.bundle = os.path.join(self.dir, "bundle")
        os.makedirs(self.bundle)
        self.id = container_id
        self.namespace = "s" + os.path.basename(self.dir)[3:].replace("_", "")[:8]
        spec = default_spec(container_id, self.namespace, args, root=rootfs, readonly_root=True)
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        self.socket = os.path.join(self.dir, "s", "shim.sock")
        self.runtime_root = os.path.join(self.dir, "runc")
        self.reaper = subprocess.Popen(
            [
                sys.executable,
                str(REAPER),
                shim_python(),
                "-m",
                "berth.shim.main",
                "--id",
                container_id,
                "--namespace",
                self.namespace,
                "--bundle",
                self.bundle,
                "--socket",
                self.socket,
                "--runtime-root",
                self.runtime_root,
                "--detach",
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.reaper.stdout is not None
        self.pid = int(self.reaper.stdout.readline())

    def client(self) -> Client:
        return Client(self.socket)

    def fifo(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        os.mkfifo(path)
        return path

    def cleanup(self) -> None:
        with (
            open(os.path.join(self.bundle, "init.pid"))
            if os.path.exists(os.path.join(self.bundle, "init.pid"))
            else open(os.devnull) as f
        ):
            text = f.read().strip()
        if text.isdigit() and process_state(int(text)) not in (None, "Z"):
            kill(int(text))
        kill(self.pid)
        subprocess.run(
            ["runc", "--root", self.runtime_root, "delete", "--force", self.id], capture_output=True
        )
        self.reaper.wait(timeout=10)
        remove_namespace_cgroups(self.namespace)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def make_shim(busybox_rootfs: str) -> Iterator[object]:
    made: list[StandaloneShim] = []

    def make(args: list[str], container_id: str = "c1") -> StandaloneShim:
        shim = StandaloneShim(busybox_rootfs, args, container_id)
        made.append(shim)
        return shim

    yield make
    for shim in made:
        shim.cleanup()


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_lifecycle_output_exit_file_and_shutdown(make_shim) -> None:  # type: ignore[no-untyped-def]
    shim = make_shim(["sh", "-c", "echo out; echo err >&2; exit 3"])
    out, err = shim.fifo("out"), shim.fifo("err")
    with shim.client() as c:
        pid = c.call("create", {"stdout": out, "stderr": err})["pid"]
        out_fd = os.open(out, os.O_RDONLY)
        err_fd = os.open(err, os.O_RDONLY)
        assert c.call("state")["status"] == "created"
        c.call("start")
        result = c.call("wait")
        assert result["exit_status"] == 3 and result["pid"] == pid
        assert read_all(out_fd) == b"out\n" and read_all(err_fd) == b"err\n"
        exit_file = json.loads(Path(shim.bundle, "exit", "init.json").read_text())
        assert exit_file["status"] == 3 and exit_file["version"] == 1
        with pytest.raises(FailedPrecondition):
            c.call("start")
        deleted = c.call("delete")
        assert deleted["exit_status"] == 3
        assert not Path(shim.bundle, "exit", "init.json").exists()
        c.call("shutdown")
    wait_until(lambda: is_gone(shim.pid), what="shim to exit and be reaped")
    assert not os.path.exists(shim.socket)


def test_events_are_kept_until_acknowledged(make_shim) -> None:  # type: ignore[no-untyped-def]
    shim = make_shim(["sh", "-c", "exit 4"])
    with shim.client() as c:
        c.call("create", {})
        c.call("start")
        c.call("wait")
    topics = []
    with shim.client() as c:
        for event in c.stream("events"):
            topics.append((event["seq"], event["topic"]))
            if event["topic"] == "task.exit":
                assert event["payload"]["exit_status"] == 4
                break
    assert [t for _, t in topics] == ["task.create", "task.start", "task.exit"]
    # Nobody acknowledged: a new subscriber (a restarted daemon) gets all of them again.
    with shim.client() as c:
        again = []
        for event in c.stream("events"):
            again.append(event["seq"])
            if len(again) == 3:
                break
        assert again == [s for s, _ in topics]
        assert c.call("ack", {"seq": topics[1][0]})["pending"] == 1
    with shim.client() as c:
        for event in c.stream("events"):
            assert event["topic"] == "task.exit"
            break
        c.call("delete")


def test_socket_is_private_and_non_root_peers_are_refused(make_shim) -> None:  # type: ignore[no-untyped-def]
    shim = make_shim(["sleep", "30"])
    assert stat.S_IMODE(os.stat(shim.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(shim.socket)).st_mode) == 0o700
    # No abstract socket: every UNIX socket the shim holds has a path.
    inodes = set()
    for fd in os.listdir(f"/proc/{shim.pid}/fd"):
        target = os.readlink(f"/proc/{shim.pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] in inodes and len(fields) > 7:
            assert not fields[7].startswith("@"), line
    # A peer with another uid is dropped before it can say anything.
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        try:
            os.chmod(os.path.dirname(shim.socket), 0o711)
            os.chmod(shim.socket, 0o666)
            os.setgid(65534)
            os.setuid(65534)
            try:
                Client(shim.socket).call("info")
                os.write(write_fd, b"served")
            except Unavailable:
                os.write(write_fd, b"refused")
            except Exception as exc:
                os.write(write_fd, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    os.waitpid(child, 0)
    assert os.read(read_fd, 100) == b"refused"
    os.close(read_fd)
    os.chmod(os.path.dirname(shim.socket), 0o700)
    os.chmod(shim.socket, 0o600)


def test_container_init_gets_exactly_its_stdio_fds(make_shim) -> None:  # type: ignore[no-untyped-def]
    shim = make_shim(["sleep", "30"])
    out = shim.fifo("out")
    with shim.client() as c:
        pid = c.call("create", {"stdout": out})["pid"]
        c.call("start")

        def fds() -> list[int]:
            return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))

        # `start` returns once runc has released the init, which may still be between the
        # exec fifo and execve (holding runc's own fds) for a moment; a leak would stay.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: fds() == [0, 1, 2], timeout=5)
        assert fds() == [0, 1, 2]
        before = len(os.listdir(f"/proc/{shim.pid}/fd"))
        for i in range(5):
            c.call(
                "exec",
                {
                    "exec_id": f"e{i}",
                    "spec": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                },
            )
            c.call("start", {"exec_id": f"e{i}"})
            assert c.call("wait", {"exec_id": f"e{i}"})["exit_status"] == 0
            c.call("delete", {"exec_id": f"e{i}"})
        assert len(os.listdir(f"/proc/{shim.pid}/fd")) == before  # no fd leak per exec
        c.call("kill", {"signal": 9})
        assert c.call("wait")["exit_status"] == 137
        c.call("delete")


def test_log_mode_never_blocks_and_rotates_within_bounds(make_shim) -> None:  # type: ignore[no-untyped-def]
    # 3 MiB of output, nobody reading: the shim logs it, rotating at 1 MiB, keeping 2 files.
    shim = make_shim(
        ["sh", "-c", "dd if=/dev/zero bs=4096 count=768 2>/dev/null; echo tail-marker"]
    )
    with shim.client() as c:
        c.call("create", {"log": {"max_size": 1 << 20, "max_files": 2}})
        c.call("start")
        assert c.call("wait")["exit_status"] == 0
        c.call("delete")
    log_dir = Path(shim.bundle, "log")
    names = sorted(p.name for p in log_dir.iterdir())
    assert names == ["stderr.log", "stdout.log", "stdout.log.1"]
    assert Path(log_dir, "stderr.log").stat().st_size == 0
    sizes = [p.stat().st_size for p in log_dir.glob("stdout.log*")]
    assert all(size <= 1 << 20 for size in sizes), sizes  # never past max_size
    assert Path(log_dir, "stdout.log").read_bytes().endswith(b"tail-marker\n")


def test_fifo_without_reader_does_not_block_the_container(make_shim) -> None:  # type: ignore[no-untyped-def]
    # 8 MiB into a FIFO nobody ever opens: after the stall timeout the shim drops past its
    # bounded buffer instead of blocking the container.
    shim = make_shim(["sh", "-c", "dd if=/dev/zero bs=65536 count=128 2>/dev/null; exit 0"])
    out = shim.fifo("out")
    with shim.client() as c:
        c.call("create", {"stdout": out})
        started = time.monotonic()
        c.call("start")
        assert c.call("wait")["exit_status"] == 0
        assert time.monotonic() - started < 15
        c.call("delete")
    assert "dropping output" in Path(shim.bundle, "shim.log").read_text()


def test_a_reader_that_stops_at_the_exit_has_all_the_output(make_shim) -> None:  # type: ignore[no-untyped-def]
    """A client that closes its FIFO as soon as it learns of the exit (containerd 1.6's Go
    client does: Task.Delete closes the FIFOs first) has read every byte: the exit waits
    until the FIFO itself is empty, not only until the shim has written into it. The reader
    here is slow (4 KiB every 10 ms); without the wait, up to a FIFO's 64 KiB are still in
    it when the exit comes, and lost."""
    size = 200_000
    shim = make_shim(["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x"])
    out = shim.fifo("out")
    got = 0
    stop = threading.Event()

    def slow_reader(fd: int) -> None:
        nonlocal got
        try:
            while not stop.is_set():
                data = os.read(fd, 4096)
                if not data:
                    return
                got += len(data)
                time.sleep(0.01)
        finally:
            os.close(fd)  # as the client does once it saw the exit

    with shim.client() as c:
        c.call("create", {"stdout": out})
        reader = threading.Thread(target=slow_reader, args=(os.open(out, os.O_RDONLY),))
        reader.start()
        try:
            c.call("start")
            assert c.call("wait")["exit_status"] == 0
        finally:
            stop.set()
            reader.join(timeout=30)
        assert got == size, f"{size - got} bytes lost"
        c.call("delete")


def test_stdin_ends_at_close_io_not_when_a_client_leaves(make_shim) -> None:  # type: ignore[no-untyped-def]
    """The shim holds the stdin FIFO open, as containerd's does: a client closing its end
    (`ctr run -d` exiting) is no EOF, a later client writes on, and CloseIO ends the input
    after passing on everything written before it, even with that client's end still open."""
    shim = make_shim(["sh", "-c", "wc -c"])
    stdin, out = shim.fifo("in"), shim.fifo("out")
    with shim.client() as c:
        c.call("create", {"stdin": stdin, "stdout": out})
        out_fd = os.open(out, os.O_RDONLY)
        c.call("start")
        first = os.open(stdin, os.O_WRONLY)
        os.write(first, b"a" * 1000)
        os.close(first)  # the first client goes away
        time.sleep(0.3)
        assert c.call("state")["status"] == "running"
        second = os.open(stdin, os.O_WRONLY)
        for _ in range(10):
            os.write(second, b"b" * 5000)
        c.call("close_io", {"stdin": True})  # with `second` still open
        assert c.call("wait")["exit_status"] == 0
        assert read_all(out_fd).strip() == b"51000"
        os.close(second)
        os.close(out_fd)
        c.call("delete")


def test_bad_requests_get_typed_errors(make_shim) -> None:  # type: ignore[no-untyped-def]
    shim = make_shim(["sleep", "30"])
    with shim.client() as c:
        with pytest.raises(InvalidArgument):
            c.call("create", {"stdout": "relative/path"})
        with pytest.raises(InvalidArgument):
            c.call("create", {"stdout": "/nonexistent/fifo"})
        with pytest.raises(NotFound):
            c.call("start")  # nothing was created
        c.call("create", {})
        with pytest.raises(InvalidArgument):
            c.call("exec", {"exec_id": "../x", "spec": {"args": ["true"]}})
        # a created task takes an exec before its start, as runc (and containerd) allow
        c.call("exec", {"exec_id": "e1", "spec": {"args": ["true"]}})
        with pytest.raises(AlreadyExists):
            c.call("exec", {"exec_id": "e1", "spec": {"args": ["true"]}})
        with pytest.raises(FailedPrecondition):
            c.call("shutdown")  # the task still exists
        c.call("start")
        with pytest.raises(InvalidArgument):
            c.call("kill", {"signal": 999})
        c.call("kill", {"signal": 9})
        c.call("wait")
        c.call("delete")
