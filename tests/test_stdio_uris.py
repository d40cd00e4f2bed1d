"""stdio named by URI, as containerd's shim reads a process's stdout: `file://` (both
streams appended to one file) and `binary://` (a logging binary, nerdctl's way). The shim
on its own, and under berthd across a kill -9."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from berth.daemon.oci import default_spec
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.support.helpers import Daemon, is_gone, kill, wait_until
from tests.test_shim import StandaloneShim, make_shim, read_all

__all__ = ["make_shim"]  # the fixture, shared with test_shim

pytestmark = pytest.mark.container


def write_logger(directory: str, body: str) -> str:
    """A logging binary: a shell script that records its pid first."""
    path = os.path.join(directory, "logger")
    Path(path).write_text(f"#!/bin/sh\necho $$ > {directory}/logger.pid\n{body}")
    os.chmod(path, 0o755)
    return path


def logger_pid(directory: str) -> int:
    pid_file = Path(directory, "logger.pid")
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), what="logger pid")
    return int(pid_file.read_text())


def test_a_logging_binary_gets_both_streams_fds_args_and_env(make_shim) -> None:  # type: ignore[no-untyped-def]
    """containerd's protocol: stdout on fd 3, stderr on fd 4, readiness on fd 5; the
    environment is CONTAINER_ID and CONTAINER_NAMESPACE only; the query becomes `key value`
    arguments, in order, a key once. The logger reads slowly (it sleeps before it starts):
    3 MiB still arrive whole, and the delete returns once the logger has exited."""
    shim: StandaloneShim = make_shim(
        ["sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' x; echo to-stderr >&2; exit 5"]
    )
    d = shim.dir
    logger = write_logger(
        d,
        f"printf '[%s]' \"$@\" > {d}/args\n"
        f"tr '\\0' '\\n' < /proc/$$/environ | sort > {d}/env\n"
        f"ls -l /proc/$$/fd/3 /proc/$$/fd/4 > {d}/fds 2>&1\n"
        "exec 5>&-\n"
        "sleep 1\n"
        f"cat <&3 > {d}/out &\n"
        f"cat <&4 > {d}/err &\n"
        "wait\n",
    )
    uri = f"binary://{logger}?b=2&a=1&b=3&flag"
    with shim.client() as c:
        c.call("create", {"stdout": uri, "stderr": uri})
        assert c.call("state")["stdout"] == uri  # reported as the client set it
        c.call("start")
        assert c.call("wait")["exit_status"] == 5
        pid = logger_pid(d)
        assert c.call("delete")["exit_status"] == 5
        assert is_gone(pid), "the logger exited (at its EOF) before the delete returned"
        c.call("shutdown")
    assert Path(d, "out").stat().st_size == 3 * 1024 * 1024
    assert Path(d, "err").read_text() == "to-stderr\n"
    assert Path(d, "args").read_text() == "[b][2][a][1][flag][]"
    assert Path(d, "env").read_text().split() == [
        f"CONTAINER_ID={shim.id}",
        f"CONTAINER_NAMESPACE={shim.namespace}",
    ]
    assert Path(d, "fds").read_text().count("pipe:") == 2


def test_an_exec_with_a_terminal_logs_through_a_binary(make_shim) -> None:  # type: ignore[no-untyped-def]
    """An exec's own logger; with a terminal the one stream is stdout, and fd 4 is at EOF."""
    shim: StandaloneShim = make_shim(["sleep", "30"])
    d = shim.dir
    logger = write_logger(d, f"exec 5>&-\ncat <&4 > {d}/err\ncat <&3 > {d}/out\n")
    with shim.client() as c:
        c.call("create", {})
        c.call("start")
        c.call(
            "exec",
            {
                "exec_id": "e1",
                "spec": {
                    "args": ["sh", "-c", "tty; echo exec-out; echo exec-err >&2"],
                    "cwd": "/",
                    "env": ["PATH=/bin"],
                },
                "stdout": f"binary://{logger}",
                "terminal": True,
            },
        )
        c.call("start", {"exec_id": "e1"})
        assert c.call("wait", {"exec_id": "e1"})["exit_status"] == 0
        c.call("delete", {"exec_id": "e1"})
        out = Path(d, "out").read_text()
        assert "/dev/pts/" in out and "exec-out" in out and "exec-err" in out, out
        assert Path(d, "err").read_text() == ""
        c.call("kill", {"signal": 9})
        c.call("wait")
        c.call("delete")


def test_a_logger_that_dies_costs_output_never_the_container(make_shim) -> None:  # type: ignore[no-untyped-def]
    """The shim pumps into the logger's pipes (containerd hands them to the container): a
    logger gone early means dropped output and a line in the shim's log, not a container
    blocked or killed by SIGPIPE."""
    shim: StandaloneShim = make_shim(
        ["sh", "-c", "sleep 0.5; head -c 8388608 /dev/zero; echo done >&2; exit 7"]
    )
    logger = write_logger(shim.dir, "exit 0\n")
    with shim.client() as c:
        c.call("create", {"stdout": f"binary://{logger}"})
        c.call("start")
        assert c.call("wait")["exit_status"] == 7
        c.call("delete")
    shim_log = Path(shim.bundle, "shim.log").read_text()
    assert "exited with 0 before its input ended" in shim_log
    # EPIPE once per stream, logged once, then dropped quietly (8 MiB is 32+ writes)
    assert 1 <= shim_log.count("Broken pipe; its output is dropped") <= 2, shim_log


