"""Images and storage on real files, real overlay mounts and a real registry."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from berth.daemon.storage.content import ContentStore
from berth.daemon.storage.snapshots import NativeSnapshotter, OverlaySnapshotter
from berth.shim.mount import temporary_mount
from berth.shim.wire.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from tests.support.helpers import Daemon, kill, wait_until
from tests.support.images import build_docker_archive, build_oci_archive
from tests.support.registry import Registry, Relay, free_port

IMAGE = "docker.io/library/busybox:test"

# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_files(busybox_rootfs: str) -> Iterator[dict[str, Any]]:
    """Test images built from busybox-static: a plain one, one with users/groups/config,
    a two-layer one sharing the base layer, a zstd one and a docker-save archive."""
    work = Path(tempfile.mkdtemp(prefix="bt-img-", dir="/tmp"))
    try:
        users = work / "users"
        shutil.copytree(busybox_rootfs, users, symlinks=True)
        (users / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
        )
        (users / "etc/group").write_text(
            "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nmore:x:3000:app\nnot:x:4000:other\n"
        )
        (users / "work").mkdir()
        extra = work / "extra"
        (extra / "opt").mkdir(parents=True)
        (extra / "opt/layer2").write_text("second layer\n")
        out: dict[str, Any] = {"dir": work}
        out["plain"] = str(work / "plain.tar")
        out["plain_digests"] = build_oci_archive(
            busybox_rootfs, out["plain"], name=IMAGE, cmd=["sh", "-c", "echo from image"]
        )
        out["users"] = str(work / "users.tar")
        build_oci_archive(
            str(users),
            out["users"],
            name="docker.io/library/users:test",
            extra_config={
                "User": "app",
                "WorkingDir": "/work",
                "Entrypoint": ["sh", "-c"],
                "Env": ["PATH=/bin:/usr/bin", "FOO=bar"],
            },
            cmd=["id -u; id -G; pwd; echo $FOO"],
        )
        out["two"] = str(work / "two.tar")
        out["two_digests"] = build_oci_archive(
            [busybox_rootfs, str(extra)], out["two"], name="docker.io/library/two:test"
        )
        out["zstd"] = str(work / "zstd.tar")
        build_oci_archive(
            busybox_rootfs,
            out["zstd"],
            name="docker.io/library/zstd:test",
            compression="zstd",
            cmd=["echo", "zstd layer"],
        )
        out["docker"] = str(work / "docker.tar")
        build_docker_archive(
            busybox_rootfs, out["docker"], tag="dockersave:v1", cmd=["echo", "from docker save"]
        )
        for uid in ("2147483648", "4294967296"):
            path = str(work / f"uid{uid}.tar")
            build_oci_archive(
                busybox_rootfs,
                path,
                name=f"docker.io/library/uid:{uid}",
                extra_config={"User": uid},
                cmd=["id"],
            )
            out[f"uid{uid}"] = path
        yield out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the content store -----------------------------------------------------------------


def test_content_ingest_resume_lock_and_verification(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    data = os.urandom(300_000)
    digest = "sha256:" + __import__("hashlib").sha256(data).hexdigest()
    w = store.writer("ref1", total=len(data), expected=digest)
    w.write(data[:100_000])
    with pytest.raises(Unavailable):
        store.writer("ref1")  # a second writer on the same ref
    w.close()  # a crash or a disconnect: the ingest stays
    assert store.status("ref1").offset == 100_000
    w = store.writer("ref1")  # resumes where it stopped
    assert w.offset == 100_000 and w.total == len(data)
    with pytest.raises(FailedPrecondition):
        w.write(b"x", offset=5)  # a client that resumes must say where
    w.write(data[100_000:])
    assert w.commit() == digest
    assert store.read(digest, 1000, 10) == data[1000:1010]
    with pytest.raises(AlreadyExists):
        store.writer("ref2", expected=digest)
    # a wrong digest or size stores nothing
    bad = store.writer("ref3", expected="sha256:" + "0" * 64)
    bad.write(b"hello")
    with pytest.raises(FailedPrecondition, match="digest mismatch"):
        bad.commit()
    assert not store.exists("sha256:" + "0" * 64)
    short = store.writer("ref4", total=10)
    short.write(b"abc")
    with pytest.raises(FailedPrecondition, match="size mismatch"):
        short.commit()
    assert store.list_ingests() == []
    # concurrent commits of one blob both succeed
    a, b = store.writer("a"), store.writer("b")
    a.write(b"same")
    b.write(b"same")
    assert a.commit() == b.commit()
    with pytest.raises(InvalidArgument):
        store.info("sha256:../../etc/passwd")


# --- snapshotters ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [OverlaySnapshotter, NativeSnapshotter])
def test_snapshotter_chain_mounts_and_persistence(tmp_path: Path, kind: type) -> None:
    root = str(tmp_path / "root")
    mounts_dir = str(tmp_path / "m")
    s = kind(root)
    base = s.prepare("base-active")
    with temporary_mount(base, mounts_dir) as d:
        Path(d, "a").write_text("from base")
        Path(d, "gone").write_text("x")
    s.commit("base", "base-active")
    child = s.prepare("child", "base")
    with temporary_mount(child, mounts_dir) as d:
        assert Path(d, "a").read_text() == "from base"
        Path(d, "b").write_text("from child")
        os.unlink(os.path.join(d, "gone"))
    s.commit("top", "child")
    view = s.view("look", "top")
    with temporary_mount(view, mounts_dir) as d:
        assert sorted(os.listdir(d)) == ["a", "b"]
        with pytest.raises(OSError):
            Path(d, "c").write_text("read-only")
    with pytest.raises(FailedPrecondition):
        s.remove("base")  # it has a child
    with pytest.raises(FailedPrecondition):
        s.prepare("x", "look")  # parents must be committed
    with pytest.raises(AlreadyExists):
        s.prepare("look")
    assert [i.key for i in s.walk()] == ["base", "top", "look"]
    assert s.stat("top").parent == "base" and s.stat("top").kind == "committed"
    assert s.usage("top").inodes >= 1
    s.close()
    again = kind(root)  # metadata persisted
    assert again.stat("look").kind == "view" and again.stat("look").parent == "top"
    for key in ("look", "top", "base"):
        again.remove(key)
    assert again.walk() == [] and os.listdir(again.data) == []
    again.close()


# --- import, run, export ---------------------------------------------------------------


def test_import_run_export_reimport_same_digest(
    daemon: Daemon, image_files: dict[str, Any]
) -> None:
    r = daemon.cli("images", "import", image_files["plain"])
    assert r.returncode == 0, r.stderr
    digest = image_files["plain_digests"]["manifest"]
    assert daemon.call("images.get", {"name": IMAGE})["target"]["digest"] == digest
    r = daemon.cli("run", "--rm", IMAGE, "c1")
    assert (r.returncode, r.stdout) == (0, b"from image\n"), r.stderr
    r = daemon.cli(
        "run", "--rm", "busybox:test", "c2", "sh", "-c", "echo changed > /etc/x; cat /etc/x"
    )
    assert (r.returncode, r.stdout) == (0, b"changed\n"), r.stderr
    out1, out2 = os.path.join(daemon.dir, "e1.tar"), os.path.join(daemon.dir, "e2.tar")
    assert daemon.cli("images", "export", out1, IMAGE).returncode == 0
    assert daemon.cli("images", "export", out2, IMAGE).returncode == 0
    assert Path(out1).read_bytes() == Path(out2).read_bytes()  # deterministic
    assert daemon.cli("images", "rm", "--sync", IMAGE).returncode == 0
    assert daemon.call("content.list")["content"] == []  # nothing referenced any more
    r = daemon.cli("images", "import", out1)
    assert r.returncode == 0, r.stderr
    assert daemon.call("images.get", {"name": IMAGE})["target"]["digest"] == digest
    with tarfile.open(out1) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["busybox:test"]  # docker load reads this


def test_docker_save_archive_and_zstd_layers(daemon: Daemon, image_files: dict[str, Any]) -> None:
    assert daemon.cli("images", "import", image_files["docker"]).returncode == 0
    r = daemon.cli("run", "--rm", "dockersave:v1", "d1")
    assert (r.returncode, r.stdout) == (0, b"from docker save\n"), r.stderr
    assert daemon.cli("images", "import", image_files["zstd"]).returncode == 0
    r = daemon.cli("run", "--rm", "zstd:test", "z1")
    assert (r.returncode, r.stdout) == (0, b"zstd layer\n"), r.stderr


def test_image_config_user_groups_env_workdir(daemon: Daemon, image_files: dict[str, Any]) -> None:
    daemon.cli("images", "import", image_files["users"], check=True)
    r = daemon.cli("run", "--rm", "users:test", "u1")
    assert r.returncode == 0, r.stderr
    uid, groups, cwd, foo = r.stdout.decode().split("\n")[:4]
    assert uid == "1000"
    assert set(groups.split()) == {"1000", "2000", "3000"}  # CVE-2023-25173
    assert (cwd, foo) == ("/work", "bar")
    r = daemon.cli("run", "--rm", "--user", "0", "users:test", "u2", "id -u")
    assert r.stdout == b"0\n"


@pytest.mark.parametrize("uid", ["2147483648", "4294967296"])
def test_uid_above_int32_is_refused(daemon: Daemon, image_files: dict[str, Any], uid: str) -> None:
    daemon.cli("images", "import", image_files[f"uid{uid}"], check=True)
    r = daemon.cli("run", "--rm", f"uid:{uid}", "bad")
    assert r.returncode == 1 and b"out of range" in r.stderr
    assert daemon.call("containers.list")["containers"] == []


def test_unpack_shares_layers_and_container_delete_removes_its_snapshot(
    daemon: Daemon, image_files: dict[str, Any]
) -> None:
    daemon.cli("images", "import", image_files["plain"], check=True)
    daemon.cli("images", "import", image_files["two"], check=True)
    snaps = daemon.call("snapshots.list")["snapshots"]
    base = image_files["plain_digests"]["diff_ids"][0]
    assert [s["name"] for s in snaps].count(base) == 1  # the shared layer unpacked once
    assert len(snaps) == 2
    daemon.cli("run", "-d", "two:test", "t1", "sleep", "300", check=True)
    r = daemon.cli("tasks", "exec", "--exec-id", "e", "t1", "cat", "/opt/layer2")
    assert r.stdout == b"second layer\n"
    assert any(
        s["name"] == "t1" and s["kind"] == "active"
        for s in daemon.call("snapshots.list")["snapshots"]
    )
    daemon.cli("tasks", "rm", "-f", "t1", check=True)
    daemon.cli("containers", "rm", "t1", check=True)
    assert not any(s["name"] == "t1" for s in daemon.call("snapshots.list")["snapshots"])


def test_gc_keeps_exactly_the_referenced_set(daemon: Daemon, image_files: dict[str, Any]) -> None:
    daemon.cli("images", "import", image_files["plain"], check=True)
    daemon.cli("images", "import", image_files["two"], check=True)
    daemon.cli("containers", "create", "two:test", "keep", "true", check=True)
    # a blob held only by a lease, and one held by nothing
    lease = daemon.call("leases.create", {"id": "hold", "expire_seconds": 0})["id"]
    with daemon.client() as c:
        c.call("content.write.open", {"ref": "leased"}, lease=lease)
        c.call("content.write.chunk", {"ref": "leased", "data": b"leased blob"})
        leased = c.call("content.write.commit", {"ref": "leased"})["digest"]
        c.call("content.write.open", {"ref": "loose"})
        c.call("content.write.chunk", {"ref": "loose", "data": b"loose blob"})
        loose = c.call("content.write.commit", {"ref": "loose"})["digest"]
    daemon.cli("images", "rm", IMAGE, check=True)  # its layer is shared with two:test
    daemon.call("gc")  # (the collector may have run by itself already: same result)
    content = {c["digest"] for c in daemon.call("content.list")["content"]}
    two = image_files["two_digests"]
    expected = {two["manifest"], two["config"], *two["layers"], leased}
    assert content == expected
    assert loose not in content
    plain = image_files["plain_digests"]
    assert plain["manifest"] not in content and plain["config"] not in content
    snaps = {s["name"] for s in daemon.call("snapshots.list")["snapshots"]}
    from berth.daemon.storage.images import chain_ids

    assert snaps == {*chain_ids(two["diff_ids"]), "keep"}
    # the lease goes: its blob goes at the next GC; the container goes: its snapshot too
    daemon.call("leases.delete", {"id": "hold"})
    daemon.cli("containers", "rm", "keep", check=True)
    daemon.call("gc")
    assert leased not in {c["digest"] for c in daemon.call("content.list")["content"]}
    assert "keep" not in {s["name"] for s in daemon.call("snapshots.list")["snapshots"]}
    assert (
        len(os.listdir(os.path.join(daemon.root, "content/blobs/sha256")))
        == 3 + len(two["layers"]) - 1
    )


def test_collector_runs_by_itself_after_deletes(
    daemon: Daemon, image_files: dict[str, Any]
) -> None:
    """As containerd's: deleting an image collects what only it referenced, with no
    `gc` call; a running container's snapshot chain is kept."""
    daemon.cli("images", "import", image_files["plain"], check=True)
    daemon.cli("images", "import", image_files["two"], check=True)
    daemon.cli("run", "-d", "two:test", "busy", "sleep", "300", check=True)
    plain = image_files["plain_digests"]
    daemon.cli("images", "rm", IMAGE, check=True)

    def collected() -> bool:
        content = {c["digest"] for c in daemon.call("content.list")["content"]}
        return plain["manifest"] not in content and plain["config"] not in content

    wait_until(collected, timeout=15, what="the background collector")
    daemon.cli("images", "rm", "two:test", check=True)
    time.sleep(1.5)  # one more collection has run; the running container's rootfs stays
    from berth.daemon.storage.images import chain_ids

    snaps = {s["name"] for s in daemon.call("snapshots.list")["snapshots"]}
    assert {*chain_ids(image_files["two_digests"]["diff_ids"]), "busy"} <= snaps
    r = daemon.cli("tasks", "exec", "--exec-id", "e", "busy", "cat", "/opt/layer2")
    assert r.stdout == b"second layer\n"
    daemon.cli("tasks", "rm", "-f", "busy", check=True)


