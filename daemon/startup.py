"""What berthd checks and fixes before it serves: its directories and their modes, the
locks that keep a second daemon off the same root and state, and the metadata database.

Each check here is the answer to a way an operator's mistake or a crash lost data:
- Two daemons on one root with different state dirs: the second deleted the records and
  snapshots of the first one's containers. Both the state dir and the root are locked.
- A deleted or truncated meta.db (or a snapshotter's metadata.db): a silent fresh start
  orphaned every running task, and the snapshotter's start-up cleanup then deleted every
  snapshot directory it no longer had a row for. A missing or empty database next to data
  is an error; `--rebuild-metadata` rebuilds what the disk can tell, explicitly, logged.
- A root pre-created 0755 kept its mode, and the databases were 0644: container
  environments (secrets) were readable by any local user. Modes are set, whatever existed.

Trio-free: runs before trio.run.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from berth.daemon.config import Config
from berth.daemon.documents import load_json_object
from berth.daemon.metadata import MAX_SPEC_BYTES, Container, Store, out_of_space
from berth.daemon.storage.service import Storage
from berth.shim.fs import remove_tree
from berth.shim.state import CorruptState, read_state
from berth.shim.wire.errors import BerthError, FailedPrecondition
from berth.shim.wire.names import is_valid

DEFAULT_NAMESPACE = "default"

log = logging.getLogger("berthd")

LOCK_FILE = "berthd.lock"
PRIVATE_DIR = 0o700
# The state dir also holds the API socket, which members of the socket's group must reach:
# it is traversable, not listable (as containerd's /run/containerd); everything inside is
# private.
STATE_DIR = 0o711
PRIVATE_FILE = 0o600

P = ParamSpec("P")
R = TypeVar("R")


class StartupError(Exception):
    """berthd must not start; the message says why and what to do (one line)."""


class CannotStart(FailedPrecondition):
    """What the OS or SQLite refused in a start-up step (a full or read-only disk, a
    permission, a broken file), in one line: main.py prints a BerthError and exits 1,
    where these were tracebacks. Not a StartupError: callers retry on that (a standby
    waits for a lock), and retrying would not help here."""


def one_line(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Raise what the OS or SQLite raises in the start-up step `what` as CannotStart."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except (OSError, sqlite3.Error) as exc:
                hint = ": free some space and start berthd again" if out_of_space(exc) else ""
                raise CannotStart(f"{what}: {exc}{hint}") from None

        return wrapper

    return decorate


# --- directories and modes ---------------------------------------------------------------


@one_line("cannot prepare berthd's directories")
def prepare_dirs(config: Config) -> None:
    """Create berthd's directories, and make them and its databases private whatever
    existed before."""
    _make_dir(config.root, PRIVATE_DIR)
    _make_dir(config.state, STATE_DIR)
    # Traversable too: a container in a user namespace reaches its rootfs through its
    # bundle as its remapped root (each bundle stays private: tasks/service.py).
    _make_dir(config.tasks_dir, STATE_DIR)
    _make_dir(config.sockets_dir, PRIVATE_DIR)
    _make_dir(config.logs_dir, PRIVATE_DIR)
    os.makedirs(os.path.dirname(config.address), exist_ok=True)
    for path in database_files(config):
        if os.path.exists(path):
            os.chmod(path, PRIVATE_FILE)


def remove_orphaned_logs(config: Config) -> None:
    """Remove the log files of tasks whose bundle is gone: after a reboot (the state dir
    is a tmpfs), or a crash between a bundle and its logs. Only with the locks held: no
    other berthd creates a task meanwhile, and a bundle is made before its logs."""
    try:
        namespaces = os.listdir(config.logs_dir)
    except FileNotFoundError:
        return
    for namespace in namespaces:
        namespace_dir = os.path.join(config.logs_dir, namespace)
        try:
            ids = os.listdir(namespace_dir)
        except OSError:
            continue
        for container_id in ids:
            if os.path.lexists(os.path.join(config.tasks_dir, namespace, container_id)):
                continue
            try:
                remove_tree(os.path.join(namespace_dir, container_id))
            except OSError as exc:
                log.error(
                    "cannot remove the orphaned logs of %s/%s: %s", namespace, container_id, exc
                )


# What the shims' zygote restores (shim/zygote.py): shims and containers keep the limit
# berthd was given, as Go (1.19+) restores it for containerd's children.
NOFILE_ENV = "BERTH_NOFILE_SOFT"


def raise_fd_limit() -> None:
    """Raise berthd's soft limit of open files to its hard limit, as Go does for
    containerd at start: berthd holds a few descriptors per task (its shim's socket, a
    pidfd), and at the common soft limit of 1024 some hundreds of tasks exhausted it
    (supervision then failed for good). The original soft limit is left in the
    environment for the zygote to restore."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    os.environ.setdefault(NOFILE_ENV, str(soft))
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)


def _make_dir(path: str, mode: int) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chmod(path, mode)


