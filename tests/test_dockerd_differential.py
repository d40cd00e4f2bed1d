"""Docker Engine differential: the same docker commands on a dockerd 20.10 driving a private
containerd 1.6 and on one driving berth (tests/support/dockerd_pair.py), their exit codes,
output and `docker inspect` State compared once ids, times and pids are normalised.

What docker shows of a failure is containerd's own words: a container whose entrypoint is
missing or not executable, or an exec of one, fails with containerd's message, from which
dockerd takes 127 or 126 and which it keeps in State.Error. Those are held to containerd's
text. What legitimately differs is set aside where it is compared, and says why: the
order in which an overlay's upper dir lists entries (docker diff), figures and pids (top,
stats), and what containerd's shim cannot do on this host's hybrid cgroup layout (it loads
no cgroup for its containers: no OOM event, no stats), where berth is held to what
containerd does on a host where it can.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.dockerd_pair import IMAGE, SIDES, Answer, Pair, dockerd_pair

pytestmark = pytest.mark.container

LOOP = "trap 'exit 3' TERM; while true; do sleep 0.1; done"


@pytest.fixture(scope="module")
def dp() -> Iterator[Pair]:
    with dockerd_pair() as engines:
        yield engines


def same(dp: Pair, *args: str, input: str | None = None, timeout: float = 60) -> Answer:
    """The command on both engines: the same exit code, stdout and stderr."""
    answers = dp.both(*args, input=input, timeout=timeout)
    assert answers["berth"] == answers["containerd"], (args, answers)
    return answers["berth"]


def same_state(dp: Pair, name: str) -> dict[str, object]:
    states = dp.state(name)
    assert states["berth"] == states["containerd"], (name, states)
    return states["berth"]


def until_status(dp: Pair, name: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outs = dp.ok("inspect", "-f", "{{.State.Status}}", name)
        if all(out.strip() == status for out in outs.values()):
            return
        assert time.monotonic() < deadline, (name, status, outs)
        time.sleep(0.2)


# -- docker run ---------------------------------------------------------------------------


def test_run_output_exit_codes_and_process_options(dp: Pair) -> None:
    """Already matched: output, exit codes (a child's 137), stdin, a terminal, --init,
    -u, -w (made when missing), -e, --rm leaving nothing."""
    assert same(dp, "run", "--rm", IMAGE, "echo", "hi") == Answer(0, "hi\n", "")
    assert same(dp, "run", "--rm", IMAGE, "sh", "-c", "exit 5").code == 5
    assert same(dp, "run", "--rm", IMAGE, "sh", "-c", "sleep 100 & kill -9 $!; wait $!").code == 137
    got = same(dp, "run", "--rm", "-i", IMAGE, "sh", "-c", "read l; echo got:$l", input="x\n")
    assert got.out == "got:x\n"
    assert same(dp, "run", "--rm", "-t", IMAGE, "sh", "-c", "echo tty; exit 3") == Answer(
        3, "tty\r\n", ""
    )
    assert same(dp, "run", "--rm", "--init", IMAGE, "cat", "/proc/1/comm").out == "docker-init\n"
    assert same(dp, "run", "--rm", "-u", "1000:1000", IMAGE, "id").out.startswith("uid=1000")
    assert same(dp, "run", "--rm", "-w", "/new/dir", IMAGE, "pwd").out == "/new/dir\n"
    assert same(dp, "run", "--rm", "-e", "FOO=bar", IMAGE, "sh", "-c", "echo $FOO").out == "bar\n"
    assert same(dp, "ps", "-aq") == Answer(0, "", "")


@pytest.mark.parametrize(
    ("entrypoint", "code", "words"),
    [
        ("/nonexistent", 127, "stat /nonexistent: no such file or directory"),
        ("nonexistent", 127, "executable file not found in $PATH"),
        ("/etc/passwd", 126, 'exec: "/etc/passwd": permission denied'),
        ("/etc", 126, 'exec: "/etc": permission denied'),
    ],
)
def test_a_failed_entrypoint_is_worded_as_containerd_words_it(
    dp: Pair, entrypoint: str, code: int, words: str
) -> None:
    """Found: berth answered Tasks/Create's runc failure FAILED_PRECONDITION as "runc create
    failed (exit 1): ...", which docker showed as "...: failed precondition" (and kept in
    State.Error); containerd answers UNKNOWN, "failed to create shim task: OCI runtime
    create failed: ...: unknown". The exit code docker derives (127/126) was the same."""
    got = same(dp, "run", "--rm", "--entrypoint", entrypoint, IMAGE)
    assert got.code == code
    assert got.err.startswith(
        "docker: Error response from daemon: failed to create shim task: "
        "OCI runtime create failed: runc create failed: "
    ), got.err
    assert words in got.err and got.err.endswith(": unknown.\n"), got.err


