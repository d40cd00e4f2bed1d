"""The CLI's argparse-free reading of its hot commands (daemon/cli/fastargs.py) against
argparse itself: wherever fastargs reads a line, argparse reads it the same; where it
does not, argparse does (and may refuse it)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.daemon.cli import fastargs
from berth.daemon.cli.main import _fast, build_parser
from tests.support.helpers import BERTH


def _argparse(argv: list[str]) -> dict[str, object] | None:
    """What argparse makes of `argv`; None if it refuses it (or prints help)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return vars(build_parser(argv).parse_args(argv))
        except SystemExit:
            return None


def _both(argv: list[str]) -> tuple[dict[str, object] | None, dict[str, object] | None]:
    fast = _fast(argv)
    return (vars(fast) if fast is not None else None), _argparse(argv)


COMMON = [
    ["run", "--rm", "--busybox", "r1", "/bin/true"],
    ["-a", "/tmp/s.sock", "run", "-d", "--busybox", "web", "httpd", "-f", "-p", "80"],
    ["run", "--rm", "-t", "--env", "A=1", "--env", "B=2", "--busybox", "x", "sh", "-c", "echo"],
    ["--namespace", "n1", "--timeout", "5", "run", "--net", "blue", "-p", "8080:80", "img", "x"],
    ["run", "--log-max-size", "1024", "--log-max-files", "3", "--rootfs", "/r", "x", "true"],
    ["run", "--busybox", "x"],
    ["tasks", "exec", "--exec-id", "e1", "x1", "/bin/true"],
    ["t", "exec", "--exec-id", "e1", "-t", "-d", "--cwd", "/", "x1", "sh", "-c", "ls -l"],
    ["-n", "moby", "tasks", "exec", "--env", "A=1", "--exec-id", "e2", "x1", "ls", "-l"],
    ["tasks", "exec", "--exec-id", "e1", "x1"],
]


def test_the_common_lines_are_read_without_argparse_and_as_argparse_reads_them() -> None:
    for argv in COMMON:
        fast, slow = _both(argv)
        assert fast is not None, argv
        assert fast == slow, argv


def test_what_fastargs_does_not_follow_is_left_to_argparse() -> None:
    for argv in (
        ["run", "--help"],
        ["run", "--bus", "x", "true"],  # an abbreviation: argparse takes it
        ["run", "-dt", "--busybox", "x", "true"],  # bundled flags
        ["run", "--env=A=1", "--busybox", "x", "true"],
        ["run", "--log-max-size", "big", "x"],  # not a number: argparse says so
        ["tasks", "exec", "x1", "true"],  # --exec-id missing: argparse says so
        ["tasks", "ls"],  # not a hot command
        ["--version"],
        ["run", "--env"],
        ["tasks", "exec", "--exec-id", "e", "x1", "--", "ls"],  # argparse drops the --
    ):
        assert _fast(argv) is None, argv


def test_the_remainder_is_argparses() -> None:
    assert fastargs.REMAINDER == argparse.REMAINDER


