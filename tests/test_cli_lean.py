"""What an attached `run` or `exec` does not do when it need not: no stdin FIFO (nor its copy
thread, nor the CloseIO call on a second connection) when the CLI's stdin is /dev/null,
and the FIFOs on a tmpfs (/dev/shm) rather than under /tmp, unless $TMPDIR says where."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from berth.daemon.cli import io
from tests.support.helpers import BERTH, Daemon


def berth(
    daemon: Daemon,
    *args: str,
    stdin: int | None,
    data: bytes | None = None,
    tmpdir: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    env.pop("TMPDIR", None)
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    return subprocess.run(
        [BERTH, *args],
        stdin=stdin,
        input=data,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def close_io_calls(daemon: Daemon) -> int:
    return daemon.log_text().count("tasks.close_io took")


@pytest.mark.container
def test_stdin_of_dev_null_is_an_eof_without_fifo_or_close_io(
    daemon: Daemon, tmp_path: Path
) -> None:
    tmpdir = str(tmp_path)
    run = berth(
        daemon,
        "run",
        "--rm",
        "--busybox",
        "lean",
        "sh",
        "-c",
        "cat; echo done",
        stdin=subprocess.DEVNULL,
        tmpdir=tmpdir,
    )
    assert (run.returncode, run.stdout) == (0, b"done\n"), run.stderr
    daemon.cli("run", "--busybox", "-d", "box", "sleep", "300", check=True)
    exec_ = berth(
        daemon,
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "box",
        "sh",
        "-c",
        "cat; echo done",
        stdin=subprocess.DEVNULL,
        tmpdir=tmpdir,
    )
    assert (exec_.returncode, exec_.stdout) == (0, b"done\n"), exec_.stderr
    assert close_io_calls(daemon) == 0
    assert os.listdir(tmpdir) == []  # the FIFOs' directory went


@pytest.mark.container
def test_stdin_of_a_pipe_still_reaches_the_container_and_ends(
    daemon: Daemon, tmp_path: Path
) -> None:
    run = berth(
        daemon,
        "run",
        "--rm",
        "--busybox",
        "piped",
        "sh",
        "-c",
        "cat; echo done",
        stdin=None,
        data=b"hi\n",
        tmpdir=str(tmp_path),
    )
    assert (run.returncode, run.stdout) == (0, b"hi\ndone\n"), run.stderr
    daemon.cli("run", "--busybox", "-d", "box", "sleep", "300", check=True)
    exec_ = berth(
        daemon,
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "box",
        "cat",
        stdin=None,
        data=b"there\n",
        tmpdir=str(tmp_path),
    )
    assert (exec_.returncode, exec_.stdout) == (0, b"there\n"), exec_.stderr
    assert close_io_calls(daemon) >= 1  # the run's (its init's stdin is held until then)
    assert os.listdir(tmp_path) == []


def test_the_fifos_go_to_tmpdir_else_dev_shm_else_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    path = io._private_dir()
    assert os.path.dirname(path) == str(tmp_path) and os.stat(path).st_mode & 0o777 == 0o700
    os.rmdir(path)
    for unset in ("", None):  # set but empty counts as unset
        if unset is None:
            monkeypatch.delenv("TMPDIR")
        else:
            monkeypatch.setenv("TMPDIR", unset)
        path = io._private_dir()
        try:
            assert os.path.dirname(path) == (io.SHM if os.access(io.SHM, os.W_OK) else "/tmp")
        finally:
            os.rmdir(path)
    monkeypatch.setattr(io, "SHM", str(tmp_path / "missing"))
    path = io._private_dir()
    try:
        assert os.path.dirname(path) == "/tmp"
    finally:
        os.rmdir(path)


def test_only_dev_null_spares_the_stdin_fifo(tmp_path: Path) -> None:
    def wanted(stdin: int, terminal: bool = False) -> bool:
        saved = os.dup(0)
        try:
            os.dup2(stdin, 0)
            return io.stdin_wanted(terminal)
        finally:
            os.dup2(saved, 0)
            os.close(saved)

    null = os.open(os.devnull, os.O_RDONLY)
    r, w = os.pipe()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    regular = os.open(empty, os.O_RDONLY)
    try:
        assert not wanted(null)
        assert wanted(null, terminal=True)  # a terminal's stdin is never ended for it
        assert wanted(r) and wanted(regular)
    finally:
        for fd in (null, r, w, regular):
            os.close(fd)


def test_a_copy_thread_joins_with_a_timeout_and_ends() -> None:
    r, w = os.pipe()
    thread = io._Thread(os.read, r, 1)
    assert thread.is_alive()
    thread.join(0.05)  # nothing to read yet: still running after the timeout
    assert thread.is_alive()
    os.write(w, b"x")
    thread.join(10)
    assert not thread.is_alive()
    for fd in (r, w):
        os.close(fd)


NO_DAEMON_ENV = dict(
    os.environ, BERTH_ADDRESS="/nonexistent/berthd.sock", BERTH_NAMESPACE="default"
)


def imports_of(*verb: str) -> tuple[set[str], str]:
    """The modules a CLI call imports (-X importtime), with no daemon to reach: the verb
    gets as far as connecting, so the wire modules are loaded. Also its stderr."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", BERTH, *verb],
        capture_output=True,
        text=True,
        env=NO_DAEMON_ENV,
        timeout=60,
        check=False,
    )
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines()}, result.stderr