def test_a_failed_start_keeps_containerds_error_in_the_state(dp: Pair) -> None:
    """Found (as above): `docker run -d` and `docker start` of a container whose entrypoint
    is missing, and the State.Error docker keeps; a file bound onto a directory."""
    name = "bad-entry"
    assert same(dp, "run", "-d", "--name", name, "--entrypoint", "/nonexistent", IMAGE).code == 127
    state = same_state(dp, name)
    assert (state["Status"], state["ExitCode"]) == ("created", 127)
    assert str(state["Error"]).startswith("failed to create shim task: OCI runtime create")
    assert same(dp, "start", name).code == 1
    same_state(dp, name)
    same(dp, "rm", name)
    got = same(dp, "run", "--rm", "-v", "/etc/hostname:/etc", IMAGE, "true")
    assert got.code == 125 and "OCI runtime create failed" in got.err


def test_resource_and_security_options(dp: Pair) -> None:
    """Already matched: --read-only (and a tmpfs on it), --cpus, --pids-limit, --ulimit,
    --cap-drop/--cap-add, --device, --tmpfs, -v, --memory-reservation."""
    assert same(dp, "run", "--rm", "--read-only", IMAGE, "touch", "/x").code == 1
    same(dp, "run", "--rm", "--read-only", "--tmpfs", "/tmp", IMAGE, "touch", "/tmp/x")
    cpus = same(
        dp, "run", "--rm", "--cpus", "0.5", IMAGE, "cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
    )
    assert cpus.out == "50000\n"
    pids = same(
        dp, "run", "--rm", "--pids-limit", "7", IMAGE, "cat", "/sys/fs/cgroup/pids/pids.max"
    )
    assert pids.out == "7\n"
    ulimit = same(
        dp, "run", "--rm", "--ulimit", "nofile=100:200", IMAGE, "sh", "-c", "ulimit -n; ulimit -Hn"
    )
    assert ulimit.out == "100\n200\n"
    same(
        dp,
        "run",
        "--rm",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "CHOWN",
        IMAGE,
        "grep",
        "Cap",
        "/proc/self/status",
    )
    device = "ls -l /dev/mynull; echo x > /dev/mynull && echo ok"
    assert same(
        dp, "run", "--rm", "--device", "/dev/null:/dev/mynull", IMAGE, "sh", "-c", device
    ).out.endswith("ok\n")
    same(dp, "run", "--rm", "--tmpfs", "/scratch", IMAGE, "sh", "-c", "grep scratch /proc/mounts")
    same(
        dp,
        "run",
        "--rm",
        "-m",
        "64m",
        "--memory-reservation",
        "32m",
        IMAGE,
        "cat",
        "/sys/fs/cgroup/memory/memory.soft_limit_in_bytes",
    )
    with tempfile.TemporaryDirectory(prefix="dpair-v-", dir="/tmp") as host:
        with open(os.path.join(host, "f"), "w") as f:
            f.write("from-host\n")
        assert (
            same(dp, "run", "--rm", "-v", f"{host}:/data", IMAGE, "cat", "/data/f").out
            == "from-host\n"
        )


