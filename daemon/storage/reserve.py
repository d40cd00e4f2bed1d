"""Space for deletes on a full disk."""

from __future__ import annotations

import contextlib
import logging
import os

from berth.daemon.metadata import out_of_space

log = logging.getLogger("berth.storage")

RESERVE_BYTES = 8 << 20  # kept free for deletes on a full disk


class SpaceReserve:
    """A preallocated ballast file in the root, released when an operation that frees
    space fails for want of space, and taken again once space is back.

    Deleting needs a little space first: SQLite appends a delete to its WAL before the
    pages are freed. On a full disk (a hostile layer filled it, say) `leases rm`,
    `snapshots rm` and `gc` all failed with ENOSPC, so nothing could be recovered in-band;
    the reserve is what lets them run."""

    def __init__(self, path: str, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size

    def present(self) -> bool:
        return os.path.exists(self.path)

    def release(self) -> bool:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        log.warning("the disk is full: released the %d-byte reserve %s", self.size, self.path)
        return True

    def restore(self) -> bool:
        """Take the reserve again if it is gone and twice its size is free."""
        if self.present():
            return True
        st = os.statvfs(os.path.dirname(self.path))
        if st.f_bavail * st.f_frsize < 2 * self.size:
            return False
        tmp = f"{self.path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not out_of_space(exc):
                raise
            return False
        return True