def test_run_imports_no_threading() -> None:
    """`run` (and `tasks exec`, once attached) copy through _thread: threading and the
    functools it imports were ~2.7 ms of every start."""
    imported, stderr = imports_of("run", "--rm", "--busybox", "c", "true")
    assert "berth.daemon.cli.io" in imported, stderr[-2000:]
    assert "threading" not in imported
    # re (with enum) only for an error text that is not UTF-8: shim/wire/protocol.py
    assert not imported & {"re", "enum", "functools"}, sorted(imported)


@pytest.mark.parametrize("verb", [["version"], ["run", "--rm", "--busybox", "c", "true"]])
def test_the_cli_speaks_without_the_msgpack_package(verb: list[str]) -> None:
    """The CLI encodes its frames with shim/wire/packing.py: msgpack's package, with the
    datetime and collections it imports, was ~5 ms of every start (measured)."""
    imported, stderr = imports_of(*verb)
    assert {"berth.shim.wire.protocol", "berth.shim.wire.packing"} <= imported, stderr
    assert "cannot connect" in stderr
    assert not imported & {"msgpack", "datetime", "collections"}, sorted(imported)


@pytest.mark.container
def test_the_fast_exit_flushes_what_was_printed_and_reports_a_failed_write(
    daemon: Daemon,
) -> None:
    """The CLI leaves with os._exit (no interpreter teardown): what it printed still
    arrives whole through a pipe, and a write that fails at the flush (a reader gone) is
    exit 1, not 0."""
    for i in range(40):
        daemon.cli("containers", "create", "--busybox", f"flush-{i:02d}", "true", check=True)
    listing = berth(daemon, "containers", "ls", "-q", stdin=subprocess.DEVNULL)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().split() == [f"flush-{i:02d}" for i in range(40)]
    version = berth(daemon, "version", stdin=subprocess.DEVNULL)
    assert version.returncode == 0 and b"Server" in version.stdout, version
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the flush at exit gets EPIPE
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    closed = subprocess.run(
        [BERTH, "containers", "ls", "-q"],
        stdin=subprocess.DEVNULL,
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=env,
        timeout=60,
        check=False,
    )
    os.close(write_end)
    assert closed.returncode == 1, closed.stderr


@pytest.mark.parametrize("closed", [">&-", "2>&- >/dev/null", "<&- >/dev/null"])
def test_the_fast_exit_takes_a_closed_standard_descriptor(closed: str) -> None:
    """Started with stdout, stderr or stdin closed (Python then has no sys.stdout or
    sys.stderr at all), a verb that succeeds still exits 0."""
    result = subprocess.run(
        ["sh", "-c", f'exec "$0" completion bash {closed}', BERTH],
        stderr=subprocess.PIPE,
        env=NO_DAEMON_ENV,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
