"""Image interop (issue 12, Images and Hostile input): what ctr, docker and podman take,
berth takes, and a hostile layer is a clear `invalid argument`.

Each test failed on the code before its fix. Real daemons, real runc, a real registry
(docker-registry) and, for schema 1 manifests (which it no longer accepts), a registry of
fixed documents (tests/support/registry.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from berth.daemon.cli.output import human_size
from berth.daemon.storage.images import host
from tests.support.helpers import BERTH, Daemon
from tests.support.images import (
    CONFIG,
    LAYER_GZIP,
    MANIFEST,
    build_docker_archive,
    build_oci_archive,
    image_blobs,
    index_blob,
    layer_tar,
    schema1_image,
    write_oci_layout,
)
from tests.support.registry import Registry, StaticRegistry

pytestmark = pytest.mark.container

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def platform_text(p: dict[str, str]) -> str:
    return "/".join([p["os"], p["architecture"]] + ([p["variant"]] if p.get("variant") else []))


HOST = host()
FOREIGN = [  # two platforms other than this host's
    p
    for p in (
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
        {"os": "linux", "architecture": "s390x"},
        {"os": "linux", "architecture": "ppc64le"},
    )
    if p["architecture"] != HOST["architecture"]
][:2]


@pytest.fixture(scope="module")
def layers(busybox_rootfs: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Uncompressed layer tars: busybox, and a second layer with /opt/layer2."""
    extra = tmp_path_factory.mktemp("extra")
    (extra / "opt").mkdir()
    (extra / "opt/layer2").write_text("second layer\n")
    return {"base": layer_tar(busybox_rootfs), "extra": layer_tar(str(extra))}


def multi_platform(
    layers: dict[str, bytes],
) -> tuple[dict[str, Any], dict[str, bytes], dict[str, bytes]]:
    """A three-platform index (the host's and two others) whose images say which they are:
    its descriptor, the host's blobs with the index, and every blob."""
    host_desc, host_blobs = image_blobs(
        [layers["base"]],
        cmd=["echo", f"running {platform_text(HOST)}"],
        architecture=HOST["architecture"],
        variant=HOST.get("variant", ""),
    )
    descs, every = [host_desc], dict(host_blobs)
    for p in FOREIGN:
        desc, blobs = image_blobs(
            [layers["base"], layers["extra"]],
            cmd=["echo", platform_text(p)],
            architecture=p["architecture"],
            variant=p.get("variant", ""),
        )
        descs.append(desc)
        every.update(blobs)
    index_desc, index = index_blob(descs)
    return (
        index_desc,
        host_blobs | {index_desc["digest"]: index},
        every | {index_desc["digest"]: index},
    )


def ok(r: subprocess.CompletedProcess[bytes]) -> str:
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def failed(r: subprocess.CompletedProcess[bytes]) -> str:
    """The error line of a command that failed (after any progress lines)."""
    assert r.returncode != 0, r.stdout.decode()
    return r.stderr.decode().strip().splitlines()[-1]


# --- hostile layers (item 6) ------------------------------------------------------------


def entry(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def hostile_layer(*entries: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buf.getvalue()


HARD_LINKS = {
    "up and out": ("../../etc/passwd", "points to '../../etc/passwd', outside the layer"),
    "absolute, elsewhere": ("/srv/secret/key", "points to '/srv/secret/key', which is not in"),
    "a name not in the layer": ("nope", "points to 'nope', which is not in the layer"),
    "a directory": ("/etc", "points to directory '/etc'"),
}


def test_a_hard_link_out_of_the_layer_is_an_invalid_argument_naming_the_entry(
    daemon: Daemon, busybox_rootfs: str, tmp_path: Path
) -> None:
    """Today: `internal: ... openat2 ...: No such file or directory`. An image of that
    name imported before stays as it was."""
    good = str(tmp_path / "good.tar")
    digests = build_oci_archive(busybox_rootfs, good, name="docker.io/library/links:1")
    ok(daemon.cli("images", "import", good))
    for case, (target, message) in HARD_LINKS.items():
        archive = str(tmp_path / "hostile.tar")
        build_oci_archive(
            busybox_rootfs,
            archive,
            name="docker.io/library/links:1",
            raw_layers=[hostile_layer(entry("bin/h", tarfile.LNKTYPE, linkname=target))],
        )
        err = failed(daemon.cli("images", "import", archive))
        assert err.startswith("berth: invalid argument: hard link 'bin/h' "), (case, err)
        assert message in err, (case, err)
        image = daemon.call("images.get", {"name": "docker.io/library/links:1"})
        assert image["target"]["digest"] == digests["manifest"], case  # changed nothing
    assert [i["name"] for i in daemon.call("images.list")["images"]] == [
        "docker.io/library/links:1"
    ]
    r = daemon.cli("run", "--rm", "links:1", "l1", "cat", "/etc/hostname")
    assert ok(r) == "berth\n"


def not_gzip_archive(busybox_rootfs: str, out: str) -> None:
    """An image whose second layer says gzip and is not (its digest is right)."""
    base = gzip.compress(layer_tar(busybox_rootfs), mtime=0)
    bogus = b"this is not a gzip stream " * 100
    config = json.dumps(
        {
            "architecture": HOST["architecture"],
            "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [sha256(gzip.decompress(base)), sha256(bogus)],
            },
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": LAYER_GZIP, "digest": sha256(b), "size": len(b)}
                for b in (base, bogus)
            ],
        }
    ).encode()
    desc = {"mediaType": MANIFEST, "digest": sha256(manifest), "size": len(manifest)}
    blobs = {sha256(b): b for b in (base, bogus, config, manifest)}
    write_oci_layout(out, {"docker.io/library/hostile:1": desc}, blobs)