def test_a_logger_that_never_gets_ready_fails_the_create(make_shim) -> None:  # type: ignore[no-untyped-def]
    """A logger that keeps fd 5 open is killed after the readiness bound; the create fails
    with the reason, nothing runs, and the shim serves the next create."""
    shim: StandaloneShim = make_shim(["sh", "-c", "echo fine"])
    logger = write_logger(shim.dir, "exec sleep 100\n")
    missing = os.path.join(shim.dir, "no-such-logger")
    out = shim.fifo("out")
    with shim.client() as c:
        with pytest.raises(InvalidArgument, match="cannot start logging binary"):
            c.call("create", {"stdout": f"binary://{missing}"})
        with pytest.raises(FailedPrecondition, match="did not get ready"):
            c.call("create", {"stdout": f"binary://{logger}"})
        pid = logger_pid(shim.dir)
        wait_until(lambda: is_gone(pid), what="the unready logger killed")
        with pytest.raises(NotFound):
            c.call("start")
        c.call("create", {"stdout": out})
        reader = os.open(out, os.O_RDONLY)
        c.call("start")
        assert c.call("wait")["exit_status"] == 0
        assert read_all(reader) == b"fine\n"
        os.close(reader)
        c.call("delete")


def test_a_file_uri_appends_both_streams(make_shim) -> None:  # type: ignore[no-untyped-def]
    """file:// (ctr --log-uri, cio.LogFile): the file and its directories are made (0644,
    0755, as containerd makes them), stdout and stderr are appended to it, and an exec
    appends to what is there."""
    shim: StandaloneShim = make_shim(["sh", "-c", "echo init-out; echo init-err >&2; sleep 30"])
    path = os.path.join(shim.dir, "logs", "sub", "c1.log")
    uri = f"file://{path}"
    with shim.client() as c:
        c.call("create", {"stdout": uri, "stderr": uri})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
        c.call("start")
        wait_until(lambda: "init-err" in Path(path).read_text(), what="init output")
        c.call(
            "exec",
            {
                "exec_id": "e1",
                "spec": {"args": ["sh", "-c", "echo exec-out"], "cwd": "/", "env": ["PATH=/bin"]},
                "stdout": uri,
            },
        )
        c.call("start", {"exec_id": "e1"})
        assert c.call("wait", {"exec_id": "e1"})["exit_status"] == 0
        c.call("delete", {"exec_id": "e1"})
        c.call("kill", {"signal": 9})
        assert c.call("wait")["exit_status"] == 137
        c.call("delete")
    lines = Path(path).read_text().splitlines()
    assert sorted(lines[:2]) == ["init-err", "init-out"] and lines[2:] == ["exec-out"]


@pytest.mark.parametrize(
    "uri",
    [
        "tcp://127.0.0.1:9/x",  # an unknown scheme
        "file://relative/x.log",  # a host, not a path
        "file:///x.log?rotate=1",  # file:// takes no query
        "binary://localhost/bin/true",
        "binary://",
    ],
)
def test_bad_stdio_uris_are_refused_and_change_nothing(make_shim, uri: str) -> None:  # type: ignore[no-untyped-def]
    shim: StandaloneShim = make_shim(["true"])
    with shim.client() as c:
        with pytest.raises(InvalidArgument):
            c.call("create", {"stdout": uri})
        with pytest.raises(NotFound):
            c.call("start")
    assert not os.path.exists("/x.log")


def test_a_logger_keeps_logging_across_a_daemon_kill9(daemon: Daemon) -> None:
    """The shim owns the logger: berthd killed and restarted loses none of the output it
    carries, and the task reports its URI after the restart."""
    d = daemon.dir
    logger = write_logger(d, f"exec 5>&-\ncat <&3 >> {d}/out &\ncat <&4 >> {d}/out &\nwait\n")
    uri = f"binary://{logger}?mode=append"
    spec = default_spec(
        "c-logger",
        daemon.namespace,
        ["sh", "-c", "i=0; while [ $i -lt 40 ]; do echo line-$i; i=$((i+1)); sleep 0.05; done"],
        root="",
        readonly_root=True,
    )
    daemon.call("containers.create", {"id": "c-logger", "spec": spec})
    daemon.call("tasks.create", {"container_id": "c-logger", "stdout": uri, "stderr": uri})
    daemon.call("tasks.start", {"container_id": "c-logger"})
    pid = logger_pid(d)
    try:
        wait_until(lambda: "line-3" in Path(d, "out").read_text(), what="first lines logged")
        daemon.kill9()
        daemon.start()
        assert daemon.call("tasks.get", {"container_id": "c-logger"})["stdout"] == uri
        assert daemon.call("tasks.wait", {"container_id": "c-logger"})["exit_status"] == 0
        daemon.call("tasks.delete", {"container_id": "c-logger"})
        assert Path(d, "out").read_text().split() == [f"line-{i}" for i in range(40)]
        assert is_gone(pid)
    finally:
        if not is_gone(pid):
            kill(pid)


def test_run_with_a_log_uri(daemon: Daemon) -> None:
    """`berth run --log-uri` (ctr's flag): the output goes to the file, not to the CLI,
    and the exit status is still the CLI's."""
    path = os.path.join(daemon.dir, "run", "out.log")
    r = daemon.cli(
        "run", "--busybox", "--rm", "--log-uri", f"file://{path}", "c-loguri",
        "sh", "-c", "echo to-out; echo to-err >&2; exit 3",
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert b"to-out" not in r.stdout and b"to-err" not in r.stderr
    assert sorted(Path(path).read_text().split()) == ["to-err", "to-out"]
    r = daemon.cli("run", "--busybox", "--rm", "--log-uri", "tcp://x", "c-loguri2", "true")
    assert r.returncode != 0 and b"unknown scheme" in r.stderr
    assert b"c-loguri" not in daemon.cli("containers", "ls", check=True).stdout