def test_restart_on_failure_counts(dp: Pair) -> None:
    """Already matched: --restart on-failure:2 restarts twice, then stays exited."""
    dp.ok("run", "-d", "--name", "rs", "--restart", "on-failure:2", IMAGE, "sh", "-c", "exit 3")
    deadline = time.monotonic() + 30
    while True:
        counts = dp.ok("inspect", "-f", "{{.RestartCount}} {{.State.Status}}", "rs")
        if all(c.strip() == "2 exited" for c in counts.values()):
            break
        assert time.monotonic() < deadline, counts
        time.sleep(0.3)
    assert same_state(dp, "rs")["ExitCode"] == 3
    same(dp, "rm", "rs")


def test_oom_is_reported_before_the_exit(dp: Pair) -> None:
    """berth: OOMKilled, and docker's oom event before its die (what containerd's shim
    reports where it can watch the cgroup). containerd's shim here loads no cgroup for its
    containers on this hybrid layout, so it sends no TaskOOM: only the exit is compared."""
    since = str(int(time.time()) - 1)
    args = ("--memory", "16m", "--memory-swap", "16m", IMAGE, "sh", "-c", "tail /dev/zero")
    assert same(dp, "run", "--name", "oom", *args).code == 137
    states = dp.state("oom")
    assert states["berth"]["OOMKilled"] is True
    assert {k: v for k, v in states["berth"].items() if k != "OOMKilled"} == {
        k: v for k, v in states["containerd"].items() if k != "OOMKilled"
    }
    until = str(int(time.time()) + 1)
    time.sleep(1.2)
    events = dp.docker(
        "berth",
        "events",
        "--since",
        since,
        "--until",
        until,
        "--filter",
        "container=oom",
        "--format",
        "{{.Action}}",
    )
    actions = events.stdout.decode().split()
    assert actions[actions.index("oom") + 1] == "die", actions
    same(dp, "rm", "oom")


# -- the lifecycle verbs in every state -----------------------------------------------------


def test_verbs_on_a_created_container(dp: Pair) -> None:
    """Already matched: stop, kill, pause, exec, restart of a container never started."""
    dp.ok("create", "--name", "cr", IMAGE, "sleep", "100")
    assert same_state(dp, "cr")["Status"] == "created"
    for verb in ("stop", "kill", "pause"):
        same(dp, verb, "cr")
    same(dp, "exec", "cr", "true")
    same(dp, "restart", "-t", "1", "cr")
    assert same_state(dp, "cr")["Status"] == "running"
    same(dp, "rm", "-f", "cr")


def test_verbs_on_running_paused_and_exited_containers(dp: Pair) -> None:
    """Already matched: pause and unpause twice, exec/stop/kill -s of a paused container,
    a TERM the init turns into exit 3, verbs on the exited container, restart, KILL: 137."""
    dp.ok("run", "-d", "--name", "lc", IMAGE, "sh", "-c", LOOP)
    assert same_state(dp, "lc")["Status"] == "running"
    for verb in ("start", "unpause", "pause", "pause"):
        same(dp, verb, "lc")
    assert same_state(dp, "lc")["Paused"] is True
    same(dp, "exec", "lc", "true")
    same(dp, "kill", "-s", "USR1", "lc")
    same(dp, "unpause", "lc")
    same(dp, "unpause", "lc")
    same(dp, "kill", "-s", "TERM", "lc")
    assert same(dp, "wait", "lc").out == "3\n"
    assert same_state(dp, "lc")["ExitCode"] == 3
    for verb in ("kill", "stop", "pause", "unpause"):
        same(dp, verb, "lc")
    same(dp, "exec", "lc", "true")
    same(dp, "restart", "-t", "1", "lc")
    assert same_state(dp, "lc")["Running"] is True
    dp.ok("pause", "lc")
    same(dp, "stop", "-t", "1", "lc")
    assert same_state(dp, "lc")["ExitCode"] == 3
    same(dp, "start", "lc")
    same(dp, "kill", "-s", "KILL", "lc")
    assert same(dp, "wait", "lc").out == "137\n"
    same_state(dp, "lc")
    same(dp, "rm", "lc")


