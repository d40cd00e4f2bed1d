"""The content store: content-addressed blobs (sha256) on disk, and named, resumable ingests.

Layout under `<root>/content/`:
    blobs/sha256/<hex>          committed blobs, read-only, shared by every namespace
    ingest/<sha256(ref)[:32]>/  one in-progress write: `data`, `meta` (ref, total,
                                declared, expected, started_at), `lock`
Namespaces, labels and leases are the metadata layer's business (daemon/store.py): this
module knows only bytes and digests, and is usable on its own (trio-free).

Rules:
- A blob is only ever created by renaming a fully written, size- and digest-verified file
  into place; concurrent commits of the same blob both succeed (the second finds it there).
- An ingest is identified by its ref and survives a crash or a daemon restart: reopening
  the ref resumes at its current offset (the digest so far is recomputed from the data).
- One writer per ref at a time, across processes too (flock on the ingest's `lock`): a
  second writer gets Unavailable("locked") instead of interleaving bytes.
- A total of 0 means "size unknown" (containerd's API), unless the caller declares it
  (`declared=True`: a descriptor's size, which may really be 0); a declared total is
  enforced, by every write and by the commit, whatever its value.
- A client's ingest (`client=True`: containerd's Content.Write, through berth-grpc) keeps
  containerd's content store rules instead: a stored blob is *shared* (the writer starts
  complete, at the blob's size, and copies the blob in only if it is written to), the
  total bounds no write (the commit checks the size it is given), and a commit that fails
  its size or digest check keeps the ingest as it was, for the client to resume or abort.
- An ingest's times are its own, kept across resumes: `started_at` in `meta`, the last
  write's time as the data file's mtime (set exactly: the kernel's coarse clock may lag
  the time a client read before writing).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from berth.shim.fs import atomic_write
from berth.shim.wire.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_REF = 512
CHUNK = 1 << 20


def validate_digest(digest: object) -> str:
    if not isinstance(digest, str) or DIGEST_RE.fullmatch(digest) is None:
        shown = repr(digest)[:90]
        raise InvalidArgument(f"invalid digest {shown}: want sha256:<64 lowercase hex>")
    return digest


def validate_ref(ref: object) -> str:
    if not isinstance(ref, str) or not ref or len(ref) > MAX_REF or "\0" in ref:
        raise InvalidArgument(f"invalid ingest ref: a non-empty string of at most {MAX_REF}")
    return ref


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    created_at: int


@dataclass(frozen=True)
class IngestStatus:
    ref: str
    offset: int
    total: int
    expected: str
    started_at: int
    updated_at: int


class ContentStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, "content")
        self.blobs = os.path.join(self.root, "blobs", "sha256")
        self.ingests = os.path.join(self.root, "ingest")
        for d in (self.blobs, self.ingests):
            os.makedirs(d, mode=0o700, exist_ok=True)

    # -- blobs

    def path(self, digest: str) -> str:
        return os.path.join(self.blobs, validate_digest(digest)[7:])

    def info(self, digest: str) -> BlobInfo:
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            raise NotFound(f"content {digest} not found") from None
        return BlobInfo(digest, st.st_size, st.st_mtime_ns)

    def exists(self, digest: str) -> bool:
        return os.path.exists(self.path(digest))

    def read(self, digest: str, offset: int = 0, size: int = -1) -> bytes:
        if offset < 0:
            raise InvalidArgument("offset must not be negative")
        try:
            with open(self.path(digest), "rb") as f:
                f.seek(offset)
                return f.read(size if size >= 0 else -1)
        except FileNotFoundError:
            raise NotFound(f"content {digest} not found") from None

    def open(self, digest: str) -> int:
        try:
            return os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content {digest} not found") from None

    def delete(self, digest: str) -> None:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            raise NotFound(f"content {digest} not found") from None

    def digests(self) -> Iterator[str]:
        for name in os.listdir(self.blobs):
            if len(name) == 64 and not name.startswith("."):
                yield "sha256:" + name

    # -- ingests

    def _ingest_dir(self, ref: str) -> str:
        return os.path.join(self.ingests, hashlib.sha256(ref.encode()).hexdigest()[:32])

    def writer(
        self,
        ref: str,
        total: int = 0,
        expected: str = "",
        *,
        declared: bool = False,
        client: bool = False,
    ) -> Writer:
        """Open (or resume) the ingest `ref`. If `expected` is already stored, raise
        AlreadyExists: the caller has nothing to write (a `client`'s writer shares it
        instead, if `total` is 0 or its size). `total` is enforced when it is not 0 or
        when `declared` says that 0 is the size (else 0 means unknown)."""
        validate_ref(ref)
        shared: BlobInfo | None = None
        if expected:
            validate_digest(expected)
            if self.exists(expected):
                if not client:
                    raise AlreadyExists(f"content {expected} already exists")
                with contextlib.suppress(NotFound):
                    info = self.info(expected)
                    shared = info if total in (0, info.size) else None
        if total < 0:
            raise InvalidArgument("total must not be negative")
        directory = self._ingest_dir(ref)
        created = not os.path.isdir(directory)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        lock = os.open(
            os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise Unavailable(f"ingest {ref!r} is locked by another writer") from None
        try:
            meta_path = os.path.join(directory, "meta")
            now = time.time_ns()
            meta: dict[str, Any] = {
                "ref": ref,
                "total": total,
                "declared": declared or total > 0,
                "expected": expected,
                "started_at": now,
            }
            if os.path.exists(meta_path):
                with open(meta_path) as f:
                    old = json.load(f)
                if old.get("ref") != ref:
                    raise FailedPrecondition(f"ingest directory of {ref!r} holds another ref")
                # A resumed ingest keeps what it was started with unless told more.
                meta["started_at"] = old.get("started_at", now)
                if not meta["declared"]:
                    # (in an ingest from before "declared" existed, a total was one if not 0)
                    meta["total"] = old.get("total", 0)
                    meta["declared"] = bool(old.get("declared", meta["total"]))
                meta["expected"] = expected or old.get("expected", "")
            if shared is None:
                atomic_write(meta_path, json.dumps(meta).encode())
            else:  # containerd's shared writer: complete, just started, and no ingest yet
                meta.update(total=shared.size, declared=True, started_at=now)
            writer = Writer(
                self,
                ref,
                directory,
                lock,
                int(meta["total"]),
                str(meta["expected"]),
                int(meta["started_at"]),
                declared=bool(meta["declared"]),
                client=client,
                shared=shared,
            )
            if shared is not None:
                writer.pending = (meta, created)
            return writer
        except BaseException:
            os.close(lock)
            raise

    def status(self, ref: str) -> IngestStatus:
        directory = self._ingest_dir(validate_ref(ref))
        try:
            with open(os.path.join(directory, "meta")) as f:
                meta = json.load(f)
            data = os.stat(os.path.join(directory, "data"))
        except FileNotFoundError:
            raise NotFound(f"ingest {ref!r} not found") from None
        return IngestStatus(
            ref,
            data.st_size,
            meta.get("total", 0),
            meta.get("expected", ""),
            meta.get("started_at", 0),
            data.st_mtime_ns,
        )

    def list_ingests(self) -> list[IngestStatus]:
        out = []
        for name in sorted(os.listdir(self.ingests)):
            try:
                with open(os.path.join(self.ingests, name, "meta")) as f:
                    ref = json.load(f)["ref"]
                out.append(self.status(ref))
            except (OSError, ValueError, KeyError, NotFound):
                continue
        return out

    def remove_unstarted(self, cutoff: int) -> int:
        """Ingest directories without a `meta` (a shared writer's, never written to, left
        by a daemon that died while it was open) last touched before `cutoff` (ns) and
        held by nobody: removed. Returns how many."""
        removed = 0
        for name in os.listdir(self.ingests):
            directory = os.path.join(self.ingests, name)
            try:
                if os.path.exists(os.path.join(directory, "meta")):
                    continue
                if os.stat(directory).st_mtime_ns >= cutoff:
                    continue
                lock = os.open(
                    os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError:
                continue
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(directory, ignore_errors=True)
                removed += 1
            except BlockingIOError:
                pass
            finally:
                os.close(lock)
        return removed

    def abort(self, ref: str) -> None:
        directory = self._ingest_dir(validate_ref(ref))
        if not os.path.isdir(directory):
            raise NotFound(f"ingest {ref!r} not found")
        lock = os.open(
            os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Unavailable(f"ingest {ref!r} is being written") from None
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(lock)


class Writer:
    """One open ingest. `write` appends; `commit` verifies and publishes the blob.
    `total` is the size it must have if `declared`, else 0 (unknown)."""

    def __init__(
        self,
        store: ContentStore,
        ref: str,
        directory: str,
        lock: int,
        total: int,
        expected: str,
        started_at: int,
        *,
        declared: bool,
        client: bool = False,
        shared: BlobInfo | None = None,
    ) -> None:
        self.store = store
        self.ref = ref
        self.directory = directory
        self._lock = lock
        self.total = total
        self.declared = declared
        self.client = client
        self.expected = expected
        self.started_at = started_at
        self.updated_at = started_at
        self.lease: str | None = None  # the lease a caller opened it under, if any
        self._data = os.path.join(directory, "data")
        self._fd = os.open(self._data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._hash = hashlib.sha256()
        self.offset = 0
        self._shared = shared  # a stored blob this writer stands for until written to
        # A shared writer's ingest: its meta, written once it is written to, and whether
        # its directory is the writer's own (removed if it never is: nothing changed)
        self.pending: tuple[dict[str, Any], bool] = ({}, False)
        if shared is not None:  # (an ingest the ref may hold already is left as it is)
            self.offset = shared.size
            return
        while True:  # resume: rehash what is there
            chunk = os.read(self._fd, CHUNK)
            if not chunk:
                break
            self._hash.update(chunk)
            self.offset += len(chunk)
        if self.offset:
            self.updated_at = os.fstat(self._fd).st_mtime_ns
        else:
            self._touch(started_at)

    def _touch(self, when: int) -> None:
        """The last write's time, exactly (see the module's rules)."""
        os.utime(self._fd, ns=(when, when))
        self.updated_at = when

    def _materialize(self) -> None:
        """A shared writer written to: the stored blob becomes the ingest's first bytes
        (containerd copies it in the same way), the write goes after them."""
        assert self._shared is not None
        # what it will hold is no longer the blob: no expected digest (as containerd's)
        self.expected = ""
        meta = {**self.pending[0], "expected": ""}
        atomic_write(os.path.join(self.directory, "meta"), json.dumps(meta).encode())
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash = hashlib.sha256()
        self.offset = 0
        source = self.store.open(self._shared.digest)
        try:
            while chunk := os.read(source, CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._fd, view) :]
                self._hash.update(chunk)
                self.offset += len(chunk)
        finally:
            os.close(source)
        self._shared = None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, data: bytes, offset: int | None = None) -> int:
        """Append `data`; `offset`, when given, must be the current offset (a client that
        resumes must say where). Returns the new offset."""
        if self._fd < 0:
            raise FailedPrecondition(f"ingest {self.ref!r} is closed")
        if offset is not None and offset != self.offset:
            raise FailedPrecondition(
                f"write at offset {offset} but ingest {self.ref!r} is at {self.offset}"
            )
        if not self.client and self.declared and self.offset + len(data) > self.total:
            raise InvalidArgument(
                f"ingest {self.ref!r}: {self.offset + len(data)} bytes exceed the total "
                f"{self.total}"
            )
        if self._shared is not None and data:
            self._materialize()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._hash.update(data)
        self.offset += len(data)
        if data and self.client:  # a client reads the time back; a pull's write sets it
            self._touch(time.time_ns())
        return self.offset

    def digest(self) -> str:
        if self._shared is not None:
            return self._shared.digest
        return "sha256:" + self._hash.hexdigest()

    def commit(self, size: int = 0, expected: str = "") -> str:
        """Verify size and digest, then publish the blob. On a mismatch nothing is stored
        and the ingest is discarded (a client's is kept as it was, and let go). Returns
        the digest. `size` 0: the declared total, if the ingest has one."""
        if self._fd < 0:
            raise FailedPrecondition(f"ingest {self.ref!r} is closed")
        expected = expected or self.expected
        want = size or (self.total if self.declared else None)
        actual = self.digest()
        problem = ""
        if want is not None and want != self.offset:
            problem = f"size mismatch: {self.offset} bytes written, {want} expected"
        elif expected and validate_digest(expected) != actual:
            problem = f"digest mismatch: got {actual}, expected {expected}"
        if problem:
            if self.client:
                self.close()
            else:
                self._discard()
            raise FailedPrecondition(f"commit of {self.ref!r} failed: {problem}")
        if self._shared is not None:  # nothing written: the stored blob is the content
            self.close()
            self.store.info(actual)  # NotFound if it went meanwhile
            return actual
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        target = self.store.path(actual)
        try:
            os.chmod(self._data, 0o444)
            if os.path.exists(target):
                os.unlink(self._data)  # a concurrent commit won the race: same bytes
            else:
                os.replace(self._data, target)
        finally:
            self._discard()
        return actual

    def _discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        shutil.rmtree(self.directory, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Release the writer, keeping the ingest for a later resume (a shared writer
        never written to leaves nothing of its own behind)."""
        if self._shared is not None and self.pending[1] and self._lock >= 0:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
