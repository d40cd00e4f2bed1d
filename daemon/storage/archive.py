"""Apply an image layer (a tar stream) to a directory, safely; compute a layer from a diff.

Confinement is the kernel's job, not string checks': every parent directory is opened with
openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) relative to the root, so "/", ".." and
every symlink met on the way resolve inside the root; the final component is then created,
replaced or changed relative to that directory fd without following it (O_NOFOLLOW,
*at calls, lchown, metadata through an fd). What that rules out, each a test:
absolute paths and ".." (CVE-2014-6407 class), symlinks and hard links pointing out, a
symlink replaced by a directory, chmod/chown through a symlink (CVE-2021-32760), and
whiteouts of a parent or of the root. Character and block devices are created only when
the caller's policy allows them.

Whiteouts follow the OCI image spec: `.wh.<name>` deletes <name> from lower layers,
`.wh..wh..opq` makes a directory opaque (its lower-layer children go). Applied on an
overlay mount, deletions become overlay whiteouts by themselves.

The diff ID (sha256 of the uncompressed tar) is computed as the bytes go by.

Headers are read within bounds (BoundedTarFile): tarfile alone reads a PAX header or a GNU
long name whole at whatever size it declares, copies a global PAX header into every later
entry, keeps every header it has read, and reads a GNU sparse map to any length.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Self

from berth.native import (
    RESOLVE_BENEATH,
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    openat2,
)
from berth.shim.fs import NotRegularFile, open_regular, remove_tree
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
XATTR_PREFIXES = ("user.", "security.capability")
CHUNK = 1 << 20
SPARSE_BLOCK = 64 << 10  # all-zero blocks of this size become holes
MAX_ID = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown(2)
MAX_MTIME_NS = 2**62  # what utimensat(2) takes, with room (PAX mtimes are free-form floats)
# What the kernel answers when a layer's entries do not fit together (a parent that is a
# file, a symlink loop, a name too long): the layer's fault, so `invalid argument` naming
# the entry. Anything else (ENOSPC, EIO, EROFS) is the host's and stays as it is.
LAYER_FAULTS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EEXIST,
        errno.EMLINK,
        errno.EINVAL,
        errno.EFBIG,  # a size (a sparse file's) no file here can have
        errno.EOVERFLOW,
    }
)
# The PAX headers and GNU long names in front of one entry: their data, together (tarfile
# reads each whole; docker's reader has the same cap), and how many (each is a recursion).
MAX_TAR_HEADER = 1 << 20
MAX_HEADER_CHAIN = 16
MAX_SPARSE_MAP = 1 << 20  # the bytes of a GNU sparse map (extension blocks, or 1.0's text)
MAX_SKIPPED_NAMES, MAX_SKIPPED_NAME = 100, 4096  # the device entries an ApplyResult names


class UnsafeLayer(InvalidArgument):
    """The layer tried something outside the rules (a hostile or broken image)."""


# --- reading tar headers within bounds ---------------------------------------------------

_EXTENDED = frozenset(
    {tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)
# What tarfile raises, besides its own errors, on headers it cannot make sense of (a sparse
# map of letters, a map cut short). Not OSError, EOFError or a decompressor's error: those
# are the reader's, and TarFile.open("r:*") tells formats apart by them.
_PARSE_ERRORS = (ValueError, LookupError, ArithmeticError, RecursionError)
# tarfile's internals that its stubs leave out: the header error it takes, after the first
# block, for the end of the archive; its number-field parser; its TarInfo hooks.
_INVALID_HEADER: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]
_number_field: Callable[[bytes], int] = tarfile.nti  # type: ignore[attr-defined]
_TarInfoHooks: Any = tarfile.TarInfo
# tarfile calls what the classes below override by name (the same in CPython 3.11 to
# 3.13); a Python that renamed one would silently drop a bound: refuse to load there.
if not all(
    callable(hook)
    for hook in (
        tarfile.TarFile.tarinfo,
        _TarInfoHooks.fromtarfile,
        _TarInfoHooks._proc_member,
        _TarInfoHooks._proc_gnusparse_10,
    )
):
    raise ImportError("tarfile lacks the hooks berth reads tar headers within bounds with")


def _blocks(size: int) -> int:
    """`size` bytes rounded up to whole tar blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _decimal(line: bytes, where: str) -> int:
    """One number of a GNU sparse 1.0 map: ASCII digits, at most 20 of them."""
    if not line.isdigit() or len(line) > 20:
        shown = _shown(line.decode("utf-8", "replace"))
        raise UnsafeLayer(f"{where}: its sparse map holds {shown}, not a number")
    return int(line)


