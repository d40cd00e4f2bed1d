"""The zygote: one pre-imported interpreter that forks a shim per container.

Why: a fresh interpreter per container costs ~40 ms of start-up and its own copy of every
imported module; forking the daemon itself would drag trio's epoll and threads along (and
forking inside a running trio loop is unsupported). The zygote imports exactly what a shim
needs, freezes those objects out of the garbage collector (`gc.freeze()`: a collection in a
child then does not touch, and so does not copy, the inherited pages) and forks on request.
Measured on this machine class: ~2.5 ms from request to a serving child, and a private
memory (USS) per shim under 2 MiB.

It talks to its daemon over an inherited socketpair with the ordinary protocol, serves one
request at a time, and dies with the daemon: the daemon's end of the socketpair closes when
the daemon dies, however it dies, and the zygote exits on that EOF. The shims it made are
detached and live on.

Kernel fact, where it bit: PR_SET_PDEATHSIG fires when the parent *thread* exits, not the
parent process. trio starts subprocesses from a worker thread, and its idle workers exit
after seconds, so a pdeathsig zygote was killed shortly after every start.
"""

from __future__ import annotations

import gc
import os
import signal
import socket

import prctl

from berth.shim.main import spawn_detached
from berth.shim.rehearsal import rehearse
from berth.shim.task import ShimConfig
from berth.shim.wire.errors import BerthError, Internal
from berth.shim.wire.protocol import (
    Connection,
    ConnectionClosed,
    ErrorReply,
    Hello,
    NeedData,
    RemoteProtocolError,
    Request,
    Response,
    Role,
)

MAX_FRAME = 256 * 1024


def serve(ctl_fd: int, work_dir: str | None = None) -> int:
    try:
        prctl.set_proctitle("berth-shim zygote")
    except Exception:
        pass
    sock = socket.socket(fileno=ctl_fd)
    sock.setblocking(True)
    conn = Connection(Role.SERVER, max_frame_size=MAX_FRAME, peer_name="berth-zygote")
    if os.environ.get("BERTH_ZYGOTE_REHEARSAL", "1") != "0":
        rehearse(directory=work_dir)  # see berth.shim.rehearsal: fewer copied pages per shim
    # The shims are the zygote's children, but it never waits: the kernel reaps them
    # (each shim resets SIGCHLD to the default before doing anything else).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    gc.collect()
    gc.freeze()
    while True:
        data = sock.recv(65536)
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                if exc.fatal:
                    return 1
                sock.sendall(conn.send(ErrorReply(exc.request_id, "invalid_argument", str(exc))))
                continue
            if isinstance(event, NeedData):
                break
            if isinstance(event, ConnectionClosed):
                return 0
            if isinstance(event, Hello):
                sock.sendall(conn.send(conn.server_handshake(event)))
            elif isinstance(event, Request):
                sock.sendall(conn.send(_handle(event)))


def _handle(req: Request) -> Response | ErrorReply:
    if req.method != "spawn":
        return ErrorReply(req.id, "unimplemented", f"zygote has no method {req.method!r}")
    try:
        config = ShimConfig.from_params(req.params.get("config") or {})
        log_path = req.params.get("log_path")
        pid = spawn_detached(config, log_path=log_path if isinstance(log_path, str) else None)
    except BerthError as exc:
        return ErrorReply.from_exception(req.id, exc)
    except Exception as exc:
        return ErrorReply.from_exception(req.id, Internal(f"spawning shim failed: {exc}"))
    return Response(req.id, {"pid": pid})
