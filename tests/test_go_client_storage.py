"""containerd's own Go client against berth's containerd socket, the storage side: a pull
with unpack from a real registry (the client fetches, writes content, applies layers
through the Diff service onto snapshots, as nerdctl and BuildKit do), content, leases,
images, snapshots and diffs, namespaces, introspection, export and import. One flow of
tests/support/goclient/flows_storage.go per test; each states what it checks there."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from berth.daemon.storage import archive
from berth.daemon.tasks.rootfs import build_busybox_rootfs
from tests.support import goclient
from tests.support.clients import grpc_address, grpc_daemon
from tests.support.helpers import Daemon
from tests.support.images import build_oci_archive
from tests.support.registry import Registry

pytestmark = pytest.mark.container


@dataclass
class Served:
    daemon: Daemon
    rootfs: str
    ref: str  # an image in the registry whose /hello says "hello from the registry"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    goclient.probe()  # built before any daemon runs (a first build takes a while)
    daemon = grpc_daemon()
    registry: Registry | None = None
    try:
        registry = Registry()
        rootfs = build_busybox_rootfs(os.path.join(daemon.dir, "rootfs"))
        extra = os.path.join(daemon.dir, "extra")
        os.makedirs(extra)
        with open(os.path.join(extra, "hello"), "w") as f:
            f.write("hello from the registry\n")
        archive = os.path.join(daemon.dir, "image.tar")
        build_oci_archive([rootfs, extra], archive, name="docker.io/library/hello:go")
        ref = f"{registry.host}/team/hello:go"
        daemon.cli("images", "import", "--no-unpack", archive, namespace="seed", check=True)
        daemon.cli("images", "push", "--plain-http", ref, "hello:go", namespace="seed", check=True)
        yield Served(daemon, rootfs, ref)
    finally:
        try:
            if registry is not None:
                registry.close()
        finally:
            daemon.cleanup()


def _flow(served: Served, flow: str) -> str:
    result = goclient.run(
        grpc_address(served.daemon),
        served.daemon.namespace,
        served.rootfs,
        flow,
        env={"GOCLIENT_REF": served.ref},
    )
    assert result.returncode == 0 and result.stdout.endswith("ok\n"), result.stdout + result.stderr
    return result.stdout


def test_a_pulled_and_unpacked_image_runs(served: Served) -> None:
    """client.Pull(WithPullUnpack) from a plain-HTTP registry under a lease: unpacked,
    sized, its config and rootfs; a container on a new snapshot of it, with the image's
    config, prints the file of the second layer through FIFOs; deletes clean the snapshot
    (WithSnapshotCleanup); once the pull's lease is gone, a synchronous image delete
    collects the unpacked layers' snapshots and the content."""
    _flow(served, "pull-unpack-run")


def test_content_store(served: Served) -> None:
    """WriteBlob with labels (twice: the second is AlreadyExists, taken as success), Info,
    Update by field path, Walk with a label filter, ReaderAt at an offset, an open ingest in
    ListStatuses then aborted, a wrong digest refused, Delete then NotFound."""
    _flow(served, "content")


def test_leases_hold_content_until_deleted(served: Served) -> None:
    """A lease with labels and an expiry, listed by filter; content written under it is a
    resource of it; Add/DeleteResource; a synchronous Delete lets the GC collect it."""
    _flow(served, "leases")


def test_image_records(served: Served) -> None:
    """Create (and AlreadyExists), Get, List with filters, Update by field path, NotFound
    for a missing one, a synchronous Delete collecting what only the image held."""
    _flow(served, "images")


def test_snapshots_and_diffs(served: Served) -> None:
    """Diff.Apply of a gzip layer onto a prepared snapshot (the uncompressed digest back),
    Commit with labels, a child mounted by the client and written, Diff.Compare of a view
    of the parent and the child (only the child's file in the layer), Usage, Walk by
    filter, Update, a parent not removable before its children, Remove."""
    _flow(served, "snapshots-diff")


def test_introspection_and_server_identity(served: Served) -> None:
    """Plugins (a snapshotter and the task runtime among them, a type filter), Server's
    UUID, Version, IsServing: what clients check before they start."""
    _flow(served, "introspection")


def test_namespaces(served: Served) -> None:
    """Create with labels (and AlreadyExists), List, a namespace holding a container is
    not deleted (FailedPrecondition), an empty one is."""
    _flow(served, "namespaces")


def test_export_and_import_through_the_client(served: Served) -> None:
    """client.Fetch, client.Export to an OCI archive, delete, client.Import under another
    name (same target), Unpack."""
    _flow(served, "export-import")


def test_an_interrupted_ingest_resumes(served: Served) -> None:
    """A writer cut after 300 kB and closed; opened again on the same ref, its Status has
    the offset and the total, and content.Copy resumes there to a verified blob."""
    _flow(served, "content-resume")


def test_diffs_are_byte_for_byte_containerds(tmp_path: Path) -> None:
    """berth's diff of two trees against containerd's own archive.WriteDiff (no daemon):
    files, directories (their modes), a symlink, a hard link, a FIFO, a device, a file
    capability, names over 100 bytes (one ustar splits, one needs PAX), non-ASCII names,
    a long symlink with a long target, an added file under an old directory. The same
    bytes, so the same diff ID; and an empty diff is the empty layer every engine knows.
    (A deletion's whiteout is left out: containerd stamps it with the time of the diff;
    berth with 0.)"""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "kept").mkdir(parents=True)
    (lower / "kept" / "old").write_text("old\n")
    shutil.copytree(lower, upper, symlinks=True, copy_function=shutil.copy2)
    os.utime(
        upper / "kept",
        ns=(os.stat(lower / "kept").st_atime_ns, os.stat(lower / "kept").st_mtime_ns),
    )
    (upper / "kept" / "new").write_text("new\n")
    (upper / "dir" / "sub").mkdir(parents=True)
    (upper / "dir" / "sub" / "g").write_text("x\n")
    (upper / "dir").chmod(0o750)
    (upper / "f").write_text("hello\n")
    os.setxattr(
        upper / "f", "security.capability", bytes.fromhex("01000002" + "00200000" + "00" * 12)
    )
    os.link(upper / "f", upper / "hard")
    os.symlink("f", upper / "link")
    os.mkfifo(upper / "fifo")
    os.mknod(upper / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (upper / "dir" / ("y" * 110) / ("z" * 30)).parent.mkdir()
    (upper / "dir" / ("y" * 110) / ("z" * 30)).write_text("deep\n")
    (upper / ("long" + "x" * 120)).mkdir()
    (upper / "café-ü.txt").write_text("non-ASCII name\n")  # PAX path; ASCII in ustar, as Go
    (upper / "ünï").mkdir()
    os.symlink("t" * 150, upper / ("l" * 120))  # long name and link: PAX records sorted
    for case, (old, new) in {"changes": (lower, upper), "empty": (lower, lower)}.items():
        theirs = tmp_path / f"{case}.containerd.tar"
        result = subprocess.run(
            [goclient.probe(), "write-diff", str(old), str(new), str(theirs)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        ours = io.BytesIO()
        digest = archive.write_diff(str(old), str(new), ours)
        assert ours.getvalue() == theirs.read_bytes(), case
        assert digest == "sha256:" + hashlib.sha256(theirs.read_bytes()).hexdigest()
    assert archive.write_diff(str(lower), str(lower), io.BytesIO()) == (
        "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    )