def test_diff_is_the_builder_primitive(daemon: Daemon, image_files: dict[str, Any]) -> None:
    """prepare + mount + change + diff + commit: a new layer, without any build API."""
    daemon.cli("images", "import", image_files["plain"], check=True)
    chain = daemon.call("images.unpack", {"name": IMAGE})["chain_id"]
    with daemon.client() as c:
        mounts = c.call("snapshots.prepare", {"key": "work", "parent": chain})["mounts"]
        lower = c.call("snapshots.view", {"key": "lower", "parent": chain})["mounts"]
    from berth.shim.mount import Mount

    with temporary_mount(
        [Mount.from_wire(m) for m in mounts], os.path.join(daemon.dir, "mnt")
    ) as d:
        Path(d, "built").write_text("made by a builder\n")
        os.unlink(os.path.join(d, "bin/vi"))
    diff = daemon.call("diff.diff", {"lower": lower, "upper": mounts})["diff"]
    assert diff["media_type"].endswith("tar+gzip")
    with daemon.client() as c:
        fresh = c.call("snapshots.prepare", {"key": "replay", "parent": chain})["mounts"]
        applied = c.call("diff.apply", {"layer": diff, "mounts": fresh})["applied"]
    assert applied["digest"] == diff["annotations"]["containerd.io/uncompressed"]
    with temporary_mount([Mount.from_wire(m) for m in fresh], os.path.join(daemon.dir, "mnt")) as d:
        assert Path(d, "built").read_text() == "made by a builder\n"
        assert not os.path.lexists(os.path.join(d, "bin/vi"))
        assert os.path.exists(os.path.join(d, "bin/sh"))


