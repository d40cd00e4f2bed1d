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
shim's own pipe while it waits for the container's. Threads start with the shim's
signal mask (SIGCHLD blocked), so the signalfd still sees every SIGCHLD.
"""

from __future__ import annotations

import _thread
import os
import select

from berth.shim.loop import log

STACK_SIZE = 256 * 1024  # a relay needs a few frames; the default would reserve 8 MiB
# What one read takes: measured (a relay's private memory, 1 GiB through stdout), a 64 KiB
# buffer cost 82 KiB and a 16 KiB one 34 KiB per relay, at the same throughput.
CHUNK = 16 * 1024


def start_relay(source: int, target: int, name: str) -> None:
    """Copy `source` to `target` in a thread of its own until the source ends (EOF, an
    error) or the target's reader is gone (the loop gave the stream up: a background
    process that keeps the container's end open silently must not keep the relay). The
    thread owns both fds from here on and closes them when it ends."""
    try:
        os.set_blocking(source, True)
        os.set_blocking(target, True)
        _thread.stack_size(STACK_SIZE)
        _thread.start_new_thread(_copy, (source, target, name))
    except BaseException:
        _close(source)
        _close(target)
        raise


def _copy(source: int, target: int, name: str) -> None:
    # What a turn allocates it frees at once (bytes are not even tracked), so this thread
    # does not push the collector over its threshold and run the loop's finalizers.
    try:
        poller = select.poll()
        poller.register(source, select.POLLIN)
        poller.register(target, 0)  # POLLERR (always reported): its reader went away
        while True:
            # poll takes no pipe mutex: a relay waits here, not inside read, until there is
            # something to move, and notices a closed reader while the source is quiet.
            for fd, _ in poller.poll():
                if fd == target:
                    return
            try:
                data = os.read(source, CHUNK)
            except OSError:  # EIO and the like: the stream is over
                return
            if not data:
                return
            while data:
                try:
                    written = os.write(target, data)
                except OSError:  # EPIPE: nobody reads any more; the rest is dropped
                    return
                data = data[written:]
    except Exception as exc:  # never a traceback on the shim's stderr for a relay
        log(f"relay {name} failed: {exc!r}")
    finally:
        _close(source)
        _close(target)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