def _sparse_map_block(tar: tarfile.TarFile, read: int, where: str) -> bytes:
    """The next block of a GNU sparse map, `read` bytes of which came before it: whole, and
    within MAX_SPARSE_MAP."""
    if read + tarfile.BLOCKSIZE > MAX_SPARSE_MAP:
        raise UnsafeLayer(f"{where}: sparse map larger than {MAX_SPARSE_MAP} bytes")
    block: bytes = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise UnsafeLayer(f"{where}: the layer ends inside its sparse map")
    return block


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header parser within bounds (CPython 3.11 to 3.13 call these hooks the
    same): the PAX headers and GNU long names in front of an entry take at most
    MAX_TAR_HEADER bytes and MAX_HEADER_CHAIN headers; a global PAX header is skipped,
    applied to nothing, as docker's and containerd's reader does (tarfile gives each later
    entry its own copy: 20,000 keys and 1000 entries in a 54 KB layer took 423 MB); a GNU
    sparse map is read up to MAX_SPARSE_MAP bytes. What breaks a bound, and a malformed
    header after the first block, is UnsafeLayer: a tarfile.HeaderError there would be
    taken for the end of the archive, and the rest of the layer silently left out."""

    __slots__ = ()

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tar)
        except _INVALID_HEADER as exc:
            if tar.offset == 0:
                raise  # not a tar at all (tarfile's ReadError; "r:*" tries the next format)
            raise UnsafeLayer(f"invalid tar header at byte {tar.offset}: {exc}") from None

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        where = f"tar entry at byte {self.offset}"
        if self.size < 0:
            raise UnsafeLayer(f"{where}: negative size {self.size}")
        if self.type == tarfile.XGLTYPE:  # handed to the caller, which ignores it
            self.offset_data = tar.fileobj.tell()
            tar.offset = self.offset_data + _blocks(self.size)
            return self
        if self.type == tarfile.GNUTYPE_SPARSE:
            return self._old_sparse(tar, where)
        if self.type not in _EXTENDED:
            return _TarInfoHooks._proc_member(self, tar)  # type: ignore[no-any-return]
        if not isinstance(tar, BoundedTarFile):
            raise TypeError("a BoundedTarInfo is read by a BoundedTarFile")
        size = self.size
        if size > MAX_TAR_HEADER - tar.header_bytes:
            raise UnsafeLayer(
                f"{where}: more than {MAX_TAR_HEADER} bytes of PAX headers and GNU long names"
            )
        if tar.header_count >= MAX_HEADER_CHAIN:
            raise UnsafeLayer(
                f"{where}: more than {MAX_HEADER_CHAIN} PAX headers and GNU long names"
            )
        tar.header_bytes += size
        tar.header_count += 1
        try:  # the entry they extend is read from here, recursively
            return _TarInfoHooks._proc_member(self, tar)  # type: ignore[no-any-return]
        finally:
            tar.header_bytes -= size
            tar.header_count -= 1

    def _old_sparse(self, tar: tarfile.TarFile, where: str) -> tarfile.TarInfo:
        """An old GNU sparse entry ('S'): up to 4 regions in its header, then 21 in each
        extension block for as long as the last one says another follows."""
        hooks: Any = self
        regions, extended, real_size = hooks._sparse_structs
        hooks._sparse_structs = None
        regions = list(regions)
        read = 0
        while extended:
            block = _sparse_map_block(tar, read, where)
            read += tarfile.BLOCKSIZE
            for start in range(0, 21 * 24, 24):
                offset = _number_field(block[start : start + 12])
                size = _number_field(block[start + 12 : start + 24])
                if size:
                    regions.append((offset, size))
            extended = block[504] != 0
        hooks.sparse = regions
        self.offset_data = tar.fileobj.tell()
        tar.offset = self.offset_data + _blocks(self.size)
        self.size = real_size
        return self

    def _proc_gnusparse_10(
        self, entry: tarfile.TarInfo, _pax_headers: object, tar: tarfile.TarFile
    ) -> None:
        """A GNU sparse 1.0 map, at the start of the entry's data: the number of regions,
        then each one's offset and size, one decimal number a line, up to a block's end."""
        where = f"tar entry at byte {self.offset}"
        numbers: list[int] = []
        count = -1
        read = 0
        tail = b""
        while count < 0 or len(numbers) < 2 * count:
            block = _sparse_map_block(tar, read, where)
            read += tarfile.BLOCKSIZE
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if count < 0:
                    count = _decimal(line, where)
                    if count > MAX_SPARSE_MAP // 4:  # each region takes 4 bytes at least
                        raise UnsafeLayer(f"{where}: sparse map of {count} regions")
                elif len(numbers) < 2 * count:
                    numbers.append(_decimal(line, where))
                else:
                    break  # the rest of the block pads the map
            if (count < 0 or len(numbers) < 2 * count) and len(tail) > 20:
                raise UnsafeLayer(f"{where}: its sparse map holds a line too long")
        hooks: Any = entry
        hooks.offset_data = tar.fileobj.tell()
        hooks.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))


class BoundedTarFile(tarfile.TarFile):
    """A TarFile read through BoundedTarInfo that keeps no list of its members (tarfile
    keeps every header it has read, even in a stream: read on with next(), never through
    getmembers() or iteration), and whose malformed headers are UnsafeLayer, never
    ValueError or IndexError (a sparse map of letters, a sparse map cut short)."""

    tarinfo = BoundedTarInfo
    members: list[tarfile.TarInfo]
    header_bytes = 0  # the PAX headers and long names read for the entry being read
    header_count = 0

    def next(self) -> tarfile.TarInfo | None:
        start = self.offset  # where the next header is (tarfile moves it as it reads)
        try:
            member = super().next()
        except _PARSE_ERRORS as exc:
            raise UnsafeLayer(f"malformed tar header at byte {start}: {exc}") from None
        self.members.clear()
        return member


def read_to_next_header(tar: tarfile.TarFile) -> None:
    """Read a stream on to the next header, past what is left of an entry's data. tarfile
    would seek there, and its stream's seek reads on past the stream's end without
    noticing: a size of 10^30 in a PAX header kept it reading nothing for ever."""
    left = tar.offset - tar.fileobj.tell()
    while left > 0:
        chunk = tar.fileobj.read(min(CHUNK, left))
        if not chunk:
            raise InvalidArgument("the layer ends inside the data of an entry")
        left -= len(chunk)


@dataclass
class ApplyResult:
    diff_id: str
    size: int
    entries: int = 0
    skipped_devices: int = 0
    skipped: list[str] = field(default_factory=list)


class TappedReader(io.RawIOBase):
    """A reader that shows every chunk read through it to `seen` (which subclasses
    define) and counts the bytes (`size`)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.size += n
        self.seen(data)
        return n

    def seen(self, data: bytes) -> None:
        """Each chunk, once read."""


