"""Hostile containers, round 4: storms of processes and output at a container's edges,
against real runc containers. Each test failed on the code before its fix."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from berth.daemon.oci import exec_process
from tests.support.helpers import Daemon

EXECS = 200  # concurrent execs: far more than the shim's 64 requests in flight
EXECS_TRICKLING = 40


def test_an_exec_storm_gets_every_exec_run_and_its_status(daemon: Daemon) -> None:
    """200 clients each exec a process into one container at once. The daemon carries
    every client's calls to the shim on one connection, and the shim refused what came
    past 64 requests in flight ("unavailable: too many requests in flight"): those execs
    never ran and their clients got an error. Requests past the limit now wait to be
    read, as in any server that applies backpressure."""
    daemon.cli("run", "-d", "--busybox", "storm", "sleep", "1000", check=True)
    spec = daemon.call("containers.get", {"id": "storm"})["spec"]
    errors: list[str] = []
    statuses: dict[int, int] = {}

    def run_one(i: int) -> None:
        ref = {"container_id": "storm", "exec_id": f"e{i}"}
        process = exec_process(spec, ["sh", "-c", f"seq 1 1000; exit {i % 250}"])
        try:
            daemon.call("tasks.exec", {**ref, "spec": process, "log": True})
            daemon.call("tasks.start", ref)
            result: dict[str, Any] = daemon.call("tasks.wait", ref)
            statuses[i] = result["exit_status"]
        except Exception as exc:
            errors.append(f"e{i}: {exc}")

    threads = [threading.Thread(target=run_one, args=(i,)) for i in range(EXECS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "an exec never finished"
    assert not errors, f"{len(errors)} of {EXECS} execs failed: {errors[:5]}"
    assert statuses == {i: i % 250 for i in range(EXECS)}
    (bundle,) = [b for b in daemon.task_dirs() if b.name == "storm"]
    for i in range(EXECS):
        out = Path(bundle, "log", f"exec-e{i}.stdout.log").read_bytes().split()
        assert len(out) == 1000 and out[-1] == b"1000", (i, len(out))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_execs_whose_children_keep_writing_to_a_paused_reader_cost_bounded_memory(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Ten execs each leave a background child writing to stdout and stderr as fast as it
    can, and exit; their client's FIFOs are open but it reads nothing (a consumer that
    pauses). Each exit is reported once the drain gives up, and the streams are given up:
    what was read then, up to 16 MiB a stream, all went into the FIFO's buffer for the
    reader (the shim's memory grew by 134 MB). Only what the stream's pipes held when it
    was given up is passed on now: what was written before."""
    daemon.cli("run", "-d", "--busybox", "mem", "sleep", "1000", check=True)
    spec = daemon.call("containers.get", {"id": "mem"})["spec"]
    shim = daemon.shim_pids()["mem"]
    before = _rss_kib(shim)
    held: list[int] = []
    try:
        for i in range(10):
            paths = {}
            for stream in ("stdout", "stderr"):
                path = str(tmp_path / f"{stream}-{i}")
                os.mkfifo(path)
                held.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # never read
                paths[stream] = path
            process = exec_process(spec, ["sh", "-c", "yes & yes >&2 & sleep 1; exit 5"])
            ref = {"container_id": "mem", "exec_id": f"m{i}"}
            daemon.call("tasks.exec", {**ref, "spec": process, **paths})
            daemon.call("tasks.start", ref)
        for i in range(10):
            result = daemon.call("tasks.wait", {"container_id": "mem", "exec_id": f"m{i}"})
            assert result["exit_status"] == 5, result
        grown = _rss_kib(shim) - before
    finally:
        for fd in held:
            os.close(fd)
    # 20 streams, each keeping at most its 1 MiB buffer and what its pipes held (2 MiB and
    # a chunk) for the reader, and some slack: 96 MiB. It was 16 MiB a stream (134 MB).
    assert grown < (20 * 4 + 16) * 1024, f"the shim grew by {grown} KiB"


def test_execs_whose_children_trickle_output_do_not_stop_the_shim_answering(
    daemon: Daemon,
) -> None:
    """Forty execs each leave a background child that writes a byte every 10 ms, and exit
    together. Giving up their streams (after the drain timeout) waited for every byte, up
    to 64 of them a stream, with the shim's loop waiting too: it answered nothing for
    tens of seconds, and a signal sent meanwhile failed (berthd gives a shim 10 s to
    deliver one). The container's SIGTERM is now delivered and its exit reported."""
    trap = "trap 'exit 7' TERM; while :; do sleep 1; done"
    daemon.cli("run", "-d", "--busybox", "trickle", "sh", "-c", trap, check=True)
    spec = daemon.call("containers.get", {"id": "trickle"})["spec"]
    # They all exit together, once /tmp/go exists, so that their drains time out together.
    trickle = (
        "while [ ! -e /tmp/go ]; do usleep 20000; done;"
        " (while :; do printf x; usleep 10000; done) & exit 5"
    )
    for i in range(EXECS_TRICKLING):
        ref = {"container_id": "trickle", "exec_id": f"t{i}"}
        process = exec_process(spec, ["sh", "-c", trickle])
        daemon.call("tasks.exec", {**ref, "spec": process, "log": True})
        daemon.call("tasks.start", ref)
    daemon.cli("tasks", "exec", "--exec-id", "go", "trickle", "touch", "/tmp/go", check=True)
    time.sleep(2.5)  # the scenario: the drains time out and the streams are given up now
    result = daemon.cli("tasks", "kill", "-s", "TERM", "trickle")
    assert result.returncode == 0, result.stderr
    assert daemon.cli("tasks", "wait", "trickle", timeout=120).stdout == b"7\n"
    for i in range(EXECS_TRICKLING):
        exit_ = daemon.call("tasks.wait", {"container_id": "trickle", "exec_id": f"t{i}"})
        assert exit_["exit_status"] in (5, 137), exit_  # 137: killed with its container
