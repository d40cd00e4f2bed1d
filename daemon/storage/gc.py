"""Garbage collection, mark and sweep as containerd's: roots are images (their target,
and the `containerd.io/gc.ref.*` labels of the image), containers (their snapshot and
labels), unexpired leases, and content and snapshots labelled `containerd.io/gc.root`.
From marked content and snapshots only their gc.ref labels lead on, never what a document
names: a client that leaves a layer out of its manifest's labels (a pull that discards
unpacked layers) means it to go with the pull's lease. A marked snapshot keeps its
parents, and an image config keeps the snapshots of its layers by chain ID (berth's own
unpack labels nothing). Everything else goes: content records, then blobs no namespace
records, then snapshots (children before parents), then stale ingests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from berth.daemon.documents import load_json
from berth.daemon.metadata import out_of_space
from berth.daemon.storage import images
from berth.daemon.storage.service import (
    GC_REF_CONTENT,
    GC_REF_SNAPSHOT,
    GC_ROOT,
    LEASED_INGEST,
    LEASED_SNAPSHOT,
    MAX_ARCHIVE_DOCUMENT,
    Storage,
    now_ns,
)
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable


@dataclass
class GCResult:
    content_records: int = 0
    blobs: int = 0
    snapshots: int = 0
    leases: int = 0
    ingests: int = 0
    seconds: float = 0.0
    kept_blobs: int = 0
    kept_snapshots: int = 0
    kept_ingests: int = 0
    # disk space given back (bytes allocated), by kind: blobs, snapshots, ingests
    freed_bytes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("blobs", "snapshots", "ingests"), 0)
    )
    errors: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {
            "removed": {
                "content": self.content_records,
                "blobs": self.blobs,
                "snapshots": self.snapshots,
                "leases": self.leases,
                "ingests": self.ingests,
            },
            "kept": {
                "blobs": self.kept_blobs,
                "snapshots": self.kept_snapshots,
                "ingests": self.kept_ingests,
            },
            "freed_bytes": dict(self.freed_bytes),
            "seconds": self.seconds,
            "errors": self.errors,
        }


@dataclass
class Marks:
    """What a collection keeps: (namespace, digest) of content, (snapshotter, scoped key)
    of snapshots."""

    content: set[tuple[str, str]] = field(default_factory=set)
    snapshots: set[tuple[str, str]] = field(default_factory=set)


def collect(storage: Storage, protected_snapshots: set[tuple[str, str]] | None = None) -> GCResult:
    """One collection (see the module docstring), under the storage's locks: nothing is
    created while it runs. `protected_snapshots`: scoped (snapshotter, key) pairs a caller
    needs kept (the rootfs of live tasks)."""
    started = time.monotonic()
    result = GCResult()
    with storage.gc_lock, storage.snap_lock:
        now = now_ns()
        for ns, lease_id in storage.store.expired_leases(now):
            storage.store.delete_lease(ns, lease_id)
            result.leases += 1
        marks = Marks(snapshots=set(protected_snapshots or ()))
        flat = set(storage.store.flat_lease_content(now))
        pending = _roots(storage, now, marks, flat)
        _mark(storage, pending, marks)
        # a flat lease's content is kept, not followed (marked after the walk, so that a
        # blob another root reaches still has its references followed)
        marks.content.update(flat)
        _sweep_content(storage, marks, result)
        _sweep_snapshots(storage, marks, result)
        _sweep_ingests(storage, now, result)
    result.seconds = time.monotonic() - started
    return result


def _label_refs(
    namespace: str,
    labels: dict[str, str],
    pending: list[tuple[str, str]],
    snapshots: set[tuple[str, str]],
) -> None:
    """What containerd's gc.ref labels name: `containerd.io/gc.ref.content`, alone or
    followed by `.` or `/` and any name, a blob; `containerd.io/gc.ref.snapshot.<name>`
    (optionally `/` and any name), a snapshot of snapshotter <name>."""
    for label, value in labels.items():
        if label.startswith(GC_REF_CONTENT):
            rest = label[len(GC_REF_CONTENT) :]
            if not rest or rest[0] in "./":
                pending.append((namespace, value))
        elif label.startswith(GC_REF_SNAPSHOT):
            snapshotter = label[len(GC_REF_SNAPSHOT) :].split("/", 1)[0]
            snapshots.add((snapshotter, f"{namespace}/{value}"))


def _roots(
    storage: Storage, now: int, marks: Marks, flat: set[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Mark the snapshots the roots hold directly; return the content they hold (to mark
    with everything it references)."""
    pending = []
    for ns, image in storage.store.all_images():
        pending.append((ns, image["target"]["digest"]))
        _label_refs(ns, image.get("labels") or {}, pending, marks.snapshots)
    for ns, kind, key in storage.store.live_lease_resources(now):
        if kind == "content":
            if (ns, key) not in flat:
                pending.append((ns, key))
        elif kind.startswith(LEASED_SNAPSHOT):
            marks.snapshots.add((kind[len(LEASED_SNAPSHOT) :], f"{ns}/{key}"))
    for container in storage.store.all_containers():
        if container.snapshot_key:
            snapshotter = container.snapshotter or storage.default_snapshotter
            marks.snapshots.add((snapshotter, f"{container.namespace}/{container.snapshot_key}"))
        _label_refs(container.namespace, container.labels, pending, marks.snapshots)
    for ns, digest in storage.store.all_content():
        with contextlib.suppress(NotFound):
            if GC_ROOT in storage.store.get_content(ns, digest)["labels"]:
                pending.append((ns, digest))
    for name, store in storage.snapshotters.items():
        for info in store.walk():
            if GC_ROOT in info.labels:
                marks.snapshots.add((name, info.key))
    return pending


