"""Persistent metadata: namespaces and containers, in SQLite under the root dir.

Tasks are deliberately *not* here: a task's truth lives with its shim and in its state dir
(shim.json, exit files), which survive a daemon crash by construction. What is here must
survive a reboot.

The database file is created 0600 before SQLite opens it: SQLite gives its -wal and -shm
files the database's mode, and these files hold container environments (secrets).

WAL mode with synchronous=NORMAL: a committed transaction survives kill -9 of the daemon
(the WAL is written before commit returns); only a power loss may drop the last commits,
and never leaves the database inconsistent. The schema is versioned (`PRAGMA user_version`)
and migrated forward on open, so a newer daemon reads an older database.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from berth.shim.wire.errors import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from berth.shim.wire.names import is_identifier, validate

SCHEMA_VERSION = 3
TEMPORARY_LEASE_LABEL = "berth.io/temporary"
MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_LABELS = 256
MAX_LABEL_BYTES = 4096

GC_FLAT = "containerd.io/gc.flat"  # a lease label: see Store.flat_lease_content


class _Result:
    __slots__ = ("lastrowid", "rowcount", "rows")

    def __init__(self, rows: list[Any], lastrowid: int | None, rowcount: int) -> None:
        self.rows = rows
        self.lastrowid = lastrowid
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows


class LockedDB:
    """One SQLite connection shared by the event loop and worker threads: every statement
    runs under a lock and its rows are fetched before the lock is released."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()

    @property
    def lock(self) -> threading.RLock:
        """Held by every statement: a caller holds it to keep statements out meanwhile."""
        return self._lock

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> _Result:
        with self._lock:
            try:
                cur = self._conn.execute(sql, params)
            except OverflowError:
                # SQLite's integers are 64-bit and a parameter is beyond them: a number a
                # client gave (a time, a size), not a fault of berthd's.
                raise InvalidArgument("a number out of range (64-bit signed)") from None
            return _Result(cur.fetchall(), cur.lastrowid, cur.rowcount)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LockedDB]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR): a second
                # ROLLBACK would fail and hide the error that matters.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


_MIGRATIONS = {
    1: """
        CREATE TABLE namespaces (
            name TEXT PRIMARY KEY,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE TABLE containers (
            namespace TEXT NOT NULL REFERENCES namespaces(name),
            id TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            image TEXT NOT NULL DEFAULT '',
            runtime TEXT NOT NULL,
            runtime_options TEXT NOT NULL DEFAULT '{}',
            spec TEXT NOT NULL,
            snapshotter TEXT NOT NULL DEFAULT '',
            snapshot_key TEXT NOT NULL DEFAULT '',
            extensions TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, id)
        );
    """,
    2: """
        CREATE TABLE content (
            namespace TEXT NOT NULL,
            digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, digest)
        );
        CREATE TABLE images (
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            media_type TEXT NOT NULL,
            digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (namespace, name)
        );
        CREATE TABLE leases (
            namespace TEXT NOT NULL,
            id TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (namespace, id)
        );
        CREATE TABLE lease_resources (
            namespace TEXT NOT NULL,
            lease TEXT NOT NULL,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            PRIMARY KEY (namespace, lease, kind, key)
        );
    """,
    # 0.2.0: which berth wrote the database last, so that an operator (and a downgrade,
    # which the older release refuses by the schema version) can tell.
    3: """
        CREATE TABLE berth (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
    """,
}


