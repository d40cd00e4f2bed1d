"""Kernel pipes sized for throughput: every pipe the shim moves a process's output through."""

from __future__ import annotations

import fcntl
import os

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024  # /proc/sys/fs/pipe-max-size default; fewer wakeups per MiB


def make_pipe(*, nonblocking_write: bool = False) -> tuple[int, int]:
    """(read end, write end), both close-on-exec. `nonblocking_write` for a pipe the shim's
    loop writes to itself: a reader that stalls must never make the loop wait."""
    r, w = os.pipe2(os.O_CLOEXEC)
    if nonblocking_write:
        os.set_blocking(w, False)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # pipe-max-size lowered by the admin: the default size works, only slower
    return r, w
