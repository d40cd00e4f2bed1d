"""Docker Engine on berth: the real dockerd 20.10, unmodified, with --containerd pointed at
berth's containerd socket (berth-grpc). Every docker action here goes dockerd -> gRPC ->
berth-grpc -> berthd -> shim -> runc, on a real container."""

from __future__ import annotations

import glob
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clients import (
    CTR,
    DOCKER,
    Dockerd,
    docker_engine,
    frontend_pids,
    grpc_address,
    grpc_command,
    run,
    script_tty,
    wait_grpc,
)
from tests.support.helpers import Daemon, is_gone, process_state, stop_child, wait_until

pytestmark = pytest.mark.container

IMAGE = "busybox:berth"
LOOP = (
    'trap "echo got-usr1" USR1; trap "exit 3" TERM; '
    "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"
)


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Daemon, Dockerd]]:
    with docker_engine(IMAGE) as (daemon, dockerd):
        yield daemon, dockerd


def _pid(dockerd: Dockerd, name: str) -> int:
    return int(dockerd.ok("inspect", "-f", "{{.State.Pid}}", name).strip())


def _state(dockerd: Dockerd, name: str) -> tuple[str, int]:
    out = dockerd.ok("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name).split()
    return out[0], int(out[1])


def _cgroup_file(pid: int, controller: str, name: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path(f"/sys/fs/cgroup/{controller}{path}/{name}")
    raise AssertionError(f"{pid} has no {controller} cgroup")


def test_run_rm_output_and_exit_codes(engine: tuple[Daemon, Dockerd]) -> None:
    _, dockerd = engine
    out = dockerd.docker("run", "--rm", IMAGE, "echo", "hi")
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
    out = dockerd.docker("run", "--rm", IMAGE, "sh", "-c", "exit 5")
    assert out.returncode == 5, out.stderr
    # --rm: dockerd deleted the task and the container on berth when it exited
    assert dockerd.ok("ps", "-aq") == ""


def test_run_interactive_stdin(engine: tuple[Daemon, Dockerd]) -> None:
    _, dockerd = engine
    out = subprocess.run(
        [
            DOCKER,
            "-H",
            f"unix://{dockerd.host}",
            "run",
            "--rm",
            "-i",
            IMAGE,
            "sh",
            "-c",
            "read line; echo got:$line",
        ],
        input="over-stdin\n",
        capture_output=True,
        text=True,
        timeout=60,
    )  # CloseIO(stdin) reaches the shim when the client's stdin ends
    assert (out.returncode, out.stdout) == (0, "got:over-stdin\n"), out.stderr


def test_detached_container_lifecycle(engine: tuple[Daemon, Dockerd]) -> None:
    _, dockerd = engine
    dockerd.ok("run", "-d", "--name", "life", IMAGE, "sh", "-c", LOOP)
    pid = _pid(dockerd, "life")
    assert process_state(pid) not in (None, "Z")

    # exec, with its exit code
    assert dockerd.ok("exec", "life", "echo", "exec-ok") == "exec-ok\n"
    assert dockerd.docker("exec", "life", "sh", "-c", "exit 4").returncode == 4

    # exec -it on a real pty of a known size: the size reaches the container's terminal
    tty = run(
        script_tty(
            f"{DOCKER} -H unix://{dockerd.host} exec -it life sh -c 'sleep 1; stty size; tty'"
        )
    )
    assert "30 100" in tty.stdout, tty.stdout + tty.stderr
    assert "/dev/pts/" in tty.stdout

    # logs: dockerd read the output from the FIFOs berth's shim wrote
    wait_until(lambda: "tick 2" in dockerd.ok("logs", "life"), what="log lines")

    # pause / unpause freeze and thaw the container's cgroup
    dockerd.ok("pause", "life")
    assert _state(dockerd, "life")[0] == "paused"
    assert _cgroup_file(pid, "freezer", "freezer.state").read_text().strip() == "FROZEN"
    dockerd.ok("unpause", "life")
    assert _state(dockerd, "life")[0] == "running"
    assert _cgroup_file(pid, "freezer", "freezer.state").read_text().strip() == "THAWED"

    # stats: cgroup figures through Tasks/Metrics (io.containerd.cgroups.v1.Metrics)
    stats = dockerd.ok("stats", "--no-stream", "--format", "{{.PIDs}} {{.MemUsage}}", "life")
    pids, mem = stats.split(" ", 1)
    assert int(pids) >= 1
    assert not mem.startswith("0B"), stats

    # top: Tasks/ListPids
    # the init and its current child (between two sleeps it has none for an instant)
    def listed() -> str | None:
        out = dockerd.ok("top", "life")
        return out if "sleep 0.2" in out else None

    top = wait_until(listed, what="docker top to list the loop's sleep")
    assert str(pid) in top and "sleep 0.2" in top, top

    # update: Tasks/Update with LinuxResources as JSON reaches the cgroup
    dockerd.ok("update", "--memory", "64m", "--memory-swap", "128m", "life")
    limit = _cgroup_file(pid, "memory", "memory.limit_in_bytes").read_text().strip()
    assert int(limit) == 64 * 1024 * 1024

    # kill -s: the signal reaches the container's init
    dockerd.ok("kill", "-s", "USR1", "life")
    wait_until(lambda: "got-usr1" in dockerd.ok("logs", "life"), what="USR1 handled")

    # stop: SIGTERM, which this init turns into exit 3
    dockerd.ok("stop", "-t", "10", "life")
    assert _state(dockerd, "life") == ("exited", 3)
    wait_until(lambda: is_gone(pid) or process_state(pid) == "Z", what="init gone")

    # restart: a new task, a new init
    dockerd.ok("start", "life")
    first = _pid(dockerd, "life")
    dockerd.ok("restart", "-t", "10", "life")
    second = _pid(dockerd, "life")
    assert second != first and _state(dockerd, "life") == ("running", 0)

    # rm -f: killed, deleted on berth, gone
    dockerd.ok("rm", "-f", "life")
    wait_until(lambda: is_gone(second) or process_state(second) == "Z", what="rm -f kill")
    assert "life" not in dockerd.ok("ps", "-a", "--format", "{{.Names}}")


def test_stop_kills_after_timeout(engine: tuple[Daemon, Dockerd]) -> None:
    _, dockerd = engine
    dockerd.ok(
        "run",
        "-d",
        "--name",
        "stubborn",
        IMAGE,
        "sh",
        "-c",
        'trap "" TERM; while true; do sleep 0.2; done',
    )
    dockerd.ok("stop", "-t", "1", "stubborn")
    assert _state(dockerd, "stubborn") == ("exited", 137)
    dockerd.ok("rm", "stubborn")


def test_live_restore_across_dockerd_kill(engine: tuple[Daemon, Dockerd]) -> None:
    _, dockerd = engine
    dockerd.ok("run", "-d", "--name", "survivor", IMAGE, "sh", "-c", LOOP)
    pid = _pid(dockerd, "survivor")
    dockerd.kill9()
    dockerd.start()
    assert _pid(dockerd, "survivor") == pid
    assert _state(dockerd, "survivor") == ("running", 0)
    assert dockerd.ok("exec", "survivor", "echo", "still-here") == "still-here\n"
    dockerd.ok("rm", "-f", "survivor")


def test_dockerd_reconnects_after_berthd_kill(engine: tuple[Daemon, Dockerd]) -> None:
    daemon, dockerd = engine
    dockerd.ok("run", "-d", "--name", "steady", IMAGE, "sh", "-c", LOOP)
    pid = _pid(dockerd, "steady")
    frontends = frontend_pids(daemon)
    assert len(frontends) == 1, "berthd runs berth-grpc"
    daemon.restart()  # kill -9 berthd, start a new one
    # the front end outlives berthd (dockerd's socket never goes away): the new berthd
    # adopts it
    wait_until(lambda: "adopted" in daemon.log_text(), what="the new berthd to adopt it")
    assert frontend_pids(daemon) == frontends
    wait_grpc(daemon)
    assert process_state(pid) not in (None, "Z"), "the container survived the daemon"
    # dockerd reconnects by itself; its exec works again
    wait_until(
        lambda: dockerd.docker("exec", "steady", "true", timeout=20).returncode == 0,
        timeout=60,
        interval=0.5,
        what="dockerd to reconnect",
    )
    # the exit reaches dockerd through the new event stream (dockerd never calls Wait)
    dockerd.ok("stop", "-t", "10", "steady")
    assert _state(dockerd, "steady") == ("exited", 3)
    dockerd.ok("rm", "steady")


class Loop:
    """A docker command repeated in a thread until stopped; every failure kept."""

    def __init__(self, command: Callable[[int], subprocess.CompletedProcess[str]]) -> None:
        self.runs = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(command,), daemon=True)
        self._thread.start()

    def _run(self, command: Callable[[int], subprocess.CompletedProcess[str]]) -> None:
        while not self._stop.is_set():
            try:
                result = command(self.runs)
            except subprocess.TimeoutExpired as exc:  # a hung command is a failure too
                self.runs += 1
                self.failures.append(f"{exc.cmd[3:]}: hung for {exc.timeout} s")
                continue
            self.runs += 1
            if result.returncode != 0:
                self.failures.append(f"{result.args[3:]}: {result.stderr.strip()}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


COUNT = "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.05; done"


def test_exec_and_logs_follow_across_five_berthd_upgrades(engine: tuple[Daemon, Dockerd]) -> None:
    """dockerd --live-restore on berth's gRPC socket: berthd is upgraded in place five
    times while `docker exec` runs in a loop and `docker logs -f` follows a container."""
    daemon, dockerd = engine
    dockerd.ok("run", "-d", "--name", "upgraded", IMAGE, "sh", "-c", COUNT)
    frontends = frontend_pids(daemon)
    follower = subprocess.Popen(
        [DOCKER, "-H", f"unix://{dockerd.host}", "logs", "-f", "upgraded"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, DOCKER_CONFIG=os.path.join(dockerd.dir, "cli")),
    )
    execs = Loop(lambda n: dockerd.docker("exec", "upgraded", "echo", f"exec-{n}", timeout=60))
    try:
        for _ in range(5):
            daemon.take_over()
            time.sleep(0.5)
        execs.stop()
        dockerd.ok("kill", "upgraded")
        out, err = follower.communicate(timeout=60)  # ends with the container
    finally:
        execs.stop()
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    print(f"\n{execs.runs} docker exec, {len(out.splitlines())} lines followed, 5 upgrades")
    assert execs.failures == [] and execs.runs >= 5, (execs.runs, execs.failures[:3])
    assert frontend_pids(daemon) == frontends, "berth-grpc outlived every upgrade"
    lines = out.splitlines()
    assert lines == [f"line {n}" for n in range(len(lines))], (lines[:3], err)
    assert len(lines) > 20
    assert dockerd.ok("inspect", "-f", "{{.State.Status}}", "upgraded").strip() == "exited"
    dockerd.ok("rm", "upgraded")


def test_berth_grpc_replaced_under_docker_and_ctr_calls(engine: tuple[Daemon, Dockerd]) -> None:
    """A new berth-grpc takes the containerd socket over from the running one (as when
    berthd's version changes): dockerd's and ctr's calls meanwhile all succeed, and
    berthd adopts the new front end."""
    daemon, dockerd = engine
    dockerd.ok("run", "-d", "--name", "steady2", IMAGE, "sh", "-c", LOOP)
    (old,) = frontend_pids(daemon)
    address = grpc_address(daemon)
    execs = Loop(lambda n: dockerd.docker("exec", "steady2", "true", timeout=60))
    ctrs = Loop(lambda n: run([CTR, "-a", address, "-n", "moby", "tasks", "ls"], timeout=60))
    command = grpc_command(daemon)
    with open(os.path.join(daemon.dir, "berth-grpc-new.log"), "wb") as log:
        new = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        time.sleep(1.0)
        wait_until(lambda: is_gone(old), timeout=30, what="the old berth-grpc to stop")
        wait_until(
            lambda: f"gRPC front end pid {new.pid} serves" in daemon.log_text(),
            timeout=30,
            what="berthd to adopt the new berth-grpc",
        )
        time.sleep(1.0)
    finally:
        execs.stop()
        ctrs.stop()
    try:
        print(f"\n{execs.runs} docker exec, {ctrs.runs} ctr tasks ls across the replacement")
        assert (execs.failures, ctrs.failures) == ([], []), (execs.failures[:3], ctrs.failures[:3])
        assert execs.runs >= 3 and ctrs.runs >= 3
        assert dockerd.ok("exec", "steady2", "echo", "after") == "after\n"
        dockerd.ok("stop", "-t", "10", "steady2")
        assert _state(dockerd, "steady2") == ("exited", 3)
        dockerd.ok("rm", "steady2")
    finally:
        # This test started it, so it stops it (berthd's supervisor then starts its own).
        stop_child(new)


def test_a_hung_call_can_be_diagnosed(engine: tuple[Daemon, Dockerd]) -> None:
    """SIGUSR1 makes berth-grpc log every task's stack, as containerd dumps its goroutines
    (dockerd's event subscription shows as a waiting Subscribe handler); the tests send it
    when a docker command hangs, so that a failure's report says what waited on what."""
    daemon, dockerd = engine

    def dumped_subscription() -> bool:
        dockerd.dump_stacks()  # (an earlier test may have left a new berth-grpc starting)
        return "Events/Subscribe" in daemon.log_text().split("SIGUSR1:")[-1]

    wait_until(dumped_subscription, timeout=30, interval=1.0, what="a dump with Subscribe")
    stacks = glob.glob(os.path.join(dockerd.dir, "**", "goroutine-stacks-*.log"), recursive=True)
    assert stacks, "dockerd wrote no goroutine dump"
    assert dockerd.docker("version", timeout=30).returncode == 0  # both still serve