@dataclass
class Container:
    namespace: str
    id: str
    runtime: str
    spec: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    runtime_options: dict[str, Any] = field(default_factory=dict)
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "labels": self.labels,
            "image": self.image,
            "runtime": {"name": self.runtime, "options": self.runtime_options},
            "spec": self.spec,
            "snapshotter": self.snapshotter,
            "snapshot_key": self.snapshot_key,
            "extensions": self.extensions,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def out_of_space(exc: BaseException) -> bool:
    """A full disk (or quota), as the OS or SQLite reports it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def _open_error(path: str, exc: BaseException) -> BerthError:
    """Why the metadata database cannot be opened, in one line (berthd prints it and exits
    instead of a traceback): a full disk, or anything else SQLite or the OS said."""
    if out_of_space(exc):
        return Unavailable(
            f"cannot open the metadata database {path}: no space left on device ({exc}); "
            "free some space on its filesystem and start berthd again"
        )
    return FailedPrecondition(f"cannot open the metadata database {path}: {exc}")


def validate_new(name: object, what: str) -> str:
    """A name for a new object, by containerd's rule for identifiers ("a..b" and "a-"
    are refused, as containerd refuses them)."""
    validate(name, what)
    assert isinstance(name, str)
    if not is_identifier(name):  # the wider rule of validate() still reads older names
        raise InvalidArgument(
            f"invalid {what} {name[:100]!r}: must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
        )
    return name


MAX_LEASE_ID = 4096


def check_lease_id(lease_id: object) -> str:
    """A lease's ID is any text, not empty, without NUL, at most MAX_LEASE_ID characters:
    containerd keeps leases by their ID alone and checks nothing more (`ctr images mount`
    names its lease after the mount point). berth keeps it only in the database."""
    if not isinstance(lease_id, str) or not lease_id:
        raise InvalidArgument("a lease id must be a non-empty string")
    if len(lease_id) > MAX_LEASE_ID or "\x00" in lease_id:
        raise InvalidArgument(
            f"invalid lease id {lease_id[:100]!r}: at most {MAX_LEASE_ID} characters, no NUL"
        )
    return lease_id


def check_labels(labels: Any, *, keep_empty: bool = False) -> dict[str, str]:
    """Labels as stored: a label set to "" is no label (containerd stores none), so an
    update that sets one to "" removes it; `keep_empty` keeps them (containerd's new
    namespace keeps every label it is given)."""
    if labels is None:
        return {}
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise InvalidArgument(f"labels must be a map of at most {MAX_LABELS} entries")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument("label keys and values must be strings")
        if (value or keep_empty) and (not key or len(key) + len(value) > MAX_LABEL_BYTES):
            raise InvalidArgument(f"label {key[:40]!r} is empty or too long")
    return {key: value for key, value in labels.items() if value or keep_empty}


def check_extensions(extensions: Any) -> dict[str, dict[str, str]]:
    """A container's extensions as stored: {name: {type_url, value (base64)}}; anything
    else, or more than a spec's worth of them, is refused."""
    if extensions is None:
        return {}
    out: dict[str, dict[str, str]] = {}
    size = 0
    for name, ext in dict(extensions).items():
        type_url = getattr(ext, "type_url", None)
        value = getattr(ext, "value", None)
        if isinstance(ext, dict):
            type_url, value = ext.get("type_url"), ext.get("value", "")
        if not name or not isinstance(type_url, str) or not isinstance(value, str):
            raise InvalidArgument(f"extension {name!r}: needs a type_url and a base64 value")
        try:
            base64.b64decode(value, validate=True)
        except ValueError:
            raise InvalidArgument(f"extension {name!r}: value is not base64") from None
        size += len(name) + len(type_url) + len(value)
        out[name] = {"type_url": type_url, "value": value}
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument("extensions are too large")
    return out


