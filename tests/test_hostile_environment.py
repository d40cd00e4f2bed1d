"""A hostile environment around berthd (not a hostile client or container): how the
operator or the system started it (closed stdio, a strict umask, a low limit of open
files), and what its standard streams do. Each failed on the code before its fix."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from berth.daemon import logs
from berth.shim.wire.client import Client
from tests.support.helpers import (
    REAPER,
    Daemon,
    daemon_on_tmpfs,
    fill_disk,
    kill,
    shim_python,
    stop_child,
    wait_until,
)

F_SETPIPE_SZ = 1031


def _run_exit_3(daemon: Daemon) -> None:
    done = daemon.cli("run", "--busybox", "--rm", "c1", "sh", "-c", "echo hello; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout == b"hello\n"


def test_berthd_started_with_its_stdio_closed_runs_containers(daemon: Daemon) -> None:
    """`berthd <&- >&- 2>&-` (a supervisor that closes stdio, a careless init script): the
    numbers 0-2 went to the first files berthd opened (trio's epoll and wake-up socket),
    and its zygote started with none of them. The zygote's pipe to each new shim then
    became fd 0 and 1, the shim put /dev/null over them before reporting it was ready, and
    every container start failed: "spawning shim failed: shim exited before it was
    ready". Now each closed one is /dev/null from the start."""
    daemon.kill9()
    daemon.command_prefix = ["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh"]
    daemon.start()
    _run_exit_3(daemon)
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{daemon.pid}/fd/{fd}") == "/dev/null"


def test_berthd_answers_while_its_stderr_is_not_read(daemon: Daemon) -> None:
    """berthd's stderr is a pipe whose reader holds it open and does not read (`berthd
    2>&1 | less` at a pause, a stalled log collector, a terminal's ^S). Once the pipe was
    full, logging blocked berthd's only trio thread in write(2): no call was answered
    until the reader read again. Now it answers, runs containers, and the lines the pipe
    could take arrive once the reader reads."""
    fifo = os.path.join(daemon.dir, "stderr.fifo")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held, not read (until the end)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)  # one page: full after a few dozen lines
        daemon.kill9()
        daemon.command_prefix = ["sh", "-c", f'exec "$@" 2>{fifo}', "sh"]
        daemon.start()
        with Client(daemon.address, namespace=daemon.namespace, timeout=10) as c:
            for i in range(300):  # a debug line each ("... took 0.3 ms"): far over 4 KiB
                c.call("namespaces.create", {"name": f"n{i}"})
                c.call("namespaces.delete", {"name": f"n{i}"})
        _run_exit_3(daemon)
        text = b""
        deadline = time.monotonic() + 10
        while b"task deleted: exit status 3" not in text and time.monotonic() < deadline:
            try:
                text += os.read(reader, 65536)
            except BlockingIOError:
                time.sleep(0.05)
        assert b"task deleted: exit status 3" in text  # the last lines, once read
    finally:
        os.close(reader)


def test_berthd_started_under_a_strict_umask_gives_containers_a_usable_root(daemon: Daemon) -> None:
    """berthd started by hand under `umask 077` (a hardened login's default): what it and
    its shims created took that umask, so a container's / (the overlay's upper directory)
    and the busybox rootfs were 0700, and a process of any user but root in the container
    could neither read / nor write /tmp. berthd now sets its umask to 022, as dockerd
    does, and makes private what must be."""
    daemon.kill9()
    daemon.command_prefix = ["sh", "-c", 'umask 077; exec "$@"', "sh"]
    daemon.start()
    script = "ls / >/dev/null && echo ok > /tmp/x && cat /tmp/x"
    done = daemon.cli("run", "--busybox", "--rm", "--user", "65534", "u1", "sh", "-c", script)
    assert (done.returncode, done.stdout) == (0, b"ok\n"), done.stderr
    status = Path(f"/proc/{daemon.pid}/status").read_text()
    assert "Umask:\t0022" in status


def test_berthd_out_of_descriptors_says_so_once_and_serves_again(daemon: Daemon) -> None:
    """As many idle clients as berthd's limit of open files (its hard limit: berthd raises
    the soft one to it): accept fails with EMFILE. trio retried every 0.1 s and logged a
    traceback each time (90 in 9 s); now berthd says it once, then says when it accepts
    again, and answers the next client once the others are gone."""
    daemon.kill9()
    daemon.command_prefix = ["prlimit", "--nofile=64:64"]
    daemon.start()
    clients = []
    try:
        for _ in range(80):
            client = socket.socket(socket.AF_UNIX)
            client.connect(daemon.address)  # queued in the backlog past the limit
            clients.append(client)
        wait_until(lambda: "cannot accept API connections" in daemon.log_text())
        time.sleep(1)  # ten retries
    finally:
        for client in clients:
            client.close()
    with Client(daemon.address, timeout=10) as c:
        c.call("version")
    wait_until(lambda: "accepting API connections again" in daemon.log_text())
    text = daemon.log_text()
    assert "Traceback" not in text
    assert text.count("cannot accept API connections") == 1


