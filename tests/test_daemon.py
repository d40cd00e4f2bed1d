"""berthd + shims + the berth CLI on real runc (and crun) containers."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import select
import signal
import stat
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from berth.daemon.filters import parse_event_filters
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.support.helpers import BERTH, Daemon, is_gone, wait_until


def run_in_pty(
    daemon: Daemon,
    args: list[str],
    rows: int = 33,
    cols: int = 101,
    send: bytes = b"",
    timeout: float = 30,
) -> tuple[int, bytes]:
    """Run the CLI with a real terminal as its stdio; return (exit code, terminal output)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    proc = subprocess.Popen(
        [BERTH, *args], stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    if send:
        os.write(master, send)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                output += data
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), bytes(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_run_echo_and_exit_codes(daemon: Daemon) -> None:
    r = daemon.cli("run", "--busybox", "--rm", "c-echo", "sh", "-c", "echo hello; echo oops >&2")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hello\n", b"oops\n")
    assert daemon.cli("run", "--busybox", "--rm", "c-three", "sh", "-c", "exit 3").returncode == 3
    # --rm removed both task and container
    assert daemon.call("containers.list")["containers"] == []
    assert daemon.call("tasks.list")["tasks"] == []


def test_sigkill_reports_137_and_leaves_no_process(daemon: Daemon) -> None:
    assert daemon.cli("run", "--busybox", "-d", "c-kill", "sleep", "300").returncode == 0
    task = daemon.call("tasks.get", {"container_id": "c-kill"})
    assert task["status"] == "running"
    shim = daemon.shim_pids()["c-kill"]
    assert daemon.cli("tasks", "kill", "-s", "SIGKILL", "c-kill").returncode == 0
    r = daemon.cli("tasks", "wait", "c-kill")
    assert r.stdout.strip() == b"137"
    assert daemon.cli("tasks", "rm", "c-kill").stdout.strip() == b"c-kill 137"
    assert daemon.cli("containers", "rm", "c-kill").returncode == 0
    wait_until(lambda: is_gone(task["pid"]) and is_gone(shim), what="container and shim reaped")


def test_terminal_run(daemon: Daemon) -> None:
    code, out = run_in_pty(
        daemon,
        ["run", "--busybox", "--rm", "-t", "c-tty", "sh", "-c", "tty; stty size; exit 5"],
        rows=33,
        cols=101,
    )
    assert code == 5, out
    assert b"/dev/pts/0" in out and b"33 101" in out, out


def test_signals_to_an_attached_run_reach_the_container(daemon: Daemon) -> None:
    """`berth run` (attached) passes SIGTERM, SIGINT and SIGHUP on to the container's
    process and exits with its status."""
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    for number, signo in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
        script = f'trap "exit {70 + number}" {signo.name[3:]}; echo ready; '
        script += "while true; do sleep 0.1; done"
        cli = subprocess.Popen(
            [BERTH, "run", "--busybox", "--rm", f"c-sig{number}", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert cli.stdout is not None
            assert cli.stdout.readline() == b"ready\n"
            cli.send_signal(signo)
            assert cli.wait(timeout=30) == 70 + number, cli.stderr.read() if cli.stderr else ""
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
            for stream in (cli.stdout, cli.stderr):
                if stream is not None:
                    stream.close()


def test_exec_into_a_running_container(daemon: Daemon) -> None:
    daemon.cli("run", "--busybox", "-d", "c-exec", "sleep", "300", check=True)
    r = daemon.cli(
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "c-exec",
        "sh",
        "-c",
        "echo inside $$; cat /proc/1/cmdline; exit 4",
    )
    assert r.returncode == 4
    assert r.stdout.startswith(b"inside ") and b"sleep" in r.stdout
    code, out = run_in_pty(
        daemon,
        ["tasks", "exec", "-t", "--exec-id", "e2", "c-exec", "sh", "-c", "stty size; tty"],
        rows=20,
        cols=70,
    )
    assert code == 0 and b"20 70" in out, out
    # exec processes are gone from the task once their exit was collected
    assert daemon.call("tasks.get", {"container_id": "c-exec"})["execs"] == []
    daemon.cli("tasks", "rm", "-f", "c-exec", check=True)


def test_pause_resume_and_metrics(daemon: Daemon) -> None:
    daemon.cli(
        "run",
        "--busybox",
        "-d",
        "c-pause",
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done",
        check=True,
    )
    log = Path(daemon.state, "tasks", daemon.namespace, "c-pause", "log", "stdout.log")
    wait_until(lambda: log.exists() and log.stat().st_size > 0, what="output")
    daemon.cli("tasks", "pause", "c-pause", check=True)
    assert daemon.call("tasks.get", {"container_id": "c-pause"})["status"] == "paused"
    size = log.stat().st_size
    time.sleep(0.5)
    assert log.stat().st_size == size  # frozen: nothing written
    with pytest.raises(FailedPrecondition):
        daemon.call("tasks.pause", {"container_id": "c-pause"})
    daemon.cli("tasks", "resume", "c-pause", check=True)
    wait_until(lambda: log.stat().st_size > size, what="output after resume")
    metrics = daemon.call("tasks.metrics", {"container_id": "c-pause"})
    assert metrics["memory"]["usage"] > 0 and metrics["pids"]["current"] >= 1
    assert metrics["cpu"]["usage_ns"] > 0
    pids = daemon.call("tasks.pids", {"container_id": "c-pause"})["processes"]
    assert daemon.call("tasks.get", {"container_id": "c-pause"})["pid"] in [p["pid"] for p in pids]
    daemon.call(
        "tasks.update",
        {"container_id": "c-pause", "resources": {"memory": {"limit": 64 * 1024 * 1024}}},
    )
    assert daemon.call("tasks.metrics", {"container_id": "c-pause"})["memory"]["limit"] == 64 << 20
    daemon.cli("tasks", "rm", "-f", "c-pause", check=True)


def test_tasks_pids_lists_every_process_of_the_cgroup_and_names_the_execs(daemon: Daemon) -> None:
    """`tasks.pids` is the container's whole cgroup, each exec's process named by its id
    (the shim sends the list packed, 4 bytes a pid; berthd expands it)."""
    daemon.cli(
        "run",
        "--busybox",
        "-d",
        "c-many",
        "sh",
        "-c",
        "i=0; while [ $i -lt 300 ]; do sleep 1000 & i=$((i+1)); done; wait",
        check=True,
    )
    init = daemon.call("tasks.get", {"container_id": "c-many"})["pid"]
    lines = dict(
        line.split(":", 2)[1:] for line in Path(f"/proc/{init}/cgroup").read_text().splitlines()
    )
    if "pids" in lines:  # cgroup v1 (or hybrid): the pids hierarchy
        procs = Path("/sys/fs/cgroup/pids" + lines["pids"], "cgroup.procs")
    else:
        procs = Path("/sys/fs/cgroup" + lines[""], "cgroup.procs")

    def in_cgroup() -> set[int]:
        return {int(line) for line in procs.read_text().split()}

    with daemon.client() as c:
        c.call(
            "tasks.exec",
            {
                "container_id": "c-many",
                "exec_id": "e-ps",
                "spec": {"args": ["/bin/sleep", "1000"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            },
        )
        c.call("tasks.start", {"container_id": "c-many", "exec_id": "e-ps"})
        exec_pid = c.call("tasks.get", {"container_id": "c-many", "exec_id": "e-ps"})["pid"]
        wait_until(lambda: len(in_cgroup()) == 302, what="300 sleeps, the shell and the exec")
        listed = c.call("tasks.pids", {"container_id": "c-many"})["processes"]
        assert {p["pid"] for p in listed} == in_cgroup()
        assert len(listed) == 302
        named = {p["pid"]: p["exec_id"] for p in listed if p["exec_id"]}
        assert named == {exec_pid: "e-ps"}
        assert init in {p["pid"] for p in listed}
    # A daemon of an older berth (a rollback) asks without `packed`: the list itself.
    from berth.shim.wire.client import Client

    digest = hashlib.sha256(f"{daemon.namespace}/c-many".encode()).hexdigest()[:24]
    with Client(os.path.join(daemon.state, "s", f"{digest}.sock")) as shim:
        legacy = shim.call("pids")["processes"]
    assert sorted(legacy, key=lambda p: p["pid"]) == sorted(listed, key=lambda p: p["pid"])
    daemon.cli("tasks", "rm", "-f", "c-many", check=True)


def test_detached_logs_are_on_disk_under_the_root_and_go_with_their_task(daemon: Daemon) -> None:
    """`run -d`'s log files live in the root dir (the state dir is a tmpfs: RAM), reached
    through the bundle's `log` link; a task's delete removes them, and a restart removes
    logs whose task is gone (a reboot empties the state dir)."""
    orphan = Path(daemon.root, "logs", daemon.namespace, "gone")
    orphan.mkdir(parents=True)
    (orphan / "stdout.log").write_bytes(b"from before a reboot\n")
    daemon.restart()
    assert not orphan.exists()

    daemon.cli("run", "--busybox", "-d", "c-disklog", "sh", "-c", "echo on-disk; sleep 1000")
    logs = Path(daemon.root, "logs", daemon.namespace, "c-disklog")
    link = Path(daemon.state, "tasks", daemon.namespace, "c-disklog", "log")
    assert link.is_symlink() and os.readlink(link) == str(logs)
    wait_until(lambda: (logs / "stdout.log").exists(), what="the log file")
    wait_until(lambda: (logs / "stdout.log").read_bytes() == b"on-disk\n", what="output")
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    daemon.cli("tasks", "rm", "-f", "c-disklog", check=True)
    assert not logs.exists() and not link.parent.exists()

    # A link that does not name this task's logs is never followed by the removal.
    daemon.cli("run", "--busybox", "-d", "c-badlink", "sleep", "1000", check=True)
    bait = Path(daemon.dir, "bait")
    bait.mkdir()
    (bait / "keep").write_bytes(b"x")
    link = Path(daemon.state, "tasks", daemon.namespace, "c-badlink", "log")
    real = Path(os.readlink(link))
    link.unlink()
    link.symlink_to(bait)
    daemon.cli("tasks", "rm", "-f", "c-badlink", check=True)
    assert (bait / "keep").exists()
    daemon.restart()  # the real logs, left by the refused link, are an orphan now
    assert not real.exists()


def test_close_stdin(daemon: Daemon) -> None:
    # `cat` ends only when its stdin reaches EOF: CloseIO must deliver exactly that.
    stdin_fifo = os.path.join(daemon.dir, "stdin")
    stdout_fifo = os.path.join(daemon.dir, "stdout")
    os.mkfifo(stdin_fifo)
    os.mkfifo(stdout_fifo)
    spec = _spec(daemon, "c-stdin", ["cat"])
    daemon.call("containers.create", {"id": "c-stdin", "spec": spec})
    daemon.call(
        "tasks.create", {"container_id": "c-stdin", "stdin": stdin_fifo, "stdout": stdout_fifo}
    )
    writer = os.open(stdin_fifo, os.O_WRONLY)
    reader = os.open(stdout_fifo, os.O_RDONLY)
    daemon.call("tasks.start", {"container_id": "c-stdin"})
    os.write(writer, b"ping\n")
    assert os.read(reader, 100) == b"ping\n"
    # A client attaches by the FIFOs the task reports (containerd's Task.Get, `ctr tasks
    # attach`), and so does one after a daemon restart: the shim's record gives them back.
    stdio = {"stdin": stdin_fifo, "stdout": stdout_fifo}
    got = daemon.call("tasks.get", {"container_id": "c-stdin"})
    assert {k: got.get(k) for k in stdio} == stdio and not got.get("terminal")
    daemon.kill9()
    daemon.start()
    got = daemon.call("tasks.get", {"container_id": "c-stdin"})
    assert {k: got.get(k) for k in stdio} == stdio
    os.write(writer, b"pong\n")
    assert os.read(reader, 100) == b"pong\n"
    # The client keeps its writer open; only close_io can end cat.
    daemon.call("tasks.close_io", {"container_id": "c-stdin", "stdin": True})
    result = daemon.call("tasks.wait", {"container_id": "c-stdin"})
    assert result["exit_status"] == 0
    assert os.read(reader, 100) == b""
    os.close(writer)
    os.close(reader)
    daemon.call("tasks.delete", {"container_id": "c-stdin"})


def test_pty_resize_is_visible_inside(daemon: Daemon) -> None:
    daemon.cli(
        "run",
        "--busybox",
        "-d",
        "-t",
        "c-resize",
        "sh",
        "-c",
        'trap "stty size" WINCH; echo ready; while true; do sleep 0.05; done',
        check=True,
    )
    log = Path(daemon.state, "tasks", daemon.namespace, "c-resize", "log", "stdout.log")
    wait_until(lambda: log.exists() and b"ready" in log.read_bytes(), what="container ready")
    daemon.call("tasks.resize", {"container_id": "c-resize", "width": 123, "height": 45})
    wait_until(lambda: b"45 123" in log.read_bytes(), what="resize seen inside")
    daemon.cli("tasks", "rm", "-f", "c-resize", check=True)


def test_same_container_under_crun(crun_daemon: Daemon) -> None:
    r = crun_daemon.cli(
        "run",
        "--busybox",
        "--rm",
        "--runtime",
        "crun",
        "c-crun",
        "sh",
        "-c",
        "echo from crun; exit 6",
    )
    assert (r.returncode, r.stdout) == (6, b"from crun\n"), r.stderr
    crun_daemon.cli(
        "run", "--busybox", "-d", "--runtime", "crun", "c-crun2", "sleep", "300", check=True
    )
    r = crun_daemon.cli("tasks", "exec", "--exec-id", "e", "c-crun2", "echo", "exec-crun")
    assert (r.returncode, r.stdout) == (0, b"exec-crun\n"), r.stderr
    crun_daemon.cli("tasks", "pause", "c-crun2", check=True)
    crun_daemon.cli("tasks", "resume", "c-crun2", check=True)
    crun_daemon.cli("tasks", "kill", "-s", "KILL", "c-crun2", check=True)
    assert crun_daemon.cli("tasks", "wait", "c-crun2").stdout.strip() == b"137"
    crun_daemon.cli("tasks", "rm", "c-crun2", check=True)


def test_events_stream(daemon: Daemon) -> None:
    seen: list[dict[str, Any]] = []
    subscribed = threading.Event()

    def listen() -> None:
        with daemon.client() as c:
            stream = c.stream(
                "events.subscribe",
                {"filters": [f"namespace=={daemon.namespace},topic~=|^/tasks/|"]},
            )
            subscribed.set()
            for envelope in stream:
                seen.append(envelope)
                if envelope["topic"] == "/tasks/delete":
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    subscribed.wait(5)
    time.sleep(0.2)
    assert daemon.cli("run", "--busybox", "--rm", "c-ev", "sh", "-c", "exit 9").returncode == 9
    thread.join(10)
    topics = [e["topic"] for e in seen]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], topics
    exit_event = seen[2]["event"]
    assert exit_event["container_id"] == "c-ev" and exit_event["exit_status"] == 9
    # containerd's TaskDelete of a task names no process: no `id` (so `event.id==c-ev`
    # matches it on neither)
    deleted = seen[3]["event"]
    assert deleted["container_id"] == "c-ev" and "id" not in deleted, deleted
    assert not parse_event_filters(["event.id==c-ev"])(seen[3])


def test_a_clients_event_reaches_subscribers_unchanged(daemon: Daemon) -> None:
    """events.publish (containerd's Publish, and Forward with an envelope's namespace and
    time): a subscriber that asks for them (with_published, as berth-grpc and the CLI do)
    gets the event as published, marked; one that does not ask never sees it; bad topics,
    namespaces and payloads are InvalidArgument; a forged /tasks/exit moves nothing of
    berthd's own (its network release follows exits, and used to fail for good on one)."""
    ns = daemon.namespace
    first, last = "m1" + ns[2:], "m2" + ns[2:]
    before = time.time_ns()
    daemon.call("namespaces.create", {"name": first})  # replayed: marks the subscription live
    seen: list[dict[str, Any]] = []
    subscribed = threading.Event()

    unasked: list[dict[str, Any]] = []
    unasked_subscribed = threading.Event()

    def listen(into: list[dict[str, Any]], ready: threading.Event, published: bool) -> None:
        with daemon.client() as c:
            filters = ['topic~="^/(probe|tasks)/"'] + [
                f'topic=="/namespaces/create",event.name=={name}' for name in (first, last)
            ]
            params = {"since": before, "filters": filters, "with_published": published}
            for envelope in c.stream("events.subscribe", params):
                marker = envelope["event"].get("name") if "published" not in envelope else None
                if marker == first:
                    ready.set()
                    continue
                into.append(envelope)
                if marker == last:
                    return

    threads = [  # each ends with the daemon at worst
        threading.Thread(target=listen, args=(seen, subscribed, True), daemon=True),
        threading.Thread(target=listen, args=(unasked, unasked_subscribed, False), daemon=True),
    ]
    for thread in threads:
        thread.start()
    # the first marker comes from the history, so the subscription exists once it arrives
    assert subscribed.wait(10) and unasked_subscribed.wait(10)
    daemon.call("events.publish", {"topic": "/probe/x", "type_url": "t/x", "value": "AAEC"})
    daemon.call(
        "events.publish",
        {
            "topic": "/probe/fwd",
            "type_url": "t/y",
            "namespace": "elsewhere",
            "timestamp": 1_700_000_000_123_456_789,
        },
    )
    bad: list[dict[str, Any]] = [
        {"topic": "probe", "type_url": "t"},
        {"topic": "/a//b", "type_url": "t"},
        {"topic": "/probe/x", "type_url": "t", "value": "not base64!"},
        {"topic": "/probe/x", "type_url": "t", "value": "A" * 30_000},
        {"topic": "/probe/x", "type_url": "t", "namespace": "-bad"},
        {"topic": "/probe/x", "type_url": "t", "timestamp": -1},
    ]
    for params in bad:
        with pytest.raises(InvalidArgument):
            daemon.call("events.publish", params)
    daemon.call("events.publish", {"topic": "/tasks/exit", "type_url": "forged"})
    daemon.call("namespaces.create", {"name": last})
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "the last marker never came"
    assert [(e["namespace"], e["topic"]) for e in seen] == [
        (ns, "/probe/x"),
        ("elsewhere", "/probe/fwd"),
        (ns, "/tasks/exit"),
        (ns, "/namespaces/create"),  # the caller's namespace, as containerd stamps it
    ]
    assert [(e["namespace"], e["topic"]) for e in unasked] == [(ns, "/namespaces/create")]
    assert seen[0]["event"] == {"type_url": "t/x", "value": "AAEC"} and seen[0]["published"]
    assert seen[1]["timestamp"] == 1_700_000_000_123_456_789
    assert seen[2]["published"] and "seq" not in seen[2] and "published" not in seen[3]
    assert daemon.call("version")  # up
    log = Path(daemon.logs[-1]).read_text()
    assert "network release failed" not in log, log[-3000:]


def test_namespaces_isolate_objects(daemon: Daemon) -> None:
    with daemon.client("other") as other:
        other.call("containers.create", {"id": "same", "spec": _spec(daemon, "same", ["true"])})
    daemon.call("containers.create", {"id": "same", "spec": _spec(daemon, "same", ["true"])})
    with daemon.client("other") as other:
        assert [c["id"] for c in other.call("containers.list")["containers"]] == ["same"]
        with pytest.raises(FailedPrecondition):
            other.call("namespaces.delete", {"name": "other"})
        other.call("containers.delete", {"id": "same"})
        other.call("namespaces.delete", {"name": "other"})
    with pytest.raises(NotFound):
        daemon.call("namespaces.get", {"name": "other"})
    r = daemon.cli("containers", "ls", "--format", "json")
    assert b'"id": "same"' in r.stdout


def _spec(daemon: Daemon, cid: str, args: list[str]) -> dict[str, Any]:
    from berth.daemon.oci import default_spec

    return default_spec(cid, daemon.namespace, args, root="", readonly_root=True)


def test_oom_kill_is_reported(daemon: Daemon) -> None:
    from berth.daemon.oci import default_spec

    spec = default_spec(
        "c-oom",
        daemon.namespace,
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
        root="",
        readonly_root=True,
    )
    spec["linux"]["resources"]["memory"] = {"limit": 32 * 1024 * 1024, "swap": 32 * 1024 * 1024}
    seen: list[str] = []
    with daemon.client() as c:
        stream = c.stream(
            "events.subscribe",
            {"filters": [f'namespace=={daemon.namespace},topic~="^/tasks/(oom|exit)$"']},
        )
        with daemon.client() as other:
            other.call("containers.create", {"id": "c-oom", "spec": spec})
            other.call("tasks.create", {"container_id": "c-oom"})
            other.call("tasks.start", {"container_id": "c-oom"})
        for envelope in stream:
            seen.append(envelope["topic"])
            if envelope["topic"] == "/tasks/exit":
                assert envelope["event"]["exit_status"] == 137
                break
    assert seen == ["/tasks/oom", "/tasks/exit"], seen
    daemon.call("tasks.delete", {"container_id": "c-oom"})


def test_attach_follows_a_detached_task(daemon: Daemon) -> None:
    daemon.cli(
        "run",
        "--busybox",
        "-d",
        "c-att",
        "sh",
        "-c",
        "echo first; sleep 1; echo second; exit 4",
        check=True,
    )
    r = daemon.cli("tasks", "attach", "c-att")
    assert r.returncode == 4
    assert r.stdout == b"first\nsecond\n"
    daemon.cli("tasks", "rm", "c-att", check=True)


def test_attach_follows_the_log_across_rotations_and_on_stderr() -> None:
    """`tasks attach` to a detached task whose log rotates while it follows it: every
    line once, in order, and its stderr too. It read on in the file it had opened, renamed
    to stdout.log.1 at the first rotation, and never read stderr.log."""
    daemon = Daemon(extra_config="[container_log]\nmax_size = 8192\nmax_files = 50\n")
    try:
        script = "sleep 1; seq 1 6000; echo on-stderr >&2; exit 4"  # ~29 KB: 3 rotations
        daemon.cli("run", "--busybox", "-d", "c-rot", "sh", "-c", script, check=True)
        r = daemon.cli("tasks", "attach", "c-rot")
        assert r.returncode == 4, r.stderr
        assert r.stdout.split() == [str(n).encode() for n in range(1, 6001)]
        assert r.stderr == b"on-stderr\n"
        assert any(name.endswith(".log.3") for name in os.listdir(next(daemon.task_dirs()) / "log"))
    finally:
        daemon.cleanup()


def test_a_dead_zygote_is_replaced(daemon: Daemon) -> None:
    import psutil

    daemon_proc = psutil.Process(daemon.pid)

    def find() -> list[psutil.Process]:
        return [p for p in daemon_proc.children() if "zygote" in " ".join(p.cmdline())]

    zygotes = wait_until(find, what="the zygote (started right after the socket opens)")
    assert len(zygotes) == 1
    zygotes[0].kill()
    zygotes[0].wait(5)
    r = daemon.cli("run", "--busybox", "--rm", "c-zyg", "echo", "new zygote")
    assert (r.returncode, r.stdout) == (0, b"new zygote\n"), r.stderr
    assert len([p for p in daemon_proc.children() if "zygote" in " ".join(p.cmdline())]) == 1


def test_cli_and_shim_do_not_import_trio() -> None:
    import pkgutil
    import subprocess
    import sys

    import berth.daemon.cli

    cli = [f"berth.daemon.cli.{m.name}" for m in pkgutil.iter_modules(berth.daemon.cli.__path__)]
    assert len(cli) > 10
    for module in (*cli, "berth.shim.main", "berth.shim.zygote"):
        code = f"import sys, {module}; sys.exit('trio' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0, module


def test_an_exec_that_cannot_start_is_final(daemon: Daemon) -> None:
    from berth.shim.wire.errors import FailedPrecondition as Failed

    daemon.cli("run", "--busybox", "-d", "c-badexec", "sleep", "300", check=True)
    with daemon.client() as c:
        c.call(
            "tasks.exec",
            {
                "container_id": "c-badexec",
                "exec_id": "nope",
                "spec": {"args": ["/no/such/binary"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            },
        )
        with pytest.raises(Failed, match="runc exec failed"):
            c.call("tasks.start", {"container_id": "c-badexec", "exec_id": "nope"})
        assert (
            c.call("tasks.wait", {"container_id": "c-badexec", "exec_id": "nope"})["exit_status"]
            == 255
        )
        c.call("tasks.delete_process", {"container_id": "c-badexec", "exec_id": "nope"})
        # the exec id is free again, and the task still works
        r = daemon.cli("tasks", "exec", "--exec-id", "nope", "c-badexec", "echo", "ok")
        assert (r.returncode, r.stdout) == (0, b"ok\n")
    daemon.cli("tasks", "rm", "-f", "c-badexec", check=True)


def test_an_exec_whose_start_is_refused_can_start_later_with_its_own_status(
    daemon: Daemon,
) -> None:
    """A start the shim refuses before running anything (the task is paused; the shim short
    of descriptors or busy) leaves the exec created there. berthd marked it exited 255
    all the same: started once the task was resumed, it ran, and its wait said 255."""
    daemon.cli("run", "--busybox", "-d", "c-refused", "sleep", "300", check=True)
    spec = {"args": ["/bin/sh", "-c", "exit 3"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    with daemon.client() as c:
        c.call("tasks.exec", {"container_id": "c-refused", "exec_id": "later", "spec": spec})
        c.call("tasks.pause", {"container_id": "c-refused"})
        with pytest.raises(FailedPrecondition, match="paused"):
            c.call("tasks.start", {"container_id": "c-refused", "exec_id": "later"})
        got = c.call("tasks.get", {"container_id": "c-refused", "exec_id": "later"})
        assert got["status"] == "created"
        c.call("tasks.resume", {"container_id": "c-refused"})
        c.call("tasks.start", {"container_id": "c-refused", "exec_id": "later"})
        waited = c.call("tasks.wait", {"container_id": "c-refused", "exec_id": "later"})
        assert waited["exit_status"] == 3
    daemon.cli("tasks", "rm", "-f", "c-refused", check=True)


def test_an_exec_runs_in_a_created_task_before_its_start(daemon: Daemon) -> None:
    """As containerd (and runc) allow: a task created but not started takes an exec,
    which runs in its namespaces and exits with its own status; the task then starts."""
    daemon.cli("containers", "create", "--busybox", "c-early", "sh", "-c", "exit 7", check=True)
    spec = {"args": ["/bin/sh", "-c", "exit 4"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    with daemon.client() as c:
        c.call("tasks.create", {"container_id": "c-early"})
        assert c.call("tasks.get", {"container_id": "c-early"})["status"] == "created"
        c.call("tasks.exec", {"container_id": "c-early", "exec_id": "early", "spec": spec})
        c.call("tasks.start", {"container_id": "c-early", "exec_id": "early"})
        waited = c.call("tasks.wait", {"container_id": "c-early", "exec_id": "early"})
        assert waited["exit_status"] == 4
        assert c.call("tasks.get", {"container_id": "c-early"})["status"] == "created"
        c.call("tasks.start", {"container_id": "c-early"})
        assert c.call("tasks.wait", {"container_id": "c-early"})["exit_status"] == 7
        c.call("tasks.delete", {"container_id": "c-early"})
    daemon.cli("containers", "rm", "c-early", check=True)


def test_immortalize_makes_objects_immortal_on_the_shim_interpreter() -> None:
    """On CPython 3.12+ (the shims' interpreter when set-up found one) the zygote's objects
    become immortal: their reference counts no longer move; on 3.11 nothing is touched."""
    from tests.support.helpers import shim_python

    code = """
import sys
from berth.shim import zygote
held = {"key": ["a", "list", 12345678901234567890], "t": (object(),)}
before = sys.getrefcount(held["key"])
count = zygote.immortalize()
supported = zygote.immortal_objects_supported()
after = sys.getrefcount(held["key"])
extra = [held["key"] for _ in range(1000)]
moved = sys.getrefcount(held["key"]) - after
del extra
print(supported, count > 10000, before < 100, after > 2**30, moved)
"""
    out = subprocess.run([shim_python(), "-c", code], capture_output=True, text=True, check=True)
    supported, many, small, huge, moved = out.stdout.split()
    if supported == "True":
        assert (many, small, huge, moved) == ("True", "True", "True", "0"), out.stdout
    else:
        assert (many, huge, moved) == ("False", "False", "1000"), out.stdout


def test_a_shim_s_memory_stays_flat_over_thousands_of_calls(daemon: Daemon) -> None:
    """resize, exec and a fresh connection (an attach, as a restarted daemon makes) over
    and over: the shim's private memory (USS) must not grow with them - an immortal
    zygote object that a call freed, or a page copied per call, would show here."""
    import hashlib

    import psutil

    from berth.shim.wire.client import Client

    daemon.cli(
        "run",
        "--busybox",
        "-d",
        "-t",
        "c-flat",
        "sh",
        "-c",
        "while :; do sleep 1; done",
        check=True,
    )
    shim = psutil.Process(daemon.shim_pids()["c-flat"])
    digest = hashlib.sha256(f"{daemon.namespace}/c-flat".encode()).hexdigest()[:24]
    shim_socket = os.path.join(daemon.state, "s", f"{digest}.sock")

    def rounds(n: int) -> None:
        with daemon.client() as c:
            for i in range(n):
                c.call(
                    "tasks.resize", {"container_id": "c-flat", "width": 80 + i % 40, "height": 24}
                )
                if i % 20 == 0:
                    exec_id = f"e{i}"
                    spec = {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
                    c.call(
                        "tasks.exec", {"container_id": "c-flat", "exec_id": exec_id, "spec": spec}
                    )
                    c.call("tasks.start", {"container_id": "c-flat", "exec_id": exec_id})
                    c.call("tasks.wait", {"container_id": "c-flat", "exec_id": exec_id})
                    c.call("tasks.delete_process", {"container_id": "c-flat", "exec_id": exec_id})
                if i % 5 == 0:
                    with Client(shim_socket, timeout=10) as direct:
                        direct.call("state", {})

    rounds(300)  # warm-up: first-time allocations, caches
    warm = shim.memory_full_info().uss
    rounds(3000)
    grown = shim.memory_full_info().uss - warm
    print(
        f"\nshim USS {warm / 2**20:.2f} MiB after warm-up, "
        f"{grown / 1024:+.0f} KiB after 3000 rounds"
    )
    assert grown < 512 * 1024, grown
    daemon.cli("tasks", "rm", "-f", "c-flat", check=True)


def test_an_attached_run_s_output_waits_in_a_pipe_nobody_reads_yet(daemon: Daemon) -> None:
    """`berth run` into a pipe its consumer reads only later: every line is there, and the
    CLI did not wait on the pipe. Spliced, each line took one of the pipe's 16 buffers: the
    copy blocked after 16 lines, drain gave up after 10 s and the rest was lost."""
    script = "for i in $(seq 1 40); do echo $i; sleep 0.05; done; exit 3"  # a write each
    with _cli_into_a_pipe(daemon, "run", "--busybox", "--rm", "c-unread", "sh", "-c", script) as (
        proc,
        stdout,
    ):
        assert proc.wait(timeout=8) == 3  # nothing read from its stdout yet
        assert stdout.read().split() == [str(n).encode() for n in range(1, 41)]


@contextlib.contextmanager
def _cli_into_a_pipe(
    daemon: Daemon, *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """The CLI with its stdout a pipe the test reads when it chooses; killed by pid and
    its pipes closed at the end, even on failure."""
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    proc = subprocess.Popen([BERTH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_an_attached_run_s_output_waits_for_a_consumer_that_pauses_longer_than_drain(
    daemon: Daemon,
) -> None:
    """More output than a pipe holds, read only 12 s after the container exited: every
    byte arrives. Drain used to give up 10 s after the exit, output on its way or not,
    and the CLI left with what had not fit into the pipe."""
    lines = 20000  # ~109 KiB, more than the 64 KiB a pipe holds
    seen: list[str] = []

    def exited() -> bool:
        try:
            seen.append(daemon.call("tasks.get", {"container_id": "c-paused"})["status"])
        except NotFound:
            return bool(seen)  # created, then gone: it exited and --rm removed it
        return seen[-1] == "stopped"

    script = f"seq 1 {lines}; exit 3"
    with _cli_into_a_pipe(daemon, "run", "--busybox", "--rm", "c-paused", "sh", "-c", script) as (
        proc,
        stdout,
    ):
        wait_until(exited, timeout=30)
        time.sleep(12)  # past the old drain's 10 s; nothing read from the CLI's stdout yet
        assert proc.poll() is None, "the CLI left with output undelivered"
        out = stdout.read()
        assert proc.wait(timeout=30) == 3
        assert out.split() == [str(n).encode() for n in range(1, lines + 1)]


def test_an_exec_whose_leftover_keeps_stdout_open_ends_after_an_idle_drain(
    daemon: Daemon,
) -> None:
    """An exec'd shell that leaves a process behind holding its stdout: the CLI delivers
    the output, reports the exit status and returns once the FIFO stayed idle (10 s),
    instead of waiting for the leftover to end."""
    daemon.cli("run", "--busybox", "-d", "c-leftover", "sleep", "300", check=True)
    try:
        r = daemon.cli(  # the timeout fails the test if the CLI waits for the leftover
            "tasks",
            "exec",
            "--exec-id",
            "e-left",
            "c-leftover",
            "sh",
            "-c",
            "sleep 120 & echo before; exit 5",
            timeout=60,
        )
        assert r.returncode == 5
        assert r.stdout == b"before\n"
    finally:
        daemon.cli("tasks", "rm", "-f", "c-leftover")