def test_stop_exit_codes(dp: Pair) -> None:
    """Already matched: stop of an init that ignores TERM (137 after the timeout), of a
    --init container (tini passes TERM on: 143), and with --stop-signal."""
    dp.ok("run", "-d", "--name", "st-kill", IMAGE, "sleep", "100")
    dp.ok("run", "-d", "--name", "st-init", "--init", IMAGE, "sleep", "100")
    dp.ok(
        "run",
        "-d",
        "--name",
        "st-sig",
        "--stop-signal",
        "USR1",
        IMAGE,
        "sh",
        "-c",
        "trap 'exit 9' USR1; while :; do sleep 0.1; done",
    )
    for name, code in (("st-kill", 137), ("st-init", 143), ("st-sig", 9)):
        same(dp, "stop", "-t", "1", name)
        assert same_state(dp, name)["ExitCode"] == code
    same(dp, "rm", "st-kill", "st-init", "st-sig")


def test_rm_force_of_running_and_paused(dp: Pair) -> None:
    dp.ok("run", "-d", "--name", "rn", IMAGE, "sleep", "100")
    same(dp, "rename", "rn", "rn2")
    assert same(dp, "rm", "rn2").code == 1
    same(dp, "rm", "-f", "rn2")
    dp.ok("run", "-d", "--name", "pz", IMAGE, "sleep", "100")
    dp.ok("pause", "pz")
    same(dp, "rm", "-f", "pz")
    dp.ok("create", "--name", "cr2", IMAGE, "true")
    same(dp, "rm", "cr2")


# -- exec -----------------------------------------------------------------------------------


def test_exec_exit_codes_and_options(dp: Pair) -> None:
    """Already matched: exit codes (a signal's too), -u, -w, -e, -d, -i, -t."""
    dp.ok("run", "-d", "--name", "ex", IMAGE, "sh", "-c", LOOP)
    assert same(dp, "exec", "ex", "sh", "-c", "exit 4").code == 4
    assert same(dp, "exec", "ex", "sh", "-c", "kill -9 $$").code == 137
    assert same(dp, "exec", "-t", "ex", "sh", "-c", "kill -15 $$").code == 143
    assert same(dp, "exec", "-u", "1000", "ex", "id").out.startswith("uid=1000")
    assert same(dp, "exec", "-w", "/tmp", "ex", "pwd").out == "/tmp\n"
    assert same(dp, "exec", "-e", "A=b", "ex", "sh", "-c", "echo $A").out == "b\n"
    same(dp, "exec", "-d", "ex", "sleep", "1")
    assert same(dp, "exec", "-i", "ex", "wc", "-l", input="a\nb\n").out.strip() == "2"
    same(dp, "rm", "-f", "ex")


def test_a_failed_exec_is_worded_as_containerd_words_it(dp: Pair) -> None:
    """Found: berth's exec start failure read "runc exec failed (exit 255): ...: failed
    precondition" where containerd's reads "OCI runtime exec failed: ...: unknown"
    (docker prints it, with 126; `exec -d` answers it as an error)."""
    dp.ok("run", "-d", "--name", "exf", IMAGE, "sleep", "100")
    cases: list[tuple[str, ...]] = [
        ("/nonexistent",),
        ("nonexistent",),
        ("/etc/passwd",),
        ("/etc",),
    ]
    try:
        for command in cases:
            got = same(dp, "exec", "exf", *command)
            assert got.code == 126 and got.out.startswith(
                "OCI runtime exec failed: exec failed: unable to start container process: "
            ), got
            assert got.out.endswith(": unknown\r\n"), got
        got = same(dp, "exec", "-w", "/nonexist", "exf", "pwd")
        assert got.code == 126 and 'chdir to cwd ("/nonexist")' in got.out, got
        got = same(dp, "exec", "-d", "exf", "nonexistent")
        assert got.code == 1 and "OCI runtime exec failed: " in got.err, got
    finally:
        dp.ok("rm", "-f", "exf")


