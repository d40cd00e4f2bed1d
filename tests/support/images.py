"""Build OCI images from a directory, deterministically (for tests and the benchmark).

The result is an OCI image-layout tar archive (oci-layout, index.json, blobs/sha256/...)
with one gzip layer, as `ctr images import` and berth's importer take it. Same input,
same bytes: entries sorted, owners 0, fixed mtimes, gzip without a timestamp.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
EPOCH = 0


def _manifest(config: bytes, layers: list[tuple[bytes, str]]) -> bytes:
    """An OCI image manifest of `config` and its (blob, media type) layers."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [
                {"mediaType": media, "digest": _digest(blob), "size": len(blob)}
                for blob, media in layers
            ],
        },
        sort_keys=True,
    ).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(root: str) -> bytes:
    """An uncompressed, deterministic tar of `root`'s contents."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                paths.append(os.path.join(dirpath, name))
        for path in sorted(paths):
            rel = os.path.relpath(path, root)
            if rel.startswith(".berth-rootfs"):
                continue
            info = tar.gettarinfo(path, arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = EPOCH
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(raw: bytes, compression: str) -> tuple[bytes, str]:
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=6, mtime=0), LAYER_GZIP
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(raw), LAYER_GZIP.replace("gzip", "zstd")
    return raw, LAYER_GZIP.removesuffix("+gzip")


def build_oci_archive(
    root: str | list[str],
    out: str,
    *,
    name: str = "docker.io/library/busybox:test",
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    extra_config: dict[str, Any] | None = None,
    compression: str = "gzip",
    raw_layers: list[bytes] | None = None,
) -> dict[str, Any]:
    """Write an OCI image-layout tar of `root` (one directory per layer) to `out`;
    `raw_layers` (uncompressed tars, e.g. hostile ones) are added on top."""
    roots = [root] if isinstance(root, str) else root
    raws = [layer_tar(r) for r in roots] + list(raw_layers or [])
    blobs_and_types = [compress(raw, compression) for raw in raws]
    config_doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd or ["sh"],
            **(extra_config or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [_digest(raw) for raw in raws]},
        "history": [{"created_by": "berth tests/images.py"}],
    }
    config = json.dumps(config_doc, sort_keys=True).encode()
    manifest = _manifest(config, blobs_and_types)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": MANIFEST,
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": index,
    }
    for blob in [b for b, _ in blobs_and_types] + [config, manifest]:
        files["blobs/sha256/" + _digest(blob)[7:]] = blob
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = EPOCH
            tar.addfile(info)
        for arcname in sorted(files):
            data = files[arcname]
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            info.mode = stat.S_IMODE(0o644)
            info.mtime = EPOCH
            tar.addfile(info, io.BytesIO(data))
    return {
        "manifest": _digest(manifest),
        "config": _digest(config),
        "layers": [_digest(b) for b, _ in blobs_and_types],
        "diff_ids": [_digest(raw) for raw in raws],
    }


def build_docker_archive(
    root: str, out: str, *, tag: str = "busybox:docker", cmd: list[str] | None = None
) -> str:
    """A `docker save`-style archive (manifest.json, <id>.json, <layer>/layer.tar) of
    `root`; returns the config digest."""
    raw = layer_tar(root)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd or ["sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(raw)]},
        },
        sort_keys=True,
    ).encode()
    config_id = _digest(config)[7:]
    layer_dir = _digest(raw)[7:]
    files = {
        f"{config_id}.json": config,
        f"{layer_dir}/layer.tar": raw,
        f"{layer_dir}/VERSION": b"1.0",
        "manifest.json": json.dumps(
            [
                {
                    "Config": f"{config_id}.json",
                    "RepoTags": [tag],
                    "Layers": [f"{layer_dir}/layer.tar"],
                }
            ]
        ).encode(),
        "repositories": json.dumps({tag.split(":")[0]: {tag.split(":")[1]: layer_dir}}).encode(),
    }
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for arcname in sorted(files):
            info = tarfile.TarInfo(arcname)
            info.size = len(files[arcname])
            info.mtime = EPOCH
            tar.addfile(info, io.BytesIO(files[arcname]))
    return _digest(config)


# --- building blocks for archives and registries of any shape ---------------------------

INDEX = "application/vnd.oci.image.index.v1+json"


def image_blobs(
    raws: list[bytes],
    *,
    cmd: list[str] | None = None,
    architecture: str = "amd64",
    variant: str = "",
    compression: str = "gzip",
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One image's blobs (layers from the uncompressed tars `raws`, config, manifest) by
    digest, and its manifest's descriptor with the platform set (for an index)."""
    layers = [compress(raw, compression) for raw in raws]
    config_doc: dict[str, Any] = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": cmd or ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(raw) for raw in raws]},
    }
    if variant:
        config_doc["variant"] = variant
    config = json.dumps(config_doc, sort_keys=True).encode()
    manifest = _manifest(config, layers)
    blobs = {_digest(b): b for b, _ in layers} | {_digest(config): config}
    blobs[_digest(manifest)] = manifest
    platform = {"os": "linux", "architecture": architecture} | (
        {"variant": variant} if variant else {}
    )
    desc = {
        "mediaType": MANIFEST,
        "digest": _digest(manifest),
        "size": len(manifest),
        "platform": platform,
    }
    return desc, blobs


