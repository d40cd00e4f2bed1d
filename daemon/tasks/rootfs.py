"""The embedded default root filesystem: busybox-static plus its applet links.

Built from the host's static busybox (Debian package busybox-static) into a directory, once;
a marker records which busybox it came from, so an upgraded busybox rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
MARKER = ".berth-rootfs"

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
tty:x:5:
nogroup:x:65534:
"""


def find_busybox() -> str | None:
    for path in BUSYBOX_CANDIDATES:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


LAYOUT_VERSION = b"3"  # bumped when the tree built around busybox changes: rebuilt
# (3: modes set explicitly; one built under a strict umask was 0700 throughout)


# (device, inode, size, mtime) of a busybox binary -> its digest: every container of the
# embedded rootfs checks it, and hashing the 2 MiB binary each time cost ~2 ms of CPU per
# start (py-spy on berthd under 8 concurrent starts); an upgraded busybox is a new file.
_DIGESTS: dict[tuple[int, int, int, int], str] = {}


def _digest(path: str) -> str:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    known = _DIGESTS.get(key)
    if known is not None:
        return known
    h = hashlib.sha256(LAYOUT_VERSION)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _DIGESTS[key] = digest = h.hexdigest()
    return digest


def _is_static(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    # A dynamic ELF has a PT_INTERP program header naming the loader.
    return b"ld-linux" not in head and b"/lib64/ld" not in head


def build_busybox_rootfs(dest: str, busybox: str | None = None) -> str:
    """Make (or refresh) a busybox rootfs at `dest`; return `dest`. Idempotent."""
    busybox = busybox or find_busybox()
    if busybox is None:
        raise FileNotFoundError("busybox not found: install Debian's busybox-static")
    if not _is_static(busybox):
        raise ValueError(f"{busybox} is dynamically linked: install busybox-static")
    digest = _digest(busybox)
    marker = os.path.join(dest, MARKER)
    try:
        with open(marker) as f:
            if f.read().strip() == digest:
                return dest
    except FileNotFoundError:
        pass
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # Modes are set, not left to the umask of whoever builds it (berthd, a test, the
    # demo): under `umask 077` a container's user other than root could not read `/`.
    dirs = ("bin", "dev", "proc", "sys", "etc", "var", "var/run", "run", "usr", "usr/bin")
    for d in ("", *dirs, "sbin", "tmp", "root"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
        os.chmod(os.path.join(tmp, d), 0o755)
    os.chmod(os.path.join(tmp, "tmp"), 0o1777)
    os.chmod(os.path.join(tmp, "root"), 0o700)
    shutil.copy2(busybox, os.path.join(tmp, "bin", "busybox"))
    applets = subprocess.run(
        [busybox, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        if applet and "/" not in applet and applet != "busybox":
            link = os.path.join(tmp, "bin", applet)
            if not os.path.lexists(link):
                os.symlink("busybox", link)
    # hosts and resolv.conf exist (empty) to be mount points: the rootfs is read-only,
    # and a networked container gets its own bind-mounted over them.
    etc = [("passwd", PASSWD), ("group", GROUP), ("hostname", "berth\n")]
    etc += [("hosts", "127.0.0.1\tlocalhost\n"), ("resolv.conf", "")]
    for name, text in etc:
        with open(os.path.join(tmp, "etc", name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(tmp, "etc", name), 0o644)
    with open(os.path.join(tmp, MARKER), "w") as f:
        f.write(digest + "\n")
    if os.path.isdir(dest):
        old = f"{dest}.old-{os.getpid()}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        os.rename(tmp, dest)
    return dest