# --- hostile archives -------------------------------------------------------------------


def _sparse_archive(path: str, size: int) -> None:
    """A tar whose index.json claims `size` bytes, written sparse (no real data)."""
    info = tarfile.TarInfo("index.json")
    info.size = size
    header = info.tobuf(tarfile.GNU_FORMAT)
    layout = tarfile.TarInfo("oci-layout")
    body = b'{"imageLayoutVersion": "1.0.0"}'
    layout.size = len(body)
    with open(path, "wb") as f:
        f.write(layout.tobuf(tarfile.GNU_FORMAT) + body + b"\0" * (512 - len(body) % 512))
        f.write(header)
        f.seek(size + (512 - size % 512) % 512, os.SEEK_CUR)
        f.write(b"\0" * 1024)


def test_huge_index_fails_fast_in_bounded_memory(daemon: Daemon) -> None:
    path = os.path.join(daemon.dir, "huge.tar")
    _sparse_archive(path, 2 << 30)  # CVE-2023-25153: a sparse 2 GiB index.json
    rss_before = psutil.Process(daemon.pid).memory_info().rss
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match="larger than"):
        daemon.call("images.import", {"path": path})
    assert time.monotonic() - started < 10
    assert psutil.Process(daemon.pid).memory_info().rss - rss_before < 64 << 20
    assert daemon.call("images.list")["images"] == []


