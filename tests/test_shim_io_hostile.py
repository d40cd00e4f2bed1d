"""The shim's I/O against what a process in a container can do to its own stdio, without
a runtime: the process is a host process given the container's ends, as runc would."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path

from berth.shim.io import IOConfig, LogConfig, ProcessIO
from berth.shim.loop import Loop
from tests.support.helpers import is_gone, kill, process_state

# Writes a byte, then splices from a socket nobody writes into its stdout: the pipe's
# mutex stays held (relay.py), and any read of the pipe sleeps in state D meanwhile.
HOLDS_ITS_STDOUT = (
    "import os, socket\n"
    "os.write(1, b'x')\n"
    "a, b = socket.socketpair()\n"
    "os.splice(a.fileno(), 1, 65536)\n"
)


def _lines(fd: int, count: int, timeout: float) -> list[dict[str, object]]:
    """Up to `count` JSON lines from `fd`, whatever arrived within `timeout`."""
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()[:count]]


def test_a_process_holding_its_stdout_pipe_never_freezes_the_shims_loop(tmp_path: Path) -> None:
    """The loop never reads a pipe the container can reach (a relay thread does): while the
    process holds its stdout's mutex, the loop's timers keep firing; once it is gone, the
    byte it wrote arrives. Before, the loop's own read slept uninterruptibly: the whole
    shim froze, kill -9 included, for as long as the container liked."""
    report_r, report_w = os.pipe()
    child = os.fork()
    if child == 0:  # the shim's side, in a process of its own: it may freeze
        code = 1
        try:
            os.close(report_r)
            loop = Loop()
            io = ProcessIO(loop, IOConfig(log=LogConfig()), f"{tmp_path}/")
            writer = subprocess.Popen(
                [sys.executable, "-c", HOLDS_ITS_STDOUT], stdout=io.stdio[1], close_fds=True
            )
            io.runtime_spawned()
            os.write(report_w, json.dumps({"writer": writer.pid}).encode() + b"\n")
            ticks = 0

            def tick() -> None:
                nonlocal ticks
                ticks += 1
                loop.call_later(0.05, tick)

            loop.call_later(0.05, tick)
            began = time.monotonic()
            while time.monotonic() - began < 1.5:
                loop.run_once()
            os.write(report_w, json.dumps({"ticks": ticks}).encode() + b"\n")
            writer.kill()
            writer.wait()
            drained = io.drained()
            began = time.monotonic()
            while not drained.done() and time.monotonic() - began < 5:
                loop.run_once()
            io.close()
            out = Path(tmp_path, "stdout.log").read_bytes()
            os.write(
                report_w,
                json.dumps({"drained": drained.done(), "out": out.decode()}).encode() + b"\n",
            )
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    writer_pid = 0
    try:
        first = _lines(report_r, 1, 10)
        assert first and "writer" in first[0], first
        writer_pid = int(first[0]["writer"])  # type: ignore[call-overload]
        rest = _lines(report_r, 2, 10)
        assert rest and int(rest[0]["ticks"]) >= 15, f"the loop froze: {rest}"  # type: ignore[call-overload]
        assert len(rest) == 2 and rest[1] == {"drained": True, "out": "x"}, rest
    finally:
        os.close(report_r)
        for pid in (writer_pid, child):
            if pid and process_state(pid) not in (None, "Z"):
                kill(pid, signal.SIGKILL)
        os.waitpid(child, 0)
        assert writer_pid == 0 or is_gone(writer_pid) or process_state(writer_pid) == "Z"


def _run(loop: Loop, seconds: float) -> None:
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        loop.run_once()


def _tick_forever(loop: Loop) -> None:
    """A timer, so that run_once never sleeps past it."""
    loop.call_later(0.02, _tick_forever, loop)


def test_a_terminal_closed_and_opened_again_keeps_its_output(tmp_path: Path) -> None:
    """A process that closes every fd of its terminal and opens it again later (systemd,
    `exec >/dev/null` then `exec >/dev/console`): what it writes after still arrives.
    Before, the master's first EIO (no fd of the terminal open) ended the output."""
    master, terminal = os.openpty()
    name = os.ttyname(terminal)
    loop = Loop()
    _tick_forever(loop)
    io = ProcessIO(loop, IOConfig(terminal=True, log=LogConfig()), f"{tmp_path}/")
    io.attach_console(master)
    os.write(terminal, b"before\n")
    os.close(terminal)  # the process lets go of its terminal
    _run(loop, 0.3)
    reopened = os.open(name, os.O_RDWR | os.O_NOCTTY)
    os.write(reopened, b"after\n")
    _run(loop, 0.3)
    os.close(reopened)
    io.process_exited()
    drained = io.drained()
    began = time.monotonic()
    while not drained.done() and time.monotonic() - began < 5:
        loop.run_once()
    io.close()
    loop.close()
    out = Path(tmp_path, "stdout.log").read_bytes()
    assert drained.done() and b"before" in out and b"after" in out, out


def test_input_for_a_terminal_nobody_holds_does_not_spin_the_loop(tmp_path: Path) -> None:
    """A process that closed its terminal, and a client that sends more input than the
    terminal queues: the input waits (backpressure), and the loop sleeps. Before, the
    master polled HUP, and the loop spun at 100% of a core until the process exited."""
    fifo = str(tmp_path / "stdin")
    os.mkfifo(fifo)
    master, terminal = os.openpty()
    tty.setraw(terminal)
    loop = Loop()
    _tick_forever(loop)
    io = ProcessIO(loop, IOConfig(stdin=fifo, terminal=True), f"{tmp_path}/")
    io.attach_console(master)
    os.close(terminal)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, b"line of input\n" * 3000)  # 42 KB: more than a terminal queues
        cpu = time.process_time()
        _run(loop, 1.0)
        spent = time.process_time() - cpu
    finally:
        os.close(writer)
        io.process_exited()
        io.close()
        loop.close()
    assert spent < 0.3, f"the loop spun: {spent:.2f} s of CPU in 1 s"
