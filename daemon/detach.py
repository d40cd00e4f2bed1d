"""`berthd --detach`: fork, and return once the forked daemon serves.

The command (the parent) waits on a pipe. The child writes one NUL byte to it where it
tells systemd READY=1 (main.py), so the parent prints the child's pid and exits 0; if the
child exits first, the parent prints how it ended and exits 1. `berthd --takeover
--detach` is therefore a synchronous upgrade: it fits berthd.service's ExecReload=, whose
process systemd starts inside the service's cgroup, where the forked successor stays, so
that systemd accepts its MAINPID= (NotifyAccess=all).

The child has a session of its own, stdin and stdout on /dev/null, and keeps stderr only
if that is the journal ($JOURNAL_STREAM names it) or a regular file (a log): a terminal
would get the log after the command returned, and a pipe's reader would wait for an EOF
that never comes. Its stderr otherwise goes to /dev/null, and until it serves, its log
goes over the pipe too, for the parent to print. A failure's one-line reason always does.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time

READY = b"\0"

_channel: int | None = None  # the child's end of the pipe, until it serves
_relay: logging.Handler | None = None


def start() -> int | None:
    """Fork. The parent waits and returns its exit status; the child returns None."""
    read_end, write_end = os.pipe()  # neither end is inherited by what berthd spawns
    parent = os.getpid()
    child = os.fork()
    if child:
        os.close(write_end)
        return _wait(child, read_end)
    os.close(read_end)
    os.setsid()
    global _channel
    _channel = write_end
    if not _stdio_to_devnull():
        _relay_log()
    if os.environ.get("LISTEN_PID") == str(parent):  # sockets systemd passed: now ours
        os.environ["LISTEN_PID"] = str(os.getpid())
    return None


def ready() -> None:
    """The detached daemon serves: its parent may return."""
    global _channel
    if _channel is None:
        return
    _send(READY)
    _stop_relaying()
    if _channel is not None:
        os.close(_channel)
        _channel = None


def failed(message: str) -> None:
    """Why the detached daemon exits before serving, for its parent to print."""
    _send(message.replace("\0", "\\0").encode(errors="replace") + b"\n")


def _stdio_to_devnull() -> bool:
    """stdin, stdout, and (unless it is the journal or a file) stderr to /dev/null; true
    if stderr was kept."""
    try:
        st = os.fstat(2)
        journal = os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"
        keep = journal or stat.S_ISREG(st.st_mode)
    except OSError:
        keep = False
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if keep else (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return keep


class _Relay(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        failed(self.format(record))


def _relay_log() -> None:
    global _relay
    _relay = _Relay()
    root = logging.getLogger()
    if root.handlers:
        _relay.setFormatter(root.handlers[0].formatter)
    root.addHandler(_relay)


def _stop_relaying() -> None:
    global _relay
    if _relay is not None:
        logging.getLogger().removeHandler(_relay)
        _relay = None


def _send(data: bytes) -> None:
    global _channel
    while _channel is not None and data:
        try:
            data = data[os.write(_channel, data) :]
        except OSError:  # the parent is gone: nobody waits any more
            _stop_relaying()
            os.close(_channel)
            _channel = None


def _wait(child: int, fd: int) -> int:
    try:
        with open(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                text, marker, _ = chunk.partition(READY)
                sys.stderr.buffer.write(text)
                sys.stderr.flush()
                if marker:
                    print(child, flush=True)
                    return 0
    except KeyboardInterrupt:
        print(f"berthd: no longer waiting for berthd pid {child}", file=sys.stderr)
        return 130
    print(f"berthd: the detached berthd (pid {child}) {_ending(child)}", file=sys.stderr)
    return 1


def _ending(child: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                return f"was killed by signal {-code} before serving"
            return f"exited with status {code} before serving"
        if time.monotonic() > deadline:
            return "stopped reporting before serving (still running)"
        time.sleep(0.05)
