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


def build_oci_archive(
    root: str,
    out: str,
    *,
    name: str = "docker.io/library/busybox:test",
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write an OCI image-layout tar of `root` to `out`; return the digests."""
    raw = layer_tar(root)
    gz = gzip.compress(raw, compresslevel=6, mtime=0)
    config_doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd or ["sh"],
            **(extra_config or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [_digest(raw)]},
        "history": [{"created_by": "berth tests/images.py"}],
    }
    config = json.dumps(config_doc, sort_keys=True).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": LAYER_GZIP, "digest": _digest(gz), "size": len(gz)}],
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
    for blob in (gz, config, manifest):
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
        "layer": _digest(gz),
        "diff_id": _digest(raw),
    }
