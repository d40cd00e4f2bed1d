"""Operability (issue 15, less metrics): JSON logs of berthd and berth-grpc across a
container's life and a daemon restart, a shim's own log through berthd and bounded, the
CLI's habits (-q and --format json on every listing, bash completion, --version, exit
codes), berthd's log options refused when bad, and a demo that signals only its own pids."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import grpc_config, wait_grpc
from tests.support.helpers import BERTH, BERTHD, Daemon

REPO = Path(__file__).resolve().parent.parent
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3,9}Z$")
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
)


def json_lines(path: str) -> list[dict[str, Any]]:
    """Every line of a daemon's log as JSON: a line that does not parse fails the test."""
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            doc = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path}:{number} is not JSON: {line!r}") from None
        assert isinstance(doc, dict), line
        assert {"time", "level", "logger", "msg"} <= doc.keys(), line
        assert RFC3339.match(doc["time"]), line
        out.append(doc)
    return out


def about(lines: list[dict[str, Any]], container_id: str) -> list[str]:
    return [d["msg"] for d in lines if d.get("container_id") == container_id]


def cli(*args: str, address: str = "/nonexistent/berthd.sock") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BERTH_ADDRESS=address, BERTH_NAMESPACE="default")
    return subprocess.run(
        [BERTH, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


# -- logs ---------------------------------------------------------------------------------


@pytest.mark.container
def test_json_logs_parse_line_by_line_across_a_life_and_a_restart() -> None:
    base = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
    d = Daemon(base_dir=base, top_config='log_format = "json"\n', extra_config=grpc_config(base))
    try:
        wait_grpc(d)
        d.cli("run", "--busybox", "-d", "life", "sh", "-c", "echo hi; sleep 300", check=True)
        assert (
            d.cli("tasks", "exec", "--exec-id", "e1", "life", "sh", "-c", "exit 4").returncode == 4
        )
        d.restart()  # kill -9 and start again: the task is recovered
        d.cli("tasks", "kill", "-s", "SIGKILL", "life", check=True)
        assert d.cli("tasks", "wait", "life").stdout.strip() == b"137"
        d.cli("tasks", "rm", "life", check=True)
        d.cli("containers", "rm", "life", check=True)
        first, second = (json_lines(path) for path in d.logs)
    finally:
        d.cleanup()
    before, after = about(first, "life"), about(second, "life")
    assert "task created: pid" in " ".join(before) and "task started: pid" in " ".join(before)
    execs = [x for x in first if x.get("exec_id") == "e1"]
    assert any(x["msg"] == "exec e1 exited with status 4" for x in execs), execs
    assert all(x["namespace"] == d.namespace for x in execs)
    assert any(m.startswith("recovery: reattached to shim pid") for m in after), after
    assert "task exited with status 137" in after and "task deleted: exit status 137" in after
    # berth-grpc logs into the same stream, in the same format (it outlived the restart)
    assert any(x["logger"].startswith("berth.grpc") for x in first), first


@pytest.mark.container
def test_the_flag_chooses_json_and_text_stays_as_it_was(daemon: Daemon) -> None:
    daemon.cli("run", "--busybox", "-d", "flagged", "sleep", "300", check=True)
    daemon.kill9()
    daemon.start_with("--log-format", "json")
    daemon.cli("tasks", "rm", "-f", "flagged", check=True)
    text = Path(daemon.logs[0]).read_text().splitlines()
    assert text and all(TEXT_LINE.match(line) or line.startswith(" ") for line in text), text
    assert "task deleted: exit status 137" in about(json_lines(daemon.logs[1]), "flagged")


def test_a_json_line_names_what_it_is_about_and_stays_one_line() -> None:
    import logging

    from berth.daemon import logs

    formatter = logs.JsonFormatter()

    def line(msg: str, **kw: Any) -> dict[str, Any]:
        record = logging.LogRecord("berthd.tasks", logging.ERROR, __file__, 1, msg, (), None)
        record.__dict__.update(kw)
        text = formatter.format(record)
        assert "\n" not in text
        doc: dict[str, Any] = json.loads(text)
        return doc

    assert "container_id" not in line("plain")
    with logs.scope("ns1", "c1"):
        assert line("a\nb") | {"time": ""} == {
            "time": "",
            "level": "error",
            "logger": "berthd.tasks",
            "msg": "a\nb",
            "namespace": "ns1",
            "container_id": "c1",
        }
        assert line("x", **logs.about("ns1", "c1", "e1"))["exec_id"] == "e1"
    assert "namespace" not in line("after the scope")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        assert "RuntimeError: boom" in line("failed", exc_info=sys.exc_info())["error"]


@pytest.mark.parametrize(
    ("flags", "config", "error"),
    [
        (["--log-format", "xml"], "", "log_format must be one of text, json"),
        ([], 'log_format = "yaml"\n', "log_format must be one of text, json"),
        ([], "log_format = 3\n", "config log_format must be a str"),
    ],
)
def test_a_bad_log_format_is_refused_before_anything_starts(
    flags: list[str], config: str, error: str, tmp_path: Path
) -> None:
    path = tmp_path / "berthd.toml"
    path.write_text(f'root = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n{config}')
    proc = subprocess.Popen(
        [BERTHD, "--config", str(path), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:  # a berthd that took the bad setting and serves: stop it
            proc.kill()
            proc.wait()
    assert proc.returncode == 2 and error in stderr, (proc.returncode, stderr)
    assert not (tmp_path / "state").exists()


# -- the shim's own log -------------------------------------------------------------------


@pytest.mark.container
def test_a_shims_log_is_read_through_berthd(daemon: Daemon) -> None:
    daemon.cli("run", "--busybox", "-d", "logged", "sleep", "300", check=True)
    whole = daemon.cli("tasks", "shim-log", "logged", check=True).stdout.decode()
    assert f"serving {daemon.namespace}/logged" in whole, whole
    last = daemon.cli("tasks", "shim-log", "--tail", "1", "logged", check=True).stdout.decode()
    assert last == whole.splitlines(keepends=True)[-1]
    reply = daemon.call("tasks.shim_log", {"container_id": "logged", "tail": 2})
    assert reply["data"].decode() == "".join(whole.splitlines(keepends=True)[-2:])
    ghost = daemon.cli("tasks", "shim-log", "ghost")
    assert ghost.returncode == 1 and b"not found: task ghost not found" in ghost.stderr
    negative = daemon.cli("tasks", "shim-log", "--tail", "-1", "logged")
    assert negative.returncode == 1 and b"--tail takes a number of lines" in negative.stderr
    with pytest.raises(Exception, match="tail"):
        daemon.call("tasks.shim_log", {"container_id": "logged", "tail": -3})
    daemon.cli("tasks", "rm", "-f", "logged", check=True)


def test_a_shims_log_is_bounded_by_the_shim(tmp_path: Path) -> None:
    """The shim's writer (shim/loop.py), in a process of its own as in a shim: 30,000 lines
    of 100 bytes stay within twice the bound, the newest kept; berthd reads them back."""
    log = tmp_path / "shim.log"
    program = textwrap.dedent(
        f"""
        from berth.shim import loop
        loop.log_to({str(log)!r})
        for i in range(30000):
            loop.log(f"line {{i:06d}} " + "x" * 60)
        """
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=60)
    from berth.daemon.tasks.service import _read_log_tail
    from berth.shim.loop import SHIM_LOG_MAX

    rotated = Path(f"{log}.1")
    assert log.stat().st_size <= SHIM_LOG_MAX + 200 and rotated.stat().st_size <= SHIM_LOG_MAX + 200
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    tail = _read_log_tail(str(log), 3).decode().splitlines()
    assert [line.split()[3] for line in tail] == ["029997", "029998", "029999"]
    everything = _read_log_tail(str(log), 0).decode().splitlines()
    numbers = [int(line.split()[3]) for line in everything]
    assert numbers == list(range(numbers[0], 30000)) and len(numbers) > 10000


# -- the CLI ------------------------------------------------------------------------------

LISTINGS = [
    ("containers", "ls"),
    ("tasks", "ls"),
    ("namespaces", "ls"),
    ("images", "ls"),
    ("leases", "ls"),
    ("snapshots", "ls"),
    ("content", "ls"),
    ("content", "ingests"),
]


@pytest.mark.container
def test_every_listing_takes_json_and_q(daemon: Daemon) -> None:
    for cid in ("b-one", "a-two"):
        daemon.cli("run", "--busybox", "-d", cid, "sleep", "300", check=True)
    for listing in LISTINGS:
        table = daemon.cli(*listing, check=True).stdout.decode()
        as_json = json.loads(daemon.cli(*listing, "--format", "json", check=True).stdout)
        ids = daemon.cli(*listing, "-q", check=True).stdout.decode().splitlines()
        assert isinstance(as_json, list) and len(ids) == len(as_json), (listing, ids, as_json)
        assert len(table.splitlines()) == len(ids) + 1, (listing, table)
        assert json.loads(daemon.cli(*listing, "-q", "--format", "json").stdout) == ids
    assert daemon.cli("containers", "ls", "-q").stdout == b"a-two\nb-one\n"
    assert daemon.cli("tasks", "ls", "--quiet").stdout == b"a-two\nb-one\n"
    assert daemon.namespace in daemon.cli("namespaces", "ls", "-q").stdout.decode().split()
    pids = daemon.cli("tasks", "ps", "-q", "a-two").stdout.decode().split()
    assert pids and all(p.isdigit() for p in pids)
    # exit codes: the container's for run and exec (attached), wait prints it and exits 0
    assert daemon.cli("run", "--busybox", "--rm", "three", "sh", "-c", "exit 3").returncode == 3
    assert daemon.cli("tasks", "exec", "--exec-id", "x", "a-two", "false").returncode == 1
    daemon.cli("tasks", "kill", "-s", "SIGKILL", "b-one", check=True)
    waited = daemon.cli("tasks", "wait", "b-one")
    assert (waited.returncode, waited.stdout) == (0, b"137\n")
    for cid in ("b-one", "a-two"):
        daemon.cli("tasks", "rm", "-f", cid, check=True)


def test_version_help_and_exit_codes_need_no_daemon() -> None:
    from berth.daemon import __version__

    version = cli("--version")
    assert (version.returncode, version.stdout) == (0, f"berth {__version__}\n")
    helped = cli("--help")
    assert helped.returncode == 0 and "exit status:" in helped.stdout
    assert "  2    a usage error" in helped.stdout and "128+N" in helped.stdout
    unreachable = cli("tasks", "ls")
    assert unreachable.returncode == 1 and unreachable.stderr.startswith("berth: cannot reach")
    usage = cli("tasks", "ls", "--format", "yaml")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    # a file the command line names that cannot be read: one line, no traceback
    unreadable = cli("images", "pull", "--tls-ca", "/nonexistent/ca.pem", "example.com/x:1")
    assert unreadable.returncode == 1, unreadable
    assert unreadable.stderr.startswith("berth: ") and "Traceback" not in unreadable.stderr


def test_bash_completion_comes_from_the_verb_tables() -> None:
    script = cli("completion", "bash")
    assert script.returncode == 0 and script.stdout.startswith("# bash completion for berth")
    check = subprocess.run(["bash", "-n"], input=script.stdout, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    probe = textwrap.dedent(
        """
        source /dev/stdin
        complete_words() {
            COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()
            _berth
            echo "${COMPREPLY[*]}"
        }
        complete_words berth ta
        complete_words berth tasks sh
        complete_words berth -n x t ls --fo
        complete_words berth images ls --format ""
        complete_words berth completion ""
        complete_words berth --vers
        """
    )
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(probe)
        f.flush()
        answers = subprocess.run(
            ["bash", f.name], input=script.stdout, text=True, capture_output=True, timeout=30
        )
    assert answers.stdout.splitlines() == [
        "tasks",
        "shim-log",
        "--format",
        "table json",
        "-h --help bash",
        "--version",
    ], answers


def test_completion_costs_a_normal_start_nothing() -> None:
    """`berth version` imports no verb but its own, and builds no other parser."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", BERTH, "version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, BERTH_ADDRESS="/nonexistent/berthd.sock"),
        timeout=30,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    verbs = {name for name in imported if name.startswith("berth.daemon.cli.")}
    assert verbs == {
        "berth.daemon.cli.main",
        "berth.daemon.cli.fastargs",  # (the reader of the line, not a verb)
        "berth.daemon.cli.version",
        "berth.daemon.cli.session",
    }, verbs
    # an argument-less verb builds no parser, and a client needs no socket.py
    for heavy in ("argparse", "socket", "contextlib", "collections.abc", "typing"):
        assert heavy not in imported, heavy


def test_argument_less_verbs_are_parsed_without_argparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """`berth [global options] version|gc` is read by fastargs, as argparse would read
    it; anything else (or anything unusual) is left to argparse."""
    from berth.daemon.cli import main

    monkeypatch.setenv("BERTH_ADDRESS", "/env.sock")
    monkeypatch.setenv("BERTH_NAMESPACE", "envns")
    monkeypatch.delenv("BERTH_TIMEOUT", raising=False)
    args = main._fast(["version"])
    assert args is not None
    assert (args.verb, args.address, args.namespace, args.timeout) == (
        "version",
        "/env.sock",
        "envns",
        main.DEFAULT_TIMEOUT,
    )
    args = main._fast(["-a", "/a.sock", "-n", "x", "--timeout", "2.5", "gc"])
    assert args is not None
    assert (args.verb, args.address, args.namespace, args.timeout) == ("gc", "/a.sock", "x", 2.5)
    for argv in (
        [],
        ["tasks", "ls"],
        ["version", "extra"],
        ["--address=/a", "version"],
        ["--timeout", "soon", "version"],
        ["-a"],
        ["--help"],
        ["version", "--help"],
        ["-x", "version"],
        ["--namespace", "version"],
    ):
        assert main._fast(argv) is None, argv
    # both ways give a verb the same arguments
    parsed = main.build_parser(["-n", "x", "version"]).parse_args(["-n", "x", "version"])
    plain = main._fast(["-n", "x", "version"])
    assert plain is not None
    assert {k: getattr(parsed, k) for k in ("verb", "address", "namespace", "timeout")} == {
        k: getattr(plain, k) for k in ("verb", "address", "namespace", "timeout")
    }


def test_the_setup_s_launcher_starts_without_site() -> None:
    """scripts/setup replaces pip's launcher with one started `-IS` (no site scan)."""
    first = Path(BERTH).read_text().splitlines()[0]
    assert first.endswith(" -IS"), first


# -- the demo -----------------------------------------------------------------------------


def test_the_demo_signals_only_the_pid_it_started() -> None:
    demo = (REPO / "scripts" / "demo").read_text()
    assert not re.search(r"\b(pkill|killall|pgrep)\b", demo)
    kills = re.findall(r"^\s*kill\b.*$", demo, re.MULTILINE)
    assert kills == ['    kill -9 "$BERTHD_PID"'], kills
    assert "BERTHD_PID=$!" in demo
    check = subprocess.run(["bash", "-n", str(REPO / "scripts" / "demo")], capture_output=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("script", ["soak", "bench.py", "bench_metrics.py", "bench_upgrade.py"])
def test_the_scripts_start(script: str) -> None:
    """Scripts no test runs end to end still start: their imports resolve (the soak's
    imported a test module that had moved) and their options parse."""
    path = REPO / "scripts" / script
    if script.startswith("bench_"):  # modules of scripts/bench.py: imported, not run
        argv = ["-c", f"import sys; sys.path.insert(0, {str(path.parent)!r}); import {path.stem}"]
    else:
        argv = [str(path), "--help"]
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if argv[-1] == "--help":
        assert "usage" in done.stdout.lower(), done.stdout


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("/proc/berth-test.sock", "No such file or directory"),  # procfs makes no socket
        ("{dir}/plain-file/berthd.sock", "cannot prepare berthd's directories"),
    ],
)
def test_berthd_that_cannot_listen_says_why_in_one_line(address: str, reason: str) -> None:
    """An address berthd cannot bind (a directory that cannot hold a socket, a file in
    the way) is one line and exit 1, not a traceback; nothing is left running."""
    work = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
    try:
        Path(work, "plain-file").write_text("")
        proc = subprocess.run(
            [
                BERTHD,
                "--root",
                f"{work}/root",
                "--state",
                f"{work}/state",
                "--address",
                address.format(dir=work),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("berthd: "), proc.stderr
        assert reason in lines[0], proc.stderr
    finally:
        subprocess.run(["rm", "-rf", work], check=False)