def _layout_with_index(path: str, index: dict[str, Any], blobs: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in {
            "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
            "index.json": json.dumps(index).encode(),
            **{f"blobs/sha256/{d[7:]}": b for d, b in blobs.items()},
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"oci-layout": b"0", "index.json": b"{}"}, "oci-layout must be a JSON object"),
        ({"oci-layout": b"[1]", "index.json": b"{}"}, "oci-layout must be a JSON object"),
        ({"oci-layout": b"{", "index.json": b"{}"}, "oci-layout is not valid JSON"),
        (
            {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": b'"x"'},
            "must be a JSON object",
        ),
        ({"manifest.json": b"{}"}, "manifest.json must be a non-empty list"),
        ({"manifest.json": b"[0]"}, "manifest.json entries need Config and Layers"),
    ],
)
def test_malformed_archive_documents_are_clear_errors(
    daemon: Daemon, members: dict[str, bytes], message: str
) -> None:
    path = os.path.join(daemon.dir, "malformed.tar")
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    with pytest.raises(InvalidArgument, match=message):
        daemon.call("images.import", {"path": path})
    assert daemon.call("images.list")["images"] == []
    assert daemon.call("version")["protocol"] == 1


def test_ambiguous_and_mismatched_documents_are_rejected(daemon: Daemon) -> None:
    import hashlib

    # CVE-2021-41190: one document that is both an index and a manifest
    both = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [],
            "layers": [],
            "config": {"mediaType": "x", "digest": "sha256:" + "1" * 64, "size": 1},
        }
    ).encode()
    d = "sha256:" + hashlib.sha256(both).hexdigest()
    for media_type in (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ):
        path = os.path.join(daemon.dir, "ambiguous.tar")
        _layout_with_index(
            path,
            {
                "schemaVersion": 2,
                "manifests": [{"mediaType": media_type, "digest": d, "size": len(both)}],
            },
            {d: both},
        )
        with pytest.raises(InvalidArgument, match="ambiguous"):
            daemon.call("images.import", {"path": path})
    # a manifest whose mediaType contradicts how it is referenced
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + "2" * 64,
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    d = "sha256:" + hashlib.sha256(manifest).hexdigest()
    path = os.path.join(daemon.dir, "mismatch.tar")
    _layout_with_index(
        path,
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": d,
                    "size": len(manifest),
                }
            ],
        },
        {d: manifest},
    )
    with pytest.raises(InvalidArgument, match="declares mediaType"):
        daemon.call("images.import", {"path": path})
    assert daemon.call("images.list")["images"] == []