WORDS = st.sampled_from(
    [
        "run", "tasks", "t", "exec", "ls", "x1", "/bin/true", "sh", "-c", "A=1", "5", "-5",
        "--rm", "-d", "--detach", "-t", "--tty", "--busybox", "--bus", "--env", "--env=A=1",
        "--exec-id", "--cwd", "--net", "-p", "--publish", "--ip", "--log-max-size",
        "--log-max-files", "--rootfs", "--label", "--mount", "--user", "-u", "--read-only",
        "--runtime", "--snapshotter", "-a", "--address", "-n", "--timeout", "--", "-",
        "-h", "-dt", "--log", "--unknown", "",
    ]
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(
    prefix=st.lists(WORDS, max_size=3),
    verb=st.sampled_from([["run"], ["tasks", "exec"], ["t", "exec"]]),
    rest=st.lists(WORDS, max_size=8),
)
def test_fastargs_reads_every_line_as_argparse_does(
    prefix: list[str], verb: list[str], rest: list[str]
) -> None:
    argv = [*prefix, *verb, *rest]
    fast, slow = _both(argv)
    if fast is not None:
        assert fast == slow, argv


def test_lines_of_the_usual_shape_take_the_fast_path_and_read_as_argparse_reads_them() -> None:
    """Lines built the way people write them (seeded, so the same every run): most take
    the fast path, and each that does reads as argparse reads it."""
    rng = random.Random(1315)
    values = ["x", "A=1", "blue", "8080:80", "/work", "5", "k=v", "run", "exec"]
    fast_lines = 0
    for _ in range(300):
        argv = rng.choice([[], ["-a", "/s"], ["-n", "ns", "--timeout", "7"]])
        argv += rng.choice([["run", "--busybox"], ["tasks", "exec", "--exec-id", "e"]])
        argv += rng.sample(["--rm", "-d", "-t", "--log", "--read-only"], rng.randint(0, 3))
        for _ in range(rng.randint(0, 3)):
            argv += [rng.choice(["--env", "--cwd", "--net", "-p", "--label"]), rng.choice(values)]
        argv += ["x1", *rng.choices([*values, "-c", "-l", "--rm"], k=rng.randint(0, 4))]
        fast, slow = _both(argv)
        if fast is not None:
            fast_lines += 1
            assert fast == slow, argv
    assert fast_lines >= 150, fast_lines


def test_a_declaration_fastargs_does_not_know_makes_it_step_aside() -> None:
    """A verb that one day declares more than fastargs reads (choices, nargs='+', another
    action) is parsed by argparse again, not misread."""
    for names, options in (
        (("--level",), {"choices": ["a", "b"]}),
        (("ids",), {"nargs": "+"}),
        (("--all",), {"action": "store_const", "const": 1}),
        (("--n",), {"action": "count"}),
    ):
        try:
            fastargs.Recorder().add_argument(*names, **options)
        except fastargs.Unsupported:
            continue
        raise AssertionError(f"{names} {options} was taken")


def test_a_repeated_option_adds_to_a_copy_of_its_default_as_argparse_does() -> None:
    recorder = fastargs.Recorder()
    recorder.add_argument("--tag", action="append", default=["base"])
    recorder.add_argument("rest", nargs=fastargs.REMAINDER)
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", action="append", default=["base"])
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    for argv in (["--tag", "a", "--tag", "b", "x"], ["x", "--tag", "c"], []):
        values: dict[str, object] = {}
        assert fastargs.parse(recorder, argv, values)
        assert values == vars(parser.parse_args(argv)), argv
    fresh: dict[str, object] = {}
    assert fastargs.parse(recorder, [], fresh) and fresh["tag"] == ["base"]


# --- odd input: one line and an exit status, never a traceback ---------------------------


def _berth(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI against a socket nobody serves: what is refused here is refused before
    berthd is asked anything."""
    return subprocess.run(
        [BERTH, "-a", "/nonexistent/berthd.sock", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "BERTH_TIMEOUT": "", **env},
    )


@pytest.mark.parametrize("value", ["abc", "nan", "-1", "0", "inf", "-inf", "1e300", "86401"])
def test_a_bad_timeout_is_refused_where_it_is_read(value: str) -> None:
    """--timeout is an option: a usage error (exit 2, as `berth --help` says); the same
    value in BERTH_TIMEOUT is an error of the environment (exit 1). float() let nan, inf,
    negatives and 1e300 through to the socket (ValueError, OverflowError), and
    BERTH_TIMEOUT=abc raised at start: tracebacks."""
    option = _berth(f"--timeout={value}", "version")
    assert option.returncode == 2, option
    assert "argument --timeout: " in option.stderr and "Traceback" not in option.stderr
    env = _berth("version", BERTH_TIMEOUT=value)
    assert env.returncode == 1, env
    assert env.stderr.startswith("berth: BERTH_TIMEOUT: ") and env.stderr.count("\n") == 1
    assert _fast([f"--timeout={value}", "version"]) is None
    assert _fast(["--timeout", value, "version"]) is None  # argparse says why


def test_a_good_timeout_still_reads_both_ways() -> None:
    assert _fast(["--timeout", "0.5", "version"]).timeout == 0.5  # type: ignore[union-attr]
    reached = _berth("version", BERTH_TIMEOUT="86400")
    assert reached.returncode == 1 and "cannot reach berthd" in reached.stderr, reached


@pytest.mark.parametrize(
    ("argv", "status", "error"),
    [
        (["leases", "create", "--expire", "inf"], 2, "argument --expire: 'inf'"),
        (["leases", "create", "--expire", "1e18"], 2, "argument --expire: '1e18'"),
        (["leases", "create", "--expire", "nan"], 2, "argument --expire: 'nan'"),
        (["events", "--since", "9" * 25], 2, "argument --since: "),
        (["run", "--log-max-size", "9" * 25, "--busybox", "x"], 2, "--log-max-size: "),
        (["run", "--log-max-files", "-1", "--busybox", "x"], 2, "--log-max-files: "),
        (["tasks", "shim-log", "--tail", "9" * 25, "x"], 1, "berth: --tail takes a number"),
        (["leases", "create", "--label", "abc"], 1, "berth: --label takes K=V, not 'abc'"),
        (["containers", "create", "--busybox", "--label", "a", "c"], 1, "--label takes K=V"),
        (["run", "--busybox", "--label", "a", "c", "true"], 1, "--label takes K=V"),
        (["content", "ingest", "--label", "a", "ref"], 1, "--label takes K=V"),
        (["run", "--busybox", "--user", "9" * 20, "c", "true"], 1, "--user with --rootfs"),
        (["run", "--busybox", "--user", "0:" + "9" * 20, "c"], 1, "--user with --rootfs"),
        (["run", "--net", "bridge", "-p", "9" * 20 + ":80", "--busybox", "c"], 1, "ports 1-"),
    ],
)
def test_numbers_and_labels_the_wire_cannot_carry_are_refused_in_one_line(
    argv: list[str], status: int, error: str
) -> None:
    """A number beyond int64 failed in the wire's encoder ("connection unusable"), a float
    lifetime of inf or 1e18 in berthd (`internal`), a label without `=` in dict() (a
    traceback)."""
    result = _berth(*argv)
    assert result.returncode == status and error in result.stderr, result
    assert "Traceback" not in result.stderr and "cannot reach" not in result.stderr
