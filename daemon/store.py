"""Persistent metadata: namespaces and containers, in SQLite under the root dir.

Tasks are deliberately *not* here: a task's truth lives with its shim and in its state dir
(shim.json, exit files), which survive a daemon crash by construction. What is here must
survive a reboot.

WAL mode with synchronous=NORMAL: a committed transaction survives kill -9 of the daemon
(the WAL is written before commit returns); only a power loss may drop the last commits,
and never leaves the database inconsistent. The schema is versioned (`PRAGMA user_version`)
and migrated forward on open, so a newer daemon reads an older database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from berth.shim.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.shim.identifiers import validate

SCHEMA_VERSION = 1
MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_LABELS = 256
MAX_LABEL_BYTES = 4096

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


def check_labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise InvalidArgument(f"labels must be a map of at most {MAX_LABELS} entries")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument("label keys and values must be strings")
        if not key or len(key) + len(value) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label {key[:40]!r} is empty or too long")
    return dict(labels)


class Store:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"metadata schema {version} is newer than this berthd ({SCHEMA_VERSION}); "
                "downgrade is not supported"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {target}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- namespaces

    def ensure_namespace(self, name: str) -> None:
        validate(name, "namespace")
        now = time.time_ns()
        self._db.execute(
            "INSERT OR IGNORE INTO namespaces(name, labels, created_at, updated_at) "
            "VALUES (?, '{}', ?, ?)",
            (name, now, now),
        )

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        validate(name, "namespace")
        now = time.time_ns()
        try:
            self._db.execute(
                "INSERT INTO namespaces(name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (name, json.dumps(check_labels(labels)), now, now),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"namespace {name} already exists") from None
        return self.get_namespace(name)

    def get_namespace(self, name: str) -> dict[str, Any]:
        validate(name, "namespace")
        row = self._db.execute(
            "SELECT name, labels, created_at, updated_at FROM namespaces WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"namespace {name} not found")
        return {
            "name": row[0],
            "labels": json.loads(row[1]),
            "created_at": row[2],
            "updated_at": row[3],
        }

    def list_namespaces(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT name FROM namespaces ORDER BY name").fetchall()
        return [self.get_namespace(r[0]) for r in rows]

    def update_namespace(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        self.get_namespace(name)
        self._db.execute(
            "UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
            (json.dumps(check_labels(labels)), time.time_ns(), name),
        )
        return self.get_namespace(name)

    def delete_namespace(self, name: str) -> None:
        self.get_namespace(name)
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM containers WHERE namespace = ?", (name,)
        ).fetchone()
        if count:
            raise FailedPrecondition(f"namespace {name} is not empty: {count} containers")
        self._db.execute("DELETE FROM namespaces WHERE name = ?", (name,))

    # -- containers

    def create_container(self, c: Container) -> Container:
        validate(c.id, "container id")
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
            "SELECT namespace, id, labels, image, runtime, runtime_options, spec, snapshotter, "
            "snapshot_key, extensions, created_at, updated_at FROM containers "
            "WHERE namespace = ? AND id = ?",
            (namespace, container_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"container {container_id} not found")
        return _container(row)

    def list_containers(self, namespace: str) -> list[Container]:
        validate(namespace, "namespace")
        rows = self._db.execute(
            "SELECT namespace, id, labels, image, runtime, runtime_options, spec, snapshotter, "
            "snapshot_key, extensions, created_at, updated_at FROM containers "
            "WHERE namespace = ? ORDER BY id",
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
    ) -> Container:
        current = self.get_container(namespace, container_id)
        if labels is not None:
            current.labels = check_labels(labels)
        if spec is not None:
            current.spec = spec
        if image is not None:
            current.image = image
        self._db.execute(
            "UPDATE containers SET labels = ?, spec = ?, image = ?, updated_at = ? "
            "WHERE namespace = ? AND id = ?",
            (
                json.dumps(current.labels),
                json.dumps(current.spec),
                current.image,
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