# --- the registry ----------------------------------------------------------------------


def test_push_and_pull_with_a_real_registry(daemon: Daemon, image_files: dict[str, Any]) -> None:
    registry = Registry(auth=("basic", ("berth", "s3cret")))
    try:
        daemon.cli("images", "import", image_files["two"], check=True)
        ref = f"{registry.host}/team/two:v1"
        with pytest.raises(PermissionDenied), daemon.client() as c:
            list(
                c.stream(
                    "images.push",
                    {"ref": ref, "local": "docker.io/library/two:test", "plain_http": True},
                )
            )
        r = daemon.cli("images", "push", "--plain-http", "--user", "berth:s3cret", ref, "two:test")
        assert r.returncode == 0, r.stderr
        pushed = r.stdout.split()[-1].decode()
        assert pushed == image_files["two_digests"]["manifest"]
        daemon.cli("images", "rm", "--sync", "two:test", check=True)
        assert daemon.call("content.list")["content"] == []
        r = daemon.cli("images", "pull", "--plain-http", "--user", "berth:s3cret", ref)
        assert r.returncode == 0, r.stderr
        assert daemon.call("images.get", {"name": ref})["target"]["digest"] == pushed  # identical
        r = daemon.cli("run", "--rm", ref, "p1", "cat", "/opt/layer2")
        assert (r.returncode, r.stdout) == (0, b"second layer\n"), r.stderr
        with pytest.raises(NotFound), daemon.client() as c:
            list(
                c.stream(
                    "images.pull",
                    {
                        "ref": f"{registry.host}/team/nope:v1",
                        "plain_http": True,
                        "username": "berth",
                        "password": "s3cret",
                    },
                )
            )
    finally:
        registry.close()