def database_files(config: Config) -> list[str]:
    """Every SQLite file berthd keeps (with their WAL and shared-memory files)."""
    bases = [config.db_path]
    snapshots = os.path.join(config.root, "snapshots")
    if os.path.isdir(snapshots):
        bases += [os.path.join(snapshots, name, "metadata.db") for name in os.listdir(snapshots)]
    return [base + suffix for base in bases for suffix in ("", "-wal", "-shm")]


# --- locks ---------------------------------------------------------------------------------


@dataclass
class Locks:
    fds: list[int]

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@one_line("cannot lock the state dir and the root")
def take_locks(config: Config) -> Locks:
    """Lock the state dir and the root: one daemon per state dir, one per root. The lock
    files name their holder, so a refusal can say who holds them."""
    taken: list[int] = []
    try:
        for directory, what in ((config.state, "state dir"), (config.root, "root")):
            taken.append(_lock(os.path.join(directory, LOCK_FILE), what, directory, config))
    except BaseException:
        for fd in taken:
            os.close(fd)
        raise
    return Locks(taken)


async def wait_for_locks(config: Config, timeout: float = 10.0) -> Locks:
    """The locks, once their holder (a predecessor handing over) has dropped them."""
    import trio

    with trio.fail_after(timeout):
        while True:
            try:
                return take_locks(config)
            except StartupError:
                await trio.sleep(0.002)


def _lock(path: str, what: str, directory: str, config: Config) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise StartupError(
            f"the {what} {directory} is in use by another berthd ({holder})"
        ) from None
    record = json.dumps({"pid": os.getpid(), "root": config.root, "state": config.state})
    try:
        # Written over the previous holder's record, in the block it already has, and
        # only then cut to length: truncating first gave that block away, and on a full
        # disk it did not come back.
        os.pwrite(fd, record.encode(), 0)
        os.ftruncate(fd, len(record.encode()))
    except OSError as exc:
        if not out_of_space(exc):
            os.close(fd)
            raise
        log.warning("the disk is full: %s does not name its holder (%s)", path, exc)
    return fd