class HashingReader(TappedReader):
    """Counts and hashes every byte read through it (the layer's diff ID)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(raw)
        self.hash = hashlib.sha256()

    def seen(self, data: bytes) -> None:
        self.hash.update(data)

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _shown(name: str) -> str:
    """A member name for a message: quoted, and cut short (a name may be kilobytes long)."""
    return repr(name if len(name) <= 200 else name[:200] + "...")


def _check_header(m: tarfile.TarInfo) -> None:
    """Refuse header values no file can take (PAX headers carry free-form numbers and
    strings): they would fail deep in a syscall wrapper as an internal error."""
    for what, value in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= value <= MAX_ID:
            raise UnsafeLayer(f"layer entry {_shown(m.name)}: {what} {value} is out of range")
    if not math.isfinite(m.mtime) or abs(m.mtime * 1e9) >= MAX_MTIME_NS:
        raise UnsafeLayer(
            f"layer entry {_shown(m.name)}: modification time {m.mtime} is out of range"
        )
    if (m.issym() or m.islnk()) and (not m.linkname or "\0" in m.linkname):
        raise UnsafeLayer(
            f"layer entry {_shown(m.name)}: link target {_shown(m.linkname)} is not a path"
        )


def _clean(name: str) -> str:
    """A member name as a path relative to the root ('' for the root itself)."""
    if "\0" in name:
        raise UnsafeLayer(f"entry name with a NUL byte: {name!r}")
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return "" if cleaned == "." else cleaned


class _Applier:
    def __init__(self, root: str, allow_devices: bool) -> None:
        self.rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.allow_devices = allow_devices
        self.created: set[str] = set()  # paths this layer made (an opaque marker keeps them)
        self.dir_times: list[tuple[str, int]] = []

    def close(self) -> None:
        os.close(self.rootfd)

    # -- resolution

    def parent(self, rel: str, create: bool = True) -> int:
        """An O_PATH fd of `rel`'s parent directory, resolved inside the root (created
        with the intermediate directories when missing)."""
        directory = posixpath.dirname(rel)
        if not directory:
            return os.dup(self.rootfd)
        try:
            return openat2(
                self.rootfd, directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, RESOLVE
            )
        except OSError as exc:
            if exc.errno != errno.ENOENT or not create:
                raise
        # Create what is missing, one component at a time, where the path really leads
        # (through in-root symlinks, as containerd does); every prefix is opened from the
        # layer's root (RESOLVE_IN_ROOT treats the dirfd given as "/").
        directory = self.resolve(directory)
        if not directory:
            return os.dup(self.rootfd)
        fd = os.dup(self.rootfd)
        try:
            parts = directory.split("/")
            for i, part in enumerate(parts):
                prefix = "/".join(parts[: i + 1])
                try:
                    nxt = openat2(
                        self.rootfd, prefix, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, RESOLVE
                    )
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = openat2(
                        self.rootfd, prefix, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, RESOLVE
                    )
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def resolve(self, rel: str) -> str:
        """Where `rel` leads inside the root, symlinks followed the way RESOLVE_IN_ROOT
        follows them, as far as the path exists. This only chooses names; every open is
        still the kernel's openat2, so an error here cannot reach outside the root."""
        pending = [p for p in rel.split("/") if p not in ("", ".")]
        resolved: list[str] = []
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            try:
                pfd = openat2(
                    self.rootfd,
                    "/".join(resolved) or ".",
                    os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                    RESOLVE,
                )
            except OSError:
                return "/".join([*resolved, part, *pending])
            try:
                st = self.lstat(pfd, part)
                if st is None or not stat.S_ISLNK(st.st_mode):
                    resolved.append(part)
                    continue
                hops += 1
                if hops > 40:
                    raise UnsafeLayer(f"too many levels of symbolic links in {rel!r}")
                target = os.readlink(part, dir_fd=pfd)
            finally:
                os.close(pfd)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
        return "/".join(resolved)

    @staticmethod
    def lstat(dirfd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def remove(dirfd: int, name: str) -> None:
        st = _Applier.lstat(dirfd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            remove_tree(name, dir_fd=dirfd)  # any depth: layers decide the shape
        else:
            os.unlink(name, dir_fd=dirfd)

    # -- entries

    def apply(self, member: tarfile.TarInfo, data: IO[bytes] | None) -> bool:
        """Apply one entry; False when policy skipped it."""
        rel = _clean(member.name)
        _check_header(member)
        base = posixpath.basename(rel)
        if base.startswith(WHITEOUT):
            self.whiteout(rel, base)
            return True
        if not rel:
            if member.isdir():  # the root directory itself: metadata only
                self.metadata(self.rootfd, "", member, is_root=True)
                return True
            raise UnsafeLayer("an entry that is the root but not a directory")
        if (member.ischr() or member.isblk()) and not self.allow_devices:
            return False
        pfd = self.parent(rel)
        try:
            self.create(pfd, base, rel, member, data)
        finally:
            os.close(pfd)
        self.created.add(rel)
        return True

    def whiteout(self, rel: str, base: str) -> None:
        directory = posixpath.dirname(rel)
        if base == OPAQUE:
            try:
                dfd = openat2(
                    self.rootfd,
                    directory or ".",
                    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                    RESOLVE,
                )
            except FileNotFoundError:
                return
            try:
                for name in os.listdir(dfd):
                    child = posixpath.join(directory, name) if directory else name
                    if child not in self.created:
                        self.remove(dfd, name)
            finally:
                os.close(dfd)
            return
        name = base[len(WHITEOUT) :]
        if name in ("", ".", "..") or "/" in name:
            raise UnsafeLayer(f"invalid whiteout {rel!r}")
        try:
            pfd = self.parent(rel, create=False)
        except FileNotFoundError:
            return
        try:
            self.remove(pfd, name)
        finally:
            os.close(pfd)

    def create(
        self, pfd: int, name: str, rel: str, m: tarfile.TarInfo, data: IO[bytes] | None
    ) -> None:
        existing = self.lstat(pfd, name)
        if m.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                self.remove(pfd, name)  # a symlink (or file) replaced by a directory
                existing = None
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=pfd)
            self.metadata(pfd, name, m)
            self.dir_times.append((rel, int(m.mtime * 1e9)))
            return
        if existing is not None:
            self.remove(pfd, name)
        if m.isreg():
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=pfd,
            )
            try:
                if data is not None:
                    _write_file(fd, data, m)
                self.fd_metadata(fd, m)
            finally:
                os.close(fd)
            return
        if m.issym():
            os.symlink(m.linkname, name, dir_fd=pfd)
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(name, ns=(int(m.mtime * 1e9),) * 2, dir_fd=pfd, follow_symlinks=False)
            return
        if m.islnk():
            self.hard_link(pfd, name, rel, m.linkname)
            return
        if m.isfifo() or m.ischr() or m.isblk():
            kind = stat.S_IFIFO if m.isfifo() else stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            self.metadata(pfd, name, m)
            return
        raise UnsafeLayer(f"unsupported entry type {m.type!r} for {rel!r}")

    def hard_link(self, pfd: int, name: str, rel: str, linkname: str) -> None:
        """Link `rel` to an entry already in the root (this layer's, or a lower one's, as
        the layer is applied on the mounted snapshot). An absolute target is named
        inside the root ("/x" is the root's x); one that climbs out of it ("../../x"), is
        not there, or is a directory is the layer's fault (docker refuses them too)."""
        if posixpath.normpath(linkname).split("/")[0] == "..":
            raise UnsafeLayer(
                f"hard link {_shown(rel)} points to {_shown(linkname)}, outside the layer"
            )
        target = _clean(linkname)
        if not target:
            raise UnsafeLayer(f"hard link {_shown(rel)} to the root")
        absent = UnsafeLayer(
            f"hard link {_shown(rel)} points to {_shown(linkname)}, which is not in the layer"
        )
        try:
            tfd = self.parent(target, create=False)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise absent from None
            raise
        try:
            st = self.lstat(tfd, posixpath.basename(target))
            if st is None:
                raise absent
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeLayer(f"hard link {_shown(rel)} points to directory {_shown(linkname)}")
            os.link(
                posixpath.basename(target),
                name,
                src_dir_fd=tfd,
                dst_dir_fd=pfd,
                follow_symlinks=False,
            )
        finally:
            os.close(tfd)

    def metadata(self, pfd: int, name: str, m: tarfile.TarInfo, is_root: bool = False) -> None:
        """Owner, mode, times and xattrs through an fd of the entry itself (never through
        a path that could be swapped for a symlink)."""
        if is_root:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.rootfd)
        else:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                return
            if stat.S_ISDIR(st.st_mode) and not is_root:
                real = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
                )
                os.close(fd)
                fd = real
            if stat.S_ISDIR(st.st_mode):
                self.fd_metadata(fd, m)
            else:  # fifo/device: an O_PATH fd cannot fchmod; /proc/self/fd/N names the inode
                path = f"/proc/self/fd/{fd}"
                os.chown(path, m.uid, m.gid)
                os.chmod(path, stat.S_IMODE(m.mode))
                os.utime(path, ns=(int(m.mtime * 1e9),) * 2)
        finally:
            os.close(fd)

    @staticmethod
    def fd_metadata(fd: int, m: tarfile.TarInfo) -> None:
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, stat.S_IMODE(m.mode))  # after chown: chown clears setuid bits
        for key, value in (m.pax_headers or {}).items():
            if key.startswith("SCHILY.xattr."):
                attr = key[len("SCHILY.xattr.") :]
                if attr.startswith(XATTR_PREFIXES):
                    with contextlib.suppress(OSError):
                        os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))
        os.utime(fd, ns=(int(m.mtime * 1e9),) * 2)

    def finish(self) -> None:
        """Directory times last: creating children changed them."""
        for rel, mtime in reversed(self.dir_times):
            with contextlib.suppress(OSError):
                fd = openat2(self.rootfd, rel, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, RESOLVE)
                try:
                    os.utime(fd, ns=(mtime, mtime))
                finally:
                    os.close(fd)