def _mark(storage: Storage, pending: list[tuple[str, str]], marks: Marks) -> None:
    """Mark `pending` content and what its gc.ref labels name, then every marked
    snapshot's ancestors and what their labels name, until nothing new is marked."""
    snapshots_done: set[tuple[str, str]] = set()
    while pending or marks.snapshots - snapshots_done:
        _mark_content(storage, pending, marks)
        for name, key in marks.snapshots - snapshots_done:
            snapshots_done.add((name, key))
            snapshotter = storage.snapshotters.get(name)
            if snapshotter is None:
                continue
            try:
                info = snapshotter.stat(key)
            except NotFound:
                continue
            ns = key.split("/", 1)[0]
            _label_refs(ns, info.labels, pending, marks.snapshots)
            if info.parent:
                marks.snapshots.add((name, info.parent))


def _mark_content(storage: Storage, pending: list[tuple[str, str]], marks: Marks) -> None:
    while pending:
        ns, digest = pending.pop()
        if (ns, digest) in marks.content:
            continue
        marks.content.add((ns, digest))
        try:
            record = storage.store.get_content(ns, digest)
        except NotFound:
            continue
        _label_refs(ns, record["labels"], pending, marks.snapshots)
        _mark_layer_snapshots(storage, ns, digest, record["size"], marks.snapshots)


