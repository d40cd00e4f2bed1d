"""`berthd`: the daemon's entry point and its structure of tasks.

    trio.run(serve)
      nursery
        ├── API listener: one task per connection, one per request (rpc.ServerConnection)
        ├── recovery: reattach to every shim in the state dir, then open task calls
        ├── GC scheduler: collects a second after deletes (images, leases)
        ├── zygote client reader
        ├── gRPC front end: berth-grpc, a child process, restarted if it dies
        ├── per task: shim connection reader, event pump, death watch (tasks.TaskService)
        └── signal watcher: SIGTERM/SIGINT -> stop serving, leave every shim running

Killing the daemon, gracefully or with SIGKILL, never touches a container: the shims are
in their own sessions and process groups, and hold everything a container needs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import trio

from berth.daemon import config as config_module
from berth.daemon import startup
from berth.daemon.api import routes
from berth.daemon.api.core import Api, load_server_uuid, namespace_of
from berth.daemon.api.storage import StorageApi
from berth.daemon.api.tasks import TaskApi
from berth.daemon.config import Config
from berth.daemon.events import Exchange
from berth.daemon.grpc import supervisor
from berth.daemon.metadata import Store
from berth.daemon.rpc import ServerConnection, guarded
from berth.daemon.storage import gc
from berth.daemon.storage.service import Storage
from berth.daemon.tasks.service import TaskService
from berth.daemon.tasks.shims import Zygote
from berth.shim.wire.errors import BerthError
from berth.shim.wire.unixsock import bind_unix, peer_credentials

log = logging.getLogger("berthd")


async def serve(
    config: Config, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    startup.prepare_dirs(config)
    locks = startup.take_locks(config)
    try:
        startup.check_metadata(config)
        rebuild = config.rebuild_metadata and startup.is_blank(config.db_path)
        if config.rebuild_metadata:
            startup.set_aside_orphaned_snapshots(config)
        store = Store(config.db_path)
    except BaseException:
        locks.release()
        raise
    store.ensure_namespace("default")
    exchange = Exchange()
    recovered = trio.Event()
    listener_sock = bind_unix(config.address, mode=0o660)
    if config.socket_group is not None:
        os.chown(config.address, 0, config.socket_group)
    try:
        async with trio.open_nursery() as nursery:
            zygote = Zygote(nursery, os.path.join(config.state, "zygote"))
            storage = Storage(
                config.root,
                config.state,
                store,
                config.default_snapshotter,
                ingest_expiry=config.ingest_expiry,
            )
            if rebuild:
                startup.rebuild_metadata(config, store, storage)
            if dropped := gc.drop_temporary_leases(storage):
                log.info("dropped %d temporary lease(s) of a previous daemon", dropped)
            tasks = TaskService(config, store, exchange, nursery, zygote, storage)
            api = Api(
                config, store, exchange, tasks, load_server_uuid(config.root), recovered, storage
            )
            storage_api = StorageApi(storage, exchange.publish, tasks.rootfs_snapshots)
            handlers = routes.bind(
                [api.handlers(), TaskApi(tasks).handlers(), storage_api.handlers()], recovered
            )

            async def handle_connection(stream: trio.SocketStream) -> None:
                _, uid, _ = peer_credentials(stream.socket)  # type: ignore[arg-type]
                if uid not in (0, os.getuid()):
                    log.warning("refused API connection from uid %d", uid)
                    await stream.aclose()
                    return
                await guarded(
                    "API connection", ServerConnection(stream, handlers, namespace_of, uid).serve
                )

            async def recover() -> None:
                try:
                    found = await tasks.recover()
                    log.info("recovered %d task(s)", found)
                finally:
                    # Even a recovery that failed opens the task calls: waiting for ever
                    # on it would hang every client (the failure is logged by `guarded`).
                    recovered.set()

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signo in signals:
                        log.info("signal %d: shutting down; containers keep running", signo)
                        await tasks.close()
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_signals)
            nursery.start_soon(guarded, "recovery", recover)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener_sock))
            await nursery.start(trio.serve_listeners, handle_connection, [listener])
            log.info("berthd serving on %s (pid %d)", config.address, os.getpid())
            task_status.started()
            nursery.start_soon(guarded, "zygote start", zygote.warm)
            nursery.start_soon(guarded, "GC scheduler", storage_api.background_collector)
            if config.grpc_address:
                nursery.start_soon(
                    guarded, "gRPC front end", supervisor.supervise, config, recovered
                )
    finally:
        with trio.CancelScope(shield=True):
            try:
                os.unlink(config.address)
            except FileNotFoundError:
                pass
            store.close()
            locks.release()


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_module.load(argv)
    except (BerthError, OSError, ValueError) as exc:
        print(f"berthd: bad configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The HTTP libraries log every request (and upload-session URLs) at INFO/DEBUG: that is
    # noise in berthd's log, and berth logs what matters about a transfer itself.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        trio.run(serve, config)
    except KeyboardInterrupt:
        pass
    except startup.StartupError as exc:
        print(f"berthd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
