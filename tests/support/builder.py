"""A builder on berth's API, as BuildKit drives containerd's: a snapshot on an image,
changed by the caller through its mounts, diffed into a layer, and an image with that
layer on top assembled from content the builder writes itself (config, manifest, GC
references). The image-tool suites (skopeo/umoci, podman) push what it makes, and run
those tools with PRIVATE_VAR_LIB."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from berth.shim.mount import Mount, temporary_mount
from tests.support.helpers import Daemon

# skopeo and podman run as root keep a blob cache in /var/lib/containers whatever their
# options say: prefixed with this, a tool runs in a mount namespace of its own with a
# tmpfs over /var/lib, so a test writes nothing outside its temp dirs.
PRIVATE_VAR_LIB = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    'mount -t tmpfs -o mode=0755 tmpfs /var/lib && exec "$0" "$@"',
]


def ok(r: subprocess.CompletedProcess[bytes]) -> str:
    """A CLI's stdout, once it succeeded (a failure shows its stderr)."""
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def tar_dir(directory: str, out: str) -> str:
    """A tar of a layout directory's contents, as `tar -C DIR -cf OUT .` writes it."""
    subprocess.run(["tar", "-C", directory, "-cf", out, "."], check=True, timeout=120)
    return out


def manifest_of(daemon: Daemon, name: str, namespace: str | None = None) -> dict[str, Any]:
    """Image `name`'s manifest, with its `digest` and the image's `target_media_type`."""
    with daemon.client(namespace) as c:
        target = c.call("images.get", {"name": name})["target"]
        doc: dict[str, Any] = json.loads(
            c.call("content.read", {"digest": target["digest"]})["data"]
        )
    doc["digest"] = target["digest"]
    doc["target_media_type"] = target["media_type"]
    return doc


def put(c: Any, data: bytes, labels: dict[str, str] | None = None) -> str:
    """Store `data` as content through the API (a builder's ingest); its digest."""
    ref = f"put-{uuid.uuid4().hex[:8]}"
    c.call("content.write.open", {"ref": ref})
    c.call("content.write.chunk", {"ref": ref, "data": data})
    digest: str = c.call("content.write.commit", {"ref": ref, "labels": labels or {}})["digest"]
    return digest


@dataclass
class Built:
    """What `layer_on` made, once its block is left."""

    digest: str = ""  # the new image's manifest
    diff_id: str = ""  # the new layer's uncompressed digest


@contextlib.contextmanager
def layer_on(
    daemon: Daemon, base_name: str, name: str, cmd: list[str]
) -> Iterator[tuple[Path, Built]]:
    """The root of a writable snapshot on image `base_name`, for the block to change; on
    leaving it, image `name` is that image plus the diff as a layer, running `cmd`."""
    base = manifest_of(daemon, base_name)
    built = Built()
    with daemon.client() as c:
        lease = c.call("leases.create", {"id": "build", "expire_seconds": 0})["id"]
        chain = c.call("images.unpack", {"name": base_name})["chain_id"]
        work = c.call("snapshots.prepare", {"key": "work", "parent": chain}, lease=lease)["mounts"]
        lower = c.call("snapshots.view", {"key": "lower", "parent": chain}, lease=lease)["mounts"]
        mounts = [Mount.from_wire(m) for m in work]
        with temporary_mount(mounts, os.path.join(daemon.dir, "mnt")) as root:
            yield Path(root), built
        layer = c.call("diff.diff", {"lower": lower, "upper": work}, lease=lease)["diff"]
        built.diff_id = layer["annotations"]["containerd.io/uncompressed"]
        config = json.loads(c.call("content.read", {"digest": base["config"]["digest"]})["data"])
        config["rootfs"]["diff_ids"].append(built.diff_id)
        config["config"]["Cmd"] = cmd
        config_data = json.dumps(config).encode()
        config_desc = {
            "mediaType": base["config"]["mediaType"],
            "digest": put(c, config_data),
            "size": len(config_data),
        }
        layers = [
            *base["layers"],
            {"mediaType": layer["media_type"], "digest": layer["digest"], "size": layer["size"]},
        ]
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": base["mediaType"],
                "config": config_desc,
                "layers": layers,
            }
        ).encode()
        refs = {"containerd.io/gc.ref.content.config": config_desc["digest"]}
        refs |= {f"containerd.io/gc.ref.content.l.{i}": x["digest"] for i, x in enumerate(layers)}
        built.digest = put(c, manifest, refs)
        target = {"media_type": base["mediaType"], "digest": built.digest, "size": len(manifest)}
        c.call("images.create", {"name": name, "target": target})
        c.call("leases.delete", {"id": lease})