def _allocated(path: str) -> int:
    """Bytes a file takes on disk (0 if it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _sweep_content(storage: Storage, marks: Marks, result: GCResult) -> None:
    """Unmarked content records, then the blobs no namespace records any more."""
    for ns, digest in storage.store.all_content():
        if (ns, digest) not in marks.content:
            storage.store.delete_content(ns, digest)
            result.content_records += 1
    live_blobs = {d for _, d in storage.store.all_content()}
    for digest in list(storage.content.digests()):
        if digest in live_blobs:
            result.kept_blobs += 1
            continue
        size = _allocated(storage.content.path(digest))
        with contextlib.suppress(NotFound):
            storage.content.delete(digest)
            result.blobs += 1
            result.freed_bytes["blobs"] += size


def _sweep_snapshots(storage: Storage, marks: Marks, result: GCResult) -> None:
    """Unmarked snapshots, children before parents (a parent with a child refuses)."""
    for name, snapshotter in storage.snapshotters.items():
        every = snapshotter.walk()
        # Newest first: a child is always newer than its parent (prepared on a committed
        # one), so one pass removes a chain of any depth; the rounds are a safety net.
        doomed = [info for info in reversed(every) if (name, info.key) not in marks.snapshots]
        result.kept_snapshots += len(every) - len(doomed)
        progress = True
        while doomed and progress:
            progress = False
            for info in list(doomed):
                try:
                    size = snapshotter.usage(info.key).size if info.kind != "view" else 0
                except (NotFound, OSError):
                    size = 0
                try:
                    snapshotter.remove(info.key)
                except FailedPrecondition:
                    continue  # has a child still: next round
                except NotFound:
                    size = 0
                doomed.remove(info)
                result.snapshots += 1
                result.freed_bytes["snapshots"] += size
                progress = True
        for info in doomed:
            result.errors.append(f"snapshot {name}/{info.key} could not be removed")


def _sweep_ingests(storage: Storage, now: int, result: GCResult) -> None:
    """An ingest is kept while a live lease holds it or while it is being written to
    (its lock is held) or was written to in the last `ingest_expiry` seconds; else it
    is stale (its writer died, a daemon crashed mid-import) and removed."""
    leased = {
        f"{ns}/{key}"
        for ns, kind, key in storage.store.live_lease_resources(now)
        if kind in LEASED_INGEST
    }
    cutoff = now - int(storage.ingest_expiry * 1e9)
    for status in storage.content.list_ingests():
        if status.ref in leased or status.updated_at > cutoff:
            result.kept_ingests += 1
            continue
        try:
            storage.content.abort(status.ref)
            result.ingests += 1
            result.freed_bytes["ingests"] += status.offset
        except Unavailable:  # a writer holds it right now
            result.kept_ingests += 1
        except NotFound:
            pass
    result.ingests += storage.content.remove_unstarted(cutoff)


def drop_temporary_leases(storage: Storage) -> int:
    """Leases berthd took for one operation (an import, a pull) die with the process
    that ran it: a starting daemon drops those of its predecessors, so what they held
    (a partial ingest) becomes collectable instead of being held for an hour."""
    dropped = 0
    for namespace, lease_id in storage.store.temporary_leases():
        try:
            storage.store.delete_lease(namespace, lease_id)
            dropped += 1
        except NotFound:
            pass
        except (OSError, sqlite3.Error) as exc:
            # On a full disk even a delete needs space (the WAL): keep them, they expire,
            # rather than fail the start (it did: berthd could not start on a full root).
            if not out_of_space(exc):
                raise
            logging.getLogger("berth.storage").warning(
                "the disk is full: temporary leases of a previous daemon are kept until "
                "they expire (%s)",
                exc,
            )
            break
    return dropped


def _mark_layer_snapshots(
    storage: Storage,
    namespace: str,
    digest: str,
    size: int,
    marked_snaps: set[tuple[str, str]],
) -> None:
    """The snapshots of an image config's layers (by chain ID), which berth's unpack
    leaves unlabelled; containerd's unpacker labels the config with gc.ref.snapshot, which
    `_label_refs` follows. Content a document names is never marked here: only labels
    keep content."""
    if size > MAX_ARCHIVE_DOCUMENT:
        return
    try:
        data = storage.content.read(digest, 0, MAX_ARCHIVE_DOCUMENT + 1)
        doc = load_json(data, digest, max_size=MAX_ARCHIVE_DOCUMENT)
    except (NotFound, InvalidArgument):
        return
    if not isinstance(doc, dict):
        return
    rootfs = doc.get("rootfs")
    if isinstance(rootfs, dict) and isinstance(rootfs.get("diff_ids"), list):
        with contextlib.suppress(InvalidArgument):
            for chain in images.chain_ids([str(d) for d in rootfs["diff_ids"]]):
                for name in storage.snapshotters:
                    marked_snaps.add((name, f"{namespace}/{chain}"))