def test_execs_killed_with_their_container_end_before_it(dp: Pair) -> None:
    """Found: the shim held the init's exit until its execs were reaped, not until their
    exits were published. An exec reaped with the init whose output was still draining
    (here: execs writing without pause when the container is killed) had its exit
    published after the init's, by when dockerd had deleted the task: it dropped the
    exec's exit ("no such container") and `docker exec` hung. containerd publishes every
    exec's exit first: each `docker exec` ends 137, and exec_die comes before die."""
    since = str(int(time.time()) - 1)
    dp.ok("run", "-d", "--name", "ek", IMAGE, "sleep", "100")
    spew = "while :; do echo 0123456789012345678901234567890123456789; done"
    clients = {
        (side, what): dp.popen(side, "exec", "ek", "sh", "-c", command)
        for side in SIDES
        for what, command in (("silent", "sleep 100"), ("spew1", spew), ("spew2", spew))
    }
    try:
        time.sleep(2)
        dp.ok("kill", "ek")
        codes = {}
        for key, client in clients.items():
            client.communicate(timeout=30)
            codes[key] = client.returncode
    finally:
        for client in clients.values():
            if client.poll() is None:
                client.kill()
                client.wait()
    assert codes == {key: 137 for key in clients}, codes
    until = str(int(time.time()) + 1)
    time.sleep(1.2)
    # (the three execs start concurrently: their create/start events interleave freely)
    events = dp.ok(
        "events",
        "--since",
        since,
        "--until",
        until,
        "--filter",
        "container=ek",
        "--format",
        "{{.Action}}",
    )
    for side, out in events.items():
        actions = [a for a in out.split() if a in ("exec_die", "die")]
        assert actions == ["exec_die"] * 3 + ["die"], (side, out)
    same(dp, "rm", "ek")


def test_exec_into_paused_and_stopped(dp: Pair) -> None:
    dp.ok("run", "-d", "--name", "ep", IMAGE, "sleep", "100")
    dp.ok("pause", "ep")
    assert same(dp, "exec", "ep", "true").code == 1
    dp.ok("unpause", "ep")
    dp.ok("kill", "ep")
    dp.ok("wait", "ep")
    assert same(dp, "exec", "ep", "true").code == 1
    same(dp, "rm", "ep")


# -- output ---------------------------------------------------------------------------------


def test_logs(dp: Pair) -> None:
    """Already matched: logs whole, --tail, --timestamps, -f of an exited and of a live
    container (ending at its exit), a line without newline, a terminal's."""
    script = "for i in 1 2 3 4 5; do echo line$i; done; printf nonl"
    dp.ok("run", "-d", "--name", "lg", IMAGE, "sh", "-c", script)
    same(dp, "wait", "lg")
    assert same(dp, "logs", "lg").out == "line1\nline2\nline3\nline4\nline5\nnonl"
    assert same(dp, "logs", "--tail", "2", "lg").out == "line5\nnonl"
    same(dp, "logs", "--timestamps", "lg")
    same(dp, "logs", "-f", "lg")
    dp.ok("run", "-d", "--name", "lf", IMAGE, "sh", "-c", "sleep 1; echo a; sleep 0.5; echo b")
    assert same(dp, "logs", "-f", "lf").out == "a\nb\n"
    dp.ok("run", "-d", "--name", "lt", "-t", IMAGE, "sh", "-c", "printf 'a\\nb'; exit 2")
    assert same(dp, "wait", "lt").out == "2\n"
    same(dp, "logs", "lt")
    same(dp, "rm", "lg", "lf", "lt")


