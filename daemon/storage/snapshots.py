"""Snapshotters: layered root filesystems, described as mount lists (containerd's model).

    prepare(key, parent) -> mounts   an active (writable) snapshot on a committed parent
    view(key, parent)    -> mounts   a read-only snapshot
    commit(name, key)                an active snapshot becomes committed, named `name`
    mounts(key), stat(key), update(key, labels), usage(key), remove(key), walk(prefix)

Two implementations: `overlayfs` (the default: layers are overlay lowerdirs, nothing is
copied) and `native` (each snapshot is a full copy, for filesystems that cannot be an
overlay upper). Each keeps its metadata in its own SQLite file under its directory, and
its data in `snapshots/<integer id>/`, so a key (any string) never becomes a path.

Trio-free and task-service-free: usable on its own. The daemon scopes keys by namespace
(`<namespace>/<key>`) before they reach here.

Crash consistency: a directory exists before its row and after it (prepare creates the
directory first, remove deletes the row first); `cleanup()` removes directories without
a row, which is all a crash can leave.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from berth.shim.fs import remove_tree, tree_usage
from berth.shim.mount import Mount
from berth.shim.wire.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

log = logging.getLogger("berth.snapshots")

KIND_ACTIVE, KIND_VIEW, KIND_COMMITTED = "active", "view", "committed"
MAX_KEY = 1024


def validate_key(key: object, what: str = "snapshot key") -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY or "\0" in key:
        raise InvalidArgument(f"invalid {what}: a non-empty string of at most {MAX_KEY}")
    return key


@dataclass
class SnapshotInfo:
    key: str
    parent: str
    kind: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0
    id: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.key,
            "parent": self.parent,
            "kind": self.kind,
            "labels": self.labels,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


class Snapshotter(abc.ABC):
    """The interface; `_MetadataSnapshotter` holds what both implementations share."""

    name: str
    root: str  # the directory of its files (exported as containerd exports its own)

    @abc.abstractmethod
    def prepare(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[Mount]: ...

    @abc.abstractmethod
    def view(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[Mount]: ...

    @abc.abstractmethod
    def mounts(self, key: str) -> list[Mount]: ...

    @abc.abstractmethod
    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None: ...

    @abc.abstractmethod
    def remove(self, key: str) -> None: ...

    @abc.abstractmethod
    def stat(self, key: str) -> SnapshotInfo: ...

    @abc.abstractmethod
    def update(self, key: str, labels: dict[str, str]) -> SnapshotInfo: ...

    @abc.abstractmethod
    def usage(self, key: str) -> Usage: ...

    @abc.abstractmethod
    def walk(self, prefix: str = "") -> list[SnapshotInfo]: ...

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """How many snapshots of each kind (active, committed, view): one cheap query."""

    @abc.abstractmethod
    def close(self) -> None: ...


class _MetadataSnapshotter(Snapshotter):
    def __init__(self, root: str, name: str) -> None:
        self.name = name
        self.root = os.path.join(root, "snapshots", name)
        self.data = os.path.join(self.root, "snapshots")
        os.makedirs(self.data, mode=0o700, exist_ok=True)
        path = os.path.join(self.root, "metadata.db")
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))  # private
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS snapshots (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "key TEXT UNIQUE NOT NULL, parent TEXT NOT NULL, kind TEXT NOT NULL, "
            "labels TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS by_parent ON snapshots(parent)")
        self.cleanup()

    # -- metadata

    def _row(self, key: str) -> SnapshotInfo:
        row = self._db.execute(
            "SELECT id, key, parent, kind, labels, created_at, updated_at FROM snapshots "
            "WHERE key = ?",
            (validate_key(key),),
        ).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return SnapshotInfo(
            id=row[0],
            key=row[1],
            parent=row[2],
            kind=row[3],
            labels=json.loads(row[4]),
            created_at=row[5],
            updated_at=row[6],
        )

    def _dir(self, info: SnapshotInfo) -> str:
        return os.path.join(self.data, str(info.id))

    def fs(self, info: SnapshotInfo) -> str:
        return os.path.join(self._dir(info), "fs")

    def _chain(self, info: SnapshotInfo) -> list[SnapshotInfo]:
        """`info`'s committed ancestors, nearest first."""
        chain = []
        parent = info.parent
        while parent:
            p = self._row(parent)
            chain.append(p)
            parent = p.parent
        return chain

    def _create(
        self, key: str, parent: str, kind: str, labels: dict[str, str] | None
    ) -> SnapshotInfo:
        validate_key(key)
        if parent:
            validate_key(parent, "parent")
            p = self._row(parent)
            if p.kind != KIND_COMMITTED:
                raise FailedPrecondition(f"parent {parent} is not committed")
        if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
            raise AlreadyExists(f"snapshot {key} already exists")
        now = time.time_ns()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            cur = self._db.execute(
                "INSERT INTO snapshots (key, parent, kind, labels, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, parent, kind, json.dumps(labels or {}), now, now),
            )
            info = SnapshotInfo(
                key, parent, kind, dict(labels or {}), now, now, int(cur.lastrowid or 0)
            )
            directory = self._dir(info)
            remove_tree(directory)  # a leftover of a crash, never data
            os.makedirs(directory, mode=0o700)
            self._populate(info)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            if "info" in locals():
                self._remove_dir(self._dir(info))
            raise
        return info

    def _populate(self, info: SnapshotInfo) -> None:
        os.mkdir(self.fs(info), 0o755)

    def prepare(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[Mount]:
        return self._mounts(self._create(key, parent, KIND_ACTIVE, labels))

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        return self._mounts(self._create(key, parent, KIND_VIEW, labels))

    def mounts(self, key: str) -> list[Mount]:
        info = self._row(key)
        if info.kind == KIND_COMMITTED:
            raise FailedPrecondition(f"snapshot {key} is committed: mount a view of it")
        return self._mounts(info)

    @abc.abstractmethod
    def _mounts(self, info: SnapshotInfo) -> list[Mount]: ...

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        """As containerd commits: a name taken is AlreadyExists before the key is looked
        at, and the committed snapshot has the commit's labels, not the active one's."""
        validate_key(name, "snapshot name")
        if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
            raise AlreadyExists(f"snapshot {name} already exists")
        info = self._row(key)
        if info.kind != KIND_ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is {info.kind}, not active")
        stored = dict(labels or {})
        now = time.time_ns()  # a committed snapshot is a new one: created and updated now
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_at = ?, updated_at = ? "
            "WHERE id = ?",
            (name, KIND_COMMITTED, json.dumps(stored), now, now, info.id),
        )
        self._committed(info)

    def _committed(self, info: SnapshotInfo) -> None:
        """Hook: what an implementation drops once a snapshot is committed."""

    def remove(self, key: str) -> None:
        info = self._row(key)
        child = self._db.execute(
            "SELECT key FROM snapshots WHERE parent = ? LIMIT 1", (key,)
        ).fetchone()
        if child:  # containerd's words, which clients match: "cannot remove snapshot with child"
            raise FailedPrecondition(f"cannot remove snapshot with child: {key} has {child[0]}")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (info.id,))
        self._remove_dir(self._dir(info))

    @staticmethod
    def _remove_dir(directory: str) -> bool:
        """Remove a snapshot's directory; a failure is logged, and `cleanup()` at the next
        start tries again (the row is gone, so the directory is a leftover)."""
        try:
            remove_tree(directory)
            return True
        except OSError as exc:
            log.error("cannot remove snapshot directory %s: %s", directory, exc)
            return False

    def stat(self, key: str) -> SnapshotInfo:
        return self._row(key)

    def update(self, key: str, labels: dict[str, str]) -> SnapshotInfo:
        info = self._row(key)
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
            (json.dumps(labels), time.time_ns(), info.id),
        )
        return self._row(key)

    def usage(self, key: str) -> Usage:
        """The blocks and inodes of the snapshot's tree, its top directory included (as
        containerd counts them)."""
        info = self._row(key)
        if info.kind == KIND_VIEW:  # a view writes nothing of its own
            return Usage(0, 0)
        top = self.fs(info)
        size, inodes = tree_usage(top)
        return Usage(size + os.lstat(top).st_blocks * 512, inodes + 1)

    def walk(self, prefix: str = "") -> list[SnapshotInfo]:
        rows = self._db.execute(
            "SELECT key FROM snapshots WHERE substr(key, 1, ?) = ? ORDER BY id",
            (len(prefix), prefix),
        ).fetchall()
        found = []
        for (key,) in rows:
            try:
                found.append(self._row(key))
            except NotFound:  # removed since the first query (a walk takes no lock)
                continue
        return found

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind").fetchall()
        return {str(kind): int(n) for kind, n in rows}

    def cleanup(self) -> int:
        """Remove snapshot directories that have no metadata row (crash leftovers). One
        that cannot be removed is logged and left for the next start: it must never stop
        this one."""
        ids = {str(r[0]) for r in self._db.execute("SELECT id FROM snapshots")}
        removed = 0
        for name in os.listdir(self.data):
            if name not in ids and self._remove_dir(os.path.join(self.data, name)):
                removed += 1
        return removed

    def close(self) -> None:
        self._db.close()