def index_blob(manifests: list[dict[str, Any]]) -> tuple[dict[str, Any], bytes]:
    """An OCI index of `manifests` (descriptors), and its descriptor."""
    data = json.dumps(
        {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}, sort_keys=True
    ).encode()
    return {"mediaType": INDEX, "digest": _digest(data), "size": len(data)}, data


def write_oci_layout(out: str, images: dict[str, dict[str, Any]], blobs: dict[str, bytes]) -> None:
    """An OCI image-layout tar: index.json lists `images` (name -> top descriptor), and
    the blobs given (only those: an archive may lack some) are in blobs/sha256."""
    entries = [
        {**desc, "annotations": {"io.containerd.image.name": name}}
        for name, desc in sorted(images.items())
    ]
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps({"schemaVersion": 2, "manifests": entries}).encode(),
    }
    files.update({f"blobs/sha256/{digest[7:]}": data for digest, data in blobs.items()})
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for arcname in sorted(files):
            info = tarfile.TarInfo(arcname)
            info.size, info.mode, info.mtime = len(files[arcname]), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(files[arcname]))


def schema1_image(
    steps: list[tuple[bytes | None, dict[str, Any]]], *, signed: bool = False
) -> tuple[bytes, dict[str, bytes], str]:
    """A Docker schema 1 manifest and its blobs. `steps`, oldest first: (uncompressed
    layer tar, or None for an empty `throwaway` step; extra v1Compatibility keys). Signed:
    the `+prettyjws` form, with a signature block as libtrust lays it out (not a valid
    signature: no client checks it)."""
    empty = gzip.compress(b"\0" * 1024, mtime=0)  # the empty tar's blob, as docker wrote it
    blobs: dict[str, bytes] = {}
    fs_layers: list[dict[str, str]] = []
    history: list[dict[str, str]] = []
    parent = ""
    for i, (raw, extra) in enumerate(steps):
        blob = gzip.compress(raw, mtime=0) if raw is not None else empty
        blobs[_digest(blob)] = blob
        v1 = {"id": f"{i + 1:064x}", "created": f"2020-01-0{i + 1}T00:00:00Z", **extra}
        if parent:
            v1["parent"] = parent
        if raw is None:
            v1["throwaway"] = True
        parent = v1["id"]
        fs_layers.insert(0, {"blobSum": _digest(blob)})
        history.insert(0, {"v1Compatibility": json.dumps(v1, sort_keys=True)})
    doc = {
        "schemaVersion": 1,
        "name": "old/app",
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": fs_layers,
        "history": history,
    }
    payload = json.dumps(doc, indent=3).encode()
    if not signed:
        return payload, blobs, _digest(payload)
    # libtrust: the payload up to its closing brace, then the signatures, then the tail.
    cut = payload.rstrip().rfind(b"}")
    body = payload[:cut].rstrip()
    tail = payload[len(body) :]
    protected = {
        "formatLength": len(body),
        "formatTail": base64.urlsafe_b64encode(tail).rstrip(b"=").decode(),
        "time": "2020-01-01T00:00:00Z",
    }
    signature = {
        "header": {"alg": "ES256"},
        "signature": "c2lnbmF0dXJl",
        "protected": base64.urlsafe_b64encode(json.dumps(protected).encode()).rstrip(b"=").decode(),
    }
    signed_doc = body + b',\n   "signatures": ' + json.dumps([signature], indent=3).encode()
    return signed_doc + tail, blobs, _digest(payload)
