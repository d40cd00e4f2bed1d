"""Relays: the only code that touches a pipe a container can reach, each in a thread.

Kernel fact that bites: a pipe has one mutex, and a process holding the other end can
keep it locked for as long as it likes. splice(2) from a socket into a pipe takes the
pipe's mutex and then waits for the socket (`splice_file_to_pipe`); splice from a pipe
into a full socket does the same. Any read, write or splice of that pipe by anyone else
then sleeps in `mutex_lock`, uninterruptibly (state D), until it lets go: O_NONBLOCK,
SPLICE_F_NONBLOCK and poll readiness do not help. A process in a container can do this
to its own stdout, stderr or stdin, unprivileged, and on the shim's loop that would
freeze the whole shim: no API, no reaping, no exit file, not even kill -9 until the
container lets go.

So the loop never touches those pipes. A relay thread copies between the container's
pipe and a pipe only the shim holds (the loop reads or writes that one, non-blocking,
as before); a relay stuck in D state costs only itself. It copies with read(2) and
write(2), never splice: a pipe-to-pipe splice locks both pipes, and would hold the
shim's own pipe while it waits for the container's.

The thread is plain C (native/build_sys.py, `berth_relay_start`), not a Python thread:
it never takes the GIL, so it cannot slow the loop, and it costs its touched stack
pages (a 16 KiB chunk once bytes flowed) rather than a thread state, a frame stack and
a malloc arena (measured: ~0.15 MiB of a shim's memory with Python relays). It blocks
every signal, so SIGCHLD still reaches the signalfd and the rest Python's handlers.
"""

from __future__ import annotations

import os

from berth.native import start_relay as _start_native_relay


def start_relay(source: int, target: int) -> None:
    """Copy `source` to `target` in a thread of its own until the source ends (EOF, an
    error) or the target's reader is gone (the loop gave the stream up: a background
    process that keeps the container's end open silently must not keep the relay). The
    thread owns both fds from here on and closes them when it ends; if it cannot be
    started, they are closed here and OSError is raised."""
    try:
        os.set_blocking(source, True)
        os.set_blocking(target, True)
        _start_native_relay(source, target)
    except BaseException:
        _close(source)
        _close(target)
        raise


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
