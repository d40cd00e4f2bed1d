"""Hostile containers, round 3: what a container's own behaviour (its output, its
processes, its resources) may cost the shim and the daemon. The first test failed on the
code before its fix (a consumer that pauses lost output); the two after it hold that
fix's edges (a reader that goes away, the shim's own two holds of one FIFO)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from berth.shim.io import FifoSink, IOConfig, ProcessIO
from berth.shim.loop import Loop
from tests.support.helpers import BERTH, Daemon, kill, stop_child, wait_until

LINES = 400_000  # ~2.7 MB: far more than a FIFO, the shim's 1 MiB buffer and a pipe hold


def test_a_consumer_that_pauses_loses_no_output_of_an_attached_run(daemon: Daemon) -> None:
    """`berth run ... | consumer`, a container that writes fast and a consumer that pauses
    longer than the shim's stall timeout (2 s) before it reads: every line arrives. The
    CLI, blocked on its stdout, reads nothing from the FIFO meanwhile; the shim took that
    for a reader that was gone and dropped everything past its buffer (2.0 of 2.7 MB
    after a 3 s pause, all but 160 KB after 6 s), and the run still exited 0. A FIFO
    whose reader is there keeps its backpressure, as any pipe does; only a FIFO nobody
    but the shim holds open drops."""
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    cli = subprocess.Popen(
        [BERTH, "run", "--rm", "--busybox", "flood", "seq", "1", str(LINES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        time.sleep(5)  # the consumer's pause: the scenario, not a bound on anything
        out, err = cli.communicate(timeout=120)
    finally:
        stop_child(cli)
    assert cli.returncode == 0, err
    lines = out.split()
    assert len(lines) == LINES, f"{LINES - len(lines)} of {LINES} lines lost; {err[-300:]!r}"
    assert lines[-1] == str(LINES).encode()


def test_a_reader_that_pauses_and_then_dies_no_longer_holds_the_container(daemon: Daemon) -> None:
    """The other side of the rule above: an attached CLI whose stdout nobody reads holds
    the container back (backpressure), and once it is killed the container is no longer
    held: its output is dropped past the shim's buffer, it runs to its end, and its exit
    status is reported."""
    # The CLI is killed: its FIFO directory (under TMPDIR) goes with the daemon's dir.
    env = dict(
        os.environ,
        BERTH_ADDRESS=daemon.address,
        BERTH_NAMESPACE=daemon.namespace,
        TMPDIR=daemon.dir,
    )
    cli = subprocess.Popen(
        [BERTH, "run", "--busybox", "held", "sh", "-c", "seq 1 5000000; exit 3"],  # 38 MB
        stdout=subprocess.PIPE,  # never read: the CLI blocks on it, and reads no more
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_until(
            lambda: any(
                t["id"] == "held" and t["status"] == "running"
                for t in daemon.call("tasks.list")["tasks"]
            ),
            timeout=30,
            what="the container to run",
        )
        time.sleep(3)  # past the stall timeout, with its reader there: held back
        assert daemon.call("tasks.get", {"container_id": "held"})["status"] == "running"
    finally:
        stop_child(cli)  # SIGTERM: the CLI and its FIFOs are gone
    result = daemon.cli("tasks", "wait", "held", timeout=60)
    assert result.stdout == b"3\n", result
    shim_log = daemon.cli("tasks", "shim-log", "held").stdout
    assert b"dropping output" in shim_log, shim_log


def test_one_fifo_named_for_both_streams_and_nobody_reading_never_blocks(tmp_path: Path) -> None:
    """A client that names one FIFO for stdout and stderr, then is gone: the shim holds the
    FIFO open twice, and neither of its own holds may pass for a reader, or the stall rule
    above would keep the process blocked for ever. Here a host process stands in for the
    container (given the container's ends, as runc would), writing 8 MiB to each stream."""
    fifo = str(tmp_path / "out")
    os.mkfifo(fifo)
    loop = Loop()

    def tick() -> None:  # a timer, so that run_once never sleeps past it
        loop.call_later(0.05, tick)

    tick()
    io = ProcessIO(loop, IOConfig(stdout=fifo, stderr=fifo), f"{tmp_path}/")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITES_BOTH_STREAMS],
        stdout=io.stdio[1],
        stderr=io.stdio[2],
        stdin=subprocess.DEVNULL,
        close_fds=True,
    )
    try:
        io.runtime_spawned()
        deadline = time.monotonic() + 60  # a hang guard only: it takes ~2 s (the stall)
        while writer.poll() is None and time.monotonic() < deadline:
            loop.run_once()
        assert writer.poll() == 0, "the process stayed blocked on its output"
        drained = io.drained()
        while not drained.done() and time.monotonic() < deadline:
            loop.run_once()
        assert drained.done()
    finally:
        if writer.poll() is None:
            kill(writer.pid)
        writer.wait()
        io.close()
        loop.close()
    assert not FifoSink._holders, "a FIFO sink kept its hold of the FIFO after its close"


WRITES_BOTH_STREAMS = (
    "import os\nchunk = b'x' * 65536\nfor _ in range(128):\n"
    "    os.write(1, chunk)\n    os.write(2, chunk)\n"
)
