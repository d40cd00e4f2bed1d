"""Image archives: import an OCI image layout or a `docker save` tar, export an OCI layout
(with a docker-compatible manifest.json). Functions over a `Storage`: blobs go through its
content store under a lease, images into its metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from typing import Any

from berth.daemon.documents import load_json
from berth.daemon.metadata import validate_image_name
from berth.daemon.reference import normalize
from berth.daemon.storage import images
from berth.daemon.storage.content import validate_digest
from berth.daemon.storage.images import Descriptor
from berth.daemon.storage.service import GC_REF_CONTENT, MAX_ARCHIVE_DOCUMENT, Storage
from berth.shim.wire.errors import InvalidArgument, NotFound


def import_archive(
    storage: Storage,
    namespace: str,
    path: str,
    *,
    name: str | None = None,
    unpack: bool = True,
    snapshotter: str | None = None,
    lease_id: str | None = None,
) -> list[dict[str, Any]]:
    """Import an OCI image-layout tar or a `docker save` archive from `path`."""
    if not os.path.isabs(path):
        raise InvalidArgument("the archive path must be absolute")
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the `with` below
    except (OSError, tarfile.TarError) as exc:
        raise InvalidArgument(f"cannot read archive {path}: {exc}") from None
    with tar, storage.lease(namespace, lease_id) as lease:
        members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isreg()}

        def read_member(member_name: str, cap: int = MAX_ARCHIVE_DOCUMENT) -> bytes:
            m = members.get(member_name.lstrip("./"))
            if m is None:
                raise InvalidArgument(f"archive has no {member_name}")
            if m.size > cap:
                raise InvalidArgument(f"{member_name} in the archive is larger than {cap} bytes")
            f = tar.extractfile(m)
            assert f is not None
            return f.read(cap + 1)

        def blob(desc: Descriptor, labels: dict[str, str] | None = None) -> None:
            m = members.get(f"blobs/sha256/{validate_digest(desc.digest)[7:]}")
            if m is None:
                raise InvalidArgument(f"archive lacks blob {desc.digest}")
            if m.size != desc.size:
                raise InvalidArgument(f"blob {desc.digest} is {m.size} bytes, not {desc.size}")
            f = tar.extractfile(m)
            assert f is not None
            storage.put_blob(namespace, f, desc.digest, desc.size, labels, lease)

        if "index.json" in members:
            created = _import_oci(storage, namespace, read_member, blob, name)
        elif "manifest.json" in members:
            created = _import_docker(storage, namespace, read_member, members, tar, name, lease)
        else:
            raise InvalidArgument(
                "not an OCI image layout or docker archive (no index.json or manifest.json)"
            )
        for image in created:
            if unpack:
                storage.unpack(namespace, image["name"], snapshotter, lease_id=lease)
        return created


def _walk(storage: Storage, namespace: str, desc: Descriptor, fetch: Any, depth: int = 0) -> None:
    """Store `desc` and everything it references, children first."""
    if depth > 4:
        raise InvalidArgument("image indexes nested too deeply")
    if desc.media_type in images.INDEX_TYPES:
        data = fetch(desc, read=True)
        refs = {}
        for i, child in enumerate(images.parse_index(data, desc.media_type)):
            _walk(storage, namespace, child, fetch, depth + 1)
            refs[f"{GC_REF_CONTENT}.m.{i}"] = child.digest
        fetch(desc, labels=refs)
    elif desc.media_type in images.MANIFEST_TYPES:
        data = fetch(desc, read=True)
        manifest = images.parse_manifest(data, desc.media_type)
        refs = {f"{GC_REF_CONTENT}.config": manifest.config.digest}
        fetch(manifest.config)
        for i, layer in enumerate(manifest.layers):
            fetch(layer)
            refs[f"{GC_REF_CONTENT}.l.{i}"] = layer.digest
        fetch(desc, labels=refs)
    else:
        raise InvalidArgument(f"unsupported image media type {desc.media_type!r}")


def _import_oci(
    storage: Storage, namespace: str, read_member: Any, blob: Any, name: str | None
) -> list[dict[str, Any]]:
    layout = images.parse_document(read_member("oci-layout"), "oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise InvalidArgument("unsupported oci-layout version")
    entries = images.parse_index(read_member("index.json"), images.OCI_INDEX)
    if not entries:
        raise InvalidArgument("the archive's index.json lists no image")

    def fetch(desc: Descriptor, read: bool = False, labels: dict[str, str] | None = None) -> bytes:
        m_data = b""
        if read:
            m_data = read_member(f"blobs/sha256/{validate_digest(desc.digest)[7:]}")
            if "sha256:" + hashlib.sha256(m_data).hexdigest() != desc.digest:
                raise InvalidArgument(f"blob {desc.digest} does not match its digest")
        blob(desc, labels)
        return m_data

    created = []
    for entry in entries:
        _walk(storage, namespace, entry, fetch)
        image_name = (
            name
            if (name and len(entries) == 1)
            else (
                entry.annotations.get("io.containerd.image.name")
                or _full_ref(entry.annotations.get("org.opencontainers.image.ref.name", ""))
                or entry.digest
            )
        )
        created.append(
            storage.store.put_image(
                namespace, image_name, entry.to_wire(), {}, create=True, update=True
            )
        )
    return created


def _import_docker(
    storage: Storage,
    namespace: str,
    read_member: Any,
    members: dict[str, tarfile.TarInfo],
    tar: tarfile.TarFile,
    name: str | None,
    lease: str,
) -> list[dict[str, Any]]:
    manifest_list = load_json(
        read_member("manifest.json"), "manifest.json", max_size=MAX_ARCHIVE_DOCUMENT
    )
    if not isinstance(manifest_list, list) or not manifest_list:
        raise InvalidArgument("manifest.json must be a non-empty list")
    created = []
    for item in manifest_list:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("Config"), str)
            or not isinstance(item.get("Layers"), list)
        ):
            raise InvalidArgument("manifest.json entries need Config and Layers")
        config_data = read_member(item["Config"])
        images.parse_config(config_data)  # validates
        config_digest = storage.put_blob(namespace, config_data, lease_id=lease)
        layers: list[dict[str, Any]] = []
        for layer_name in item["Layers"]:
            if not isinstance(layer_name, str):
                raise InvalidArgument("manifest.json Layers must be strings")
            m = members.get(layer_name.lstrip("./"))
            if m is None:
                raise InvalidArgument(f"archive has no layer {layer_name}")
            f = tar.extractfile(m)
            assert f is not None
            head = f.read(2)
            f.seek(0)
            media = images.OCI_LAYER_GZIP if head == b"\x1f\x8b" else images.OCI_LAYER
            digest = storage.put_blob(namespace, f, size=m.size, lease_id=lease)
            layers.append({"mediaType": media, "digest": digest, "size": m.size})
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
        manifest_digest = storage.put_blob(namespace, manifest, labels=refs, lease_id=lease)
        target = {
            "media_type": images.OCI_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest),
        }
        tags = item.get("RepoTags") or []
        names = (
            [name]
            if name
            else [_full_ref(t) for t in tags if isinstance(t, str)] or [manifest_digest]
        )
        for image_name in names:
            created.append(
                storage.store.put_image(namespace, image_name, target, {}, create=True, update=True)
            )
    return created


def export_archive(
    storage: Storage,
    namespace: str,
    names: list[str],
    path: str,
    platform: dict[str, str] | None = None,
    all_platforms: bool = True,
) -> dict[str, Any]:
    """Write an OCI image-layout tar (with a docker-compatible manifest.json) of the
    images `names` to `path`. Deterministic: same images, same bytes."""
    if not os.path.isabs(path):
        raise InvalidArgument("the archive path must be absolute")
    blobs: dict[str, int] = {}
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
            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]
            if ":" in name.rsplit("/", 1)[-1]
            else "latest",
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
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:

        def add(arcname: str, data: bytes | None = None, blob_digest: str | None = None) -> None:
            info = tarfile.TarInfo(arcname)
            info.mtime = 0
            info.mode = 0o644
            if blob_digest is not None:
                info.size = storage.content.info(blob_digest).size
                with open(storage.content.path(blob_digest), "rb") as f:
                    tar.addfile(info, f)
            else:
                assert data is not None
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for digest in sorted(blobs):
            add(f"blobs/sha256/{digest[7:]}", blob_digest=digest)
        add("index.json", index)
        add("manifest.json", json.dumps(docker_manifest, sort_keys=True).encode())
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    os.replace(tmp, path)
    return {"path": path, "blobs": len(blobs), "images": len(names)}


def _collect(
    storage: Storage,
    namespace: str,
    desc: Descriptor,
    out: dict[str, int],
    platform: dict[str, str] | None,
    depth: int = 0,
) -> None:
    if depth > 4:
        raise InvalidArgument("image indexes nested too deeply")
    out[desc.digest] = desc.size
    if desc.media_type in images.INDEX_TYPES:
        for child in images.parse_index(storage.read_json(namespace, desc), desc.media_type):
            if platform is None or images.platform_matches(child.platform, platform):
                with contextlib.suppress(NotFound):
                    storage.store.get_content(namespace, child.digest)
                    _collect(storage, namespace, child, out, platform, depth + 1)
    elif desc.media_type in images.MANIFEST_TYPES:
        manifest = images.parse_manifest(storage.read_json(namespace, desc), desc.media_type)
        out[manifest.config.digest] = manifest.config.size
        for layer in manifest.layers:
            storage.store.get_content(namespace, layer.digest)
            out[layer.digest] = layer.size


def _full_ref(name: str) -> str:
    """docker's normalisation (busybox -> docker.io/library/busybox:latest); a name that is
    not a reference (a bare tag in an OCI layout, say) is kept as it is."""
    if not name or ("/" not in name and ":" not in name):
        return name  # a bare tag: no repository to normalise against
    try:
        return normalize(name)
    except InvalidArgument:
        return name


def _docker_tag(name: str) -> str:
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name