def test_large_and_binary_output(dp: Pair) -> None:
    """Already matched: 5 MB through `docker run` and through `docker logs`, and bytes that
    are not text, byte for byte."""
    big = "head -c 3000000 /dev/zero | od -v | head -c 5000000"
    runs = dp.raw("run", "--rm", IMAGE, "sh", "-c", big, timeout=120)
    sums = {side: hashlib.sha256(r.stdout).hexdigest() for side, r in runs.items()}
    assert len(runs["berth"].stdout) == 5_000_000 and sums["berth"] == sums["containerd"]
    binary = "printf '\\000\\001\\377\\376abc\\r\\n'; printf 'x%.0s' $(seq 1 20000)"
    dp.ok("run", "-d", "--name", "bin", IMAGE, "sh", "-c", binary)
    dp.ok("run", "-d", "--name", "big", IMAGE, "sh", "-c", big)
    dp.ok("wait", "bin", "big")
    for name in ("bin", "big"):
        logs = dp.raw("logs", name, timeout=120)
        assert logs["berth"].stdout == logs["containerd"].stdout, name
    same(dp, "rm", "bin", "big")


def test_attach_top_stats_update(dp: Pair) -> None:
    """Already matched: attach with stdin to the exit (its code), top with ps options, update of a
    running and a paused container. stats: every field present on berth (containerd's
    shim reads no cgroup here: its PIDs is 0)."""
    dp.ok("run", "-d", "-i", "--name", "at", IMAGE, "sh", "-c", "read l; echo got:$l; exit 4")
    # the exit code only: whether the CLI, its stdin ended, still prints what the container
    # answered is a race of its own, on either engine
    attached = dp.both("attach", "at", input="hello\n")
    assert {side: a.code for side, a in attached.items()} == {side: 4 for side in SIDES}
    dp.ok("run", "-d", "--name", "tp", IMAGE, "sh", "-c", LOOP)
    # pids differ, and the loop's sleep comes and goes: its shell is there on both
    tops = dp.both("top", "tp", "-o", "pid,comm")
    for side, top in tops.items():
        lines = top.out.splitlines()
        assert (top.code, lines[0].split()) == (0, ["PID", "COMMAND"]), (side, top)
        assert "sh" in [line.split()[1] for line in lines[1:]], (side, top)
    fields = "{{.Name}} {{.CPUPerc}} {{.MemUsage}} {{.NetIO}} {{.BlockIO}} {{.PIDs}}"
    stats = dp.docker("berth", "stats", "--no-stream", "--format", fields, "tp")
    name, *rest = stats.stdout.decode().split()
    assert name == "tp" and all(rest) and int(rest[-1]) >= 1, stats
    update = ("--memory", "64m", "--memory-swap", "128m", "--cpus", "0.5", "--pids-limit", "50")
    same(dp, "update", *update, "tp")
    files = "memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us pids/pids.max"
    cat = " ".join(f"/sys/fs/cgroup/{f}" for f in files.split())
    assert same(dp, "exec", "tp", "sh", "-c", f"cat {cat}").out == "67108864\n50000\n50\n"
    dp.ok("pause", "tp")
    same(dp, "update", "--memory", "96m", "--memory-swap", "200m", "tp")
    same(dp, "rm", "-f", "at", "tp")


# -- the container's files ------------------------------------------------------------------


def test_cp_diff_commit_export_port(dp: Pair) -> None:
    """Already matched: cp both ways, commit and a run of the result, export (its size),
    port. diff: the same changes (listed in the order the overlay's dirs read)."""
    dp.ok(
        "run",
        "-d",
        "--name",
        "fs",
        "-p",
        "8080",
        IMAGE,
        "sh",
        "-c",
        "echo made > /made; rm /etc/group; sleep 100",
    )
    time.sleep(0.5)
    with tempfile.TemporaryDirectory(prefix="dpair-cp-", dir="/tmp") as host:
        with open(os.path.join(host, "f"), "w") as f:
            f.write("in\n")
        same(dp, "cp", os.path.join(host, "f"), "fs:/copied")
        assert same(dp, "exec", "fs", "cat", "/copied").out == "in\n"
        for side in SIDES:
            assert dp.docker(side, "cp", "fs:/made", os.path.join(host, side)).returncode == 0
            with open(os.path.join(host, side)) as f:
                assert f.read() == "made\n"
    diffs = dp.ok("diff", "fs")
    assert sorted(diffs["berth"].split("\n")) == sorted(diffs["containerd"].split("\n"))
    same(dp, "commit", "fs", "committed:1")
    assert same(dp, "run", "--rm", "committed:1", "cat", "/made").out == "made\n"
    exports = dp.raw("export", "fs")
    assert len(exports["berth"].stdout) == len(exports["containerd"].stdout) > 0
    same(dp, "port", "fs")
    same(dp, "rm", "-f", "fs")
    same(dp, "rmi", "committed:1")


