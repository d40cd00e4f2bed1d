"""`berthd`: the daemon's entry point and its structure of tasks.

    trio.run(run)                 as configured: active, a standby (--standby), or the
                                  successor of a running daemon (--takeover)
      serve(): nursery
        ├── control socket: a standby's attach, a successor's handover (handover.py)
        └── services: nursery (cancelled as a whole by a shutdown or a handover)
              ├── API listener: a task per connection, one per request (rpc)
              ├── recovery: reattach to every shim in the state dir, then open task calls
              ├── GC scheduler: collects after deletes, and stale things periodically
              ├── memory release: trims the C heap a second after storage work
              ├── zygote client reader
              ├── gRPC front end: berth-grpc, a child process, restarted if it dies
              ├── metrics endpoint ([metrics] address): GET /v1/metrics (metrics.py)
              ├── per task: shim connection reader, event pump, death watch
              └── signal watcher: SIGTERM/SIGINT -> stop serving, leave every shim running

Killing the daemon, gracefully or with SIGKILL, never touches a container: the shims are
in their own sessions and process groups, and hold everything a container needs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

# isort: off
from berth.daemon import deferred  # noqa: F401  # before trio: ssl, hmac, hashlib at first use
# isort: on

import trio

from berth.daemon import config as config_module
from berth.daemon import detach, handover, listeners, logs, notify, standby, startup
from berth.daemon.api import routes, schema
from berth.daemon.api.core import Api, load_server_uuid, namespace_of
from berth.daemon.api.network import NetworkApi
from berth.daemon.api.storage import StorageApi
from berth.daemon.api.tasks import TaskApi
from berth.daemon.config import Config
from berth.daemon.events import Exchange
from berth.daemon.grpc import supervisor
from berth.daemon.metadata import Store
from berth.daemon.network.service import NetworkService, NetworkSettings, Usage
from berth.daemon.removals import Removals
from berth.daemon.rpc import Drain, Observer, ServerConnection, guarded, refuse
from berth.daemon.storage import gc
from berth.daemon.storage.generation import ContentGeneration
from berth.daemon.storage.service import Storage
from berth.daemon.tasks.service import TaskService
from berth.daemon.tasks.shims import SHORTAGE_ERRNOS, Zygote
from berth.shim.loop import ensure_std_fds
from berth.shim.wire.errors import BerthError, NotFound
from berth.shim.wire.status import STOPPED
from berth.shim.wire.unixsock import peer_credentials

log = logging.getLogger("berthd")
RECONCILE_INTERVAL = 60.0  # seconds between sweeps of network attachments nobody uses

RESUME_FD_ENV = "BERTH_RESUME"  # set by a daemon that re-executes itself (handover.py)


@dataclass
class State:
    """What serve() opened, and how it ends."""

    store: Store
    locks: startup.Locks
    listener: listeners.Listener
    handing_over: bool = False  # a successor asked: serve() waits for the handover's end
    handed_over: bool = False
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.close()
            self.locks.release()


def open_state(config: Config, locks: startup.Locks | None) -> tuple[Store, startup.Locks, bool]:
    """Directories, locks and the metadata database (startup.py's checks first)."""
    startup.prepare_dirs(config)
    if locks is None:
        locks = startup.take_locks(config)
    try:
        startup.check_metadata(config)
        startup.remove_orphaned_logs(config)
        rebuild = config.rebuild_metadata and startup.is_blank(config.db_path)
        if config.rebuild_metadata:
            startup.set_aside_orphaned_snapshots(config)
        store = Store(config.db_path, ContentGeneration(config.state).bump)
    except BaseException:
        locks.release()
        raise
    # No namespace is made here: as in containerd, one comes with the first object made
    # in it (Store.ensure_namespace), so a fresh daemon lists none.
    return store, locks, rebuild


async def serve(
    config: Config,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    *,
    inheritance: handover.Inheritance | None = None,
    locks: startup.Locks | None = None,
) -> None:
    inheritance = inheritance or handover.Inheritance()
    store, locks, rebuild = open_state(config, locks)
    try:
        listener = inheritance.listener or listeners.take(
            config.address, listeners.from_systemd(), inheritance.sockets, inode=inheritance.inode
        )
        listener.restore_path()
        listener.forget_keep()
        if listener.ensure_named():  # a standby whose active daemon's path went with it
            log.warning("%s no longer named the listening socket: bound again", config.address)
        log.info("listening socket %s: %s", config.address, listener.source)
    except BaseException as exc:
        store.close()
        locks.release()
        if isinstance(exc, listeners.AddressInUse):
            raise startup.StartupError(str(exc)) from None  # one line, nothing changed
        if isinstance(exc, OSError):  # no such directory, a read-only or foreign filesystem
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise startup.CannotStart(f"cannot listen on {config.address}: {reason}") from None
        raise
    if listener.bound_here and config.socket_group is not None:
        os.chown(config.address, 0, config.socket_group)
    state = State(store, locks, listener)
    try:
        async with trio.open_nursery() as outer:
            await _run_services(config, state, inheritance, rebuild, outer, task_status)
            if state.handing_over:
                await trio.sleep_forever()  # the handover finishes (or resumes) this daemon
            outer.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if not state.handed_over:
                listener.unlink_if_ours()
                notify.notify("STOPPING=1")
            state.close()


async def _run_services(
    config: Config,
    state: State,
    inheritance: handover.Inheritance,
    rebuild: bool,
    outer: trio.Nursery,
    task_status: trio.TaskStatus[None],
) -> None:
    store = state.store
    exchange = Exchange()
    exchange.inherit(inheritance.history)
    recovered = trio.Event()
    drain = Drain(frozenset(name for name, m in schema.METHODS.items() if m.resumable))
    async with trio.open_nursery() as nursery:
        zygote = Zygote(nursery, os.path.join(config.state, "zygote"), config.shim_python)
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
        tasks.inherit_seqs(inheritance.task_seqs)
        api = Api(config, store, exchange, tasks, load_server_uuid(config.root), recovered, storage)
        storage_api = StorageApi(storage, exchange.publish, tasks.rootfs_snapshots)
        observe = _start_metrics(
            config, nursery, tasks, store, exchange, storage, lambda: control.standbys
        )
        api.networks = networks = _network_service(config, exchange)  # go with their container
        await nursery.start(api.removals.serve)  # `run --rm`'s removals, behind its answer
        handlers = routes.bind(
            [
                api.handlers(),
                TaskApi(tasks, store, networks, api.removals).handlers(),
                storage_api.handlers(),
                NetworkApi(networks, api.removals).handlers(),
            ],
            recovered,
        )

        async def handle_connection(stream: trio.SocketStream) -> None:
            _, uid, _ = peer_credentials(stream.socket)  # type: ignore[arg-type]
            if uid not in (0, os.getuid()):
                log.warning("refused API connection from uid %d", uid)
                await refuse(stream, f"uid {uid} may not use berthd", "permission_denied")
                return
            connection = ServerConnection(
                stream, handlers, namespace_of, uid, drain=drain, observe=observe
            )
            await guarded("API connection", connection.serve)

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signo in signals:
                    log.info("signal %d: shutting down; containers keep running", signo)
                    # A deliberate stop of berth, not a death: standbys exit rather than
                    # take over (before the socket's path goes, in serve()).
                    await control.dismiss_standbys()
                    await tasks.close()
                    nursery.cancel_scope.cancel()
                    return

        accepting = trio.CancelScope()

        async def accept() -> None:
            with accepting:
                served = [state.listener.sock, *state.listener.unnamed]
                # Connections live in the outer nursery: a handover ends this daemon's
                # services, not its connections, which answer Reconnect until it exits.
                await trio.serve_listeners(
                    handle_connection,
                    [_KeepOpen(trio.socket.from_stdlib_socket(sock)) for sock in served],
                    handler_nursery=outer,
                )

        async def stop_accepting() -> None:
            state.handing_over = True
            accepting.cancel()

        handing = handover.Handing(
            listener_fd=state.listener.sock.fileno,
            listener_inode=lambda: state.listener.inode,
            stop_accepting=stop_accepting,
            drain=lambda: drain.drain(handover.DRAIN_TIMEOUT),
            release_tasks=lambda: _release_tasks(api.removals, tasks),
            history=exchange.history,
            close_state=lambda: _close_for_handover(state, storage, nursery),
            resume=lambda: _resume(config, state, exchange),
            finish=lambda: _finish(state, outer),
        )
        control = handover.ControlServer(config.state, handing)
        await outer.start(control.serve)
        nursery.start_soon(watch_signals)
        nursery.start_soon(guarded, "recovery", _recover, api, recovered, nursery, networks)
        nursery.start_soon(accept)
        log.info("berthd %s serving on %s (pid %d)", _version(), config.address, os.getpid())
        task_status.started()
        nursery.start_soon(guarded, "zygote start", zygote.warm)
        _start_background(nursery, storage_api, exchange, networks)
        if config.grpc_address:
            nursery.start_soon(
                guarded,
                "gRPC front end",
                supervisor.supervise,
                config,
                recovered,
                lambda: state.handing_over,
            )
        await recovered.wait()
        notify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")
        await handover.announce_done(inheritance)
        control.settled.set()  # from now on this daemon may hand over in its turn
        detach.ready()  # berthd --detach: the command that started this daemon returns
        if config.standby:
            nursery.start_soon(guarded, "standby keeper", standby.keep_one, config, control)


async def _release_tasks(removals: Removals, tasks: TaskService) -> dict[str, int]:
    """A handover's release: the removals under way stop first (their marks stay for the
    successor), then the tasks are let go."""
    await removals.stop()
    return await tasks.release()


async def _recover(
    api: Api, recovered: trio.Event, nursery: trio.Nursery, networks: NetworkService
) -> None:
    """Find the tasks a previous daemon left (their shims), finish the container removals
    it left, then open the task calls and sweep unused network attachments."""
    tasks = api.tasks
    try:
        found = await tasks.recover()
        log.info("recovered %d task(s)", found)
        if unfinished := api.finish_removals():
            log.info("finishing %d container removal(s) left unfinished", unfinished)
        nursery.start_soon(api.removals.retry_failed, api.removal_of)
    finally:
        # Even a recovery that failed opens the task calls: waiting for ever on it
        # would hang every client (the failure is logged by `guarded`).
        recovered.set()
    nursery.start_soon(
        guarded, "network reconcile", _reconcile_networks, networks, _usage(api.store, tasks)
    )


def _network_service(config: Config, exchange: Exchange) -> NetworkService:
    settings = NetworkSettings(
        conf_dir=config.network_conf_dir,
        plugin_dirs=config.network_plugin_dirs,
        default_subnet=config.network_default_subnet,
        default_bridge=config.network_default_bridge,
    )
    return NetworkService(settings, config.state, exchange.publish)


def _usage(store: Store, tasks: TaskService) -> Usage:
    def container_exists(namespace: str, container_id: str) -> bool:
        try:
            store.get_container(namespace, container_id)
            return True
        except NotFound:
            return False

    def task_exited(namespace: str, container_id: str) -> bool:
        try:
            return tasks.get_handle(namespace, container_id).init.status == STOPPED
        except NotFound:
            return False

    return Usage(container_exists, task_exited)


async def _reconcile_networks(networks: NetworkService, usage: Usage) -> None:
    """Release the network attachments nobody uses any more (a container that exited or
    went while berthd was down, an ADD a crash cut short), then now and then those a
    failed release or a vanished container left."""
    released = await networks.start(usage)
    if released:
        log.info("released %d network attachment(s) nobody uses", released)
    while True:
        await trio.sleep(RECONCILE_INTERVAL)
        if released := await networks.reconcile(usage):
            log.info("released %d network attachment(s) nobody uses", released)


def _start_background(
    nursery: trio.Nursery, storage_api: StorageApi, exchange: Exchange, networks: NetworkService
) -> None:
    nursery.start_soon(guarded, "GC scheduler", storage_api.background_collector)
    nursery.start_soon(guarded, "memory release", storage_api.memory_releaser)
    nursery.start_soon(guarded, "network release", _release_on_exit, exchange, networks)


async def _release_on_exit(exchange: Exchange, networks: NetworkService) -> None:
    """A task's network attachments go when its init exits, as Docker releases a stopped
    container's addresses (its namespace has nobody left to serve). An exit this misses
    (a subscriber that fell behind is dropped: it subscribes again) is released with its
    container, or by the next start's reconcile."""
    async with trio.open_nursery() as releases:
        while True:
            # berthd's own exits only (not with_published): a forged one releases nothing
            subscription = exchange.subscribe(['topic=="/tasks/exit"'])
            try:
                async for envelope in subscription.receive:
                    event = envelope["event"]
                    container_id = event.get("container_id")
                    if container_id and event.get("id") == container_id:  # the init's exit
                        releases.start_soon(
                            guarded,
                            "network release",
                            _detach,
                            networks,
                            envelope["namespace"],
                            container_id,
                        )
            finally:
                subscription.close()


async def _detach(networks: NetworkService, namespace: str, container_id: str) -> None:
    await networks.detach(namespace, container_id)


ACCEPT_RETRY = 0.1  # seconds between accepts while berthd is short of descriptors


class _KeepOpen(trio.abc.Listener[trio.SocketStream]):
    """The API listener, which a handover passes on: when this daemon stops accepting,
    trio closes the listener it served; this one leaves the socket open.

    Short of descriptors (EMFILE: as many clients as its limit of open files), accept
    fails while the connection waits in the backlog. trio retried every 0.1 s and logged
    each failure with its traceback (10 a second, for as long as the shortage lasted);
    this says it once, retries as quietly, and says when it accepts again."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._inner = trio.SocketListener(sock)
        self._short = False

    async def accept(self) -> trio.SocketStream:
        while True:
            try:
                stream = await self._inner.accept()
            except OSError as exc:
                if exc.errno not in SHORTAGE_ERRNOS:
                    raise
                if not self._short:
                    log.error(
                        "cannot accept API connections: %s; retrying every %gs",
                        os.strerror(exc.errno or 0),
                        ACCEPT_RETRY,
                    )
                    self._short = True
                await trio.sleep(ACCEPT_RETRY)
                continue
            if self._short:
                log.warning("accepting API connections again")
                self._short = False
            return stream

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _start_metrics(
    config: Config,
    services: trio.Nursery,
    tasks: TaskService,
    store: Store,
    exchange: Exchange,
    storage: Storage,
    standbys: Callable[[], int],
) -> Observer | None:
    """Serve [metrics] (daemon/metrics.py) among the services; the API calls' observer.
    prometheus_client is imported only here, only when metrics are on."""
    if not config.metrics_address:
        return None
    from berth.daemon import metrics

    figures = metrics.Metrics(metrics.Sources(tasks, store, exchange, storage, standbys))
    server = metrics.MetricsServer(config.metrics_address, figures)
    services.start_soon(guarded, "metrics endpoint", server.serve)
    return figures.observe


def _version() -> str:
    from berth.daemon import __version__

    return __version__


def _close_for_handover(state: State, storage: Storage, services: trio.Nursery) -> None:
    """The last step before the successor gets the socket: nothing of this daemon may
    write any more (its services stop, its databases close, its locks drop)."""
    services.cancel_scope.cancel()
    storage.close()
    state.close()


def _finish(state: State, outer: trio.Nursery) -> None:
    state.handed_over = True
    outer.cancel_scope.cancel()


def _resume(config: Config, state: State, exchange: Exchange) -> None:
    """The successor did not take over: re-execute this daemon (same pid) with the same
    listening socket, as systemd would pass it, and the event history in a file."""
    path = os.path.join(config.state, "resume-history.msgpack")
    from berth.shim.wire.protocol import encode

    with open(path, "wb") as f:
        f.write(encode(exchange.history()))
    fd = state.listener.sock.fileno()
    os.dup2(fd, listeners.SD_LISTEN_FDS_START)
    os.set_inheritable(listeners.SD_LISTEN_FDS_START, True)
    os.environ.update(
        LISTEN_PID=str(os.getpid()),
        LISTEN_FDS="1",
        LISTEN_FDNAMES=listeners.API,
        **{RESUME_FD_ENV: path},
    )
    argv = [a for a in sys.argv if a not in config_module.ONE_TIME_FLAGS]
    log.warning("re-executing berthd to resume serving")
    os.execv(sys.executable, [sys.executable, "-m", "berth.daemon.main", *argv[1:]])


def _resumed_history() -> list[dict[str, object]]:
    path = os.environ.pop(RESUME_FD_ENV, "")
    if not path:
        return []
    from berth.shim.wire.protocol import decode

    try:
        with open(path, "rb") as f:
            history = decode(f.read())
        os.unlink(path)
    except (OSError, ValueError) as exc:
        log.error("cannot read the resumed history %s: %s", path, exc)
        return []
    return history if isinstance(history, list) else []


async def run(config: Config, mode: str) -> None:
    """Serve as `mode` says: "active", "standby" (serve once the active one is gone), or
    "takeover" (serve in the place of the running daemon, which hands over)."""
    if mode == "takeover":
        inheritance = await handover.take_over(config.state, config.address)
        fault = os.environ.get("BERTH_TAKEOVER_FAULT")  # tests only
        if fault == "after-handover":
            os._exit(70)  # a successor that dies half-way: the predecessor must resume
        if fault == "stop-predecessor":  # a predecessor that stalls before "done"
            os.kill(inheritance.predecessor, signal.SIGSTOP)
        try:
            locks = await startup.wait_for_locks(config, timeout=30.0)
            log.info("berthd pid %d handed over to this one", inheritance.predecessor)
            await serve(config, inheritance=inheritance, locks=locks)
        finally:
            if inheritance.listener is not None:
                inheritance.listener.forget_keep()
    elif mode == "standby":
        try:
            inheritance, locks = await standby.stand_by(config)
        except standby.StandbyRefused as exc:
            log.info("standby not wanted: %s; exiting", exc)
            return
        await serve(config, inheritance=inheritance, locks=locks)
    elif RESUME_FD_ENV in os.environ:  # resuming after a failed handover (_resume)
        history = _resumed_history()
        locks = await startup.wait_for_locks(config, timeout=60.0)  # the successor's go
        await serve(config, inheritance=handover.Inheritance(history=history), locks=locks)
    else:
        await serve(config)


def main(argv: list[str] | None = None) -> int:
    # Before anything is opened: a berthd started with stdio closed gave fds 0-2 to trio's
    # epoll and wake-up socket, and its children (the zygote, berth-grpc) none at all.
    ensure_std_fds()
    # What berthd, its zygote, shims and runtimes create has the modes berth gives it, not
    # the ones its starter's umask leaves (dockerd does the same): started under `umask
    # 077`, a container's / and the busybox rootfs were 0700, and any user in it other
    # than root could not read /, nor write /tmp. What must be private is made so
    # explicitly (startup.prepare_dirs, bundles, logs, sockets).
    os.umask(0o022)
    try:
        config = config_module.load(argv)
    except (BerthError, OSError, ValueError) as exc:
        print(f"berthd: bad configuration: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    startup.raise_fd_limit()
    # The HTTP libraries log every request (and upload-session URLs) at INFO/DEBUG: that is
    # noise in berthd's log, and berth logs what matters about a transfer itself.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if config.detach and (code := detach.start()) is not None:
        return code  # the parent: the detached daemon serves (0), or failed (1)
    try:
        trio.run(run, config, config.mode)
    except KeyboardInterrupt:
        pass
    except (startup.StartupError, BerthError) as exc:
        print(f"berthd: {exc}", file=sys.stderr)
        detach.failed(f"berthd: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
