"""`berth-grpc`: containerd's gRPC API in front of berthd, as a process of its own.

    berth-grpc --address /run/berth/containerd.sock --berthd /run/berth/berthd.sock

berthd starts it when `[grpc] address` is configured. It is separate because grpcio is a
large, threaded library: kept out of berthd, berthd stays small and single-threaded, and
its cost is visible on its own line in the benchmark. It holds no state: every call is
translated to berthd's API, so it may die and be started again at any time.

It dies with berthd (it watches a pidfd of its parent: PR_SET_PDEATHSIG would fire when
the *thread* that started it exits, and trio starts processes from worker threads), as
containerd's socket disappears with containerd; the berthd that starts next starts a new
one, and clients reconnect as they do to a restarted containerd.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import stat
import sys

log = logging.getLogger("berth.grpc")

MAX_MESSAGE = 32 * 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="berth-grpc", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="the gRPC socket to serve")
    parser.add_argument("--berthd", required=True, help="berthd's API socket")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when it dies")
    parser.add_argument("--socket-group", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def _unlink_stale(path: str) -> None:
    """A socket left by a front end that died with its berthd; never anything else, and
    never a socket somebody still serves (a containerd, a front end still stopping)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"berth-grpc: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: stale
        return
    finally:
        probe.close()
    raise SystemExit(f"berth-grpc: {path} is served by another process")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


async def serve(args: argparse.Namespace, parent_fd: int | None = None) -> None:
    import grpc

    from berth.daemon.grpc import convert as containerd_api
    from berth.daemon.grpc.services import Backend, generic_handlers

    containerd_api.types()  # fail now, with a clear message, if the stubs are missing
    backend = Backend(args.berthd)
    server_uuid = ""
    try:
        server_uuid = (await backend.call("introspection.server", {})).get("uuid", "")
    except Exception as exc:  # berthd may still be starting: the uuid is cosmetic
        log.warning("berthd not answering yet: %s", exc)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    server.add_generic_rpc_handlers(generic_handlers(backend, server_uuid))
    os.makedirs(os.path.dirname(args.address), exist_ok=True)
    _unlink_stale(args.address)
    old_umask = os.umask(0o117)  # the socket is created 0660, never briefly wider
    try:
        server.add_insecure_port(f"unix:{args.address}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(args.address, 0o660)
    if args.socket_group is not None:
        os.chown(args.address, 0, args.socket_group)
    ours = _identity(args.address)
    log.info("containerd API on %s -> berthd %s (pid %d)", args.address, args.berthd, os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop.set)
    orphaned = False
    if parent_fd is not None:

        def parent_died() -> None:  # the pidfd stays readable: watch it once
            nonlocal orphaned
            loop.remove_reader(parent_fd)
            orphaned = True
            stop.set()

        loop.add_reader(parent_fd, parent_died)
    await stop.wait()
    log.info("stopping%s", " (berthd is gone)" if orphaned else "")
    # grpc logs every stream it cancels at stop (open Subscribe calls) as an error.
    logging.getLogger("grpc._cython.cygrpc").setLevel(logging.CRITICAL)
    # Without berthd nothing can be answered: no grace, so the next front end can bind.
    await server.stop(grace=0 if orphaned else 1.0)
    await backend.aclose()
    if _identity(args.address) == ours:  # never a successor's socket
        os.unlink(args.address)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    parent_fd = None
    if args.parent_pid:
        try:
            parent_fd = os.pidfd_open(args.parent_pid)
        except ProcessLookupError:
            return 0
        if os.getppid() != args.parent_pid:  # it died (and the pid was reused) already
            return 0
    try:
        asyncio.run(serve(args, parent_fd))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