def test_layers_whose_entries_cannot_be_applied_are_invalid_arguments_naming_them(
    daemon: Daemon, busybox_rootfs: str, tmp_path: Path
) -> None:
    """The same class: entries that fail in a syscall (a parent that is a file, a symlink
    loop, PAX numbers no file takes, an empty link target) and a layer blob that is not
    the gzip it says were all `internal` errors."""
    cases = {
        "a file under a file": (
            [entry("etc/passwd/x", size=1)],
            "layer entry 'etc/passwd/x': Not a directory",
        ),
        "a symlink loop": (
            [
                entry("a", tarfile.SYMTYPE, linkname="b"),
                entry("b", tarfile.SYMTYPE, linkname="a"),
                entry("a/x", size=1),
            ],
            "layer entry 'a/x': Too many levels of symbolic links",
        ),
        "a uid out of range": (
            [entry("u", size=1, pax_headers={"uid": "99999999999999999999"})],
            "layer entry 'u': uid 99999999999999999999 is out of range",
        ),
        "a time that is not a number": (
            [entry("m", size=1, pax_headers={"mtime": "nan"})],
            "layer entry 'm': modification time nan is out of range",
        ),
        "an empty symlink target": (
            [entry("s", tarfile.SYMTYPE, linkname="")],
            "layer entry 's': link target '' is not a path",
        ),
        "a name too long": ([entry("n" * 300, size=1)], "File name too long"),
    }
    for case, (entries, message) in cases.items():
        archive = str(tmp_path / "hostile.tar")
        build_oci_archive(
            busybox_rootfs,
            archive,
            name="docker.io/library/hostile:1",
            raw_layers=[hostile_layer(*entries)],
        )
        err = failed(daemon.cli("images", "import", archive))
        assert err.startswith("berth: invalid argument: "), (case, err)
        assert message in err, (case, err)
    archive = str(tmp_path / "not-gzip.tar")
    not_gzip_archive(busybox_rootfs, archive)
    err = failed(daemon.cli("images", "import", archive))
    assert err.startswith("berth: invalid argument: layer blob is not valid gzip"), err
    assert daemon.call("images.list")["images"] == []  # nothing was created
    assert "Traceback" not in Path(daemon.logs[-1]).read_text()


# --- archives that lack other platforms (item 2) -----------------------------------------