SPAWN_PROGRAM = """
import os, sys
from berth.shim.main import spawn_detached
from berth.shim.task import ShimConfig
config = ShimConfig.from_params({"id": "orphan", "bundle": sys.argv[1], "socket": sys.argv[2]})
result = sys.argv[3]
for fd in (0, 1, 2):
    os.close(fd)
try:
    text = str(spawn_detached(config))
except Exception as exc:
    text = f"error {exc}"
with open(result, "w") as f:
    f.write(text)
"""


def test_a_shim_forked_by_a_process_without_stdio_reports_it_is_ready() -> None:
    """spawn_detached (the zygote's fork of each shim) in a process whose fds 0-2 are
    closed: the readiness pipe got those numbers, the new shim put /dev/null over them
    first thing, and its "ready" went nowhere (the container failed to start). The shim
    now moves the pipe out of the way first."""
    base = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
    bundle, sock = os.path.join(base, "bundle"), os.path.join(base, "s", "shim.sock")
    result = os.path.join(base, "result")
    os.mkdir(bundle)
    # under the tests' subreaper, which reaps the detached shim once it is killed
    reaper = subprocess.Popen(
        [sys.executable, str(REAPER), shim_python(), "-c", SPAWN_PROGRAM, bundle, sock, result]
    )
    try:
        text = wait_until(lambda: Path(result).exists() and Path(result).read_text(), timeout=30)
        assert text.isdigit(), text
        with Client(sock, timeout=10) as c:
            assert c.call("info")["pid"] == int(text)
    finally:
        record = Path(bundle, "shim.json")
        if record.exists():  # the shim it started, by its own record
            pid = json.loads(record.read_text())["pid"]
            if isinstance(pid, int) and pid > 1:
                kill(pid)
        stop_child(reaper)
        shutil.rmtree(base, ignore_errors=True)


# -- the log handler itself


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)


def test_log_lines_into_a_pipe_nobody_reads_never_block_and_drops_are_counted() -> None:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
        handler = logs.StderrHandler(w, limit=16 * 1024)
        handler.setFormatter(logging.Formatter("%(message)s"))
        assert handler.threaded
        started = time.monotonic()
        for i in range(2000):  # ~80 KB
            handler.handle(_record(f"line {i:04d} " + "x" * 30))
        assert time.monotonic() - started < 5  # was: blocked in write(2) at ~4 KiB
        assert handler.dropped > 0
        got = bytearray()
        drained = threading.Event()

        def drain() -> None:
            while chunk := os.read(r, 65536):
                got.extend(chunk)
                if b"dropped" in got:
                    drained.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + 10
        while not drained.is_set() and time.monotonic() < deadline:
            handler.handle(_record("after"))  # the reader keeps up again: the count is said
            time.sleep(0.05)
        assert drained.is_set(), bytes(got[-200:])
        lines = bytes(got).splitlines()
        assert lines[0] == b"line 0000 " + b"x" * 30  # in order, whole lines
        assert any(line.endswith(b"stderr's reader did not read") for line in lines)
    finally:
        os.close(w)  # the drain thread sees EOF
        handler.flush()
        os.close(r)


