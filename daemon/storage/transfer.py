"""Image archives: import an OCI image layout or a `docker save` tar, export an OCI layout
(with a docker-compatible manifest.json). Functions over a `Storage`: blobs go through its
content store under a lease, images into its metadata.

What ctr, docker and podman do, berth does:
- an index may list platforms whose blobs the archive lacks (`ctr export` and berth's own
  export after a single-platform pull write such archives): the platforms it holds are
  imported, the others reported as absent, and the host's image is unpacked when held;
- `docker save` layers that are plain tars are stored gzip-compressed (as docker pushes
  them), with their uncompressed digest (the config's diff ID) as a label;
- a failed import (a hostile layer that does not unpack, say) leaves the image records as
  they were: what it stored is only leased, and the collector takes it.
Progress: a callback gets pull's items (kind, digest, offset, total, status).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from berth.daemon.documents import load_json
from berth.daemon.metadata import validate_image_name
from berth.daemon.reference import normalize, parse
from berth.daemon.storage import images
from berth.daemon.storage.archive import BoundedTarFile, TappedReader
from berth.daemon.storage.content import Writer, validate_digest
from berth.daemon.storage.images import Descriptor
from berth.daemon.storage.service import GC_REF_CONTENT, MAX_ARCHIVE_DOCUMENT, Storage
from berth.shim.wire.errors import InvalidArgument, NotFound

ProgressFn = Callable[[dict[str, Any]], None]
UNCOMPRESSED = "containerd.io/uncompressed"  # containerd's label: a blob's uncompressed digest
GZIP_LEVEL = 6  # gzip's default, and Go's (docker's, containerd's): size and speed balanced
PROGRESS_INTERVAL = 0.1  # seconds between two items of one blob (a change of status: at once)
CHUNK = 1 << 20
# An archive to import: its entries (docker save writes 4 a layer), the characters of the
# name of a file in it (blobs/sha512/<128 digits> is 141), and the regions of its sparse
# files (none, as docker and berth write them): what is kept of them until the end.
MAX_ARCHIVE_MEMBERS = 1 << 16
MAX_MEMBER_NAME = 512
MAX_SPARSE_REGIONS = 1 << 16


class Reporter:
    """Progress items of one transfer, shaped like a pull's; at most one per blob every
    PROGRESS_INTERVAL, except when its status changes. Without a callback: silent."""

    def __init__(self, send: ProgressFn | None) -> None:
        self._send = send
        self._last: dict[str, tuple[str, float]] = {}

    def __call__(self, kind: str, digest: str, offset: int, total: int, status: str) -> None:
        if self._send is None:
            return
        now = time.monotonic()
        previous = self._last.get(digest)
        if previous and previous[0] == status and now - previous[1] < PROGRESS_INTERVAL:
            return
        self._last[digest] = (status, now)
        self._send(
            {"kind": kind, "digest": digest, "offset": offset, "total": total, "status": status}
        )


class _Counting(TappedReader):
    """A reader that reports how far it has been read (a blob copied into the store or
    into an archive)."""

    def __init__(self, raw: IO[bytes], report: Callable[[int], None]) -> None:
        super().__init__(raw)
        self._report = report

    def seen(self, data: bytes) -> None:
        self._report(self.size)


class _IngestSink:
    """A content-store ingest as the file a GzipFile writes to."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer

    def write(self, data: bytes) -> int:
        self._writer.write(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


@dataclass
class _Found:
    """An image an archive holds: its name, its top descriptor, the platforms of its index
    the archive lacks."""

    name: str
    target: Descriptor
    absent: list[tuple[str, str]] = field(default_factory=list)  # (platform, digest)


class _Archive:
    """An archive being imported: its members, read under the caps for documents, and
    stored into `namespace` under `lease` with progress."""

    def __init__(
        self, storage: Storage, namespace: str, tar: tarfile.TarFile, lease: str, report: Reporter
    ) -> None:
        self.storage = storage
        self.namespace = namespace
        self.tar = tar
        self.lease = lease
        self.report = report
        self.members = _regular_members(tar)

    def open(self, member_name: str) -> tuple[IO[bytes], int]:
        m = self.members.get(member_name.lstrip("./"))
        if m is None:
            raise InvalidArgument(f"archive has no {member_name}")
        f = self.tar.extractfile(m)
        assert f is not None
        return f, m.size

    def read(self, member_name: str, cap: int = MAX_ARCHIVE_DOCUMENT) -> bytes:
        f, size = self.open(member_name)
        if size > cap:
            raise InvalidArgument(f"{member_name} in the archive is larger than {cap} bytes")
        return f.read(cap + 1)

    @staticmethod
    def blob_name(digest: str) -> str:
        return f"blobs/sha256/{validate_digest(digest)[7:]}"

    def has(self, desc: Descriptor) -> bool:
        return self.blob_name(desc.digest) in self.members

    def document(self, desc: Descriptor) -> bytes:
        data = self.read(self.blob_name(desc.digest))
        if "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
            raise InvalidArgument(f"blob {desc.digest} does not match its digest")
        return data

    def store(self, desc: Descriptor, kind: str, labels: dict[str, str] | None = None) -> None:
        """Copy blob `desc` of the archive into the content store (verified there)."""
        f, size = self.open(self.blob_name(desc.digest))
        if size != desc.size:
            raise InvalidArgument(f"blob {desc.digest} is {size} bytes, not {desc.size}")
        self.put(f, kind, desc.digest, desc.size, labels)

    def put(
        self,
        f: IO[bytes],
        kind: str,
        digest: str = "",
        size: int = 0,
        labels: dict[str, str] | None = None,
        key: str = "",
    ) -> str:
        """Store `f` (verified against `digest` and `size` when given); progress items
        go under `key` (the digest when known, the member's name otherwise)."""
        shown = key or digest

        def progress(offset: int) -> None:
            self.report(kind, shown, offset, size, "importing")

        stored = self.storage.put_blob(
            self.namespace,
            cast(IO[bytes], _Counting(f, progress)),
            digest,
            size,
            labels,
            self.lease,
        )
        self.report(kind, shown, size, size, "done")
        return stored


def _regular_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The archive's files by name, read header by header (BoundedTarFile, which keeps no
    list of its own), within the bounds above."""
    members: dict[str, tarfile.TarInfo] = {}
    count = regions = 0
    try:
        while (member := tar.next()) is not None:
            count += 1
            if count > MAX_ARCHIVE_MEMBERS:
                raise InvalidArgument(f"the archive has more than {MAX_ARCHIVE_MEMBERS} entries")
            if not member.isreg():
                continue
            if len(member.name) > MAX_MEMBER_NAME:
                raise InvalidArgument(
                    f"the archive has a file name longer than {MAX_MEMBER_NAME} characters"
                )
            regions += len(member.sparse or ())
            if regions > MAX_SPARSE_REGIONS:
                raise InvalidArgument(
                    f"the archive's sparse files have more than {MAX_SPARSE_REGIONS} regions"
                )
            member.pax_headers = {}  # applied to the entry already; up to a megabyte each
            members[member.name.lstrip("./")] = member
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, lzma.LZMAError) as exc:
        raise InvalidArgument(f"cannot read archive: {exc}") from None
    return members


def _open_archive_file(path: str) -> IO[bytes]:
    """The archive at `path`, opened only if it is a regular file: a client's path to a
    FIFO blocked a worker thread until a writer came, and one to a device (/dev/zero)
    was read for ever. Opened without blocking, then checked on the fd itself."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"cannot read archive {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"cannot read archive {path}: not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def import_archive(
    storage: Storage,
    namespace: str,
    path: str,
    *,
    name: str | None = None,
    unpack: bool = True,
    snapshotter: str | None = None,
    lease_id: str | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Import an OCI image-layout tar or a `docker save` archive from `path`: {images:
    the records made, absent: [{name, platform, digest}] an index lists but the archive
    lacks}."""
    if not os.path.isabs(path):
        raise InvalidArgument("the archive path must be absolute")
    source = _open_archive_file(path)
    try:
        tar = BoundedTarFile.open(fileobj=source, mode="r:*")  # closed by the `with` below
    except (OSError, tarfile.TarError) as exc:
        source.close()
        raise InvalidArgument(f"cannot read archive {path}: {exc}") from None
    report = Reporter(progress)
    with source, tar, storage.lease(namespace, lease_id) as lease:
        archive = _Archive(storage, namespace, tar, lease, report)
        if "index.json" in archive.members:
            found = _import_oci(archive, name)
        elif "manifest.json" in archive.members:
            found = _import_docker(archive, name)
        else:
            raise InvalidArgument(
                "not an OCI image layout or docker archive (no index.json or manifest.json)"
            )
        created = _record(storage, namespace, found, unpack, snapshotter, lease, report)
    absent = [
        {"name": f.name, "platform": platform, "digest": digest}
        for f in found
        for platform, digest in f.absent
    ]
    return {"images": created, "absent": absent}


def _record(
    storage: Storage,
    namespace: str,
    found: list[_Found],
    unpack: bool,
    snapshotter: str | None,
    lease: str,
    report: Reporter,
) -> list[dict[str, Any]]:
    """Create (or move) the image records and unpack what this host runs; if anything
    fails, the records are put back as they were (bad input changes nothing)."""
    records = [(image.name, image.target.to_wire()) for image in found]
    with storage.images_replaced(namespace, records) as created:
        for image in found:
            if unpack and _held_for_host(storage, namespace, image.target):
                report("unpack", image.target.digest, 0, 0, "unpacking")
                storage.unpack(namespace, image.name, snapshotter, lease_id=lease)
                report("unpack", image.target.digest, 0, 0, "done")
    return created


def _held_for_host(storage: Storage, namespace: str, target: Descriptor) -> bool:
    """Whether the host platform's image of `target` is stored whole (else there is
    nothing to unpack here: an archive of other platforms only)."""
    try:
        _mdesc, manifest = storage.manifest_for(namespace, target)
    except NotFound:
        return False
    return _manifest_held(storage, namespace, manifest)


def _manifest_held(storage: Storage, namespace: str, manifest: images.Manifest) -> bool:
    for desc in (manifest.config, *manifest.layers):
        try:
            storage.store.get_content(namespace, desc.digest)
        except NotFound:
            return False
    return True


def platforms_held(
    storage: Storage, namespace: str, target: Descriptor
) -> tuple[list[Descriptor], list[Descriptor]]:
    """The manifests an image's index lists, split into those stored whole (manifest,
    config and layers) and those not (a single-platform pull holds one of many)."""
    if target.media_type not in images.INDEX_TYPES:
        manifest = images.parse_manifest(storage.read_json(namespace, target), target.media_type)
        return ([target], []) if _manifest_held(storage, namespace, manifest) else ([], [target])
    held: list[Descriptor] = []
    absent: list[Descriptor] = []
    for entry in images.parse_index(storage.read_json(namespace, target), target.media_type):
        try:
            manifest = images.parse_manifest(storage.read_json(namespace, entry), entry.media_type)
        except (NotFound, InvalidArgument):
            absent.append(entry)  # not stored, or a nested index: not pushable as one
            continue
        (held if _manifest_held(storage, namespace, manifest) else absent).append(entry)
    return held, absent


def _store_image(
    archive: _Archive, desc: Descriptor, absent: list[tuple[str, str]], depth: int = 0
) -> str:
    """Store `desc` and everything it references, children first. Returns "" when done, or
    the digest of a blob the archive lacks; an index's children that the archive lacks
    are left out (listed in `absent`) as long as one of them is held."""
    if depth > 4:
        raise InvalidArgument("image indexes nested too deeply")
    if desc.media_type not in images.INDEX_TYPES + images.MANIFEST_TYPES:
        raise InvalidArgument(f"unsupported image media type {desc.media_type!r}")
    if not archive.has(desc):
        return desc.digest
    data = archive.document(desc)
    if desc.media_type in images.INDEX_TYPES:
        refs: dict[str, str] = {}
        first_missing = ""
        for child in images.parse_index(data, desc.media_type):
            missing = _store_image(archive, child, absent, depth + 1)
            if missing:
                absent.append((images.format_platform(child.platform), child.digest))
                first_missing = first_missing or missing
            else:
                refs[f"{GC_REF_CONTENT}.m.{len(refs)}"] = child.digest
        if not refs:
            return first_missing or desc.digest
        archive.store(desc, "index", refs)
        return ""
    manifest = images.parse_manifest(data, desc.media_type)
    for blob in (manifest.config, *manifest.layers):
        if not archive.has(blob):
            return blob.digest
    refs = {f"{GC_REF_CONTENT}.config": manifest.config.digest}
    archive.store(manifest.config, "config")
    for i, layer in enumerate(manifest.layers):
        archive.store(layer, "layer")
        refs[f"{GC_REF_CONTENT}.l.{i}"] = layer.digest
    archive.store(desc, "manifest", refs)
    return ""


def _import_oci(archive: _Archive, name: str | None) -> list[_Found]:
    layout = images.parse_document(archive.read("oci-layout"), "oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise InvalidArgument("unsupported oci-layout version")
    entries = images.parse_index(archive.read("index.json"), images.OCI_INDEX)
    if not entries:
        raise InvalidArgument("the archive's index.json lists no image")
    found: list[_Found] = []
    for entry in entries:
        absent: list[tuple[str, str]] = []
        missing = _store_image(archive, entry, absent)
        if missing:
            raise InvalidArgument(f"archive lacks blob {missing}")
        found.append(_Found(_layout_name(entry, name, len(entries) == 1), entry, absent))
    return found


def _layout_name(entry: Descriptor, name: str | None, only: bool) -> str:
    """The name of one image of an OCI layout: `name` for the only one; else its own: a
    containerd name that its ref name agrees with, or its ref name. A ref name that is a
    bare tag (what skopeo's and umoci's `oci:DIR:TAG` write) is a tag of `name`'s
    repository when one is given (ctr's --base-name), else normalised as the CLI
    normalises what it is given (`v1`: docker.io/library/v1:latest): kept as it was, no
    command could name it again."""
    if name and only:
        return name
    own = entry.annotations.get("io.containerd.image.name")
    ref = entry.annotations.get("org.opencontainers.image.ref.name", "")
    if own and (not ref or ref in (own, _ref_name(own))):
        return own  # else stale: umoci's repack keeps it on the entry of its new tag
    if name and ref and "/" not in ref and ":" not in ref:
        with contextlib.suppress(InvalidArgument):
            return normalize(f"{parse(name).name}:{ref}")
    return _full_ref(ref) or entry.digest


def _import_docker(archive: _Archive, name: str | None) -> list[_Found]:
    manifest_list = load_json(
        archive.read("manifest.json"), "manifest.json", max_size=MAX_ARCHIVE_DOCUMENT
    )
    if isinstance(manifest_list, dict) and "schemaVersion" in manifest_list:
        raise InvalidArgument(
            "manifest.json is one image manifest: a dir: transport layout (skopeo's dir:, "
            "podman's docker-dir), not an image archive; save as docker-archive or oci-archive"
        )
    if not isinstance(manifest_list, list) or not manifest_list:
        raise InvalidArgument("manifest.json must be a non-empty list")
    found: list[_Found] = []
    for item in manifest_list:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("Config"), str)
            or not isinstance(item.get("Layers"), list)
            or not all(isinstance(layer, str) for layer in item["Layers"])
        ):
            raise InvalidArgument("manifest.json entries need Config and Layers (strings)")
        tags = item.get("RepoTags")
        if tags is None:
            tags = []  # docker writes null for an untagged image
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise InvalidArgument("manifest.json RepoTags must be a list of strings")
        config_data = archive.read(item["Config"])
        config = images.parse_config(config_data)  # validates
        if len(config.diff_ids) != len(item["Layers"]):
            raise InvalidArgument(
                f"{item['Config']} lists {len(config.diff_ids)} diff IDs for "
                f"{len(item['Layers'])} layers"
            )
        config_digest = archive.put(io.BytesIO(config_data), "config", size=len(config_data))
        layers = [
            _docker_layer(archive, layer_name, diff_id)
            for layer_name, diff_id in zip(item["Layers"], config.diff_ids, strict=True)
        ]
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": images.OCI_MANIFEST,
                "config": {
                    "mediaType": images.OCI_CONFIG,
                    "digest": config_digest,
                    "size": len(config_data),
                },
                "layers": layers,
            },
            sort_keys=True,
        ).encode()
        refs = {f"{GC_REF_CONTENT}.config": config_digest}
        refs.update({f"{GC_REF_CONTENT}.l.{i}": layer["digest"] for i, layer in enumerate(layers)})
        manifest_digest = archive.put(
            io.BytesIO(manifest), "manifest", size=len(manifest), labels=refs
        )
        target = Descriptor(images.OCI_MANIFEST, manifest_digest, len(manifest))
        names = [name] if name else [_full_ref(t) for t in tags] or [manifest_digest]
        found.extend(_Found(image_name, target) for image_name in names)
    return found


def _docker_layer(archive: _Archive, layer_name: str, diff_id: str) -> dict[str, Any]:
    """Store one `docker save` layer as docker pushes it: gzip-compressed (a plain tar is
    compressed here, its digest checked against the config's diff ID as it goes)."""
    f, size = archive.open(layer_name)
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        digest = archive.put(f, "layer", size=size, key=layer_name)
        return {"mediaType": images.OCI_LAYER_GZIP, "digest": digest, "size": size}
    storage, namespace = archive.storage, archive.namespace
    ref = f"import-{uuid.uuid4().hex}"
    writer = storage.open_writer(namespace, ref, 0, "", archive.lease)
    try:
        uncompressed = hashlib.sha256()
        with gzip.GzipFile(
            fileobj=cast(IO[bytes], _IngestSink(writer)),
            mode="wb",
            compresslevel=GZIP_LEVEL,
            mtime=0,
        ) as gz:
            done = 0
            while chunk := f.read(CHUNK):
                uncompressed.update(chunk)
                gz.write(chunk)
                done += len(chunk)
                archive.report("layer", layer_name, done, size, "compressing")
        if "sha256:" + uncompressed.hexdigest() != diff_id:
            raise InvalidArgument(
                f"layer {layer_name} of the archive is not the config's diff ID {diff_id}"
            )
        digest = storage.commit(namespace, writer, 0, "", {UNCOMPRESSED: diff_id}, archive.lease)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            storage.content.abort(f"{namespace}/{ref}")
    archive.report("layer", layer_name, size, size, "done")
    return {
        "mediaType": images.OCI_LAYER_GZIP,
        "digest": digest,
        "size": storage.content.info(digest).size,
    }


def export_archive(
    storage: Storage,
    namespace: str,
    names: list[str],
    path: str,
    platform: dict[str, str] | None = None,
    all_platforms: bool = True,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write an OCI image-layout tar (with a docker-compatible manifest.json) of the
    images `names` to `path`. Deterministic: same images, same bytes. An index whose
    other platforms are not held here is written as it is (it re-imports: see above)."""
    if not os.path.isabs(path):
        raise InvalidArgument("the archive path must be absolute")
    report = Reporter(progress)
    blobs: dict[str, str] = {}  # digest -> kind
    index_entries = []
    docker_manifest = []
    for name in names:
        image = storage.store.get_image(namespace, validate_image_name(name))
        target = Descriptor.from_wire(image["target"])
        _collect(
            storage,
            namespace,
            target,
            blobs,
            None if all_platforms else (platform or images.host()),
        )
        annotations = {
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": _ref_name(name),
        }
        index_entries.append({**target.to_json(), "annotations": annotations})
        with contextlib.suppress(NotFound, InvalidArgument):
            _mdesc, manifest = storage.manifest_for(namespace, target, platform)
            docker_manifest.append(
                {
                    "Config": f"blobs/sha256/{manifest.config.digest[7:]}",
                    "RepoTags": [_docker_tag(name)],
                    "Layers": [f"blobs/sha256/{layer.digest[7:]}" for layer in manifest.layers],
                }
            )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": images.OCI_INDEX, "manifests": index_entries},
        sort_keys=True,
    ).encode()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for directory in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(directory)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(info)
            for digest in sorted(blobs):
                _add_blob(storage, tar, digest, blobs[digest], report)
            _add_file(tar, "index.json", index)
            _add_file(tar, "manifest.json", json.dumps(docker_manifest, sort_keys=True).encode())
            _add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return {"path": path, "blobs": len(blobs), "images": len(names)}


def _ref_name(name: str) -> str:
    """The OCI ref name an export gives image `name`: its tag, as containerd writes it
    (what `skopeo`'s and `umoci`'s `DIR:TAG` select)."""
    return name.rsplit(":", 1)[-1] if ":" in name.rsplit("/", 1)[-1] else "latest"


def _add_file(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    info = tarfile.TarInfo(arcname)
    info.mtime, info.mode, info.size = 0, 0o644, len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_blob(
    storage: Storage, tar: tarfile.TarFile, digest: str, kind: str, report: Reporter
) -> None:
    info = tarfile.TarInfo(f"blobs/sha256/{digest[7:]}")
    info.mtime, info.mode = 0, 0o644
    info.size = storage.content.info(digest).size
    total = info.size

    def progress(offset: int) -> None:
        report(kind, digest, offset, total, "exporting")

    with open(storage.content.path(digest), "rb") as f:
        tar.addfile(info, cast(IO[bytes], _Counting(f, progress)))
    report(kind, digest, total, total, "done")


def _collect(
    storage: Storage,
    namespace: str,
    desc: Descriptor,
    out: dict[str, str],
    platform: dict[str, str] | None,
    depth: int = 0,
) -> None:
    """The blobs of `desc` held here (digest -> kind), children of an index that are not
    held left out."""
    if depth > 4:
        raise InvalidArgument("image indexes nested too deeply")
    if desc.media_type in images.INDEX_TYPES:
        out[desc.digest] = "index"
        for child in images.parse_index(storage.read_json(namespace, desc), desc.media_type):
            if platform is None or images.platform_matches(child.platform, platform):
                with contextlib.suppress(NotFound):
                    storage.store.get_content(namespace, child.digest)
                    _collect(storage, namespace, child, out, platform, depth + 1)
    elif desc.media_type in images.MANIFEST_TYPES:
        out[desc.digest] = "manifest"
        manifest = images.parse_manifest(storage.read_json(namespace, desc), desc.media_type)
        out[manifest.config.digest] = "config"
        for layer in manifest.layers:
            storage.store.get_content(namespace, layer.digest)
            out[layer.digest] = "layer"


def image_usage(storage: Storage, namespace: str, target: Descriptor) -> dict[str, Any]:
    """What `images ls` shows, as ctr does: `content_size`, the bytes of the image for
    this host (index, manifest, config and layers; another platform's when the host's is
    not held), and `platforms`, those its index lists (its config's, for a manifest)."""
    size = target.size
    platforms: list[str] = []
    try:
        manifests = [target]
        if target.media_type in images.INDEX_TYPES:
            entries = images.parse_index(storage.read_json(namespace, target), target.media_type)
            platforms = [images.format_platform(e.platform) for e in entries]
            host = images.host()
            held, _absent = platforms_held(storage, namespace, target)
            manifests = sorted(held, key=lambda e: not images.platform_matches(e.platform, host))
        if manifests:
            mdesc = manifests[0]
            manifest = images.parse_manifest(storage.read_json(namespace, mdesc), mdesc.media_type)
            size += 0 if mdesc is target else mdesc.size
            size += manifest.config.size + sum(layer.size for layer in manifest.layers)
            if not platforms:
                platforms = [_config_platform(storage, namespace, manifest.config)]
    except (NotFound, InvalidArgument):
        pass  # a broken or partial image still lists, with what is known
    return {"content_size": size, "platforms": platforms}


def _config_platform(storage: Storage, namespace: str, config: Descriptor) -> str:
    doc = images.parse_document(storage.read_json(namespace, config), "image config")
    return images.format_platform(
        {k: doc.get(k) for k in ("os", "architecture", "variant") if isinstance(doc.get(k), str)}
    )


def _full_ref(name: str) -> str:
    """docker's normalisation (busybox -> docker.io/library/busybox:latest); a name that is
    not a reference is kept as it is."""
    if not name:
        return name
    try:
        return normalize(name)
    except InvalidArgument:
        return name


def _docker_tag(name: str) -> str:
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name