def test_an_archive_lacking_other_platforms_imports_the_host_one_and_reexports(
    daemon: Daemon, layers: dict[str, bytes], tmp_path: Path
) -> None:
    """What `ctr export` writes by default. Today: `archive has no blobs/sha256/...`."""
    index_desc, host_blobs, _every = multi_platform(layers)
    archive = str(tmp_path / "ctr-export.tar")
    write_oci_layout(archive, {"docker.io/library/multi:v1": index_desc}, host_blobs)
    out = ok(daemon.cli("images", "import", archive))
    assert f"docker.io/library/multi:v1 {index_desc['digest']}" in out
    for p in FOREIGN:
        assert f"multi:v1: {platform_text(p)} not in the archive" in out, out
    r = daemon.cli("run", "--rm", "multi:v1", "m1")
    assert ok(r) == f"running {platform_text(HOST)}\n"
    exported = str(tmp_path / "berth-export.tar")
    ok(daemon.cli("images", "export", exported, "multi:v1"))
    ok(daemon.cli("images", "rm", "--sync", "multi:v1"))
    assert daemon.call("content.list")["content"] == []
    ok(daemon.cli("images", "import", exported))  # berth's own export re-imports
    assert ok(daemon.cli("run", "--rm", "multi:v1", "m2")) == f"running {platform_text(HOST)}\n"
    only_foreign = str(tmp_path / "foreign.tar")
    foreign_desc, foreign_blobs = image_blobs(
        [layers["base"]],
        architecture=FOREIGN[0]["architecture"],
        variant=FOREIGN[0].get("variant", ""),
    )
    absent_host = {"mediaType": MANIFEST, "digest": sha256(b"absent"), "size": 6, "platform": HOST}
    foreign_index_desc, foreign_index = index_blob([absent_host, foreign_desc])
    write_oci_layout(
        only_foreign,
        {"docker.io/library/foreign:v1": foreign_index_desc},
        foreign_blobs | {foreign_index_desc["digest"]: foreign_index},
    )
    out = ok(daemon.cli("images", "import", only_foreign))  # nothing to unpack here: fine
    assert f"foreign:v1: {platform_text(HOST)} not in the archive" in out, out
    err = failed(daemon.cli("run", "--rm", "foreign:v1", "f1"))
    assert err.startswith(f"berth: not found: the image's {platform_text(HOST)} manifest"), err


# --- a registry: single-platform pulls, pushes, listings (items 2, 3, 5) -----------------


def test_a_single_platform_pull_lists_exports_and_pushes_only_what_it_holds(
    daemon: Daemon, registry: Registry, layers: dict[str, bytes], tmp_path: Path
) -> None:
    """Pull one platform of an index: `images ls` shows its content size and the index's
    platforms; export re-imports; a push of the whole index is refused before any upload
    (today: `unavailable`, after the layers went up), one with --platform goes."""
    index_desc, _host_blobs, every = multi_platform(layers)
    full = str(tmp_path / "full.tar")
    write_oci_layout(full, {"docker.io/library/multi:v1": index_desc}, every)
    ok(daemon.cli("images", "import", full))
    ref = f"{registry.host}/team/multi:v1"
    ok(daemon.cli("images", "push", "--plain-http", ref, "multi:v1"))

    ns = "pulled"
    ok(daemon.cli("images", "pull", "--plain-http", ref, namespace=ns))
    host_manifest = json.loads(
        every[json.loads(every[index_desc["digest"]])["manifests"][0]["digest"]]
    )
    expected = index_desc["size"] + json.loads(every[index_desc["digest"]])["manifests"][0]["size"]
    expected += host_manifest["config"]["size"] + sum(x["size"] for x in host_manifest["layers"])
    listing = json.loads(ok(daemon.cli("images", "ls", "--format", "json", namespace=ns)))
    assert listing[0]["content_size"] == expected
    platforms = [platform_text(HOST)] + [platform_text(p) for p in FOREIGN]
    assert listing[0]["platforms"] == platforms
    table = ok(daemon.cli("images", "ls", namespace=ns)).splitlines()
    assert table[0].split() == ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "CREATED"]
    assert ",".join(platforms) in table[1].split(), table
    assert human_size(expected) in table[1], table

    exported = str(tmp_path / "single.tar")
    ok(daemon.cli("images", "export", exported, ref, namespace=ns))
    ok(daemon.cli("images", "import", exported, namespace="reimported"))
    r = daemon.cli("run", "--rm", ref, "s1", namespace="reimported")
    assert ok(r) == f"running {platform_text(HOST)}\n"

    copy = f"{registry.host}/team/copy:v1"
    err = failed(daemon.cli("images", "push", "--plain-http", copy, ref, namespace=ns))
    assert err.startswith("berth: failed precondition: cannot push "), err
    assert ", ".join(platform_text(p) for p in FOREIGN) in err, err
    repo = Path(registry.dir, "data/docker/registry/v2/repositories/team/copy")
    assert not repo.exists(), "something was uploaded before the refusal"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{registry.host}/v2/team/copy/tags/list", timeout=10)
    assert caught.value.code == 404

    err = failed(
        daemon.cli(
            "images", "push", "--plain-http", "--platform", "linux/s390x", copy, ref, namespace=ns
        )
    )
    assert "no image for platform linux/s390x is held here" in err, err
    host_text = platform_text(HOST)
    ok(
        daemon.cli(
            "images", "push", "--plain-http", "--platform", host_text, copy, ref, namespace=ns
        )
    )
    ok(daemon.cli("images", "pull", "--plain-http", copy, namespace="copied"))
    assert ok(daemon.cli("run", "--rm", copy, "c1", namespace="copied")) == f"running {host_text}\n"

    err = failed(
        daemon.cli(
            "images", "pull", "--plain-http", "--platform", "linux/mips64", ref, namespace="x"
        )
    )
    assert f"no manifest for platform linux/mips64 (have {', '.join(platforms)})" in err, err


