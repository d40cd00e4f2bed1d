"""The pty of a terminal process: received from the OCI runtime, resized by clients.

The runtime allocates the pty inside the container (its own devpts) and sends the master
over `--console-socket` with SCM_RIGHTS, then closes the connection. The socket must be
listening before the runtime runs; the runtime does not wait for accept (the backlog holds
the connection), so the master is collected after the runtime command has exited.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

from berth.shim.wire.errors import FailedPrecondition, InvalidArgument
from berth.shim.wire.unixsock import bind_unix


class ConsoleSocket:
    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = bind_unix(path, mode=0o600, backlog=1)

    def receive_master(self) -> int:
        """The pty master the runtime sent (call after the runtime command exited)."""
        self._sock.setblocking(False)
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            raise FailedPrecondition("the runtime did not send a console") from None
        with conn:
            conn.settimeout(5)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        if not fds:
            raise FailedPrecondition("the runtime connected to the console socket but sent no fd")
        master, extra = fds[0], fds[1:]
        for fd in extra:
            os.close(fd)
        os.set_inheritable(master, False)
        os.set_blocking(master, False)
        return master

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def resize(master: int, width: int, height: int) -> None:
    """Set the window size (TIOCSWINSZ); the kernel sends SIGWINCH to the foreground group."""
    if not (0 < width <= 0xFFFF and 0 < height <= 0xFFFF):
        raise InvalidArgument("width and height must be 1..65535")
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
