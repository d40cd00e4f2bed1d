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
import sys
import sysconfig
import types

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
IMMORTAL = 0xFFFFFFFF  # the low half of an immortal object's reference count (PEP 683)


def serve(ctl_fd: int, work_dir: str | None = None) -> int:
    try:
        prctl.set_proctitle("berth-shim zygote")
    except Exception:
        pass
    _restore_fd_limit()
    sock = socket.socket(fileno=ctl_fd)
    sock.setblocking(True)
    conn = Connection(Role.SERVER, max_frame_size=MAX_FRAME, peer_name="berth-zygote")
    if os.environ.get("BERTH_ZYGOTE_REHEARSAL", "1") != "0":
        rehearse(directory=work_dir)  # see berth.shim.rehearsal: fewer copied pages per shim
    # The shims are the zygote's children, but it never waits: the kernel reaps them
    # (each shim resets SIGCHLD to the default before doing anything else).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    gc.collect()
    if os.environ.get("BERTH_ZYGOTE_IMMORTAL", "1") != "0":
        immortalize()
    gc.freeze()
    try:
        return _serve_requests(sock, conn)
    except (BrokenPipeError, ConnectionResetError):
        return 0  # berthd went away (killed while this zygote started): nothing to do


def _restore_fd_limit() -> None:
    """Shims and their containers get the soft limit of open files berthd was started
    with (BERTH_NOFILE_SOFT), not the one berthd raised for itself (daemon/startup.py)."""
    value = os.environ.get("BERTH_NOFILE_SOFT", "")
    if not value.isdigit():
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(int(value), hard)
    if wanted < soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _serve_requests(sock: socket.socket, conn: Connection) -> int:
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


def immortal_objects_supported() -> bool:
    """CPython 3.12 and 3.13, 64-bit, GIL build, no reference tracing: the builds whose
    object header and immortality rule `immortalize` relies on."""
    return (
        (3, 12) <= sys.version_info[:2] <= (3, 13)
        and sys.maxsize > 2**32
        and sys.byteorder == "little"
        and not sysconfig.get_config_var("Py_GIL_DISABLED")
        and not hasattr(sys, "getobjects")  # Py_TRACE_REFS: another header layout
    )


def immortalize() -> int:
    """Make every object the zygote holds immortal (PEP 683); how many it made so.

    Why: a forked shim shares the zygote's pages until it writes to them, and the writes
    that copy most pages are reference counts: reading a module global or calling a
    function increments and decrements counts in objects the shim never changes. From
    CPython 3.12 on, an object whose reference count has the low 32 bits all set is
    immortal: Py_INCREF and Py_DECREF leave it alone. Setting that on every object the
    zygote can reach (gc-tracked objects, what they refer to, and the constants and names
    of code objects, which the collector does not traverse) keeps those pages shared.
    Immortal objects are never freed; the zygote's are kept for the shim's life anyway.
    Cost: ~150 ms once per zygote (~40,000 objects made immortal here), which a container
    created in berthd's first moments waits for; measured gain: shim USS 2.6 -> 1.2 MiB.
    The pass itself allocates nothing per object: what it freed would stay resident in the
    zygote, mapped by every shim (a set of the addresses seen cost the zygote 10 MB and a
    shim 0.5 MiB of PSS at 20 containers).
    """
    if not immortal_objects_supported():
        return 0
    import ctypes

    # An object already immortal is not visited again: no set of the addresses seen (a
    # set and an int per object, ~7 MB here, freed afterwards but left resident in the
    # zygote's heap and arenas, which every shim then maps: PSS). The objects immortal
    # before this pass (None, small ints, interned strings, static types) have no
    # referents that gc.get_referents reports.
    count = 0
    stack: list[object] = gc.get_objects()
    while stack:
        obj = stack.pop()
        # ob_refcnt is the header's first word; its low half (little-endian: first).
        refcount = ctypes.c_uint32.from_address(id(obj))
        if refcount.value == IMMORTAL:
            continue
        refcount.value = IMMORTAL
        count += 1
        stack.extend(gc.get_referents(obj))
        if isinstance(obj, types.CodeType):
            # co_code, co_varnames, co_freevars and co_cellvars are made on first access
            # and cached on the code object (3.12): made here, before the fork, they are
            # shared and immortal too (measured: shim USS 1.35 -> 1.24 MiB with them).
            stack.extend(obj.co_consts)
            stack.extend(obj.co_names)
            stack.extend(obj.co_varnames)
            stack.extend(obj.co_freevars + obj.co_cellvars)
            stack.extend((obj.co_code, obj.co_linetable, obj.co_exceptiontable))
            stack.extend((obj.co_filename, obj.co_name, obj.co_qualname))
    return count


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