# --- docker save archives keep compressed layers (item 4) --------------------------------


def test_docker_save_layers_are_stored_and_pushed_compressed(
    daemon: Daemon, registry: Registry, busybox_rootfs: str, tmp_path: Path
) -> None:
    """Today the plain layer tar was stored (and pushed) as it is, several times larger."""
    archive = str(tmp_path / "saved.tar")
    build_docker_archive(busybox_rootfs, archive, tag="saved:v1", cmd=["echo", "from docker save"])
    raw = layer_tar(busybox_rootfs)
    ok(daemon.cli("images", "import", archive))
    target = daemon.call("images.get", {"name": "docker.io/library/saved:v1"})["target"]
    manifest = json.loads(daemon.call("content.read", {"digest": target["digest"]})["data"])
    [layer] = manifest["layers"]
    assert layer["mediaType"] == LAYER_GZIP
    print(f"layer: {len(raw)} bytes as saved, {layer['size']} bytes stored")
    assert layer["size"] < len(raw) * 0.75
    info = daemon.call("content.info", {"digest": layer["digest"]})
    assert info["size"] == layer["size"]
    assert info["labels"]["containerd.io/uncompressed"] == sha256(raw)
    config = json.loads(
        daemon.call("content.read", {"digest": manifest["config"]["digest"]})["data"]
    )
    assert config["rootfs"]["diff_ids"] == [sha256(raw)]
    assert ok(daemon.cli("run", "--rm", "saved:v1", "d1")) == "from docker save\n"

    ref = f"{registry.host}/team/saved:v1"
    ok(daemon.cli("images", "push", "--plain-http", ref, "saved:v1"))
    blobs = Path(registry.dir, "data/docker/registry/v2/blobs")
    pushed = sum(p.stat().st_size for p in blobs.rglob("data"))
    print(f"pushed: {pushed} bytes (the layer as saved alone: {len(raw)})")
    assert pushed < len(raw) * 0.75
    ok(daemon.cli("images", "pull", "--plain-http", ref, namespace="other"))
    assert ok(daemon.cli("run", "--rm", ref, "d2", namespace="other")) == "from docker save\n"
    ok(daemon.cli("images", "rm", "--sync", "saved:v1"))
    ok(daemon.cli("images", "import", archive))
    again_target = daemon.call("images.get", {"name": "docker.io/library/saved:v1"})["target"]
    assert again_target["digest"] == target["digest"]  # compression is deterministic


# --- messages and progress (item 5) -------------------------------------------------------


def on_a_terminal(daemon: Daemon, *args: str) -> tuple[int, str]:
    """Run the CLI with its stderr on a pseudo-terminal; its exit code and what it drew."""
    master, slave = os.openpty()
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer closed it
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [BERTH, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=env,
            timeout=120,
        )
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_import_and_export_show_progress_on_a_terminal_like_pull(
    daemon: Daemon, layers: dict[str, bytes], tmp_path: Path
) -> None:
    index_desc, _host_blobs, every = multi_platform(layers)
    archive = str(tmp_path / "full.tar")
    write_oci_layout(archive, {"docker.io/library/multi:v1": index_desc}, every)
    code, drawn = on_a_terminal(daemon, "images", "import", archive)
    assert code == 0, drawn
    layer = json.loads(every[json.loads(every[index_desc["digest"]])["manifests"][0]["digest"]])
    short = layer["layers"][0]["digest"][7:19]
    assert "\x1b[" in drawn and f"layer    {short} [{'#' * 30}]" in drawn, drawn
    assert "done" in drawn
    exported = str(tmp_path / "out.tar")
    code, drawn = on_a_terminal(daemon, "images", "export", exported, "multi:v1")
    assert code == 0, drawn
    assert f"layer    {short} [{'#' * 30}]" in drawn and "done" in drawn, drawn
    r = daemon.cli("images", "import", exported)  # not a terminal: one line per step
    assert f"layer {short}: done" in r.stderr.decode(), r.stderr


# --- Docker schema 1 (item 1) ---------------------------------------------------------------