class Store:
    """The metadata database. Opening an up-to-date database writes nothing: berthd must
    start, and manage the containers it finds, on a full disk (reads need no space), and a
    write at every start made that impossible."""

    def __init__(self, path: str, content_changing: Callable[[], None] = lambda: None) -> None:
        self._path = path
        # called before a content record's labels change or it is deleted: berth-grpc
        # reuses Content answers only while nothing has (storage/generation.py)
        self._content_changing = content_changing
        # The root's space reserve (storage/reserve.py) sits beside the database, in the
        # root: a migration that finds the disk full releases it (see _startup_write).
        self._reserve = os.path.join(os.path.dirname(path), "reserve")
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))  # see below
            self._db = LockedDB(path)
        except (OSError, sqlite3.Error) as exc:
            raise _open_error(path, exc) from None
        try:
            self._open()
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise _open_error(path, exc) from None
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        # journal_mode=WAL writes only when the database is not in WAL mode yet (new).
        self._startup_write(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        self._record_version()

    def close(self) -> None:
        self._db.close()

    def _startup_write(self, write: Callable[[], object]) -> None:
        """Run a write the database cannot be used without (its schema). If the disk is
        full, release the root's space reserve and try once more: the reserve exists so
        that a full disk can be cleaned up in-band (deletes, gc), which needs a running
        berthd; a berthd that cannot open its database cannot do any of it. What the write
        leaves of that space stays free for the deletes that follow, and the reserve is
        taken again once space is back (SpaceReserve.restore, after a gc)."""
        try:
            write()
            return
        except (OSError, sqlite3.Error) as exc:
            if not out_of_space(exc) or not self._release_reserve():
                raise
        write()

    def _release_reserve(self) -> bool:
        from berth.daemon.storage.reserve import SpaceReserve  # imports this module

        return SpaceReserve(self._reserve).release()

    def _record_version(self) -> None:
        """Record which berth opened the database last, only if another one did: a record,
        not worth the reserve, so a full disk skips it (the next start writes it)."""
        from berth.daemon import __version__

        row = self._db.execute("SELECT value FROM berth WHERE key = 'version'").fetchone()
        if row is not None and row[0] == __version__:
            return
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO berth (key, value) VALUES ('version', ?)", (__version__,)
            )
        except sqlite3.Error as exc:
            if not out_of_space(exc):
                raise
            logging.getLogger("berthd").warning(
                "the disk is full: %s does not record berth %s yet (%s)",
                self._path,
                __version__,
                exc,
            )

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"the metadata database ({version}) was written by a newer berth than this "
                f"one (schema {SCHEMA_VERSION}): a downgrade is not supported; start the "
                "newer berthd again"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._startup_write(functools.partial(self._migrate_to, target))

    def _migrate_to(self, target: int) -> None:
        """One migration, in one transaction (a failure leaves the previous schema)."""
        with self._db.transaction() as db:
            for statement in _MIGRATIONS[target].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")

    # -- namespaces

    def ensure_namespace(self, name: str) -> None:
        """The namespace, made if it is new (by containerd's rule for a new name; one an
        older berthd made under the wider rule is used as it is)."""
        validate(name, "namespace")
        if self._db.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone():
            return
        validate_new(name, "namespace")
        now = time.time_ns()
        self._db.execute(
            "INSERT OR IGNORE INTO namespaces(name, labels, created_at, updated_at) "
            "VALUES (?, '{}', ?, ?)",
            (name, now, now),
        )

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        validate_new(name, "namespace")
        now = time.time_ns()
        try:
            self._db.execute(
                "INSERT INTO namespaces(name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (name, json.dumps(check_labels(labels, keep_empty=True)), now, now),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"namespace {name} already exists") from None
        return self.get_namespace(name)

    def get_namespace(self, name: str) -> dict[str, Any]:
        validate(name, "namespace")
        row = self._db.execute(
            f"SELECT {_NAMESPACE_COLUMNS} FROM namespaces WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"namespace {name} not found")
        return _namespace(row)

    def list_namespaces(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            f"SELECT {_NAMESPACE_COLUMNS} FROM namespaces ORDER BY name"
        ).fetchall()
        return [_namespace(r) for r in rows]

    def update_namespace(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        self.get_namespace(name)
        self._db.execute(
            "UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
            (json.dumps(check_labels(labels)), time.time_ns(), name),
        )
        return self.get_namespace(name)

    def delete_namespace(self, name: str, *, also_holds: tuple[str, ...] = ()) -> None:
        """Delete an empty namespace: one that holds images, blobs or containers (or
        what the caller says it holds: `also_holds`) is FailedPrecondition, as containerd
        refuses it; leases do not count."""
        self.get_namespace(name)
        held = [
            kind
            for kind, table in (
                ("images", "images"),
                ("blobs", "content"),
                ("containers", "containers"),
            )
            if self._db.execute(
                f"SELECT 1 FROM {table} WHERE namespace = ? LIMIT 1", (name,)
            ).fetchone()
        ]
        held += also_holds
        if held:
            raise FailedPrecondition(
                f"namespace {name} must be empty, but it still has {', '.join(held)}"
            )
        self._db.execute("DELETE FROM namespaces WHERE name = ?", (name,))

    # -- containers

    def create_container(self, c: Container) -> Container:
        validate_new(c.id, "container id")
        self.ensure_namespace(c.namespace)
        spec_json = json.dumps(c.spec)
        if len(spec_json) > MAX_SPEC_BYTES:
            raise InvalidArgument("spec is too large")
        now = time.time_ns()
        try:
            self._db.execute(
                "INSERT INTO containers(namespace, id, labels, image, runtime, runtime_options, "
                "spec, snapshotter, snapshot_key, extensions, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.namespace,
                    c.id,
                    json.dumps(check_labels(c.labels)),
                    c.image,
                    c.runtime,
                    json.dumps(c.runtime_options),
                    spec_json,
                    c.snapshotter,
                    c.snapshot_key,
                    json.dumps(c.extensions),
                    now,
                    now,
                ),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"container {c.id} already exists") from None
        return self.get_container(c.namespace, c.id)

    def get_container(self, namespace: str, container_id: str) -> Container:
        validate(namespace, "namespace")
        validate(container_id, "container id")
        row = self._db.execute(
            f"SELECT {_CONTAINER_COLUMNS} FROM containers WHERE namespace = ? AND id = ?",
            (namespace, container_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"container {container_id} not found")
        return _container(row)

    def list_containers(self, namespace: str) -> list[Container]:
        validate(namespace, "namespace")
        rows = self._db.execute(
            f"SELECT {_CONTAINER_COLUMNS} FROM containers WHERE namespace = ? ORDER BY id",
            (namespace,),
        ).fetchall()
        return [_container(r) for r in rows]

    def update_container(
        self,
        namespace: str,
        container_id: str,
        *,
        labels: dict[str, str] | None = None,
        spec: dict[str, Any] | None = None,
        image: str | None = None,
        extensions: dict[str, dict[str, str]] | None = None,
        snapshot_key: str | None = None,
    ) -> Container:
        current = self.get_container(namespace, container_id)
        if snapshot_key is not None:
            if snapshot_key and not current.snapshotter:
                raise InvalidArgument("a snapshot key needs the container's snapshotter")
            current.snapshot_key = snapshot_key
        if extensions is not None:
            current.extensions = extensions
        if labels is not None:
            current.labels = check_labels(labels)
        if spec is not None:
            current.spec = spec
        if image is not None:
            current.image = image
        self._db.execute(
            "UPDATE containers SET labels = ?, spec = ?, image = ?, extensions = ?, "
            "snapshot_key = ?, updated_at = ? WHERE namespace = ? AND id = ?",
            (
                json.dumps(current.labels),
                json.dumps(current.spec),
                current.image,
                json.dumps(current.extensions),
                current.snapshot_key,
                time.time_ns(),
                namespace,
                container_id,
            ),
        )
        return self.get_container(namespace, container_id)

    def delete_container(self, namespace: str, container_id: str) -> None:
        self.get_container(namespace, container_id)
        self._db.execute(
            "DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id)
        )

    # -- content records (a blob is visible in a namespace once recorded there)

    def add_content(
        self, namespace: str, digest: str, size: int, labels: dict[str, str] | None = None
    ) -> None:
        self.ensure_namespace(namespace)
        now = time.time_ns()
        self._db.execute(
            "INSERT INTO content (namespace, digest, size, labels, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(namespace, digest) DO NOTHING",
            (namespace, digest, size, json.dumps(check_labels(labels)), now, now),
        )

    def get_content(self, namespace: str, digest: str) -> dict[str, Any]:
        row = self._db.execute(
            f"SELECT {_CONTENT_COLUMNS} FROM content WHERE namespace = ? AND digest = ?",
            (namespace, digest),
        ).fetchone()
        if row is None:
            raise NotFound(f"content {digest} not found")
        return _content(row)

    def list_content(self, namespace: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            f"SELECT {_CONTENT_COLUMNS} FROM content WHERE namespace = ? ORDER BY digest",
            (namespace,),
        ).fetchall()
        return [_content(r) for r in rows]

    def update_content(self, namespace: str, digest: str, labels: dict[str, str]) -> dict[str, Any]:
        self.get_content(namespace, digest)
        labels = check_labels(labels)
        with self._content_change():
            self._db.execute(
                "UPDATE content SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                (json.dumps(labels), time.time_ns(), namespace, digest),
            )
        return self.get_content(namespace, digest)

    def delete_content(self, namespace: str, digest: str) -> None:
        with self._content_change():
            deleted = self._db.execute(
                "DELETE FROM content WHERE namespace = ? AND digest = ?", (namespace, digest)
            ).rowcount
        if not deleted:
            raise NotFound(f"content {digest} not found")

    @contextlib.contextmanager
    def _content_change(self) -> Iterator[None]:
        """A content record's change, announced first (a change that cannot be announced
        is not made), with the database held from before the announcement until the change
        is made: an answer berthd gave before it was kept by berth-grpc under an older
        generation, and no statement, from the loop or a worker thread, can answer from
        the old record after it."""
        with self._db.lock:
            self._content_changing()
            yield

    def content_referenced_anywhere(self, digest: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM content WHERE digest = ? LIMIT 1", (digest,)).fetchone()
            is not None
        )

    # -- images

    def put_image(
        self,
        namespace: str,
        name: str,
        target: dict[str, Any],
        labels: dict[str, str] | None,
        *,
        create: bool,
        update: bool,
    ) -> dict[str, Any]:
        """Create and/or replace the image record `name` (-> target descriptor)."""
        validate_image_name(name)
        self.ensure_namespace(namespace)
        now = time.time_ns()
        with self._db.transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM images WHERE namespace = ? AND name = ?", (namespace, name)
            ).fetchone()
            if exists and not update:
                raise AlreadyExists(f"image {name} already exists")
            if not exists and not create:
                raise NotFound(f"image {name} not found")
            if exists:
                db.execute(
                    "UPDATE images SET media_type = ?, digest = ?, size = ?, labels = ?, "
                    "updated_at = ? WHERE namespace = ? AND name = ?",
                    (
                        target["media_type"],
                        target["digest"],
                        target["size"],
                        json.dumps(check_labels(labels)),
                        now,
                        namespace,
                        name,
                    ),
                )
            else:
                db.execute(
                    "INSERT INTO images (namespace, name, media_type, digest, size, labels, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        namespace,
                        name,
                        target["media_type"],
                        target["digest"],
                        target["size"],
                        json.dumps(check_labels(labels)),
                        now,
                        now,
                    ),
                )
        return self.get_image(namespace, name)

    def get_image(self, namespace: str, name: str) -> dict[str, Any]:
        row = self._db.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE namespace = ? AND name = ?",
            (namespace, name),
        ).fetchone()
        if row is None:
            raise NotFound(f"image {name} not found")
        return _image(row)

    def list_images(self, namespace: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE namespace = ? ORDER BY name",
            (namespace,),
        ).fetchall()
        return [_image(r) for r in rows]

    def delete_image(self, namespace: str, name: str) -> None:
        if not self._db.execute(
            "DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, name)
        ).rowcount:
            raise NotFound(f"image {name} not found")

    def all_images(self) -> list[tuple[str, dict[str, Any]]]:
        rows = self._db.execute(f"SELECT namespace, {_IMAGE_COLUMNS} FROM images").fetchall()
        return [(r[0], _image(r[1:])) for r in rows]

    # -- leases

    def create_lease(
        self, namespace: str, lease_id: str, labels: dict[str, str] | None, expires_at: int = 0
    ) -> dict[str, Any]:
        check_lease_id(lease_id)
        self.ensure_namespace(namespace)
        try:
            self._db.execute(
                "INSERT INTO leases (namespace, id, labels, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (namespace, lease_id, json.dumps(check_labels(labels)), time.time_ns(), expires_at),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"lease {lease_id} already exists") from None
        return self.get_lease(namespace, lease_id)

    def get_lease(self, namespace: str, lease_id: str) -> dict[str, Any]:
        row = self._db.execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE namespace = ? AND id = ?",
            (namespace, lease_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"lease {lease_id} not found")
        return _lease(row)

    def list_leases(self, namespace: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE namespace = ? ORDER BY id", (namespace,)
        ).fetchall()
        return [_lease(r) for r in rows]

    def delete_lease(self, namespace: str, lease_id: str) -> None:
        with self._db.transaction() as db:
            if not db.execute(
                "DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)
            ).rowcount:
                raise NotFound(f"lease {lease_id} not found")
            db.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND lease = ?",
                (namespace, lease_id),
            )

    def add_lease_resource(self, namespace: str, lease_id: str, kind: str, key: str) -> None:
        self.get_lease(namespace, lease_id)
        self._db.execute(
            "INSERT OR IGNORE INTO lease_resources (namespace, lease, kind, key) "
            "VALUES (?, ?, ?, ?)",
            (namespace, lease_id, kind, key),
        )

    def delete_lease_resource(self, namespace: str, lease_id: str, kind: str, key: str) -> None:
        self._db.execute(
            "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND kind = ? "
            "AND key = ?",
            (namespace, lease_id, kind, key),
        )

    def lease_resources(self, namespace: str, lease_id: str) -> list[tuple[str, str]]:
        rows = self._db.execute(
            "SELECT kind, key FROM lease_resources WHERE namespace = ? AND lease = ?",
            (namespace, lease_id),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def live_lease_resources(self, now: int) -> list[tuple[str, str, str]]:
        """(namespace, kind, key) held by every unexpired lease: GC roots."""
        rows = self._db.execute(
            "SELECT r.namespace, r.kind, r.key FROM lease_resources r JOIN leases l "
            "ON l.namespace = r.namespace AND l.id = r.lease "
            "WHERE l.expires_at = 0 OR l.expires_at > ?",
            (now,),
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def flat_lease_content(self, now: int) -> list[tuple[str, str]]:
        """(namespace, digest) of content that only unexpired leases labelled
        `containerd.io/gc.flat` hold: kept, but what it references is not (containerd's
        flat leases, which BuildKit takes for temporary content). Content a plain lease
        holds too is a full root there, its references followed."""
        rows = self._db.execute(
            "SELECT r.namespace, r.key, l.labels FROM lease_resources r JOIN leases l "
            "ON l.namespace = r.namespace AND l.id = r.lease "
            "WHERE r.kind = 'content' AND (l.expires_at = 0 OR l.expires_at > ?)",
            (now,),
        ).fetchall()
        flat: set[tuple[str, str]] = set()
        plain: set[tuple[str, str]] = set()
        for namespace, key, labels in rows:
            (flat if GC_FLAT in json.loads(labels) else plain).add((namespace, key))
        return sorted(flat - plain)

    def temporary_leases(self) -> list[tuple[str, str]]:
        """(namespace, id) of the leases berthd itself took for one operation."""
        rows = self._db.execute(
            "SELECT namespace, id FROM leases WHERE json_extract(labels, ?) = 'true'",
            (f'$."{TEMPORARY_LEASE_LABEL}"',),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def expired_leases(self, now: int) -> list[tuple[str, str]]:
        rows = self._db.execute(
            "SELECT namespace, id FROM leases WHERE expires_at != 0 AND expires_at <= ?", (now,)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def all_content(self) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self._db.execute("SELECT namespace, digest FROM content").fetchall()
        ]

    def all_containers(self) -> list[Container]:
        rows = self._db.execute(f"SELECT {_CONTAINER_COLUMNS} FROM containers").fetchall()
        return [_container(r) for r in rows]

    def container_images(self) -> dict[tuple[str, str], str]:
        """(namespace, id) -> image of every container, in one query (berthd's metrics)."""
        rows = self._db.execute("SELECT namespace, id, image FROM containers").fetchall()
        return {(r[0], r[1]): r[2] for r in rows}


MAX_IMAGE_NAME = 512


def validate_image_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_IMAGE_NAME
        or any(c.isspace() or c == "\0" for c in name)
    ):
        raise InvalidArgument(
            f"invalid image name: a non-empty string of at most {MAX_IMAGE_NAME}, no spaces"
        )
    return name


# Each kind of record is read by one SELECT of these columns, a listing too: a listing
# that selected the keys and then read each record apart raced with a collection (in a
# worker thread) deleting one in between, and failed NOT_FOUND for a record it had just
# listed (content.list during a background GC, found by a full test run).
_NAMESPACE_COLUMNS = "name, labels, created_at, updated_at"
_CONTENT_COLUMNS = "digest, size, labels, created_at, updated_at"
_IMAGE_COLUMNS = "name, media_type, digest, size, labels, created_at, updated_at"
_LEASE_COLUMNS = "id, labels, created_at, expires_at"
_CONTAINER_COLUMNS = (
    "namespace, id, labels, image, runtime, runtime_options, spec, snapshotter, snapshot_key, "
    "extensions, created_at, updated_at"
)


def _namespace(row: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "name": row[0],
        "labels": json.loads(row[1]),
        "created_at": row[2],
        "updated_at": row[3],
    }


def _content(row: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "digest": row[0],
        "size": row[1],
        "labels": json.loads(row[2]),
        "created_at": row[3],
        "updated_at": row[4],
    }


def _image(row: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "name": row[0],
        "target": {"media_type": row[1], "digest": row[2], "size": row[3]},
        "labels": json.loads(row[4]),
        "created_at": row[5],
        "updated_at": row[6],
    }


def _lease(row: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": row[0], "labels": json.loads(row[1]), "created_at": row[2], "expires_at": row[3]}


def _container(row: tuple[Any, ...]) -> Container:
    return Container(
        namespace=row[0],
        id=row[1],
        labels=json.loads(row[2]),
        image=row[3],
        runtime=row[4],
        runtime_options=json.loads(row[5]),
        spec=json.loads(row[6]),
        snapshotter=row[7],
        snapshot_key=row[8],
        extensions=json.loads(row[9]),
        created_at=row[10],
        updated_at=row[11],
    )
