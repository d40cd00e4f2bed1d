"""berth's images against podman (Debian 12: podman 4.3, runc as its runtime).

What podman builds (`FROM scratch`, COPY, then a stage whose RUN deletes a file of the
first layer: a whiteout) and saves in each of its formats (docker-archive, one image or
several; oci-archive; oci-dir, compressed or not, tarred) imports into berth and runs,
the deleted file absent; what podman pushes (v2s2; OCI, gzip or zstd) berth pulls to the
digest podman reports, and runs. What berth exports podman loads and runs; what berth
pushes (an image it imported, and one a builder made on berth's API with a diff that
deletes) podman pulls, to berth's digest, and runs. Real podman, a real berthd, real
runc, a loopback docker-registry.

podman runs as root with a store of its own (--root, --runroot, --tmpdir, vfs, runc's
state dir, a private containers.conf, storage.conf and registries.conf, cgroupfs under a
cgroup parent of its own) and in a mount namespace of its own with a tmpfs over /var/lib
(as skopeo does in tests/test_skopeo_umoci.py): nothing is written to /var/lib/containers
or /run/containers, and whatever it started is stopped by pid when the test ends.

Failed on the code before its fix: podman's docker-dir (skopeo's dir: transport: one
image manifest and blobs by digest, no archive) was refused as `manifest.json must be a
non-empty list`; berth now says what it is and what to save instead (neither berth nor
containerd imports that format).

podman's own, asserted as they are: an export of several images podman reads through the
docker manifest.json (its oci-archive takes one image), whose RepoTags berth writes as
`docker save` does (`berth/two:2`), and podman names such a tag localhost/berth/two:2 (as
it names docker's own); podman raises root's nofile and nproc to 1048576, refused where
root lacks CAP_SYS_RESOURCE (a CI container), so its containers get lower limits here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.builder import PRIVATE_VAR_LIB, layer_on, manifest_of, ok, tar_dir
from tests.support.helpers import Daemon, kill, process_state, wait_until
from tests.support.images import build_oci_archive
from tests.support.registry import Registry

pytestmark = pytest.mark.container

BUSYBOX = "/bin/busybox"  # busybox-static: the only binary in the images podman builds
HOST_DIRS = ("/var/lib/containers", "/run/containers")  # podman's defaults: never touched


class Podman:
    """podman with a store, configuration and runtime state all under one temp dir."""

    def __init__(self) -> None:
        if shutil.which("podman") is None:
            pytest.fail("podman is not installed (scripts/setup installs it)")
        self.dir = tempfile.mkdtemp(prefix="bt-podman-", dir="/tmp")
        self.cgroup_parent = f"/berth-podman-{uuid.uuid4().hex[:10]}"
        d = Path(self.dir)
        for sub in ("root", "runroot", "tmp", "tmpdir", "net", "runc"):
            (d / sub).mkdir()
        (d / "containers.conf").write_text(
            "[containers]\n"
            'log_driver = "k8s-file"\n'
            'netns = "none"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{d}/events.log"\n'
            f'tmp_dir = "{d}/tmp"\n'
            f'image_copy_tmp_dir = "{d}/tmpdir"\n'  # not /var/tmp
            'runtime = "runc"\n'
            "[network]\n"
            f'network_config_dir = "{d}/net"\n'
        )
        (d / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{d}/root"\nrunroot = "{d}/runroot"\n'
        )
        (d / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = dict(
            os.environ,
            CONTAINERS_CONF=f"{d}/containers.conf",
            CONTAINERS_STORAGE_CONF=f"{d}/storage.conf",
            CONTAINERS_REGISTRIES_CONF=f"{d}/registries.conf",
            TMPDIR=f"{d}/tmpdir",  # podman's big temporary files (a layer being copied)
        )
        self.flags = [
            f"--root={d}/root",
            f"--runroot={d}/runroot",
            f"--tmpdir={d}/tmp",
            "--storage-driver=vfs",
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
            "--runtime=runc",
            f"--runtime-flag=root={d}/runc",  # runc's state: not /run/runc
        ]

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*PRIVATE_VAR_LIB, "podman", *self.flags, *args],
            capture_output=True,
            env=self.env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def __call__(self, *args: str, timeout: float = 180) -> str:
        """Run podman; its stdout (a failure shows its stderr)."""
        r = self.run(*args, timeout=timeout)
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stderr.decode()}"
        return r.stdout.decode()

    def digest(self, name: str) -> str:
        return self("image", "inspect", "--format", "{{.Digest}}", name).strip()

    def processes(self) -> list[int]:
        """What podman left running: conmon (its arguments name this dir) and everything
        under it (the container's processes), children first."""
        parents: dict[int, int] = {}
        roots = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                stat = Path(f"/proc/{pid}/stat").read_bytes()
            except OSError:
                continue
            parents[pid] = int(stat.rsplit(b")", 1)[1].split()[1])
            if self.dir.encode() in cmdline and pid != os.getpid():
                roots.append(pid)
        found: list[int] = []
        todo = list(roots)
        while todo:
            pid = todo.pop()
            if pid in found:
                continue
            found.append(pid)
            todo.extend(child for child, parent in parents.items() if parent == pid)
        return found[::-1]

    def close(self) -> None:
        """Stop what podman started (by pid), remove its cgroups and its dir."""
        try:
            for pid in self.processes():
                kill(pid, signal.SIGKILL)
            for pid in self.processes():
                wait_until(
                    lambda p=pid: process_state(p) in (None, "Z"),
                    what=f"podman's process {pid} to stop",
                )
        finally:
            tmpfs = os.stat("/sys/fs/cgroup").st_dev
            for base in Path("/sys/fs/cgroup").glob(f"*{self.cgroup_parent}"):
                if os.stat(base).st_dev == tmpfs:  # no controller mounted: a plain directory
                    shutil.rmtree(base, ignore_errors=True)
                    continue
                for sub in sorted(base.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    before = {p: os.path.exists(p) for p in HOST_DIRS}
    p = Podman()
    try:
        yield p
    finally:
        p.close()
    assert {p: os.path.exists(p) for p in HOST_DIRS} == before, "podman wrote to the host"


# --- images podman makes ------------------------------------------------------------------

APP = "localhost/pm/app:1"  # podman build: COPY, then a RUN that deletes a copied file
IMPORTED = "localhost/pm/imported:1"  # podman import of a rootfs tar
CHECK = "cat /etc/keep; test -e /etc/del && echo LEFT /etc/del; true"
CONTAINERFILE = """\
FROM scratch AS base
COPY busybox /bin/busybox
COPY keep del /etc/
FROM base
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/busybox", "rm", "/etc/del"]
CMD ["/bin/sh", "-c", "cat /etc/keep"]
"""


@pytest.fixture(scope="module")
def podman_images(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """APP and IMPORTED in podman's store: their digests as podman has them."""
    work = tmp_path_factory.mktemp("podman-build")
    context = work / "context"
    context.mkdir()
    shutil.copy(BUSYBOX, context / "busybox")
    (context / "keep").write_text("keep\n")
    (context / "del").write_text("deleted\n")
    (context / "Containerfile").write_text(CONTAINERFILE)
    # chroot isolation: buildah runs the RUN steps without a runtime or cgroup
    podman("build", "--isolation=chroot", "-t", APP, str(context))
    rootfs = work / "rootfs"
    for d in ("bin", "etc"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin/busybox")
    for applet in ("sh", "cat", "test"):
        os.symlink("busybox", rootfs / "bin" / applet)
    (rootfs / "etc/keep").write_text("imported\n")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(work / "rootfs.tar"), "."], check=True)
    podman("import", "--change", "CMD=/bin/sh", str(work / "rootfs.tar"), IMPORTED)
    return {name: podman.digest(name) for name in (APP, IMPORTED)}


def run_in_berth(daemon: Daemon, name: str, namespace: str) -> str:
    cid = f"c{uuid.uuid4().hex[:8]}"
    return ok(daemon.cli("run", "--rm", name, cid, "sh", "-c", CHECK, namespace=namespace))


def test_podmans_saves_in_every_format_import_into_berth_and_run(
    daemon: Daemon, podman: Podman, podman_images: dict[str, str], tmp_path: Path
) -> None:
    """`podman save` of each format berth imports (docker-archive of one image or of
    several, oci-archive, oci-dir with gzip or plain layers, tarred): each imports into a
    namespace of its own, under podman's names, and runs with podman's whiteout applied.
    docker-dir (skopeo's dir: transport, no archive) is refused with a clear error."""
    cases: dict[str, tuple[list[str], list[str]]] = {
        "docker-archive": (["--format=docker-archive", APP], [APP]),
        "docker-archive multi": (["--format=docker-archive", "-m", APP, IMPORTED], [APP, IMPORTED]),
        "oci-archive": (["--format=oci-archive", APP], [APP]),
        "oci-dir": (["--format=oci-dir", APP], [APP]),
        "oci-dir uncompressed": (["--format=oci-dir", "--uncompressed", APP], [APP]),
    }
    for n, (case, (args, names)) in enumerate(cases.items()):
        out = str(tmp_path / case.replace(" ", "-"))
        podman("save", "-o", out, *args)
        archive = tar_dir(out, out + ".tar") if os.path.isdir(out) else out
        ns = f"save{n}"
        r = daemon.cli("images", "import", archive, namespace=ns)
        assert r.returncode == 0, (case, r.stderr.decode())
        for name in names:
            assert name in r.stdout.decode(), (case, r.stdout.decode())
            want = "keep\n" if name == APP else "imported\n"
            assert run_in_berth(daemon, name, ns) == want, case

    out = str(tmp_path / "docker-dir")
    podman("save", "-o", out, "--format=docker-dir", APP)
    r = daemon.cli("images", "import", tar_dir(out, out + ".tar"), namespace="dir")
    assert r.returncode != 0
    assert "dir: transport" in r.stderr.decode(), r.stderr.decode()


DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def test_podmans_pushes_pull_into_berth_to_podmans_digest_and_run(
    daemon: Daemon,
    podman: Podman,
    podman_images: dict[str, str],
    registry: Registry,
    tmp_path: Path,
) -> None:
    """`podman push` as v2s2, as OCI, and as OCI with zstd layers: berth pulls each to the
    digest podman reports (its --digestfile), with podman's layer types, and runs it."""
    cases = {
        "v2s2": (["--format=v2s2"], DOCKER_MANIFEST, DOCKER_GZIP),
        "oci": (["--format=oci"], OCI_MANIFEST, OCI_GZIP),
        "zstd": (["--format=oci", "--compression-format=zstd"], OCI_MANIFEST, OCI_ZSTD),
    }
    for n, (case, (flags, media_type, layer_type)) in enumerate(cases.items()):
        for name in (APP, IMPORTED):
            ref = f"{registry.host}/{name.removeprefix('localhost/')}-{case}"
            digest_file = tmp_path / f"digest-{n}"
            podman(
                "push",
                "--tls-verify=false",
                *flags,
                f"--digestfile={digest_file}",
                name,
                f"docker://{ref}",
            )
            ns = f"pull{n}"
            ok(daemon.cli("images", "pull", "--plain-http", ref, namespace=ns))
            manifest = manifest_of(daemon, ref, ns)
            assert manifest["digest"] == digest_file.read_text().strip(), (case, name)
            assert manifest["target_media_type"] == media_type, (case, name)
            assert {x["mediaType"] for x in manifest["layers"]} == {layer_type}, (case, name)
            want = "keep\n" if name == APP else "imported\n"
            assert run_in_berth(daemon, ref, ns) == want, (case, name)


# --- berth's images into podman ------------------------------------------------------------


# podman raises root's nofile and nproc to 1048576, which a host without CAP_SYS_RESOURCE
# (a CI container) refuses; lowering a limit needs no privilege, and a `cat` needs little.
ULIMITS = ("--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024")


def podman_run(podman: Podman, image: str, *command: str) -> str:
    # a cgroup parent of the test's own, not podman's /libpod_parent: removed at the end
    return podman(
        "run",
        "--rm",
        "--pull=never",
        *ULIMITS,
        "--network=none",
        f"--cgroup-parent={podman.cgroup_parent}",
        image,
        *command,
    )


def bb_image(daemon: Daemon, busybox_rootfs: str, tmp_path: Path, name: str) -> None:
    """A busybox image berth imported, with a file of its own: /etc/berth says `name`."""
    layer = tmp_path / f"layer-{uuid.uuid4().hex[:8]}"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc/berth").write_text(f"{name}\n")
    archive = str(tmp_path / f"{uuid.uuid4().hex[:8]}.tar")
    build_oci_archive([busybox_rootfs, str(layer)], archive, name=name, cmd=["cat", "/etc/berth"])
    ok(daemon.cli("images", "import", archive))


def test_berths_export_loads_into_podman_and_runs(
    daemon: Daemon, podman: Podman, busybox_rootfs: str, tmp_path: Path
) -> None:
    """`berth images export` of one image and of two: podman loads each and runs them.
    One image podman reads as an OCI archive: berth's name (its containerd annotation) and
    berth's digest. Of several (podman's oci-archive takes one) it reads the docker
    manifest.json, whose RepoTags berth writes as `docker save` does (`berth/two:2`), and
    podman names a tag without a registry localhost/berth/two:2, as it does docker's own
    archives; the image is berth's (same layers), its manifest podman's."""
    one, two = "docker.io/berth/one:1", "docker.io/berth/two:2"
    for name in (one, two):
        bb_image(daemon, busybox_rootfs, tmp_path, name)
    exported = str(tmp_path / "export-one.tar")
    ok(daemon.cli("images", "export", exported, one))
    assert podman("load", "-i", exported) == f"Loaded image: {one}\n"
    assert podman.digest(one) == manifest_of(daemon, one)["digest"]
    assert podman_run(podman, one) == f"{one}\n"
    podman("rmi", one)

    exported = str(tmp_path / "export-two.tar")
    ok(daemon.cli("images", "export", exported, one, two))
    out = podman("load", "-i", exported)
    for name in (one, two):
        local = name.replace("docker.io/", "localhost/")
        assert f"Loaded image: {local}\n" in out, out
        assert podman_run(podman, local) == f"{name}\n"
        inspect = json.loads(podman("image", "inspect", local))[0]
        config = json.loads(
            daemon.call("content.read", {"digest": manifest_of(daemon, name)["config"]["digest"]})[
                "data"
            ]
        )
        assert inspect["RootFS"]["Layers"] == config["rootfs"]["diff_ids"]


def test_berths_push_pulls_into_podman_to_berths_digest_and_runs(
    daemon: Daemon, podman: Podman, registry: Registry, busybox_rootfs: str, tmp_path: Path
) -> None:
    name = "docker.io/berth/pushed:1"
    bb_image(daemon, busybox_rootfs, tmp_path, name)
    ref = f"{registry.host}/berth/pushed:1"
    ok(daemon.cli("images", "push", "--plain-http", ref, name))
    podman("pull", "--tls-verify=false", ref)
    assert podman.digest(ref) == manifest_of(daemon, name)["digest"]
    assert podman_run(podman, ref) == f"{name}\n"


def test_an_image_a_builder_made_on_berth_runs_in_podman_with_its_deletions(
    daemon: Daemon, podman: Podman, registry: Registry, busybox_rootfs: str, tmp_path: Path
) -> None:
    """A builder on berth's API: a snapshot on an image, changed (a file written, a file
    and a directory deleted, a directory replaced), diffed into a layer, assembled into an
    image and pushed. podman pulls it to berth's digest and runs it: the deletions are
    deletions (whiteouts podman applies)."""
    base_name = "docker.io/berth/base:1"
    bb_image(daemon, busybox_rootfs, tmp_path, base_name)
    built_name, cmd = "docker.io/berth/built:1", ["cat", "/built"]
    with layer_on(daemon, base_name, built_name, cmd) as (root, built):
        (root / "built").write_text("made by a builder\n")
        (root / "etc/berth").unlink()
        (root / "bin/vi").unlink()
        shutil.rmtree(root / "var")
        (root / "var/new").mkdir(parents=True)
        (root / "var/new/file").write_text("replaced\n")
    ref = f"{registry.host}/berth/built:1"
    ok(daemon.cli("images", "push", "--plain-http", ref, "berth/built:1"))
    podman("pull", "--tls-verify=false", ref)
    assert podman.digest(ref) == built.digest
    assert podman_run(podman, ref) == "made by a builder\n"
    gone = "/etc/berth /bin/vi /var/run"
    script = f"cat /var/new/file; for p in {gone}; do test -e $p && echo LEFT $p; done; true"
    assert podman_run(podman, ref, "sh", "-c", script) == "replaced\n"