def test_schema1_manifests_pull_convert_and_run(daemon: Daemon, layers: dict[str, bytes]) -> None:
    """Old registries serve schema 1 (signed or not, with odd or no media types). Today:
    `unsupported manifest type ''`."""
    steps: list[tuple[bytes | None, dict[str, Any]]] = [
        (layers["base"], {"container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) ADD busybox"]}}),
        (None, {"container_config": {"Cmd": ["/bin/sh", "-c", "#(nop)  ENV X=1"]}}),
        (
            layers["extra"],
            {
                "os": "linux",
                "architecture": "amd64",
                "author": "someone",
                "config": {"Cmd": ["sh", "-c", "cat /opt/layer2; echo $X"], "Env": ["X=1"]},
                "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) ADD layer2"]},
            },
        ),
    ]
    plain, blobs, plain_digest = schema1_image(steps)
    signed, _, signed_digest = schema1_image(steps, signed=True)
    assert signed_digest == plain_digest
    v1 = "application/vnd.docker.distribution.manifest.v1+json"
    jws = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    manifests = {
        "old/app/plain": (plain, v1),
        "old/app/signed": (signed, jws),
        "old/app/odd": (plain, "text/plain"),
        "old/app/bare": (signed, None),
        f"old/app/{signed_digest}": (signed, jws),
    }
    static = StaticRegistry(manifests, blobs)
    try:
        for tag in ("plain", "signed", "odd", "bare", f"@{signed_digest}"):
            ref = f"{static.host}/old/app{tag if tag.startswith('@') else ':' + tag}"
            ok(daemon.cli("images", "pull", "--plain-http", ref))
            r = daemon.cli("run", "--rm", ref, f"s1-{tag[-6:]}")
            assert ok(r) == "second layer\n1\n", tag
        image = daemon.call("images.get", {"name": f"{static.host}/old/app:signed"})
        assert image["target"]["media_type"] == DOCKER_MANIFEST
        manifest = json.loads(
            daemon.call("content.read", {"digest": image["target"]["digest"]})["data"]
        )
        assert [x["digest"] for x in manifest["layers"]] == [
            sha256(gzip.compress(layers[k], mtime=0)) for k in ("base", "extra")
        ]  # the empty (throwaway) step has no layer
        config = json.loads(
            daemon.call("content.read", {"digest": manifest["config"]["digest"]})["data"]
        )
        assert config["rootfs"] == {
            "type": "layers",
            "diff_ids": [sha256(layers["base"]), sha256(layers["extra"])],
        }
        assert (config["os"], config["architecture"], config["author"]) == (
            "linux",
            "amd64",
            "someone",
        )
        assert "id" not in config and "parent" not in config
        assert [h.get("empty_layer", False) for h in config["history"]] == [False, True, False]
        assert config["history"][1]["created_by"] == "/bin/sh -c #(nop)  ENV X=1"
        assert config["history"][0]["created"] == "2020-01-01T00:00:00Z"
    finally:
        static.close()


def test_half_utf16_pairs_in_an_image_s_json_read_as_go_reads_them(
    daemon: Daemon, busybox_rootfs: str, tmp_path: Path
) -> None:
    """JSON may escape half a surrogate pair ("\\ud800"); Go reads it as U+FFFD, Python
    kept a string nothing could encode. Before: the import failed `internal` on such an
    image name (its blobs stored), and `run` of such an Env or WorkingDir failed
    `internal: reply not sendable`. Now both work, with U+FFFD where the half pair was."""
    named = str(tmp_path / "named.tar")
    build_oci_archive(busybox_rootfs, named, name="docker.io/library/halves:t\udfff")
    ok(daemon.cli("images", "import", named))
    configured = str(tmp_path / "configured.tar")
    build_oci_archive(
        busybox_rootfs,
        configured,
        name="docker.io/library/halves:env",
        env=["PATH=/bin", "HALF=a\ud800b"],
        extra_config={"WorkingDir": "/w\udc00", "Labels": {"k\ud800": "v\udbff"}},
    )
    ok(daemon.cli("images", "import", configured))
    listed = json.loads(ok(daemon.cli("images", "ls", "--format", "json")))
    assert sorted(i["name"] for i in listed) == [
        "docker.io/library/halves:env",
        "docker.io/library/halves:t\ufffd",
    ]
    r = daemon.cli("run", "--rm", "halves:env", "h1", "sh", "-c", 'echo "$HALF"; pwd')
    assert ok(r) == "a\ufffdb\n/w\ufffd\n"