class OverlaySnapshotter(_MetadataSnapshotter):
    """Layers as overlay lowerdirs: `fs` is each snapshot's own layer (the upper dir while
    active), `work` is overlay's work dir (same filesystem as `fs`, as overlay requires)."""

    def __init__(self, root: str) -> None:
        super().__init__(root, "overlayfs")

    def _populate(self, info: SnapshotInfo) -> None:
        os.mkdir(self.fs(info), 0o755)
        if info.kind == KIND_ACTIVE:
            os.mkdir(os.path.join(self._dir(info), "work"), 0o711)

    def _mounts(self, info: SnapshotInfo) -> list[Mount]:
        chain = self._chain(info)
        if info.kind == KIND_VIEW:
            if not chain:
                return [Mount("bind", self.fs(info), ["rbind", "ro"])]
            if len(chain) == 1:
                return [Mount("bind", self.fs(chain[0]), ["rbind", "ro"])]
            lower = ":".join(self.fs(p) for p in chain)
            return [Mount("overlay", "overlay", [f"lowerdir={lower}"])]
        if not chain:
            return [Mount("bind", self.fs(info), ["rbind", "rw"])]
        lower = ":".join(self.fs(p) for p in chain)
        work = os.path.join(self._dir(info), "work")
        return [
            Mount(
                "overlay",
                "overlay",
                ["index=off", f"workdir={work}", f"upperdir={self.fs(info)}", f"lowerdir={lower}"],
            )
        ]

    def _committed(self, info: SnapshotInfo) -> None:
        self._remove_dir(os.path.join(self._dir(info), "work"))

    def upper(self, key: str) -> str:
        """The directory holding exactly this snapshot's own changes (for diffs)."""
        return self.fs(self._row(key))


class NativeSnapshotter(_MetadataSnapshotter):
    """Every snapshot a full copy of its parent (cp -a: hard links, xattrs, devices and
    sparse files preserved). Slow and large, but works on any filesystem."""

    def __init__(self, root: str) -> None:
        super().__init__(root, "native")

    def _populate(self, info: SnapshotInfo) -> None:
        target = self.fs(info)
        if not info.parent:
            os.mkdir(target, 0o755)
            return
        source = self.fs(self._row(info.parent))
        result = subprocess.run(
            ["cp", "-a", "--reflink=auto", source, target], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise FailedPrecondition(f"copying snapshot {info.parent}: {result.stderr.strip()}")

    def _mounts(self, info: SnapshotInfo) -> list[Mount]:
        return [Mount("bind", self.fs(info), ["rbind", "ro" if info.kind == KIND_VIEW else "rw"])]


SNAPSHOTTERS: dict[str, type[OverlaySnapshotter] | type[NativeSnapshotter]] = {
    "overlayfs": OverlaySnapshotter,
    "native": NativeSnapshotter,
}