_ZEROS = bytes(SPARSE_BLOCK)


def _write_file(fd: int, data: IO[bytes], m: tarfile.TarInfo) -> None:
    """The content of regular file `m`, with its holes kept as holes: a sparse member's
    data regions only (a 1 MB layer can hold a 10 GiB sparse file: written out in full,
    it filled the disk), and any all-zero block of a plain member skipped too."""
    sparse: list[tuple[int, int]] = m.sparse or []  # type: ignore[assignment]
    regions = [(offset, size) for offset, size in (sparse or [(0, m.size)]) if size]
    source: Any = data
    if m.sparse:
        # tarfile's member reader (a BufferedReader over its _FileInFile) can only be
        # positioned through the raw reader: in a stream ("r|") the buffered one asks the
        # stream whether it is seekable, which it cannot answer. The raw one jumps over a
        # hole without producing its zeros, and only ever forward (as the map is sorted).
        source = data.raw  # type: ignore[attr-defined]
    for offset, size in regions:
        if offset < 0 or offset + size > m.size:
            raise UnsafeLayer(f"sparse map of {m.name!r} points outside the file")
        if m.sparse:
            source.seek(offset)
        position, end = offset, offset + size
        while position < end:
            chunk = source.read(min(CHUNK, end - position))
            if not chunk:
                raise InvalidArgument(f"layer entry {m.name!r} is shorter than its header says")
            view = memoryview(chunk)
            for start in range(0, len(view), SPARSE_BLOCK):
                block = view[start : start + SPARSE_BLOCK]
                if block != _ZEROS[: len(block)]:
                    _pwrite_all(fd, block, position + start)
            position += len(chunk)
    os.ftruncate(fd, m.size)  # trailing holes (and a file of zeros only)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _apply_entry(applier: _Applier, member: tarfile.TarInfo, data: IO[bytes] | None) -> bool:
    """Apply one entry; a failure the entry caused (see LAYER_FAULTS) is `invalid
    argument` naming it, not an internal error."""
    try:
        return applier.apply(member, data)
    except OSError as exc:
        if exc.errno not in LAYER_FAULTS:
            raise
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UnsafeLayer(f"layer entry {_shown(member.name)}: {reason}") from None