def test_log_lines_into_a_file_are_there_when_the_call_returns(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        handler = logs.StderrHandler(fd)
        handler.setFormatter(logging.Formatter("%(message)s"))
        assert not handler.threaded
        handler.handle(_record("one"))
        assert path.read_bytes() == b"one\n"
    finally:
        os.close(fd)


def test_log_lines_into_a_pipe_whose_reader_is_gone_are_dropped_quietly() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        handler = logs.StderrHandler(w)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.handle(_record("nobody hears this"))  # EPIPE: no exception, no retry loop
        handler.flush()
        assert handler.dropped == 0
    finally:
        os.close(w)


def test_no_stderr_logs_nothing() -> None:
    handler = logs.StderrHandler(None)
    handler.handle(_record("nowhere"))
    handler.flush()


# -- a shim out of descriptors


def test_a_shim_log_stays_bounded_while_the_shim_is_out_of_descriptors(tmp_path: Path) -> None:
    """A shim at its limit of open files cannot open the next log file when it rotates:
    it went on appending to the renamed `shim.log.1` without bound (7.5 MB in 3 s on the
    state tmpfs, logging each failed accept) and, `shim.log` gone, never rotated again.
    Now lines are dropped while no file can be opened, and the rotation resumes as soon
    as a descriptor is free."""
    log = tmp_path / "shim.log"
    program = textwrap.dedent(
        f"""
        import os
        from berth.shim import loop
        loop.log_to({str(log)!r})
        spare = []
        try:
            while True:
                spare.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass  # EMFILE: every descriptor taken
        for i in range(30000):
            loop.log(f"starved {{i:06d}} " + "x" * 60)
        for fd in spare:
            os.close(fd)
        for i in range(3):
            loop.log(f"recovered {{i}}")
        """
    )
    subprocess.run(
        ["prlimit", "--nofile=64:64", sys.executable, "-c", program], check=True, timeout=60
    )
    from berth.shim.loop import SHIM_LOG_MAX

    rotated = Path(f"{log}.1")
    assert rotated.stat().st_size <= SHIM_LOG_MAX + 200  # was 3.4 MB, growing with each line
    assert log.read_text().splitlines()[-1].endswith("recovered 2")  # rotated again


SHIM_PROGRAM = """
import sys
from berth.shim.main import main
sys.exit(main(["--id", "starved", "--bundle", sys.argv[1], "--socket", sys.argv[2]]))
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_shim_out_of_descriptors_waits_instead_of_spinning_and_serves_again() -> None:
    """Connections queue on a shim that has no descriptor left (its soft limit is the one
    berthd was started with; each exec holds ~8): accept fails with EMFILE, the connection
    stays queued, the listener stays readable, and the shim's loop went round at 100% CPU
    (3.0 s of CPU in 3 s), logging each turn, until a descriptor was free. Now it looks
    again after a pause, and serves once descriptors are free."""
    base = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
    bundle, sock = os.path.join(base, "bundle"), os.path.join(base, "s", "shim.sock")
    os.mkdir(bundle)
    shim = subprocess.Popen(
        ["prlimit", "--nofile=48:48", shim_python(), "-c", SHIM_PROGRAM, bundle, sock],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    clients: list[socket.socket] = []
    try:
        wait_until(lambda: os.path.exists(sock), what="the shim's socket")
        for _ in range(60):  # more than the shim has descriptors left
            client = socket.socket(socket.AF_UNIX)
            client.connect(sock)
            clients.append(client)
        wait_until(lambda: len(os.listdir(f"/proc/{shim.pid}/fd")) >= 48, what="EMFILE")
        before = _cpu_seconds(shim.pid)
        time.sleep(2)
        assert _cpu_seconds(shim.pid) - before < 0.5
        for client in clients:
            client.close()
        clients.clear()
        with Client(sock, timeout=10) as c:
            assert c.call("info")["id"] == "starved"
    finally:
        for client in clients:
            client.close()
        shim.kill()
        shim.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_an_exec_on_a_full_state_dir_is_unavailable_and_works_once_there_is_room() -> None:
    """The shim answered a call that met ENOSPC (or EMFILE) with `internal`, as if it were
    broken; berthd answers `unavailable` for the same state (tasks.create on a full disk).
    Now the shim does too, and the same exec works once there is room again."""

    import pytest

    from berth.shim.wire.errors import Unavailable

    with daemon_on_tmpfs("4m") as d:
        started = d.cli("run", "--busybox", "-d", "c-full", "sleep", "1000")
        assert started.returncode == 0, started.stderr.decode()
        filler = Path(d.dir, "filler")
        fill_disk(filler)
        spec = {"args": ["/bin/echo", "ok"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
        with d.client() as c, pytest.raises(Unavailable, match="No space left"):
            c.call("tasks.exec", {"container_id": "c-full", "exec_id": "e1", "spec": spec})
        filler.unlink()
        ran = d.cli("tasks", "exec", "--exec-id", "e2", "c-full", "echo", "ok")
        assert (ran.returncode, ran.stdout) == (0, b"ok\n"), ran.stderr
        d.cli("tasks", "rm", "-f", "c-full", check=True)


def test_the_busybox_rootfs_has_its_modes_whatever_the_umask_of_its_builder(
    tmp_path: Path,
) -> None:
    """The embedded rootfs took its builder's umask: built under `umask 077` (before
    berthd set its own, or by a test or the demo) `/`, `/bin` and `/etc/passwd` were
    private to root, and cached so (its marker), for every later container."""
    from berth.daemon.tasks.rootfs import build_busybox_rootfs

    old = os.umask(0o077)
    try:
        root = Path(build_busybox_rootfs(str(tmp_path / "rootfs")))
    finally:
        os.umask(old)
    modes = {p: (root / p).stat().st_mode & 0o7777 for p in ("", "bin", "usr/bin", "etc")}
    assert modes == {"": 0o755, "bin": 0o755, "usr/bin": 0o755, "etc": 0o755}
    assert (root / "etc" / "passwd").stat().st_mode & 0o777 == 0o644
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (root / "root").stat().st_mode & 0o777 == 0o700