def test_registry_transport_failures_are_typed_errors(daemon: Daemon) -> None:
    """Unreachable, untrusted or misconfigured: typed errors with the reason, never an
    internal error, and nothing stored."""
    port = free_port()  # nothing listens there
    unreachable = rf"127\.0\.0\.1:{port}: all attempts to connect"
    with pytest.raises(Unavailable, match=unreachable), daemon.client() as c:
        list(c.stream("images.pull", {"ref": f"127.0.0.1:{port}/x/y:v1", "plain_http": True}))
    with pytest.raises(InvalidArgument, match="tls_ca"), daemon.client() as c:
        list(c.stream("images.pull", {"ref": f"127.0.0.1:{port}/x/y:v1", "tls_ca": "junk"}))
    assert daemon.call("images.list")["images"] == []
    assert daemon.call("content.list")["content"] == []


def test_pull_and_push_over_tls_with_bearer_tokens(
    daemon: Daemon, image_files: dict[str, Any]
) -> None:
    """https (a CA given with --tls-ca) and token auth: the registry answers 401 with a
    Bearer challenge, berth gets a token for the challenge's scope from the realm with the
    user's credentials, and retries with it."""
    registry = Registry(auth=("token", ("berth", "s3cret")), tls=True)
    try:
        assert registry.tokens is not None
        ca = os.path.join(daemon.dir, "registry-ca.pem")
        Path(ca).write_text(registry.ca)
        daemon.cli("images", "import", image_files["two"], check=True)
        ref = f"{registry.host}/team/two:v1"
        with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"), daemon.client() as c:
            list(c.stream("images.pull", {"ref": ref, "username": "berth", "password": "s3cret"}))
        # the certificate is not trusted without --tls-ca: a clear error, nothing pushed
        r = daemon.cli("images", "push", "--user", "berth:s3cret", ref, "two:test")
        assert r.returncode != 0 and b"certificate" in r.stderr.lower(), r.stderr
        # wrong password: the token service refuses, and so does berth
        r = daemon.cli("images", "push", "--tls-ca", ca, "--user", "berth:wrong", ref, "two:test")
        assert r.returncode != 0 and b"token" in r.stderr, r.stderr
        assert registry.tokens.requests and not registry.tokens.requests[-1]["ok"]
        registry.tokens.requests.clear()
        r = daemon.cli("images", "push", "--tls-ca", ca, "--user", "berth:s3cret", ref, "two:test")
        assert r.returncode == 0, r.stderr + registry.log().encode()
        pushed = r.stdout.split()[-1].decode()
        assert pushed == image_files["two_digests"]["manifest"]
        granted = [q for q in registry.tokens.requests if q["ok"]]
        assert granted, registry.tokens.requests
        assert all(q["service"] == ["berth-test-registry"] for q in granted)
        assert any("repository:team/two:pull,push" in q["scopes"] for q in granted), granted
        daemon.cli("images", "rm", "--sync", "two:test", check=True)
        assert daemon.call("content.list")["content"] == []
        registry.tokens.requests.clear()
        r = daemon.cli("images", "pull", "--tls-ca", ca, "--user", "berth:s3cret", ref)
        assert r.returncode == 0, r.stderr + registry.log().encode()
        assert daemon.call("images.get", {"name": ref})["target"]["digest"] == pushed
        assert any("repository:team/two:pull" in q["scopes"] for q in registry.tokens.requests), (
            registry.tokens.requests
        )
        r = daemon.cli("run", "--rm", ref, "p-tls", "cat", "/opt/layer2")
        assert (r.returncode, r.stdout) == (0, b"second layer\n"), r.stderr
        # anonymous: the token service refuses to issue a token without credentials
        with pytest.raises(PermissionDenied), daemon.client() as c:
            list(c.stream("images.pull", {"ref": ref, "tls_ca": registry.ca}))
    finally:
        registry.close()


