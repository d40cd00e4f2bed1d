"""Garbage collection, mark and sweep as containerd's: roots are images (-> their content
graph -> the snapshots of their layers, by chain ID), containers (-> their snapshot),
unexpired leases and `containerd.io/gc.ref.*` labels on marked content; a marked snapshot
keeps its parents. Everything else goes: content records, then blobs no namespace
records, then snapshots (children before parents), then stale ingests.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from berth.daemon.documents import load_json
from berth.daemon.storage import images
from berth.daemon.storage.service import (
    GC_REF_CONTENT,
    GC_REF_SNAPSHOT,
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
        pending = _roots(storage, now, marks)
        _mark(storage, pending, marks)
        _sweep_content(storage, marks, result)
        _sweep_snapshots(storage, marks, result)
        _sweep_ingests(storage, now, result)
    result.seconds = time.monotonic() - started
    return result


def _roots(storage: Storage, now: int, marks: Marks) -> list[tuple[str, str]]:
    """Mark the snapshots the roots hold directly; return the content they hold (to mark
    with everything it references)."""
    pending = [(ns, image["target"]["digest"]) for ns, image in storage.store.all_images()]
    for ns, kind, key in storage.store.live_lease_resources(now):
        if kind == "content":
            pending.append((ns, key))
        elif kind.startswith(LEASED_SNAPSHOT):
            marks.snapshots.add((kind[len(LEASED_SNAPSHOT) :], f"{ns}/{key}"))
    for container in storage.store.all_containers():
        if container.snapshot_key:
            snapshotter = container.snapshotter or storage.default_snapshotter
            marks.snapshots.add((snapshotter, f"{container.namespace}/{container.snapshot_key}"))
    return pending


def _mark(storage: Storage, pending: list[tuple[str, str]], marks: Marks) -> None:
    """Mark `pending` content and all it references (gc.ref labels and the documents
    themselves), then the ancestors of every marked snapshot."""
    while pending:
        ns, digest = pending.pop()
        if (ns, digest) in marks.content:
            continue
        marks.content.add((ns, digest))
        try:
            record = storage.store.get_content(ns, digest)
        except NotFound:
            continue
        for label, value in record["labels"].items():
            if label.startswith(GC_REF_CONTENT):
                pending.append((ns, value))
            elif label.startswith(GC_REF_SNAPSHOT):
                marks.snapshots.add((label[len(GC_REF_SNAPSHOT) :], f"{ns}/{value}"))
        _mark_from_document(storage, ns, digest, record["size"], pending, marks.snapshots)
    for name, snapshotter in storage.snapshotters.items():
        for _, key in [m for m in marks.snapshots if m[0] == name]:
            try:
                info = snapshotter.stat(key)
            except NotFound:
                continue
            while info.parent:
                marks.snapshots.add((name, info.parent))
                info = snapshotter.stat(info.parent)


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
        with contextlib.suppress(NotFound):
            storage.content.delete(digest)
            result.blobs += 1


def _sweep_snapshots(storage: Storage, marks: Marks, result: GCResult) -> None:
    """Unmarked snapshots, children before parents (a parent with a child refuses)."""
    for name, snapshotter in storage.snapshotters.items():
        every = snapshotter.walk()
        doomed = [info for info in every if (name, info.key) not in marks.snapshots]
        result.kept_snapshots += len(every) - len(doomed)
        progress = True
        while doomed and progress:
            progress = False
            for info in list(doomed):
                try:
                    snapshotter.remove(info.key)
                except FailedPrecondition:
                    continue  # has a child still: next round
                except NotFound:
                    pass
                doomed.remove(info)
                result.snapshots += 1
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
        if kind == "ingest"
    }
    cutoff = now - int(storage.ingest_expiry * 1e9)
    for status in storage.content.list_ingests():
        if status.ref in leased or status.updated_at > cutoff:
            result.kept_ingests += 1
            continue
        try:
            storage.content.abort(status.ref)
            result.ingests += 1
        except Unavailable:  # a writer holds it right now
            result.kept_ingests += 1
        except NotFound:
            pass


def drop_temporary_leases(storage: Storage) -> int:
    """Leases berthd took for one operation (an import, a pull) die with the process
    that ran it: a starting daemon drops those of its predecessors, so what they held
    (a partial ingest) becomes collectable instead of being held for an hour."""
    dropped = 0
    for namespace, lease_id in storage.store.temporary_leases():
        with contextlib.suppress(NotFound):
            storage.store.delete_lease(namespace, lease_id)
            dropped += 1
    return dropped


def _mark_from_document(
    storage: Storage,
    namespace: str,
    digest: str,
    size: int,
    pending: list[tuple[str, str]],
    marked_snaps: set[tuple[str, str]],
) -> None:
    """Follow what an index, manifest or config references, by parsing it."""
    if size > MAX_ARCHIVE_DOCUMENT:
        return
    try:
        data = storage.content.read(digest, 0, MAX_ARCHIVE_DOCUMENT + 1)
        doc = load_json(data, digest, max_size=MAX_ARCHIVE_DOCUMENT)
    except (NotFound, InvalidArgument):
        return
    if not isinstance(doc, dict):
        return
    if isinstance(doc.get("manifests"), list):
        for m in doc["manifests"]:
            if isinstance(m, dict) and isinstance(m.get("digest"), str):
                pending.append((namespace, m["digest"]))
    if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
        cfg = doc["config"].get("digest")
        if isinstance(cfg, str):
            pending.append((namespace, cfg))
        for layer in doc["layers"]:
            if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
                pending.append((namespace, layer["digest"]))
    rootfs = doc.get("rootfs")
    if isinstance(rootfs, dict) and isinstance(rootfs.get("diff_ids"), list):
        with contextlib.suppress(InvalidArgument):
            for chain in images.chain_ids([str(d) for d in rootfs["diff_ids"]]):
                for name in storage.snapshotters:
                    marked_snaps.add((name, f"{namespace}/{chain}"))