def _apply_member(
    applier: _Applier, tar: tarfile.TarFile, member: tarfile.TarInfo, result: ApplyResult
) -> None:
    data = tar.extractfile(member) if member.isreg() else None
    if _apply_entry(applier, member, data):
        result.entries += 1
    else:
        result.skipped_devices += 1
        if len(result.skipped) < MAX_SKIPPED_NAMES:  # each name may be a megabyte long
            result.skipped.append(member.name[:MAX_SKIPPED_NAME])


def apply_layer(
    root: str, stream: IO[bytes], *, allow_devices: bool = False, expected_diff_id: str = ""
) -> ApplyResult:
    """Apply the uncompressed tar `stream` to `root`; verify its diff ID if given."""
    reader = HashingReader(stream)
    applier = _Applier(root, allow_devices)
    result = ApplyResult("", 0)
    try:
        try:
            with BoundedTarFile.open(fileobj=io.BufferedReader(reader, CHUNK), mode="r|") as tar:
                while (member := tar.next()) is not None:
                    if member.type != tarfile.XGLTYPE:  # applied to nothing (see BoundedTarInfo)
                        _apply_member(applier, tar, member, result)
                    read_to_next_header(tar)
        except tarfile.TarError as exc:
            raise InvalidArgument(f"not a valid layer tar: {exc}") from None
        applier.finish()
        reader.drain()  # trailing blocks count towards the diff ID
    finally:
        applier.close()
    result.diff_id = reader.digest
    result.size = reader.size
    if expected_diff_id and expected_diff_id != result.diff_id:
        raise FailedPrecondition(
            f"layer diff ID mismatch: got {result.diff_id}, expected {expected_diff_id}"
        )
    return result


