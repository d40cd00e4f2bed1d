"""stdio named by URI, as containerd's shim reads a process's stdout: `file://` (both
streams appended to one file) and `binary://` (a logging binary, nerdctl's way). The shim
on its own, and under berthd across a kill -9."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from berth.daemon.oci import default_spec
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.support.helpers import Daemon, is_gone, kill, process_state, wait_until
from tests.test_shim import StandaloneShim, make_shim, read_all

__all__ = ["make_shim"]  # the fixture, shared with test_shim

pytestmark = pytest.mark.container


@pytest.fixture
def logging_shim(make_shim) -> Iterator[Callable[..., StandaloneShim]]:  # type: ignore[no-untyped-def]
    """make_shim, plus: a logger a test left running (it failed) is killed by its pid."""
    made: list[StandaloneShim] = []

    def make(*args: object, **kwargs: object) -> StandaloneShim:
        shim: StandaloneShim = make_shim(*args, **kwargs)
        made.append(shim)
        return shim

    yield make
    for shim in made:
        pid_file = Path(shim.dir, "logger.pid")
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        if text.isdigit() and process_state(int(text)) not in (None, "Z"):
            kill(int(text))


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


def test_a_logging_binary_gets_both_streams_fds_args_and_env(logging_shim) -> None:  # type: ignore[no-untyped-def]
    """containerd's protocol: stdout on fd 3, stderr on fd 4, readiness on fd 5; the
    environment is CONTAINER_ID and CONTAINER_NAMESPACE only; the query becomes `key value`
    arguments, in order, a key once. The logger reads slowly (it sleeps before it starts):
    3 MiB still arrive whole, and the delete returns once the logger has exited."""
    shim: StandaloneShim = logging_shim(
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


def test_an_exec_with_a_terminal_logs_through_a_binary(logging_shim) -> None:  # type: ignore[no-untyped-def]
    """An exec's own logger; with a terminal the one stream is stdout, and fd 4 carries
    nothing but stays open until the output ends (containerd's does: a logger reading both
    must not see one stream end at once)."""
    shim: StandaloneShim = logging_shim(["sleep", "30"])
    d = shim.dir
    logger = write_logger(
        d, f"exec 5>&-\n(cat <&4 > {d}/err; touch {d}/err-eof) &\ncat <&3 > {d}/out\nwait\n"
    )
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
        time.sleep(0.3)  # the logger is ready (the exec call waited for it)
        assert not Path(d, "err-eof").exists(), "fd 4 ended before the exec even started"
        c.call("start", {"exec_id": "e1"})
        assert c.call("wait", {"exec_id": "e1"})["exit_status"] == 0
        c.call("delete", {"exec_id": "e1"})
        out = Path(d, "out").read_text()
        assert "/dev/pts/" in out and "exec-out" in out and "exec-err" in out, out
        assert Path(d, "err").read_text() == "" and Path(d, "err-eof").exists()
        c.call("kill", {"signal": 9})
        c.call("wait")
        c.call("delete")


def test_a_logger_that_dies_costs_output_never_the_container(logging_shim) -> None:  # type: ignore[no-untyped-def]
    """The shim pumps into the logger's pipes (containerd hands them to the container): a
    logger gone early means dropped output and a line in the shim's log, not a container
    blocked or killed by SIGPIPE."""
    shim: StandaloneShim = logging_shim(
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


def test_a_logger_that_never_gets_ready_fails_the_create(logging_shim) -> None:  # type: ignore[no-untyped-def]
    """A logger that keeps fd 5 open is killed after the readiness bound; the create fails
    with the reason, nothing runs, and the shim serves the next create."""
    shim: StandaloneShim = logging_shim(["sh", "-c", "echo fine"])
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


def test_a_logger_that_never_reads_costs_output_never_the_container(logging_shim) -> None:  # type: ignore[no-untyped-def]
    """A logger that is ready but never reads (hung): the pipe and the shim's buffer fill,
    then output is dropped; the container runs to its end, its exit is reported, and the
    delete returns once the logger, which never exits by itself, was made to."""
    shim: StandaloneShim = logging_shim(["sh", "-c", "head -c 8388608 /dev/zero; exit 3"])
    logger = write_logger(shim.dir, "exec 5>&-\nexec sleep 100\n")
    with shim.client() as c:
        c.call("create", {"stdout": f"binary://{logger}"})
        c.call("start")
        assert c.call("wait")["exit_status"] == 3
        pid = logger_pid(shim.dir)
        assert not is_gone(pid)
        assert c.call("delete")["exit_status"] == 3
        assert is_gone(pid), "the delete returned before the logger was stopped"
    shim_log = Path(shim.bundle, "shim.log").read_text()
    assert "dropping output" in shim_log and "did not exit: SIGTERM" in shim_log, shim_log


def test_a_failed_creates_logger_does_not_outlive_the_shim(logging_shim) -> None:  # type: ignore[no-untyped-def]
    """The runtime refuses the create after the logger started (its process's binary does
    not exist): the logger, which ignores SIGTERM, is still the shim's to stop, and a shim
    that shuts down right away kills it."""
    shim: StandaloneShim = logging_shim(["/no-such-binary"])
    logger = write_logger(shim.dir, "trap '' TERM\nexec 5>&-\nexec sleep 100\n")
    with shim.client() as c:
        with pytest.raises(Exception, match="no-such-binary"):
            c.call("create", {"stdout": f"binary://{logger}"})
        pid = logger_pid(shim.dir)
        c.call("shutdown")
    wait_until(lambda: is_gone(shim.pid), timeout=5, what="the shim's exit")
    wait_until(lambda: is_gone(pid), timeout=2, what="the logger killed with its shim")


def test_a_file_uri_appends_both_streams(logging_shim) -> None:  # type: ignore[no-untyped-def]
    """file:// (ctr --log-uri, cio.LogFile): the file and its directories are made (0644,
    0755, as containerd makes them), stdout and stderr are appended to it, and an exec
    appends to what is there, here named `file:/path` (Go's url.Parse reads it the same)."""
    shim: StandaloneShim = logging_shim(["sh", "-c", "echo init-out; echo init-err >&2; sleep 30"])
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
                "stdout": f"file:{path}",
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
        "relative/x.log",  # neither a FIFO's (absolute) path nor a URI
        "binary:relative/logger",
    ],
)
def test_bad_stdio_uris_are_refused_and_change_nothing(logging_shim, uri: str) -> None:  # type: ignore[no-untyped-def]
    shim: StandaloneShim = logging_shim(["true"])
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
