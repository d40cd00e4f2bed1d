"""`berth-grpc`: containerd's gRPC API in front of berthd, as a process of its own.

    berth-grpc --address /run/berth/containerd.sock --berthd /run/berth/berthd.sock \
               --state /run/berth

berthd starts it when `[grpc] address` is configured. It is separate so that protobuf and
containerd's message stubs stay out of berthd, and its cost is visible on its own line in
the benchmark. It speaks gRPC over its own HTTP/2 (http2, h2server) on asyncio,
single-threaded. It holds no state: every call is translated to berthd's API.

It outlives berthd's own restarts and upgrades, so that dockerd and ctr never see the
containerd socket go: berthd records it in `<state>/grpc.json`, and the berthd that
follows (a successor, a standby, a restart) adopts it; its calls ride over the gap
(berthd's listening socket queues them; a refused connect is retried for a few seconds).
It is replaced only by a berth-grpc of another version: the new one binds a temporary
name and renames it over the socket (no moment without a listener), then the old one
stops gracefully. A berthd stopping for good stops it; one that berthd does not answer
for ORPHAN_TIMEOUT seconds exits by itself.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "ssl" not in sys.modules:
    # berth-grpc only ever serves and calls UNIX sockets, in clear. Python's ssl module,
    # which asyncio imports for TLS it never does here, maps libssl and libcrypto: 4 MiB
    # of this process's private memory.
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` -> ImportError
    from berth.daemon import deferred

    # protobuf's descriptor_pool imports its pure-Python message implementation (with
    # text_format, the decoders and encoders) even when upb's C messages are the ones in
    # use, as they are here: 1 MiB of this process's memory, deferred to a first use that
    # does not come.
    deferred.defer("google.protobuf.internal.python_message")

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("berth.grpc")


ORPHAN_TIMEOUT = 60.0  # seconds without any berthd before this front end exits
REPLACED_LINGER = 1.0  # seconds a replaced front end serves on before it stops
RECORD = "grpc.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="berth-grpc", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="the gRPC socket to serve")
    parser.add_argument("--berthd", required=True, help="berthd's API socket")
    parser.add_argument("--state", default="", help="berthd's state dir (records this process)")
    parser.add_argument("--ttrpc-address", default="", help="also serve over ttrpc here")
    parser.add_argument("--socket-group", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    return parser.parse_args(argv)


def _check_replaceable(path: str, predecessor: int) -> None:
    """The socket may be replaced if nobody serves it, or if the one serving it is the
    front end this one replaces; never a socket of something else (a containerd)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"berth-grpc: {path} exists and is not a socket")
    if predecessor:
        return
    from berth.shim.wire.unixsock import is_served

    if not is_served(path):
        return  # nobody answers: stale
    raise SystemExit(f"berth-grpc: {path} is served by another process")


def _record(args: argparse.Namespace) -> None:
    """Tell berthd (and its successors) who serves the socket."""
    if not args.state:
        return
    from berth.daemon import __version__
    from berth.shim.fs import atomic_write
    from berth.shim.state import process_start_time

    doc = {
        "pid": os.getpid(),
        "start_time": process_start_time(os.getpid()) or 0,
        "version": __version__,
        "address": args.address,
        "log_format": args.log_format,  # a berthd logging otherwise starts its own
    }
    atomic_write(os.path.join(args.state, RECORD), json.dumps(doc).encode())


