"""A count of changes to content records, which berth-grpc reads with one stat.

containerd's clients read the same few blobs again and again: `ctr run` asks Content/Info
and Content/Read for its image's manifest and config ten times each. berth-grpc keeps
those answers (grpc/services/content.py, ContentCache) and reuses one only while no
content record has changed since it was asked. A change is announced here first: berthd
appends a byte to `<state>/content.generation` before it updates a record's labels or
deletes a record (metadata.Store calls `bump`, and holds the database from before it until
the change is made). berth-grpc takes the file's identity and size before it asks berthd, and reuses
the answer only while a stat still gives the same.
Content itself never changes under a digest; a record that is added changes no answer
given before (only a NotFound, which is never kept).

Why a file and its size, not a shared counter in memory: a stat follows the path, so a
replaced file (the state dir made again, a new berthd) is noticed, and the size grows by
an append that the kernel makes whole, with no torn read. The file is replaced by a new
one (a new inode: every answer kept is dropped) when berthd starts, and past ROLL_AT.
"""

from __future__ import annotations

import contextlib
import os
import threading

FILE = "content.generation"
ROLL_AT = 1 << 20  # bytes: then a new file
ROLL_RACES = 8  # appends tried while another berthd keeps making a new file


class ContentGeneration:
    """berthd's side: `bump` before a content record changes (from any thread).

    Each bump opens the path again: during a handover the predecessor, still finishing
    its calls, and the successor, which made a new file at its start, both write to the
    file berth-grpc sees."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, FILE)
        self._lock = threading.Lock()
        self._roll()

    def _roll(self) -> None:
        temporary = f"{self.path}.{os.getpid()}.new"
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        try:
            os.rename(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def bump(self) -> None:
        """Say that a content record changes. If the file cannot take the byte, it is
        removed (berth-grpc keeps nothing without it); if that fails too, the error is
        raised (and a change announced beforehand is not made)."""
        with self._lock:
            try:
                self._append()
            except OSError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # raises if even that fails

    def _append(self) -> None:
        for _ in range(ROLL_RACES):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b".")
                written = os.fstat(fd)
            finally:
                os.close(fd)
            # Another berthd (a successor at its start) may have put a new file in place
            # between the open and the write: then the byte went to the one berth-grpc no
            # longer sees, and goes again to the new one.
            if os.stat(self.path).st_ino == written.st_ino:
                break
        else:
            raise OSError(f"{self.path} was replaced {ROLL_RACES} times while written")
        if written.st_size >= ROLL_AT:
            self._roll()


Generation = tuple[int, int, int, int]


def current(state_dir: str) -> Generation | None:
    """berth-grpc's side: the generation now, None when there is none to trust. The
    device and modification time are in it too: a file system that gives a freed inode
    number to the next file (ext4, xfs) could otherwise repeat a pair seen long ago."""
    try:
        st = os.stat(os.path.join(state_dir, FILE))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