def test_a_pull_cut_by_a_daemon_crash_resumes_where_it_stopped(daemon: Daemon) -> None:
    """kill -9 of berthd in the middle of a layer download: the bytes already written stay
    in the ingest, and the next pull asks the registry for the rest (a Range request; its
    first progress item starts past zero) and ends with the same verified digest. A relay
    holds the download still at 16 MiB, so the cut lands mid-layer however loaded the
    machine is; a second relay resets the resumed download once, which berthd retries."""
    work = Path(tempfile.mkdtemp(prefix="bt-big-", dir="/tmp"))
    registry: Registry | None = None
    relay: Relay | None = None
    # A pull that hangs (a bug) must fail this test, not stall the suite: kill the daemon.
    watchdog = threading.Timer(120, lambda: kill(daemon.pid))
    watchdog.start()
    try:
        registry = Registry()
        (work / "layer/opt").mkdir(parents=True)
        (work / "layer/opt/big").write_bytes(os.urandom(48 << 20))  # incompressible
        archive = str(work / "big.tar")
        digests = build_oci_archive(
            str(work / "layer"), archive, name="docker.io/library/big:test", compression="none"
        )
        daemon.cli("images", "import", "--no-unpack", archive, check=True)
        daemon.cli(
            "images",
            "push",
            "--plain-http",
            f"{registry.host}/team/big:v1",
            "big:test",
            check=True,
        )
        daemon.cli("images", "rm", "--sync", "big:test", check=True)
        assert daemon.call("content.list")["content"] == []
        relay = Relay(registry.port, stall_after=16 << 20)
        ref = f"{relay.host}/team/big:v1"
        layer = digests["layers"][0]
        params = {"ref": ref, "plain_http": True, "unpack": False}
        cut_at = 0
        with daemon.client() as c:
            for item in c.stream("images.pull", params):
                if item.get("digest") == layer and item.get("offset", 0) >= 8 << 20:
                    cut_at = item["offset"]
                    daemon.kill9()  # mid-download: the relay holds the rest back
                    break
        assert cut_at, "no progress past 8 MiB was reported for the layer"
        relay.close()
        daemon.start()
        kept = [i["offset"] for i in daemon.call("content.ingests")["ingests"] if layer in i["ref"]]
        assert kept and kept[0] >= cut_at, f"ingest of the cut layer: {kept}, cut at {cut_at}"
        # The resumed download is cut once more, by a connection reset 8 MiB in: berthd
        # retries on its own and resumes again from what it has.
        relay = Relay(registry.port, cut_once_after=8 << 20)
        ref = f"{relay.host}/team/big:v1"
        params["ref"] = ref
        resumed_from = None
        with daemon.client() as c:
            for item in c.stream("images.pull", params):
                if item.get("digest") == layer and resumed_from is None:
                    resumed_from = item.get("offset", 0)
        assert resumed_from is not None and resumed_from >= cut_at, (resumed_from, cut_at)
        assert daemon.call("images.get", {"name": ref})["target"]["digest"] == digests["manifest"]
        assert daemon.call("content.info", {"digest": layer})["size"] > 48 << 20  # verified
        assert daemon.call("content.ingests")["ingests"] == []
        assert relay.cuts == 1 and "retrying" in daemon.log_text()
    finally:
        watchdog.cancel()
        if relay is not None:
            relay.close()
        if registry is not None:
            registry.close()
        shutil.rmtree(work, ignore_errors=True)


def test_importing_what_is_no_regular_file_is_refused_at_once(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A client's archive path to a FIFO blocked one of berthd's worker threads until a
    writer came, and one to /dev/zero was read for ever: only a regular file is read."""
    fifo = tmp_path / "archive.fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero", str(tmp_path)):  # each hung the call before
        with pytest.raises(InvalidArgument, match="not a regular file"):
            daemon.call("images.import", {"path": path})
    assert daemon.call("images.list")["images"] == []