def _predecessor(args: argparse.Namespace) -> int:
    """The pid of the front end recorded as serving the socket now, if it lives."""
    if not args.state:
        return 0
    from berth.shim.state import process_start_time

    try:
        with open(os.path.join(args.state, RECORD), "rb") as f:
            doc = json.loads(f.read(4096))
        pid, start_time = int(doc["pid"]), int(doc["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if pid != os.getpid() and start_time and process_start_time(pid) == start_time:
        return pid
    return 0


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


async def serve(args: argparse.Namespace) -> None:
    # as containerd dumps its goroutines; first, since SIGUSR1 unhandled would kill
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    from berth.daemon.grpc import convert as containerd_api
    from berth.daemon.grpc.h2server import Server as GrpcServer
    from berth.daemon.grpc.services import Backend, routes

    containerd_api.types()  # fail now, with a clear message, if the stubs are missing
    backend = Backend(args.berthd, args.state)
    server_uuid = ""
    try:
        server_uuid = (await backend.call("introspection.server", {})).get("uuid", "")
    except Exception as exc:  # berthd may still be starting: the uuid is cosmetic
        log.warning("berthd not answering yet: %s", exc)
    table = routes(backend, server_uuid)  # one table: both sockets answer alike
    server = GrpcServer(table)
    # The socket's own directory only, never its parents: a berth-grpc that outlives the
    # tree it was started in (a test's temp dir removed meanwhile) made that tree again,
    # an empty `state` left behind; now it stops with FileNotFoundError.
    if os.path.dirname(args.address):
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.dirname(args.address), 0o711)
    predecessor = _predecessor(args)
    _check_replaceable(args.address, predecessor)
    if args.ttrpc_address:
        _check_replaceable(args.ttrpc_address, predecessor)

    ours = {args.address: await _listen(args, args.address, server.listen)}
    ttrpc_server = None
    if args.ttrpc_address:
        from berth.daemon.grpc.ttrpc import Server as TtrpcServer

        ttrpc_server = TtrpcServer(table)
        ours[args.ttrpc_address] = await _listen(args, args.ttrpc_address, ttrpc_server.listen)
        log.info("ttrpc on %s", args.ttrpc_address)
    _record(args)
    if predecessor:
        log.info("replacing berth-grpc pid %d", predecessor)
        with contextlib.suppress(ProcessLookupError):
            os.kill(predecessor, signal.SIGTERM)  # it stops gracefully
    log.info("containerd API on %s -> berthd %s (pid %d)", args.address, args.berthd, os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop.set)
    watch = asyncio.create_task(_exit_when_orphaned(backend, stop))
    await stop.wait()
    watch.cancel()
    if _identity(args.address) != ours[args.address]:
        # Replaced: the path names the successor's socket now, but a client may have
        # connected to this one just before the rename and not yet sent its call (a
        # stopping server refuses new calls). Serve on a moment first.
        log.info("replaced: serving calls already on their way for %.1f s", REPLACED_LINGER)
        await asyncio.sleep(REPLACED_LINGER)
    log.info("stopping")
    backend.handoff.closing.set()  # subscriptions end, to resume with the successor
    await asyncio.sleep(0)
    stopping = [server.stop(grace=5.0)]  # calls in flight finish (a successor serves new ones)
    if ttrpc_server is not None:
        stopping.append(ttrpc_server.stop(grace=5.0))
    await asyncio.gather(*stopping)
    await backend.aclose()
    for path, identity in ours.items():
        if _identity(path) == identity:  # never a successor's socket
            os.unlink(path)


def dump_tasks() -> None:
    """Log the stack of every task of this process (SIGUSR1): what a hung call waits on."""
    tasks = asyncio.all_tasks()
    lines = []
    for task in sorted(tasks, key=lambda t: t.get_name()):
        lines.append(f"task {task.get_name()}:")
        awaiting: Any = task.get_coro()
        for _ in range(20):  # down the chain of awaits (get_stack shows only the top)
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "ag_frame", None)
            if frame is None:
                lines.append(f"    {awaiting!r}")
                break
            code = frame.f_code  # (grpc's own coroutines may lack a line number)
            lines.append(f"    {code.co_filename}:{frame.f_lineno or 0} in {code.co_name}")
            awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "ag_await", None)
            if awaiting is None:
                break
    log.warning("SIGUSR1: %d tasks\n%s", len(tasks), "\n".join(lines))


async def _listen(
    args: argparse.Namespace, path: str, listen: Callable[[str], Awaitable[None]]
) -> tuple[int, int] | None:
    """Serve `path`: bound under a temporary name, given its mode and group, then renamed
    over the path (atomic: the path always names a listening socket, a predecessor's
    until this one's). Its identity, to never remove a successor's socket."""
    temporary = f"{path}.{os.getpid()}"
    old_umask = os.umask(0o117)  # the socket is created 0660, never briefly wider
    try:
        await listen(temporary)
    finally:
        os.umask(old_umask)
    os.chmod(temporary, 0o660)
    if args.socket_group is not None:
        os.chown(temporary, 0, args.socket_group)
    os.rename(temporary, path)
    return _identity(path)


async def _exit_when_orphaned(backend: Any, stop: asyncio.Event) -> None:
    """Stop when no berthd has answered for ORPHAN_TIMEOUT seconds (one that stops for
    good stops this front end itself; this is for one that died and never came back)."""
    clock = asyncio.get_running_loop().time
    seen = clock()
    while True:
        await asyncio.sleep(5.0)
        if await backend.healthy():
            seen = clock()
        elif clock() - seen > ORPHAN_TIMEOUT:
            log.warning("no berthd for %.0f s: exiting", ORPHAN_TIMEOUT)
            stop.set()
            return


def _leave_oom_protection(path: str = "/proc/self/oom_score_adj") -> None:
    """berthd's unit protects berthd from the OOM killer (OOMScoreAdjust=-999), and this
    process inherits it; but it holds its clients' requests, and a memory hog here must be
    what the kernel kills (berthd starts it again), not a container. Raising the score
    needs no privilege."""
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) >= 0:
                return
        with open(path, "w") as f:
            f.write("0")
    except (OSError, ValueError) as exc:
        log.debug("oom_score_adj left as it is: %s", exc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from berth.daemon import logs

    logs.setup(args.log_level, args.log_format)  # berthd's format: the two share a stream
    # hpack's debug lines are per header (most of a call's CPU at debug); `--log-level
    # debug` shows each call's method, status and time instead
    logging.getLogger("hpack").setLevel(max(logging.INFO, logging.root.level))
    _leave_oom_protection()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