def _holder(fd: int) -> str:
    try:
        doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(doc['pid'])}, root {doc['root']}, state {doc['state']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "its pid is unknown"


# --- the metadata database -------------------------------------------------------------------


def existing_data(config: Config) -> dict[str, int]:
    """What the disk holds that the metadata describes: blobs, snapshots, tasks."""
    found = {"content blobs": 0, "snapshots": 0, "tasks": 0}
    blobs = os.path.join(config.root, "content", "blobs", "sha256")
    if os.path.isdir(blobs):
        found["content blobs"] = len(os.listdir(blobs))
    snapshots = os.path.join(config.root, "snapshots")
    if os.path.isdir(snapshots):
        for name in os.listdir(snapshots):
            data = os.path.join(snapshots, name, "snapshots")
            if os.path.isdir(data):
                found["snapshots"] += len(os.listdir(data))
    if os.path.isdir(config.tasks_dir):
        for namespace in os.listdir(config.tasks_dir):
            ns_dir = os.path.join(config.tasks_dir, namespace)
            if os.path.isdir(ns_dir):
                found["tasks"] += len(os.listdir(ns_dir))
    return {k: v for k, v in found.items() if v}


@one_line("cannot read the metadata database")
def is_blank(path: str) -> bool:
    """Missing, or empty with an empty WAL, or an SQLite database that holds no schema yet.
    (After a kill -9 everything may still be in the -wal file, the main file empty.)"""
    try:
        main_size = os.path.getsize(path)
    except FileNotFoundError:
        return True
    try:
        wal_size = os.path.getsize(path + "-wal")
    except FileNotFoundError:
        wal_size = 0
    if main_size == 0 and wal_size == 0:
        return True
    try:
        db = sqlite3.connect(path)
        try:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            return int(tables) == 0
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return False  # not blank: broken, and check_database says so


def check_database(path: str) -> None:
    """A one-line StartupError for a file that is not a usable SQLite database."""
    if not os.path.exists(path):
        return
    try:
        db = sqlite3.connect(path)
        try:
            (result,) = db.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        result = str(exc)
    if result != "ok":
        raise StartupError(
            f"{path} is not a usable database ({result}): restore it from a backup, or move "
            "it aside and start berthd once with --rebuild-metadata"
        )


@one_line("cannot check the metadata databases")
def check_metadata(config: Config) -> None:
    """Refuse a missing, empty or broken metadata database next to data (see the module
    docstring), unless the operator asked for a rebuild."""
    databases = [config.db_path]
    snapshots = os.path.join(config.root, "snapshots")
    if os.path.isdir(snapshots):
        databases += [os.path.join(snapshots, n, "metadata.db") for n in os.listdir(snapshots)]
    for path in databases:
        if config.rebuild_metadata and not is_blank(path):
            try:
                check_database(path)
            except StartupError:
                _move_aside(path)
            continue
        check_database(path)
    if config.rebuild_metadata:
        return
    data = existing_data(config)
    if not data:
        return
    held = ", ".join(f"{n} {what}" for what, n in data.items())
    for path in databases:
        if is_blank(path) and (path == config.db_path or _snapshot_dirs(path)):
            state = "missing" if not os.path.exists(path) else "empty"
            raise StartupError(
                f"{path} is {state} but {config.root} and {config.state} hold {held}: restore "
                "it from a backup, or start berthd once with --rebuild-metadata to rebuild "
                "what the disk holds (see the README)"
            )


def _snapshot_dirs(metadata_path: str) -> int:
    data = os.path.join(os.path.dirname(metadata_path), "snapshots")
    return len(os.listdir(data)) if os.path.isdir(data) else 0


def _move_aside(path: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.rename(path + suffix, f"{path}.broken-{stamp}{suffix}")
    log.warning("rebuild: moved the broken %s aside (%s.broken-%s)", path, path, stamp)


# --- the explicit rebuild ------------------------------------------------------------------


@one_line("cannot set orphaned snapshots aside")
def set_aside_orphaned_snapshots(config: Config) -> None:
    """Under --rebuild-metadata, a snapshotter whose database is blank would delete every
    snapshot directory as a crash leftover: they are moved aside instead, for the operator."""
    snapshots = os.path.join(config.root, "snapshots")
    if not os.path.isdir(snapshots):
        return
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name in os.listdir(snapshots):
        base = os.path.join(snapshots, name)
        data = os.path.join(base, "snapshots")
        metadata = os.path.join(base, "metadata.db")
        if is_blank(metadata) and _snapshot_dirs(metadata):
            aside = os.path.join(base, f"orphaned-{stamp}")
            os.rename(data, aside)
            log.warning(
                "rebuild: snapshotter %s has no metadata; its data is kept in %s", name, aside
            )


def rebuild_metadata(config: Config, store: Store, storage: Storage) -> None:
    """Rebuild what the disk can tell into a blank database, and log it: a container record
    for every task in the state dir (so it can be managed and deleted), and one lease per
    namespace holding every blob and snapshot, so that nothing is collected until the
    operator has looked. Image names are lost: re-import or re-pull (the layers present
    are reused)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    lease_id = f"rebuilt-{stamp}"
    labels = {"berth.io/rebuilt": stamp}
    leases: set[str] = set()

    def lease(namespace: str) -> str:
        if namespace not in leases:
            store.create_lease(namespace, lease_id, labels)
            leases.add(namespace)
        return lease_id

    containers = 0
    if os.path.isdir(config.tasks_dir):
        for namespace in sorted(os.listdir(config.tasks_dir)):
            ns_dir = os.path.join(config.tasks_dir, namespace)
            if not is_valid(namespace) or not os.path.isdir(ns_dir):
                continue
            for container_id in sorted(os.listdir(ns_dir)):
                if is_valid(container_id) and _rebuild_container(
                    config, store, storage, namespace, container_id, labels
                ):
                    containers += 1
    blobs = 0
    for digest in storage.content.digests():
        store.add_content(DEFAULT_NAMESPACE, digest, storage.content.info(digest).size)
        store.add_lease_resource(DEFAULT_NAMESPACE, lease(DEFAULT_NAMESPACE), "content", digest)
        blobs += 1
    snapshots = 0
    for name, snapshotter in storage.snapshotters.items():
        for info in snapshotter.walk():
            namespace, _, key = info.key.partition("/")
            if is_valid(namespace) and key:
                store.add_lease_resource(namespace, lease(namespace), f"snapshot/{name}", key)
                snapshots += 1
    log.warning(
        "rebuild: %d container record(s) from the state dir; %d blob(s) and %d snapshot(s) "
        "held by lease %s in namespaces %s; image names are not recoverable",
        containers,
        blobs,
        snapshots,
        lease_id,
        sorted(leases) or "-",
    )


def _rebuild_container(
    config: Config,
    store: Store,
    storage: Storage,
    namespace: str,
    container_id: str,
    labels: dict[str, str],
) -> bool:
    bundle = os.path.join(config.tasks_dir, namespace, container_id)
    try:
        spec = load_json_object(
            _read(os.path.join(bundle, "config.json")), "config.json", max_size=MAX_SPEC_BYTES
        )
    except (OSError, BerthError) as exc:
        log.error("rebuild: no container for %s/%s: %s", namespace, container_id, exc)
        return False
    runtime = config.default_runtime
    try:
        record = read_state(bundle)
    except CorruptState:
        record = None
    binary = record.runtime.get("binary") if record else None
    for entry in config.runtimes.values():
        if entry.binary == binary:
            runtime = entry.name
    snapshot_key = ""
    try:  # berth's own clients key a container's snapshot by its id
        storage.snapshotter(None).stat(f"{namespace}/{container_id}")
        snapshot_key = container_id
    except BerthError:
        pass
    try:
        store.create_container(
            Container(
                namespace=namespace,
                id=container_id,
                runtime=runtime,
                spec=spec,
                labels=labels,
                snapshot_key=snapshot_key,
            )
        )
    except BerthError as exc:
        log.error("rebuild: no container for %s/%s: %s", namespace, container_id, exc)
        return False
    log.warning("rebuild: container %s/%s (runtime %s)", namespace, container_id, runtime)
    return True


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(MAX_SPEC_BYTES + 1)
