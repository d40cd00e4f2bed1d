"""Restart safety: containers, their output and their exit statuses survive the daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from berth.daemon.tasks.service import SHIM_CALL_TIMEOUT
from berth.shim.wire.errors import Unavailable
from tests.support.helpers import (
    BERTH,
    REAPER,
    Daemon,
    is_gone,
    kill,
    process_state,
    wait_until,
)


def _tasks(daemon: Daemon) -> dict[str, dict[str, object]]:
    return {t["id"]: t for t in daemon.call("tasks.list")["tasks"]}


def test_kill9_daemon_with_ten_running_containers(daemon: Daemon) -> None:
    ids = [f"c{i}" for i in range(10)]
    for cid in ids:
        daemon.cli("run", "--busybox", "-d", cid, "sleep", "600", check=True)
    before = _tasks(daemon)
    shims = daemon.shim_pids()
    assert all(before[c]["status"] == "running" for c in ids)
    daemon.kill9()
    # The containers and shims do not notice.
    assert all(process_state(before[c]["pid"]) not in (None, "Z") for c in ids)  # type: ignore[arg-type]
    daemon.start()
    after = _tasks(daemon)
    assert sorted(after) == ids
    for cid in ids:
        assert after[cid]["status"] == "running"
        assert after[cid]["pid"] == before[cid]["pid"]
        assert after[cid]["shim_pid"] == shims[cid]
    # And they are fully usable through the new daemon.
    r = daemon.cli("tasks", "exec", "--exec-id", "after-restart", "c3", "echo", "still here")
    assert (r.returncode, r.stdout) == (0, b"still here\n")
    daemon.cli("tasks", "kill", "-s", "KILL", "c0", check=True)
    assert daemon.cli("tasks", "wait", "c0").stdout.strip() == b"137"
    for cid in ids:
        daemon.cli("tasks", "rm", "-f", cid, check=True)
    for cid in ids:
        wait_until(
            lambda c=cid: is_gone(before[c]["pid"]) and is_gone(shims[c]),
            what=f"{cid} and its shim reaped",
        )


def test_exit_while_daemon_is_down_is_reported_after_restart(daemon: Daemon) -> None:
    daemon.cli("run", "--busybox", "-d", "c-exit", "sh", "-c", "sleep 1; exit 7", check=True)
    before = time.time_ns()
    daemon.kill9()
    pid = int(Path(daemon.state, "tasks", daemon.namespace, "c-exit", "init.pid").read_text())
    wait_until(lambda: is_gone(pid), timeout=10, what="container to exit while berthd is down")
    daemon.start()
    # Resubscribing with `since` delivers what happened while the daemon was down.
    with daemon.client() as c:
        for envelope in c.stream(
            "events.subscribe",
            {
                "filters": [f'namespace=={daemon.namespace},topic=="/tasks/exit"'],
                "since": before,
            },
        ):
            assert envelope["event"]["container_id"] == "c-exit"
            assert envelope["event"]["exit_status"] == 7
            assert envelope["timestamp"] > before
            break
    assert _tasks(daemon)["c-exit"]["status"] == "stopped"
    assert daemon.cli("tasks", "wait", "c-exit").stdout.strip() == b"7"
    assert daemon.cli("tasks", "rm", "c-exit").stdout.strip() == b"c-exit 7"


def test_output_while_daemon_is_down_is_logged_completely(daemon: Daemon) -> None:
    daemon.cli(
        "run",
        "--busybox",
        "-d",
        "c-log",
        "sh",
        "-c",
        # paced (~3 s in all), so that most of it is written while berthd is down: unpaced,
        # it could all be logged before the kill, and the test would prove nothing
        "i=0; while [ $i -lt 100000 ]; do echo line-$i; i=$((i+1));"
        " [ $((i % 2000)) -eq 0 ] && sleep 0.06; done; sleep 600",
        check=True,
    )
    log = Path(daemon.state, "tasks", daemon.namespace, "c-log", "log", "stdout.log")
    wait_until(lambda: log.exists() and log.stat().st_size > 1000, what="first output")
    daemon.kill9()
    size_at_kill = log.stat().st_size
    # With the daemon gone, the container keeps writing: it never blocks on its output.
    wait_until(
        lambda: log.read_bytes().endswith(b"line-99999\n"),
        timeout=60,
        what="all output to reach the log while berthd is down",
    )
    assert log.stat().st_size > size_at_kill
    daemon.start()
    lines = log.read_bytes().splitlines()
    assert lines == [f"line-{i}".encode() for i in range(100000)]
    daemon.cli("tasks", "rm", "-f", "c-log", check=True)


def test_attached_client_survives_a_daemon_restart(daemon: Daemon) -> None:
    # A foreground `berth run` reads the shim's FIFOs directly: a daemon restart cuts
    # nothing; the client reconnects to wait and gets the exit status and every byte.
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    client = subprocess.Popen(
        [
            BERTH,
            "run",
            "--busybox",
            "--rm",
            "c-attached",
            "sh",
            "-c",
            "i=0; while [ $i -lt 40 ]; do echo tick-$i; i=$((i+1)); sleep 0.05; done; exit 3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_until(lambda: "c-attached" in daemon.shim_pids(), what="container to start")
        time.sleep(0.5)
        daemon.kill9()
        time.sleep(0.5)
        daemon.start()
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 3, err
    assert out.decode().split() == [f"tick-{i}" for i in range(40)]
    wait_until(
        lambda: daemon.call("containers.list")["containers"] == [],
        what="--rm to remove the container",
    )


def test_kill9_of_a_shim_reports_the_task_exited(daemon: Daemon) -> None:
    daemon.cli("run", "--busybox", "-d", "c-shim", "sleep", "600", check=True)
    task = _tasks(daemon)["c-shim"]
    shim = daemon.shim_pids()["c-shim"]
    os.kill(shim, 9)
    result = daemon.call("tasks.wait", {"container_id": "c-shim"})
    assert result["exit_status"] == 255  # containerd's "unknown": the shim took it along
    assert _tasks(daemon)["c-shim"]["status"] == "stopped"
    # No orphan keeps running unsupervised, and nothing is left a zombie.
    wait_until(lambda: is_gone(task["pid"]) and is_gone(shim), what="container and shim reaped")  # type: ignore[arg-type]
    # The same status after a daemon restart (the daemon wrote it down).
    daemon.restart()
    assert _tasks(daemon)["c-shim"]["exit_status"] == 255
    assert daemon.cli("tasks", "rm", "c-shim").stdout.strip() == b"c-shim 255"
    assert not Path(daemon.state, "tasks", daemon.namespace, "c-shim").exists()


def test_shim_killed_while_daemon_is_down(daemon: Daemon) -> None:
    daemon.cli("run", "--busybox", "-d", "c-both", "sleep", "600", check=True)
    task = _tasks(daemon)["c-both"]
    shim = daemon.shim_pids()["c-both"]
    daemon.kill9()
    os.kill(shim, 9)
    wait_until(lambda: is_gone(shim), what="shim reaped")
    daemon.start()
    after = _tasks(daemon)["c-both"]
    assert after["status"] == "stopped" and after["exit_status"] == 255
    wait_until(lambda: is_gone(task["pid"]), what="orphaned container killed")  # type: ignore[arg-type]
    daemon.cli("tasks", "rm", "c-both", check=True)


def _run_with_a_stopped_shim(daemon: Daemon, cid: str) -> tuple[int, int]:
    """A container running `sleep 1000` whose shim is SIGSTOPped (as an operator might, or
    as if stuck in the kernel): (its init's pid, its shim's pid). The caller resumes the
    shim, by pid, whatever happens."""
    daemon.cli("run", "--busybox", "-d", cid, "sleep", "1000", check=True)
    init = int(_tasks(daemon)[cid]["pid"])  # type: ignore[call-overload]
    shim = daemon.shim_pids()[cid]
    kill(shim, signal.SIGSTOP)
    wait_until(lambda: process_state(shim) == "T", what="shim stopped")
    return init, shim


def _topics_of(daemon: Daemon, cid: str, since: int) -> list[tuple[str, object]]:
    """The task events of `cid` published since `since` (ns), up to its delete:
    (topic, exit status)."""
    seen: list[tuple[str, object]] = []
    with daemon.client() as c:
        filters = [f'namespace=={daemon.namespace},topic~="^/tasks/",event.container_id=="{cid}"']
        for envelope in c.stream("events.subscribe", {"filters": filters, "since": since}):
            seen.append((envelope["topic"], envelope["event"].get("exit_status")))
            if envelope["topic"] == "/tasks/delete":
                return seen
    return seen


def test_forced_delete_of_a_task_whose_shim_does_not_answer(daemon: Daemon) -> None:
    """A shim that does not answer cannot hold a forced delete: berthd SIGKILLs it, kills
    and deletes the container through the runtime, and reports the exit 137 (berthd
    killed it; no exit file says otherwise)."""
    since = time.time_ns()
    init, shim = _run_with_a_stopped_shim(daemon, "c-stuck")
    try:
        began = time.monotonic()
        result = daemon.call("tasks.delete", {"container_id": "c-stuck", "force": True})
        took = time.monotonic() - began
        assert result["exit_status"] == 137, result
        assert took < SHIM_CALL_TIMEOUT + 20, took  # the shim's timeout, then bounded steps
        assert process_state(init) in (None, "Z")  # dead at once; reaped by its new parent
        assert "c-stuck" not in _tasks(daemon)
        assert daemon.container_pids() == []
        wait_until(lambda: is_gone(init) and is_gone(shim), what="container and shim reaped")
        assert not Path(daemon.state, "tasks", daemon.namespace, "c-stuck").exists()
        assert _topics_of(daemon, "c-stuck", since)[-2:] == [
            ("/tasks/exit", 137),
            ("/tasks/delete", 137),
        ]
        # Its container can have a task again.
        daemon.call("tasks.create", {"container_id": "c-stuck"})
        daemon.call("tasks.delete", {"container_id": "c-stuck"})
    finally:
        kill(shim, signal.SIGCONT)  # if berthd did not kill it; the fixture stops it then


def test_sigkill_reaches_a_container_whose_shim_does_not_answer(daemon: Daemon) -> None:
    """Kill with SIGKILL goes through the runtime when the shim does not answer (within
    the CLI's own deadline); another signal fails, saying why. The shim, once resumed,
    reports the container's real exit."""
    init, shim = _run_with_a_stopped_shim(daemon, "c-stuck")
    try:
        with pytest.raises(Unavailable, match=r"its shim \(pid \d+\) is not answering"):
            daemon.call("tasks.kill", {"container_id": "c-stuck", "signal": signal.SIGTERM})
        assert process_state(init) == "S"  # that signal was not delivered some other way
        began = time.monotonic()
        r = daemon.cli("tasks", "kill", "-s", "SIGKILL", "c-stuck")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - began < 30  # the CLI's deadline
        assert process_state(init) in (None, "Z")  # dead, left for its (stopped) shim to reap
        assert daemon.container_pids() == []
    finally:
        kill(shim, signal.SIGCONT)
    assert daemon.call("tasks.wait", {"container_id": "c-stuck"})["exit_status"] == 137
    wait_until(lambda: is_gone(init), what="container reaped by its shim")
    daemon.cli("tasks", "rm", "c-stuck", check=True)
    wait_until(lambda: is_gone(shim), what="shim exited")


def test_graceful_daemon_stop_leaves_containers_running(daemon: Daemon) -> None:
    daemon.cli("run", "--busybox", "-d", "c-term", "sleep", "600", check=True)
    pid = _tasks(daemon)["c-term"]["pid"]
    daemon.terminate()
    assert process_state(pid) not in (None, "Z")  # type: ignore[arg-type]
    daemon.start()
    assert _tasks(daemon)["c-term"]["status"] == "running"
    daemon.cli("tasks", "rm", "-f", "c-term", check=True)


def test_sigterm_during_recovery_leaves_every_shim_alive(daemon: Daemon) -> None:
    """Found by the soak: a SIGTERM that arrived while a restarted daemon was still
    reattaching closed the shim connections under the recovery, which took them for
    broken shims and killed them (their containers then reported 255)."""
    ids = [f"r{i}" for i in range(12)]
    for cid in ids:
        daemon.cli("run", "--busybox", "-d", cid, "sleep", "600", check=True)
    before = _tasks(daemon)
    shims = daemon.shim_pids()
    for _ in range(3):
        daemon.kill9()
        daemon.start()
        daemon.terminate()  # at once: recovery is usually still reattaching
        for cid in ids:
            assert process_state(shims[cid]) not in (None, "Z"), f"shim of {cid} was killed"
            assert process_state(before[cid]["pid"]) not in (None, "Z")  # type: ignore[arg-type]
    daemon.start()
    after = _tasks(daemon)
    assert all(after[c]["status"] == "running" for c in ids)
    assert "alive but unusable" not in daemon.log_text()
    for cid in ids:
        daemon.cli("tasks", "rm", "-f", cid, check=True)


def _shim_record(daemon: Daemon, cid: str) -> dict[str, object]:
    import json

    path = Path(daemon.state, "tasks", daemon.namespace, cid, "shim.json")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_daemon_killed_inside_delete_finishes_the_delete(daemon: Daemon) -> None:
    # Reproduce the window: the shim has deleted the task, the daemon died before it
    # removed the bundle. The restarted daemon must finish the delete and report no exit.
    from berth.shim.wire.client import Client

    daemon.cli("run", "--busybox", "-d", "c-del", "sh", "-c", "exit 2", check=True)
    assert daemon.cli("tasks", "wait", "c-del").stdout.strip() == b"2"
    record = _shim_record(daemon, "c-del")
    daemon.kill9()
    with Client(str(record["address"])) as shim:
        assert shim.call("delete")["exit_status"] == 2
        shim.call("shutdown")
    wait_until(lambda: is_gone(int(record["pid"])), what="the shim to exit")  # type: ignore[call-overload]
    before = time.time_ns()
    daemon.start()
    assert "c-del" not in _tasks(daemon)
    assert not Path(daemon.state, "tasks", daemon.namespace, "c-del").exists()
    # Everything published since the restart, up to a sentinel we publish ourselves: no
    # /tasks/exit (a deleted task must not be reported as exited with 255).
    sentinel = "sentinel-" + daemon.namespace
    topics = []
    with daemon.client() as c:
        stream = c.stream("events.subscribe", {"since": before})
        with daemon.client() as other:
            other.call("namespaces.create", {"name": sentinel})
        for envelope in stream:
            topics.append(envelope["topic"])
            if envelope["event"].get("name") == sentinel:
                break
    assert topics[-1] == "/namespaces/create" and "/tasks/exit" not in topics, topics
    daemon.call("namespaces.delete", {"name": sentinel})
    daemon.call("containers.delete", {"id": "c-del"})


def test_daemon_killed_between_shim_start_and_task_create(daemon: Daemon) -> None:
    # Reproduce the window with a shim started by hand in the daemon's layout, whose task
    # was never created: the restarted daemon stops it and forgets it.
    import sys

    from tests.support.helpers import BIN

    bundle = Path(daemon.state, "tasks", daemon.namespace, "c-half")
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    socket = os.path.join(daemon.state, "s", "half.sock")
    daemon.kill9()
    # The reaper lives as long as the shim: read the pid line, do not wait for EOF.
    reaper = subprocess.Popen(
        [
            sys.executable,
            str(REAPER),
            str(BIN / "berth-shim"),
            "--id",
            "c-half",
            "--namespace",
            daemon.namespace,
            "--bundle",
            str(bundle),
            "--socket",
            socket,
            "--detach",
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert reaper.stdout is not None
    line = reaper.stdout.readline()
    shim_pid = int(line) if line.strip() else 0
    try:
        assert shim_pid and process_state(shim_pid) not in (None, "Z")
        daemon.start()
        assert "c-half" not in _tasks(daemon)
        wait_until(lambda: process_state(shim_pid) in (None, "Z"), what="unused shim stopped")
        assert not bundle.exists()
    finally:
        if shim_pid and process_state(shim_pid) not in (None, "Z"):
            os.kill(shim_pid, 9)
        reaper.wait(timeout=10)


def test_wait_after_restart_for_an_exit_already_acknowledged(daemon: Daemon) -> None:
    # The exit was published and acknowledged before the restart, so it is not replayed:
    # the restarted daemon must still know it is final (a wait used to hang here).
    daemon.cli("run", "--busybox", "-d", "c-acked", "sh", "-c", "exit 3", check=True)
    assert daemon.cli("tasks", "wait", "c-acked").stdout.strip() == b"3"
    daemon.restart()
    r = daemon.cli("tasks", "wait", "c-acked", timeout=10)
    assert r.stdout.strip() == b"3"
    daemon.cli("tasks", "rm", "c-acked", check=True)


def test_delete_is_idempotent_when_the_shim_already_deleted(daemon: Daemon) -> None:
    from berth.shim.wire.client import Client

    daemon.cli("run", "--busybox", "-d", "c-twice", "sh", "-c", "exit 0", check=True)
    daemon.cli("tasks", "wait", "c-twice", check=True)
    record = _shim_record(daemon, "c-twice")
    with Client(str(record["address"])) as shim:  # as if an earlier delete was cut short
        shim.call("delete")
    r = daemon.cli("tasks", "rm", "c-twice")
    assert r.returncode == 0, r.stderr
    assert "c-twice" not in _tasks(daemon)
    wait_until(lambda: is_gone(int(record["pid"])), what="shim stopped")  # type: ignore[call-overload]


def _soft_fd_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError(f"no open files limit for {pid}")


def test_a_restart_with_a_low_soft_fd_limit_still_supervises_every_task(daemon: Daemon) -> None:
    """berthd raises its soft limit of open files to the hard one, as Go does for
    containerd: restarted at a soft 64 with 40 tasks (each costs it a shim socket and a
    pidfd), it used to give up supervising most of them ("Too many open files"), and
    their exits were never reported. Shims keep the limit berthd was started with."""
    count = 40
    for i in range(count):
        daemon.cli("run", "--busybox", "-d", f"fd{i}", "sleep", "1000", check=True)
    daemon.kill9()
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard >= 1024, "this test needs a hard limit of open files of 1024 at least"
    daemon.command_prefix = ["prlimit", f"--nofile=64:{hard}", "--"]
    daemon.start()
    wait_until(lambda: daemon.call("introspection.server")["recovered"], what="recovery")
    assert _soft_fd_limit(daemon.pid) == hard
    assert len(_tasks(daemon)) == count
    for i in (0, count // 2, count - 1):
        cid = f"fd{i}"
        daemon.call("tasks.kill", {"container_id": cid, "signal": signal.SIGKILL})
        wait_until(
            lambda cid=cid: _tasks(daemon)[cid]["status"] == "stopped",
            timeout=20,
            what=f"the exit of {cid} reported",
        )
        assert daemon.call("tasks.wait", {"container_id": cid})["exit_status"] == 137
    daemon.cli("run", "--busybox", "-d", "fd-new", "sleep", "1000", check=True)
    shim = _shim_record(daemon, "fd-new")["pid"]
    assert isinstance(shim, int) and _soft_fd_limit(shim) == 64


def test_a_live_shim_whose_record_is_corrupt_is_found_again(daemon: Daemon) -> None:
    """shim.json garbled while berthd was down: the shim, found at its task's socket, says
    who it is; the task is supervised again (an exit is reported) and its record is
    written again. It used to be skipped: the container ran on, invisible, for ever."""
    daemon.cli("run", "--busybox", "-d", "garbled", "sleep", "1000", check=True)
    before = _shim_record(daemon, "garbled")
    daemon.kill9()
    record = Path(daemon.state, "tasks", daemon.namespace, "garbled", "shim.json")
    record.write_text("garbage{")
    daemon.start()
    wait_until(lambda: daemon.call("introspection.server")["recovered"], what="recovery")
    assert _tasks(daemon)["garbled"]["status"] == "running"
    assert _shim_record(daemon, "garbled") == before
    daemon.call("tasks.kill", {"container_id": "garbled", "signal": signal.SIGKILL})
    assert daemon.call("tasks.wait", {"container_id": "garbled"})["exit_status"] == 137
    daemon.cli("tasks", "rm", "garbled", check=True)
    wait_until(lambda: is_gone(int(str(before["pid"]))), what="the shim to exit")


def test_a_bundle_whose_shim_still_answers_is_never_removed_by_a_create(daemon: Daemon) -> None:
    """A bundle berthd does not know, whose task's socket still has a listener, is not a
    leftover: a create of that id is refused and removes nothing."""
    import hashlib
    import socket

    bundle = Path(daemon.state, "tasks", daemon.namespace, "stranded")
    bundle.mkdir(parents=True)
    (bundle / "shim.json").write_text("garbage{")
    digest = hashlib.sha256(f"{daemon.namespace}/stranded".encode()).hexdigest()[:24]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(Path(daemon.state, "s", f"{digest}.sock")))
        listener.listen(8)
        done = daemon.cli("run", "--busybox", "stranded", "true")
        assert done.returncode != 0
        assert b"its shim still runs" in done.stderr
        assert (bundle / "shim.json").read_text() == "garbage{"
    finally:
        listener.close()
    daemon.cli("containers", "rm", "stranded", check=False)