def test_events_of_a_lifecycle(dp: Pair) -> None:
    """Already matched: the container events docker derives from containerd's, in order,
    with exit codes and signals: create, attach, start, exec_*, pause, kill, die, stop,
    restart, destroy; a failed entrypoint (no start, no die)."""
    since = str(int(time.time()) - 1)
    dp.ok("run", "-d", "--name", "evt", IMAGE, "sleep", "100")
    dp.both("exec", "evt", "sh", "-c", "exit 3")
    dp.both("exec", "evt", "/nonexistent")
    dp.ok("pause", "evt")
    dp.ok("unpause", "evt")
    dp.ok("stop", "-t", "1", "evt")
    dp.ok("restart", "-t", "1", "evt")
    dp.ok("rm", "-f", "evt")
    dp.both("run", "--name", "evt-bad", "--entrypoint", "/nonexistent", IMAGE)
    dp.ok("rm", "evt-bad")
    assert same(dp, "run", "--rm", "--name", "evt-rm", IMAGE, "sh", "-c", "exit 6").code == 6
    until = str(int(time.time()) + 1)
    time.sleep(1.2)
    attributes = ("name", "exitCode", "signal")
    fmt = " ".join(["{{.Action}}", *(f"{{{{.Actor.Attributes.{a}}}}}" for a in attributes)])
    events = same(
        dp,
        "events",
        "--since",
        since,
        "--until",
        until,
        *("--filter", "container=evt", "--filter", "container=evt-bad"),
        *("--filter", "container=evt-rm", "--format", fmt),
    )
    actions = [line.split()[0] for line in events.out.splitlines()]
    assert actions[:2] == ["create", "start"] and "die" in actions, actions
    assert "die evt-rm 6 <no value>" in events.out.splitlines(), events.out


def test_system_df_and_prune(dp: Pair) -> None:
    dp.ok("create", "--name", "pr", IMAGE, "true")
    same(dp, "system", "df", "--format", "{{.Type}} {{.TotalCount}} {{.Active}}")
    same(dp, "container", "prune", "-f")
    assert same(dp, "ps", "-aq").out == ""


def test_dockerd_restart_restores_the_same_states(dp: Pair) -> None:
    """Already matched: dockerd killed (live-restore) while a container exits, one runs and
    one is paused: after its restart, the same states and exit code on both."""
    dp.ok("run", "-d", "--name", "lr-exit", IMAGE, "sh", "-c", "sleep 2; exit 7")
    dp.ok("run", "-d", "--name", "lr-run", IMAGE, "sleep", "100")
    dp.ok("run", "-d", "--name", "lr-pause", IMAGE, "sleep", "100")
    dp.ok("pause", "lr-pause")
    with ThreadPoolExecutor(max_workers=2) as pool:  # both at once: dockerd takes seconds
        list(pool.map(lambda engine: engine.kill9(), dp.engines.values()))
        time.sleep(3)
        list(pool.map(lambda engine: engine.start(), dp.engines.values()))
    until_status(dp, "lr-exit", "exited")
    assert same_state(dp, "lr-exit")["ExitCode"] == 7
    assert same_state(dp, "lr-run")["Running"] is True
    assert same_state(dp, "lr-pause")["Paused"] is True
    same(dp, "unpause", "lr-pause")
    assert same(dp, "exec", "lr-run", "echo", "hi").out == "hi\n"
    same(dp, "rm", "-f", "lr-exit", "lr-run", "lr-pause")