# --- diffs -----------------------------------------------------------------------------


class _Tree:
    """One side of a diff: a directory whose files are opened without following
    symlinks, beneath it, and only when regular (a container may swap a file for a FIFO
    while it is diffed; open(2) of a FIFO would block)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._parent: tuple[str, int] | None = None  # the last directory looked into

    def close(self) -> None:
        self._forget_parent()
        os.close(self.fd)

    def _forget_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def _resolve(self, rel: str, flags: int) -> int:
        try:
            return openat2(self.fd, rel or ".", flags | os.O_CLOEXEC, _RESOLVE_DIFF)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise InvalidArgument(f"path too long to diff: {rel[:80]}...") from None
            raise

    def listing(self, rel: str) -> list[tuple[str, bool]]:
        """(name, is a directory) of each entry of directory `rel`; [] if it is no
        directory (any more)."""
        try:
            fd = self._resolve(rel, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            with os.scandir(fd) as entries:
                return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        """lstat of `rel` (None if it is gone), through its parent directory, which is
        kept open for its siblings, visited next."""
        parent, name = posixpath.split(rel)
        if self._parent is None or self._parent[0] != parent:
            self._forget_parent()
            try:
                self._parent = (parent, self._resolve(parent, os.O_PATH | os.O_DIRECTORY))
            except (FileNotFoundError, NotADirectoryError):
                return None
        try:
            return os.stat(name, dir_fd=self._parent[1], follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open(self, rel: str) -> IO[bytes]:
        try:
            fd = open_regular(rel, dir_fd=self.fd, resolve=_RESOLVE_DIFF)
        except NotRegularFile:
            raise FailedPrecondition(f"{rel} changed while it was diffed") from None
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise InvalidArgument(f"path too long to diff: {rel[:80]}...") from None
            raise
        if fd is None:
            raise FailedPrecondition(f"{rel} vanished while it was diffed")
        return os.fdopen(fd, "rb")

    def xattrs(self, rel: str, st: os.stat_result) -> dict[str, bytes]:
        """The xattrs a layer carries (XATTR_PREFIXES) of `rel`, if it is a regular file or
        a directory: those the applier sets, so those a diff must write and compare."""
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return {}
        try:
            fd = self._resolve(rel, os.O_PATH | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found: dict[str, bytes] = {}
        try:
            path = f"/proc/self/fd/{fd}"  # an O_PATH fd takes no f*xattr calls
            for key in sorted(os.listxattr(path)):
                if key.startswith(XATTR_PREFIXES):
                    with contextlib.suppress(OSError):  # removed meanwhile
                        found[key] = os.getxattr(path, key)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENOENT):
                raise
        finally:
            os.close(fd)
        return found

    def readlink(self, rel: str) -> str:
        parent, name = posixpath.split(rel)
        pfd = openat2(self.fd, parent or ".", os.O_PATH | os.O_CLOEXEC, _RESOLVE_DIFF)
        try:
            return os.readlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)


_RESOLVE_DIFF = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


def _same_content(lower: _Tree, upper: _Tree, rel: str) -> bool:
    with lower.open(rel) as fa, upper.open(rel) as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


def _changed(
    lower: _Tree, upper: _Tree, rel: str, lst: os.stat_result, ust: os.stat_result
) -> bool:
    if stat.S_IFMT(lst.st_mode) != stat.S_IFMT(ust.st_mode):
        return True
    if (lst.st_mode, lst.st_uid, lst.st_gid) != (ust.st_mode, ust.st_uid, ust.st_gid):
        return True
    if lst.st_ctime_ns != ust.st_ctime_ns and lower.xattrs(rel, lst) != upper.xattrs(rel, ust):
        return True  # an xattr set or removed: only the ctime says so
    if stat.S_ISLNK(ust.st_mode):
        return lower.readlink(rel) != upper.readlink(rel)
    if stat.S_ISDIR(ust.st_mode):
        return lst.st_mtime_ns != ust.st_mtime_ns
    if stat.S_ISREG(ust.st_mode):
        if lst.st_size != ust.st_size:
            return True
        if lst.st_mtime_ns == ust.st_mtime_ns:
            return False
        return not _same_content(lower, upper, rel)
    return lst.st_rdev != ust.st_rdev


def write_diff(lower: str | None, upper: str, out: IO[bytes]) -> str:
    """Write to `out` the layer that turns `lower` (None: empty) into `upper`: added and
    changed entries, and whiteouts for removed ones. Deterministic (sorted, PAX). Returns
    the diff ID (sha256 of the tar)."""
    upper_tree = _Tree(upper)
    lower_tree = _Tree(lower) if lower else None
    try:
        return _write_diff(lower_tree, upper_tree, out)
    finally:
        upper_tree.close()
        if lower_tree is not None:
            lower_tree.close()


def _write_diff(lower: _Tree | None, upper: _Tree, out: IO[bytes]) -> str:
    hashed = HashingWriter(out)
    ended = _GoTarEnd(hashed)
    hardlinks: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=ended, mode="w|", format=tarfile.PAX_FORMAT) as tar:

        def add(info: tarfile.TarInfo, content: IO[bytes] | None = None) -> None:
            tar.addfile(info, content)
            # TarFile keeps every header it wrote (typeshed omits the list): a stream needs none
            tar.members.clear()  # type: ignore[attr-defined]

        for rel, ust, lst in _both_trees(lower, upper):
            if ust is None:
                if lst is None:
                    continue  # gone from both meanwhile
                whiteout = _GoTarInfo(
                    posixpath.join(posixpath.dirname(rel), WHITEOUT + posixpath.basename(rel))
                )
                whiteout.mtime = 0  # containerd writes the time of the diff: not reproducible
                whiteout.mode = 0  # as containerd's
                add(whiteout)
                continue
            if lst is not None and lower is not None and not _changed(lower, upper, rel, lst, ust):
                continue
            info = _tarinfo(upper, rel, ust)
            if info is None:
                continue  # a socket: no layer can carry one (docker skips them too)
            key = (ust.st_dev, ust.st_ino)
            if stat.S_ISREG(ust.st_mode) and ust.st_nlink > 1:
                if key in hardlinks:
                    info.type = tarfile.LNKTYPE
                    info.linkname = hardlinks[key]
                    info.size = 0
                    add(info)
                    continue
                hardlinks[key] = rel
            if info.isreg():
                with upper.open(rel) as f:
                    add(info, f)
            else:
                add(info)
        ended.limit = tar.offset + 2 * tarfile.BLOCKSIZE  # the archive's end: 2 zero blocks
    return hashed.digest


class _GoTarInfo(tarfile.TarInfo):
    """A tar header as Go's archive/tar writes an entry's (containerd's diffs): the device
    numbers "0000000" for every entry, where Python leaves them NUL unless it is a
    device; a long name split into ustar's prefix as Go splits it; a PAX header named as
    Go names it (`<dir>/PaxHeaders.0/<base>`, cut at 100 bytes), where Python writes
    "././@PaxHeader", with its records sorted and ASCII-only ustar fields under it. With
    whole-second times and Go's end of archive, a diff is byte for byte containerd's
    (checked against its archive.WriteDiff in test_go_client_storage)."""

    def create_pax_header(self, info: Any, encoding: str) -> bytes:
        name, link = info["name"], info.get("linkname", "")
        if len(name) > LENGTH_NAME and not self.pax_headers and name.isascii():
            # Go writes a plain ustar header when a long name splits into prefix and name
            # and nothing else needs PAX; Python would write PAX ("path") for it
            split = _go_ustar_split(name)
            if split is not None and len(link) <= LENGTH_NAME and link.isascii():
                ustar = {**info, "prefix": split[0], "name": split[1]}
                with contextlib.suppress(ValueError):  # a field past ustar's: PAX, below
                    return self._create_header(ustar, tarfile.USTAR_FORMAT, "ascii", "strict")
        # Go's PAX records, sorted by key (Python writes path before linkpath), and in the
        # ustar fields under them the name and link as Go writes them: ASCII only, cut
        records = dict(self.pax_headers)
        for header_field, key in (("name", "path"), ("linkname", "linkpath")):
            value = info.get(header_field, "")
            if not value.isascii() or len(value) > LENGTH_NAME:
                records[key] = value
                info = {**info, header_field: _go_ascii(value)[:LENGTH_NAME]}
        saved, self.pax_headers = self.pax_headers, dict(sorted(records.items()))
        try:
            buf = super().create_pax_header(info, encoding)
        finally:
            self.pax_headers = saved
        if buf[156:157] != tarfile.XHDTYPE:
            return buf  # no extended header was needed
        real = _go_ascii(self.name + ("/" if self.type == tarfile.DIRTYPE else ""))
        directory, base = posixpath.split(real)
        name = posixpath.normpath("/".join(p for p in (directory, "PaxHeaders.0", base) if p))
        block = bytearray(buf[: tarfile.BLOCKSIZE])
        block[0:100] = name.encode("ascii")[:100].ljust(100, b"\x00")
        _checksum(block)
        return bytes(block) + buf[tarfile.BLOCKSIZE :]

    @staticmethod
    def _create_header(info: dict[str, Any], format: int, encoding: str, errors: str) -> bytes:
        buf: bytes = tarfile.TarInfo._create_header(info, format, encoding, errors)  # type: ignore[attr-defined]
        if info.get("type") in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.XHDTYPE, tarfile.XGLTYPE):
            return buf  # a device's are its own; a PAX header's stay NUL, as Go's
        block = bytearray(buf[-tarfile.BLOCKSIZE :])
        block[329:345] = b"0000000\x00" * 2  # devmajor, devminor
        _checksum(block)
        return bytes(buf[: -tarfile.BLOCKSIZE]) + bytes(block)


LENGTH_NAME, LENGTH_PREFIX = 100, 155  # ustar's name and prefix fields


def _go_ascii(text: str) -> str:
    """What Go's archive/tar keeps of a string for a ustar field: its ASCII characters
    but NUL (the rest goes to PAX records)."""
    return "".join(c for c in text if "\x00" < c < "\x80")


def _go_ustar_split(name: str) -> tuple[str, str] | None:
    """Go's split of a long name into ustar's prefix and name fields (at the last "/"
    that leaves a name of at most 100 bytes and a prefix of at most 155), or None."""
    length = len(name)
    if length > LENGTH_PREFIX + 1:
        length = LENGTH_PREFIX + 1
    elif name[length - 1] == "/":
        length -= 1
    i = name.rfind("/", 0, length)
    suffix = len(name) - i - 1
    if i <= 0 or suffix > LENGTH_NAME or suffix == 0 or i > LENGTH_PREFIX:
        return None
    return name[:i], name[i + 1 :]


def _checksum(block: bytearray) -> None:
    """A ustar header's checksum, after a change: the sum of its bytes, its own field
    counted as blanks, written as tar writes it."""
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)


class _GoTarEnd(io.RawIOBase):
    """Ends a tar as Go's archive/tar does (containerd's diffs): two zero blocks, without
    Python's padding of the archive to a 10 KiB record. The same layer then has the
    same diff ID on both (an empty diff is the well-known 1,024 zero bytes,
    sha256:5f70bf18..., which engines recognise as the empty layer). What is written
    past `limit` (set once the last entry is written) is dropped: only that padding."""

    def __init__(self, out: HashingWriter) -> None:
        self._out = out
        self._written = 0
        self.limit: int | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = len(data)
        if self.limit is not None:
            data = memoryview(data)[: max(0, self.limit - self._written)]
        self._written += len(data)
        if len(data):
            self._out.write(data)
        return size


# What _both_trees has yet to visit at one level, reversed: (sort key, path, enter it (a
# block) or not (an entry), whether `lower` has this level).
_Pending = list[tuple[str, str, bool, bool]]


def _both_trees(
    lower: _Tree | None, upper: _Tree
) -> Iterator[tuple[str, os.stat_result | None, os.stat_result | None]]:
    """Every path of `upper` or `lower` that a diff must look at, with its lstat in each
    (None where it is not), in the order of their sorted paths, one directory listed at
    a time: memory follows the widths of the directories on the current path, not the
    size of the trees (both were indexed whole: a container's millions of files cost
    berthd hundreds of bytes each). A directory only `lower` has is not entered (its
    whiteout removes it whole), nor `lower`'s side of a name `upper` made something
    else. Paths sharing a prefix are contiguous in sorted order, so each directory's
    subtree is visited as a block, sorted by its name and a "/"."""
    stack: list[_Pending] = [_level(lower, upper, "", lower is not None)]
    while stack:
        pending = stack[-1]
        if not pending:
            stack.pop()
            continue
        _, rel, enter, with_lower = pending.pop()
        lst = lower.lstat(rel) if with_lower and lower is not None else None
        if enter:
            stack.append(_level(lower, upper, rel, lst is not None and stat.S_ISDIR(lst.st_mode)))
            continue
        yield rel, upper.lstat(rel), lst


def _level(lower: _Tree | None, upper: _Tree, rel: str, with_lower: bool) -> _Pending:
    """The entries of directory `rel` in both trees, and a block for each directory of
    `upper` to enter, sorted and reversed (pop() takes the first)."""
    prefix = f"{rel}/" if rel else ""
    names: dict[str, bool] = dict.fromkeys(
        (name for name, _ in lower.listing(rel)) if with_lower and lower else (), False
    )
    for name, is_dir in upper.listing(rel):
        names[name] = is_dir
    pending: _Pending = []
    for name, enter in names.items():
        pending.append((name, prefix + name, False, with_lower))
        if enter:
            pending.append((f"{name}/", prefix + name, True, with_lower))
    pending.sort(reverse=True)
    return pending


def _tarinfo(tree: _Tree, rel: str, st: os.stat_result) -> tarfile.TarInfo | None:
    """The tar header of one entry, from its lstat (what tarfile.gettarinfo does by
    path, without a path that could be longer than PATH_MAX or swapped)."""
    info = _GoTarInfo(rel)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    # whole seconds, as containerd's diff writes them (Truncate(time.Second)): a finer
    # time costs each entry a PAX header, and the layer its diff ID equal to containerd's
    info.mtime = st.st_mtime_ns // 1_000_000_000
    if stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, tree.readlink(rel)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None
    info.pax_headers = {  # as tar --xattrs writes them, and the applier reads them
        f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
        for key, value in sorted(tree.xattrs(rel, st).items())  # Go writes them sorted
    }
    return info


class HashingWriter(io.RawIOBase):
    """Hashes every byte written through it on its way to `out` (a blob's digest as it
    is written, without reading it back)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._hash.update(data)
        self._out.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()
