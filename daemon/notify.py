"""systemd's notify protocol (`Type=notify`): READY=1 once serving, STOPPING=1 when
stopping, MAINPID=<pid> when a successor has taken over (the unit needs NotifyAccess=all
for a message from a process that is not yet its main one). A no-op without
NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("berthd")


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    if path.startswith("@"):  # systemd's own abstract socket: we only ever connect to it
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", path, exc)
