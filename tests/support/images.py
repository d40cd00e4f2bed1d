"""Build OCI images from a directory, deterministically (for tests and the benchmark).

The result is an OCI image-layout tar archive (oci-layout, index.json, blobs/sha256/...)
with one gzip layer, as `ctr images import` and berth's importer take it. Same input,
same bytes: entries sorted, owners 0, fixed mtimes, gzip without a timestamp.
"""

from __future__ import annotations

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
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [
                {"mediaType": media, "digest": _digest(blob), "size": len(blob)}
                for blob, media in blobs_and_types
            ],
        },
        sort_keys=True,
    ).encode()
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
